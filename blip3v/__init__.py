"""blip3v: BLIP-3-Video (xGen-MM-Vid) at the edge.

The import package. Design folders map to subpackages: `blip3v.model` (PyTorch reference),
`blip3v.export`, `blip3v.runtime`, `blip3v.kernels`, `blip3v.calibration`, `blip3v.data`.
Importing this package imports nothing heavy (no torch), so the runtime stays torch-free.
"""

__version__ = "0.1.0"
