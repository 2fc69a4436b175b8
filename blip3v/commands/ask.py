"""`blip3v ask VIDEO QUESTION...`: answer questions about a video, the clip decoded and encoded once.

The PyTorch backend runs a checkpoint directory (`--model`, default: the shipped demo model); the
ONNX Runtime / TensorRT backends run an exported engine directory (`--engine`). Every question
after the first reuses the clip's encoding and its cached prompt prefix (blip3v.runtime.session).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from blip3v.runtime.backends import BACKENDS

REVISION_KEY = "blip3v.revision"  # click context meta entry set by --revision


def _check_seed(ctx, param, value):
    if value is not None and not 0 <= value < 2**63:
        raise click.BadParameter("must be in [0, 2^63)")
    return value


def _finite(ctx, param, value):
    if value is not None and value != value:  # NaN passes click's range checks
        raise click.BadParameter("must be a number, not nan")
    return value


def sampling_options(f):
    """Generation options shared by `ask`, `chat` and `eval`."""
    f = click.option("--seed", type=int, default=None, callback=_check_seed,
                     help="Random seed for sampling (temperature > 0), in [0, 2^63).")(f)
    f = click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                     callback=_finite, help="Nucleus sampling: keep the smallest set of tokens with this probability mass.")(f)
    f = click.option("--temperature", type=click.FloatRange(min=0, max=100), default=0.0, show_default=True,
                     callback=_finite, help="0 = greedy decoding (the reference behaviour); > 0 samples.")(f)
    f = click.option("--max-new-tokens", type=click.IntRange(min=1, max=4096), default=32, show_default=True,
                     help="Stop after this many generated tokens (also stops at <|end|> / eos).")(f)
    return f


def torch_options(f):
    """Options of the PyTorch backend's decoder (an engine's precision is fixed at export)."""
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


def _keep_revision(ctx, param, value):
    # Not passed as a parameter, so the commands sharing model_options keep their signatures;
    # open_engine reads it back from the context.
    ctx.meta[REVISION_KEY] = value


VIDEO_KEY = "blip3v.video_options"


def _video_option(name: str):
    """Stores a video option in the context (not a parameter), for open_engine to read."""
    def store(ctx, param, value):
        if value is not None:
            ctx.meta.setdefault(VIDEO_KEY, {})[name] = value
        return value
    return store


def video_options(f):
    """How frames are read: aspect handling, the decoder, the scaler (runtime/video.py load_clip)."""
    f = click.option("--video-scaler", type=click.Choice(["pillow", "ffmpeg"]), default=None, expose_value=False,
                     callback=_video_option("scaler"),
                     help="Resize with Pillow (default, the reference pixels) or FFmpeg's scaler straight to the "
                          "model's size (faster on large video, not bit-exact).")(f)
    f = click.option("--video-decoder", type=click.Choice(["auto", "cpu", "cuda"]), default=None, expose_value=False,
                     callback=_video_option("decoder"),
                     help="Video decoding: cpu (default), cuda (NVDEC through FFmpeg; an error where there is none), "
                          "auto (cuda where available, else cpu).")(f)
    f = click.option("--aspect", type=click.Choice(["squash", "pad"]), default=None, expose_value=False,
                     callback=_video_option("aspect"),
                     help="squash (default, as the released processor) or pad to a square with grey first "
                          "(as the authors' video inference script).")(f)
    return f


def model_options(f):
    """--model / --revision / --engine / --backend / --device and the video options, shared by every
    command that answers."""
    f = video_options(f)
    f = click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto",
                     show_default=True,
                     help="Where to run: auto = cuda where the backend can use it (torch sees a CUDA device; "
                          "onnxruntime-gpu), else cpu; cpu; cuda; or (onnxruntime only) the TensorRT "
                          "execution provider.")(f)
    f = click.option("--backend", type=click.Choice(BACKENDS), default=None,
                     help="Inference backend. Default: torch with --model, onnxruntime with --engine.")(f)
    f = click.option("--engine", type=click.Path(path_type=str), default=None,
                     help="Exported engine directory (from `blip3v export`); selects --backend onnxruntime.")(f)
    f = click.option("--revision", default=None, expose_value=False, callback=_keep_revision,
                     help="Branch, tag or commit of a Hub --model ORG/NAME. Default: main.")(f)
    f = click.option("--model", type=click.Path(path_type=str), default=None,
                     help="Checkpoint directory or Hub model id ORG/NAME (PyTorch backend; a local directory "
                          "of the same name wins). Default: the shipped demo model.")(f)
    return f


def open_engine(model, engine, backend, device, dtype=None, decoder="auto", weights="dense", group_size="128",
                revision=None, spinning=True, parallel_clips=False):
    """--model/--engine/--backend -> a blip3v.runtime.session.Engine. `revision` defaults to the
    command line's --revision; `spinning` and `parallel_clips` as in blip3v.runtime.backends.open_host."""
    from blip3v.runtime.backends import open_host
    from blip3v.runtime.session import Engine

    if revision is None:
        ctx = click.get_current_context(silent=True)
        revision = ctx.meta.get(REVISION_KEY) if ctx is not None else None
    options = {"dtype": dtype, "decoder": decoder, "weights": weights, "group_size": group_size}
    host = open_host(model, engine, backend, device, revision=revision, spinning=spinning,
                     parallel_clips=parallel_clips, **options)
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get(VIDEO_KEY):
        host.video_options = dict(ctx.meta[VIDEO_KEY])
        if host.video_options.get("decoder") == "auto":
            from blip3v.runtime.video import hardware_decoder_problem

            problem = hardware_decoder_problem()
            if problem:  # asked for by name, so said even off a terminal (stderr: --json stays clean)
                click.echo(f"note: --video-decoder auto: decoding on the CPU, {problem}", err=True)
    return Engine(host)


