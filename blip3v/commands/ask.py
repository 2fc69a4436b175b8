"""`blip3v ask VIDEO QUESTION`: answer a question about a video.

The PyTorch backend runs a checkpoint directory (`--model`, default: the shipped demo model);
the ONNX Runtime / TensorRT backends run an exported engine directory (`--engine`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def sampling_options(f):
    """Generation options shared by `ask` and `eval`."""
    f = click.option("--seed", type=int, default=None, help="Random seed for sampling (temperature > 0).")(f)
    f = click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                     help="Nucleus sampling: keep the smallest set of tokens with this probability mass.")(f)
    f = click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="0 = greedy decoding (the reference behaviour); > 0 samples.")(f)
    f = click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Stop after this many generated tokens (also stops at <|end|> / eos).")(f)
    return f


def torch_options(f):
    """Options of the PyTorch backend's decoder (ignored by the engine backends)."""
    f = click.option("--group-size", type=click.Choice(["32", "64", "128", "256"]), default="128", show_default=True,
                     help="INT4 quantization group size along the input dimension.")(f)
    f = click.option("--weights", type=click.Choice(["dense", "int4"]), default="dense", show_default=True,
                     help="Decoder weights: dense, or INT4 weight-only (round-to-nearest) for the static decoder.")(f)
    f = click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
                     help="PyTorch backend dtype. Default: fp32 on cpu, fp16 on cuda.")(f)
    f = click.option("--decoder", type=click.Choice(["auto", "reference", "static"]), default="auto", show_default=True,
                     help="PyTorch decoder: transformers' DynamicCache (reference) or static KV buffers with a "
                          "CUDA-graph step (static). auto = static on cuda or with --weights int4.")(f)
    return f


def open_backend(model: str | None, engine: str | None, backend: str | None, device: str,
                 dtype: str | None = None, decoder: str = "auto", weights: str = "dense", group_size: str = "128"):
    """Resolves --model/--engine/--backend into a backend object with `.ask(...)`."""
    from blip3v.errors import InputError

    if model and engine:
        raise InputError("give either --model (PyTorch checkpoint) or --engine (exported engine), not both")
    if backend is None:
        backend = "onnxruntime" if engine else "torch"
    if backend == "torch":
        if engine:
            raise InputError("--backend torch runs a checkpoint: use --model DIR, not --engine")
        import torch

        from blip3v.assets import DEMO_MODEL
        from blip3v.model.generate import TorchBackend

        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            dtype or ("fp16" if device == "cuda" else "fp32")]
        return TorchBackend.load(model or DEMO_MODEL, device=device, dtype=torch_dtype, decoder=decoder,
                                 weights=weights, group_size=int(group_size))
    if weights != "dense" or dtype is not None:
        raise InputError("--weights/--dtype apply to the PyTorch backend; an engine's precision is fixed at export")
    if not engine:
        raise InputError(f"--backend {backend} runs an exported engine: give --engine DIR (see `blip3v export`)")
    if backend == "onnxruntime":
        from blip3v.runtime.ort_backend import OrtBackend

        return OrtBackend.load(engine, device=device)
    from blip3v.runtime.trt_backend import TrtBackend

    return TrtBackend.load(engine)


@click.command("ask")
@click.argument("video", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("question")
@click.option("--model", type=click.Path(path_type=str), default=None,
              help="Checkpoint directory (PyTorch backend). Default: the shipped demo model.")
@click.option("--engine", type=click.Path(path_type=str), default=None,
              help="Exported engine directory (from `blip3v export`); selects --backend onnxruntime.")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Inference backend. Default: torch with --model, onnxruntime with --engine.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="Where to run: cpu, cuda, or (onnxruntime only) the TensorRT execution provider.")
@torch_options
@sampling_options
@click.option("--json", "as_json", is_flag=True,
              help="Print {answer, video_tokens, timings_ms} as JSON instead of streaming text.")
def command(video: Path, question: str, model, engine, backend, device, decoder, dtype, weights, group_size,
            max_new_tokens, temperature, top_p, seed, as_json: bool) -> None:
    """Answer QUESTION about VIDEO (mp4/mkv/webm/avi/ts/gif or a still image).

    \b
    Examples:
      blip3v ask clip.mp4 "which way does the circle move?"
      blip3v ask clip.mp4 "what colour does the square turn?" --json
      blip3v ask clip.mp4 "what happens?" --engine engines/demo --device cpu
    """
    from blip3v.runtime.generation import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    runner = open_backend(model, engine, backend, device, dtype, decoder, weights, group_size)
    if as_json:
        result = runner.ask(video, question, sampling)
        click.echo(json.dumps({
            "answer": result.text,
            "video_tokens": result.video_tokens,
            "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
        }))
        return

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = runner.ask(video, question, sampling, on_text=show)
    sys.stdout.write("\n")
