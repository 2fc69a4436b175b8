"""Video input shared by every backend: PyAV decoding, frame choice, preprocessing.

Numpy, Pillow and PyAV only: the ONNX Runtime and TensorRT backends run without torch.
"""

from __future__ import annotations

import numpy as np

# Official xGen-MM-Vid inference script: frames at linspace(4, N - 4, T) over the decoded frames.
EDGE_SKIP = 4


def frame_indices(num_frames: int, num_samples: int) -> list[int]:
    """Indices of the `num_samples` frames the model sees out of `num_frames` decoded ones.

    `linspace(4, N - 4, T)` cast to int, as in the official inference script. Clips too short for
    that window (N - 4 <= 4) fall back to `linspace(0, N - 1, T)`, repeating frames when N < T;
    a still image (N = 1) is repeated T times.
    """
    if num_frames < 1:
        raise ValueError("a clip needs at least one frame")
    if num_frames - EDGE_SKIP > EDGE_SKIP:
        points = np.linspace(EDGE_SKIP, num_frames - EDGE_SKIP, num_samples)
    else:
        points = np.linspace(0, num_frames - 1, num_samples)
    return [min(int(p), num_frames - 1) for p in points]