def open_backend(model, engine, backend, device, dtype=None, decoder="auto", weights="dense", group_size="128"):
    """The Engine, for commands (eval) that take `load_video` / `answer_batch` / `decode`; the next
    clips decode beside it, so ONNX Runtime's threads do not spin, and on an ONNX Runtime CPU engine
    several clips decode and encode side by side (`parallel_clips`)."""
    return open_engine(model, engine, backend, device, dtype, decoder, weights, group_size, spinning=False,
                       parallel_clips=True)


def check_video_arg(video: Path) -> None:
    """Fails on a missing or unreadable video before any model loads."""
    from blip3v.errors import InputError

    if not video.exists():
        raise InputError(f"{video}: no such file")
    if video.is_dir():
        raise InputError(f"{video}: is a directory, not a video")


def answer_json(question: str, result) -> dict:
    return {"question": question, "answer": result.text, "video_tokens": result.video_tokens,
            "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "reused_tokens": result.reused_tokens,
            "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()}}


@click.command("ask")
@click.argument("video", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("questions", nargs=-1)
@click.option("-q", "--question", "extra", multiple=True, help="A question (repeatable); adds to QUESTIONS.")
@model_options
@torch_options
@sampling_options
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object per question: {question, answer, video_tokens, finish_reason, "
                   "prompt_tokens, reused_tokens, timings_ms}.")
def command(video: Path, questions: tuple[str, ...], extra: tuple[str, ...], model, engine, backend, device, decoder,
            dtype, weights, group_size, max_new_tokens, temperature, top_p, seed, as_json: bool) -> None:
    """Answer each QUESTION about VIDEO (mp4/mkv/webm/avi/ts/gif or a still image).

    The clip is decoded and encoded once; every question after the first prefills only its own
    tokens on the clip's cached prompt prefix (see `reused_tokens` and `timings_ms` in --json).

    \b
    Examples:
      blip3v ask clip.mp4 "which way does the circle move?"
      blip3v ask clip.mp4 "what colour does the square turn?" "how many shapes are there?" --json
      blip3v ask clip.mp4 -q "what happens?" --engine engines/demo --device cpu
    """
    from blip3v.errors import InputError
    from blip3v.runtime.generation import SamplingConfig

    asked = list(questions) + list(extra)
    if not asked:
        raise InputError("give at least one question (QUESTION arguments or -q)")
    for q in asked:
        if not q.strip():
            raise InputError("the question is empty")
    check_video_arg(video)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    sampling.validate()
    runner = open_engine(model, engine, backend, device, dtype, decoder, weights, group_size)
    if getattr(runner.host, "device", None) == "cuda":
        # The first request's compilation and graph capture, paid and reported apart from the
        # answer's own timings; compiled kernels go to an on-disk cache (blip3v.runtime.warmup).
        from blip3v.runtime.warmup import configure_compile_caches, describe, warm_up

        caches = configure_compile_caches()
        click.echo(describe(warm_up(runner), caches), err=True)
    clip = runner.clip(video)
    for question in asked:
        if as_json:
            click.echo(json.dumps(answer_json(question, clip.ask(question, sampling))))
            continue
        if len(asked) > 1:
            click.echo(f"Q: {question}")
        clip.ask(question, sampling, on_text=_show)
        sys.stdout.write("\n")
        sys.stdout.flush()


def _show(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
