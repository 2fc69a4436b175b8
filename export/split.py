"""The visual path split in two graphs, for live video: each frame encoded once, as it arrives.

    FrameGraph:    pixel_values (B, 3, S, S) -> frame_latents (B, N, D_vis)
                   SigLIP + Perceiver resampler of each frame on its own (B frames, any B).
    TemporalGraph: frame_latents (B, T, N, D_vis) -> video_tokens (B, M, D_lm)
                   temporal encoder + norm + projection over T frames (T fixed at export).

Their composition is the fused `visual.onnx` (export/graphs.py VisualGraph): the reference model's
`encode_video` is `vision_tokenizer.tokens(frame_latents(pixels))` and `frame_latents` resamples
every frame independently (model/xgenmm.py, model/resampler.py), so a frame's N latents never change
once computed. A live stream therefore runs FrameGraph once per sampled frame and, per question,
only TemporalGraph over the last T frames' latents (blip3v.runtime.live).

Both are written beside the fused graph by `blip3v export` and named in the manifest's optional
`frame` and `temporal` sections (schema in blip3v.runtime.live.split_spec). Each is checked right
after export against the PyTorch reference (frame latents on fresh random pixels, video tokens on
fresh random latents), and their chain against the reference's video tokens on the same pixels the
fused graph was checked on, with export/engine.py's tolerances.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from blip3v.model.xgenmm import XGenMMVideoModel

FRAME, TEMPORAL = "frame.onnx", "temporal.onnx"
FRAME_LATENTS = "frame_latents"
GOLDEN_SEED = 20241022  # neither the tracing inputs' seed nor the fused graph's golden seed
GOLDEN_FRAMES = 2  # frames through the per-frame reference (SigLIP is the costly part)


class FrameGraph(nn.Module):
    """pixel_values (B, 3, S, S) -> frame_latents (B, N, D_vis): one frame at a time, batched."""

    def __init__(self, model: XGenMMVideoModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.frame_latents(pixel_values[:, None])[:, 0]  # (B, 1, N, D) -> (B, N, D)


class TemporalGraph(nn.Module):
    """frame_latents (B, T, N, D_vis) -> video_tokens (B, M, D_lm): what follows the resampler."""

    def __init__(self, model: XGenMMVideoModel):
        super().__init__()
        self.tokenizer = model.vlm.vision_tokenizer

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.tokens(latents)


def latent_shape(model: XGenMMVideoModel) -> tuple[int, int]:
    """(N latents per frame, D_vis) of the resampler."""
    tok = model.vlm.vision_tokenizer
    return int(tok.latents.shape[0]), int(tok.latents.shape[1])


def split_golden(model: XGenMMVideoModel, frames: int) -> dict[str, np.ndarray]:
    """Float32 reference outputs on fresh inputs (call before casting the model to fp16): the
    latents of `GOLDEN_FRAMES` random frames, and the video tokens of one clip of random latents."""
    g = torch.Generator().manual_seed(GOLDEN_SEED)
    size = model.config.image_size
    n, d = latent_shape(model)
    pixels = torch.randn(GOLDEN_FRAMES, 3, size, size, generator=g)
    latents = torch.randn(1, frames, n, d, generator=g)
    with torch.inference_mode():
        model = model.float()
        return {"pixel_values": pixels.numpy(), "frame_latents": FrameGraph(model)(pixels).numpy(),
                "latents": latents.numpy(), "video_tokens": TemporalGraph(model)(latents).numpy()}


def export_split(model: XGenMMVideoModel, directory: Path, frames: int, opset: int) -> list[str]:
    """Writes frame.onnx and temporal.onnx into `directory`; -> the file names written."""
    from blip3v.export.engine import _to_onnx

    dtype = next(model.parameters()).dtype
    size = model.config.image_size
    n, d = latent_shape(model)
    g = torch.Generator().manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    pixels = torch.randn(2, 3, size, size, generator=g).to(dtype)
    files = _to_onnx(FrameGraph(model).eval(), (pixels,), directory / FRAME, ["pixel_values"], [FRAME_LATENTS],
                     {"pixel_values": {0: batch}}, opset)
    latents = torch.randn(2, frames, n, d, generator=g).to(dtype)
    files += _to_onnx(TemporalGraph(model).eval(), (latents,), directory / TEMPORAL, [FRAME_LATENTS],
                      ["video_tokens"], {"latents": {0: batch}}, opset)
    return files


def check_split(directory: Path, golden: dict[str, np.ndarray], visual_golden: dict[str, np.ndarray],
                precision: str, dtype: np.dtype) -> dict[str, float]:
    """Max abs differences to the float32 reference; raises EngineError (one line) out of tolerance.

    frame: frame.onnx on random pixels; temporal: temporal.onnx on random latents; chain: frame.onnx
    then temporal.onnx on the pixels the fused graph was checked on (visual_golden), against the
    reference's video tokens for them."""
    from blip3v.export.engine import _check, _session

    frame, temporal = _session(directory / FRAME), _session(directory / TEMPORAL)
    latents = frame.run([FRAME_LATENTS], {"pixel_values": golden["pixel_values"].astype(dtype)})[0]
    out = {"frame_max_abs_diff": _check(f"{FRAME} output {FRAME_LATENTS}", latents.astype(np.float32),
                                        golden["frame_latents"], precision)}
    tokens = temporal.run(["video_tokens"], {FRAME_LATENTS: golden["latents"].astype(dtype)})[0]
    out["temporal_max_abs_diff"] = _check(f"{TEMPORAL} output video_tokens", tokens.astype(np.float32),
                                          golden["video_tokens"], precision)
    pixels = visual_golden["pixel_values"]  # (B, T, 3, S, S)
    b, t = pixels.shape[:2]
    flat = frame.run([FRAME_LATENTS], {"pixel_values": pixels.reshape(b * t, *pixels.shape[2:]).astype(dtype)})[0]
    chained = temporal.run(["video_tokens"], {FRAME_LATENTS: flat.reshape(b, t, *flat.shape[1:])})[0]  # (B, T, N, D)
    out["chain_max_abs_diff"] = _check(f"{FRAME} + {TEMPORAL} video_tokens", chained.astype(np.float32),
                                       visual_golden["video_tokens"], precision)
    return out


def manifest_sections(model: XGenMMVideoModel, frames: int) -> dict[str, Any]:
    """The manifest's `frame` and `temporal` sections (read by blip3v.runtime.live.split_spec)."""
    n, d = latent_shape(model)
    return {
        "frame": {"file": FRAME, "inputs": {"pixel_values": "pixel_values"}, "outputs": {"latents": FRAME_LATENTS},
                  "latents_per_frame": n, "latent_dim": d},
        "temporal": {"file": TEMPORAL, "inputs": {"latents": FRAME_LATENTS},
                     "outputs": {"video_tokens": "video_tokens"},
                     "num_frames": frames},
    }
