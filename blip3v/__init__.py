"""blip3v: BLIP-3-Video (xGen-MM-Vid) at the edge.

The import package. Design folders map to subpackages: `blip3v.model` (PyTorch reference),
`blip3v.export`, `blip3v.runtime`, `blip3v.kernels`, `blip3v.calibration`, `blip3v.data`.
Importing this package imports nothing heavy (no torch), so the runtime stays torch-free.

In a source checkout the design folders sit beside this package, not inside it, and hold no
`__init__.py`: a folder with one is a regular package, and Python run from the repository root
(`python -m pytest`) would import it in place of an installed distribution of the same name
(transformers >= 5.25 imports Hugging Face's `kernels`). Without one, the folder is at most a
namespace portion, which loses to any installed package. The folders join this package's search
path below; in an installed wheel they are inside it already.
"""

import os as _os

__version__ = "0.1.0"

_SOURCE_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_SOURCE_ROOT, "pyproject.toml")) and _os.path.isdir(
        _os.path.join(_SOURCE_ROOT, "runtime")):
    __path__.append(_SOURCE_ROOT)  # noqa: F821 (a package's own __path__)
