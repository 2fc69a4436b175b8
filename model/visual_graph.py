"""The visual call captured as one CUDA graph: pixels (B, T, 3, S, S) -> video tokens (B, M, D_lm).

The visual path (SigLIP, resampler, gTTM, norm + projection) is hundreds of small kernels per clip;
run eagerly on a GPU its time is mostly the host launching them (issue 23: the gTTM alone took
12-14 ms of a 24 ms visual call on an H200, its FLOP floor far below). Its shapes are fixed by the
model (T frames at S px), so the whole call is captured once per batch size and replayed: the
kernels run back to back with no Python between them. Inside the capture the gTTM takes its fast
path (blip3v.model.temporal: fused q/k/v, SDPA, the fused TokenLearner kernel).

    visual = GraphedVisual(model)
    tokens = visual(pixels)          # CUDA: captured on the first call per shape; CPU: eager

On the CPU there is nothing to capture and the call is `model.encode_video` itself.
`TorchBackend` (blip3v.model.generate) runs its visual call through this on CUDA.

    python -m blip3v.model.visual_graph [--frames 8] [--repeats 20]
        # GPU: the released sizes, eager vs graphed, the gTTM reference vs fast, the FLOP floor (JSON)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from blip3v.model.xgenmm import XGenMMVideoModel


class CapturedCall:
    """`fn(*inputs)` captured as a CUDA graph on static copies of `inputs`: each call copies its
    arguments in, replays, and returns a copy of the output (so it outlives the next replay).
    Warm-up runs on a side stream first: Triton compiles its kernels, cuBLAS/cuDNN pick algorithms,
    none of which may happen during capture."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], warmup: int = 2):
        self.inputs = tuple(t.clone() for t in inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        for static, given in zip(self.inputs, args):
            static.copy_(given)
        self.graph.replay()
        return self.output.clone()


class GraphedVisual:
    """`model.encode_video` as a CUDA graph per (shape, dtype) of the pixels, the `max_graphs` most
    recent kept (each holds its activations' memory); eager on the CPU."""

    def __init__(self, model: XGenMMVideoModel, max_graphs: int = 2):
        self.model = model
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple[Any, ...], CapturedCall] = OrderedDict()

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.device.type != "cuda":
            return self.model.encode_video(pixels)
        key = (tuple(pixels.shape), pixels.dtype, pixels.device)
        call = self.graphs.get(key)
        if call is None:
            call = self.graphs[key] = CapturedCall(self.model.encode_video, (pixels,))
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        return call(pixels)


# ---------------------------------------------------------------------------------------------
# Benchmark (GPU)
# ---------------------------------------------------------------------------------------------

def released_visual(frames: int, dtype: torch.dtype = torch.float16) -> XGenMMVideoModel:
    """xgen-mm-vid-128 at the released sizes with random weights, built on the GPU; the decoder cut
    to one layer (only the visual path is timed here)."""
    from blip3v.model.config import preset

    cfg = preset("xgen-mm-vid-128")
    cfg.num_frames = frames
    cfg.text_config["num_hidden_layers"] = 1
    with torch.device("cuda"):
        return XGenMMVideoModel(cfg).to(dtype).eval().requires_grad_(False)


def bench(frames: int = 8, repeats: int = 20) -> dict[str, Any]:
    """Per variant the median GPU ms (CUDA events) of the visual call and of the gTTM alone, eager
    and graphed, reference and fast gTTM; the outputs' max abs difference from the eager reference;
    the call's FLOPs over the fp16 matmul rate measured here."""
    from torch.utils.flop_counter import FlopCounterMode

    from blip3v.benchmarks.common import cuda_times_ms, gpu_ceilings

    model = released_visual(frames)
    encoder = model.vlm.vision_tokenizer.temporal_encoder
    size = model.config.image_size
    pixels = torch.randn(1, frames, 3, size, size, device="cuda", dtype=torch.float16)
    out: dict[str, Any] = {"frames": frames, "image_size": size, "tokens": int(model.config.num_video_tokens),
                           "dtype": "fp16", "gpu": torch.cuda.get_device_name(0), "ms": {}, "max_abs_diff": {}}

    def median_ms(fn: Callable[[], object]) -> float:
        return statistics.median(cuda_times_ms(fn, repeats, warmup=3))

    with torch.inference_mode():
        latents = model.frame_latents(pixels)  # (1, T, N, D)
        out["ms"]["vision_tower + resampler (eager)"] = median_ms(lambda: model.frame_latents(pixels))
        encoder.path = "reference"
        reference = model.encode_video(pixels).float()
        ttm_reference = encoder(latents).float()
        out["ms"]["gttm reference (eager)"] = median_ms(lambda: encoder(latents))
        out["ms"]["visual, gttm reference (eager)"] = median_ms(lambda: model.encode_video(pixels))
        encoder.path = "fast"
        out["ms"]["gttm fast (eager)"] = median_ms(lambda: encoder(latents))
        out["ms"]["visual, gttm fast (eager)"] = median_ms(lambda: model.encode_video(pixels))
        ttm_graph = CapturedCall(encoder, (latents,))
        out["ms"]["gttm fast (CUDA graph)"] = median_ms(lambda: ttm_graph(latents))
        out["max_abs_diff"]["gttm fast (CUDA graph) vs reference"] = (ttm_graph(latents).float() - ttm_reference).abs().max().item()
        encoder.path = "auto"
        visual = GraphedVisual(model)
        out["ms"]["visual (CUDA graph, gttm fast)"] = median_ms(lambda: visual(pixels))
        out["max_abs_diff"]["visual (CUDA graph) vs eager reference"] = (visual(pixels).float() - reference).abs().max().item()
        out["reference_abs_max"] = reference.abs().max().item()
        with FlopCounterMode(display=False) as counter:
            model.encode_video(pixels)
    ceilings = gpu_ceilings()
    out["flops"] = counter.get_total_flops()
    out["ceilings"] = ceilings
    out["floor_ms"] = out["flops"] / ceilings["matmul_fp16_tflop_per_s"] / 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=8, help="frames per clip (default 8, as released)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per variant (default 20)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("visual_graph: no CUDA GPU here, nothing to capture (the CPU checks are tests/test_gpu_paths.py)")
        return 0
    print(json.dumps(bench(args.frames, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
