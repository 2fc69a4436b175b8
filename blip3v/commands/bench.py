"""`blip3v bench`: latency per token budget, decode speed against peers, and the random Phi-3 they use.

The benchmarks live in `benchmarks/` (package `blip3v.benchmarks`); this module only parses options
and prints. Figures come with the device, versions, precision, backend and model they were taken on.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import click

from blip3v.errors import InputError

CPUS = os.cpu_count() or 1


def _csv(allowed: tuple[str, ...]):
    def parse(_ctx, _param, value: str) -> tuple[str, ...]:
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [v for v in items if v not in allowed]
        if bad or not items:
            raise click.BadParameter(f"{', '.join(bad) or 'nothing given'}; choose from {', '.join(allowed)}")
        return items
    return parse


def _write_results(path: str, section: str, text: str) -> None:
    from blip3v.benchmarks.common import write_section

    write_section(Path(path), section, text)
    click.echo(f"wrote {path}", err=True)


def _command_line() -> str:
    return "blip3v " + shlex.join(sys.argv[sys.argv.index("bench"):] if "bench" in sys.argv else sys.argv[1:])


@click.group("bench")
def command() -> None:
    """Measure latency: per token budget (`budget`) and decode speed against peers (`decode`)."""


@command.command("budget")
@click.option("--model", default="demo", show_default=True,
              help="demo (the shipped checkpoint), real (random weights at the released sizes) or a checkpoint DIR.")
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Decoder layers of --model real (32 = full Phi-3-mini depth).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="torch times each visual stage on its own; onnxruntime exports an engine per budget (one fused visual graph).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Default: fp32 on cpu, fp16 on cuda.")
@click.option("--budgets", default="16,32,64,128,none,raw", show_default=True,
              callback=_csv(("16", "32", "64", "128", "none", "raw")),
              help="Comma-separated: video tokens M, none (all T x N resampler latents), raw (every SigLIP token).")
@click.option("--temporal", type=click.Choice(["gttm_tl", "tl"]), default="gttm_tl", show_default=True,
              help="Temporal encoder that pools to M tokens.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs per budget (medians reported).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Excluded runs first.")
@click.option("--new-tokens", type=click.IntRange(min=2), default=16, show_default=True,
              help="Answer length: every request generates exactly this many tokens.")
@click.option("--video", type=click.Path(dir_okay=False), default=None, help="Clip to decode. Default: the sample clip.")
@click.option("--question", default="what colour does the triangle turn?", show_default=True)
@click.option("--decoder", type=click.Choice(["auto", "reference", "static"]), default="auto", show_default=True,
              help="torch backend decoder (auto: static KV + CUDA graph on cuda, transformers' cache on cpu).")
@click.option("--threads", type=click.IntRange(min=1), default=CPUS, show_default=True, help="CPU threads.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a PNG of stage latency per budget.")
@click.option("--results", type=click.Path(dir_okay=False), default=None,
              help="Write the table as a section of this Markdown file (e.g. benchmarks/RESULTS.md).")
@click.option("--title", default=None, help="Heading of that section (default: model, backend and device).")
@click.option("--quiet", is_flag=True, help="Nothing on stderr: no progress bar, no step lines.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"budgets": [{"budget", "tokens", "ttft_ms", "decode_ms_per_token", "stages_ms"}, ...], '
                   '"memory", ...} (step lines on stderr, no bar).')
def budget(model, layers, backend, device, precision, budgets, temporal, repeats, warmup, new_tokens, video,
           question, decoder, threads, plot, results, title, quiet, as_json) -> None:
    """Cost of each stage at each video-token budget M, beside no temporal encoder and raw SigLIP tokens.

    \b
    TTFT is the time from the encoded video to the first answer token (splice + prefill), the part
    the budget changes; e2e is the whole request from the video file to the last token. The
    expected peak memory (from the parameter count) is printed before the model is made, the
    measured one (max RSS) at the end.
    Examples:
      blip3v bench budget                                  # the demo model on this CPU
      blip3v bench budget --model real --layers 2 --repeats 2 --plot budget.png
      blip3v bench budget --model real --layers 32 --device cuda --json
    """
    from blip3v.benchmarks.bench_budget import (BudgetOptions, markdown, plot as draw, run_budget, section_heading,
                                                summary_lines, table)

    if plot and not plot.lower().endswith(".png"):
        raise InputError("--plot writes a PNG: give a file name ending in .png")
    opts = BudgetOptions(model=model, layers=layers, backend=backend, device=device,
                         precision=precision or ("fp16" if device == "cuda" else "fp32"), budgets=budgets,
                         temporal=temporal, repeats=repeats, warmup=warmup, new_tokens=new_tokens, video=video,
                         question=question, threads=threads, decoder=decoder)
    log = (lambda _m: None) if quiet else (lambda m: click.echo(m, err=True))
    # transformers' own bars (loading shards): silent under --quiet, covered by this command's bar otherwise
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    result = run_budget(opts, log=log, progress=not (quiet or as_json))
    if plot:
        draw(result, plot)
        log(f"wrote {plot}")
    if results:
        cfg = result["config"]
        where = result["device"].get("gpu") or "CPU"
        title = title or f"{cfg['model']}, {cfg['backend']} {cfg['precision']}, {where}"
        _write_results(results, section_heading(title), markdown(result, _command_line(), title))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(table(result))
    for line in summary_lines(result):
        click.echo(line)


@command.command("decode")
@click.option("--lm", type=click.Path(file_okay=False), default=None, metavar="HF_PHI3_DIR",
              help="Hugging Face Phi-3 directory to time (see `blip3v bench make-lm`). Default: a random Phi-3 "
                   "of --size with --layers layers, built for this run.")
@click.option("--size", type=click.Choice(["phi3-mini", "tiny"]), default="phi3-mini", show_default=True,
              help="Widths of the random Phi-3 when no --lm is given.")
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Layers of the random Phi-3 when no --lm is given.")
@click.option("--backend", default="onnxruntime,torch", show_default=True, callback=_csv(("onnxruntime", "torch")),
              help="This project's runtimes to time, comma-separated.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", default=None, callback=lambda c, p, v: _csv(("fp32", "fp16", "int4"))(c, p, v) if v else None,
              help="Comma-separated precisions. Default: fp32,fp16,int4 (every one this project runs). int4: "
                   "weight-only MatMulNBits from `blip3v calibrate`'s quantizer beside the builder's int4 model.")
@click.option("--int4-block-size", type=click.Choice(["16", "32", "64", "128"]), default="32", show_default=True,
              help="INT4 block size, the same for blip3v and onnxruntime-genai.")
@click.option("--int4-accuracy-level", type=click.Choice(["0", "1", "2", "3", "4"]), default="4", show_default=True,
              help="MatMulNBits accuracy level for both INT4 models (4 = int8 activations, the builder's CPU default).")
@click.option("--attention", default="gqa,standard", show_default=True, callback=_csv(("gqa", "standard")),
              help="ONNX decoder variants (GroupQueryAttention, or plain ONNX ops).")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed requests per system after one warm-up, interleaved across systems.")
@click.option("--threads", type=click.IntRange(min=1), default=CPUS, show_default=True)
@click.option("--skip-genai", is_flag=True, help="Leave onnxruntime-genai out even where it is installed.")
@click.option("--profile", is_flag=True,
              help="Add where the time goes: ORT op-type profiles on cpu; torch.profiler kernel times of the "
                   "torch backend's decode step on cuda.")
@click.option("--results", type=click.Path(dir_okay=False), default=None,
              help="Write the result as the decode section of this Markdown file (e.g. benchmarks/RESULTS.md).")
@click.option("--quiet", is_flag=True, help="Nothing on stderr: no progress bar, no step lines.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"systems": [{"name", "precision", "ttft_ms", "decode_ms_per_token"}, ...], "ratios", '
                   '"memory", ...} (step lines on stderr, no bar).')
def decode(lm, size, layers, backend, device, precision, int4_block_size, int4_accuracy_level, attention,
           prompt_tokens, new_tokens, repeats, threads, skip_genai, profile, results, quiet, as_json) -> None:
    """Decode ms/token and time to first token: this project's runtimes (named blip3v) against
    what a user would run instead, same weights, one run. On cpu: transformers' eager generate and
    onnxruntime-genai (where installed). On cuda: transformers' generate with
    cache_implementation="static" (it compiles the step itself) and ONNX Runtime's CUDA provider on
    the exported graphs (with onnxruntime-gpu), eager generate kept as a reference; bandwidth and
    FLOP floors beside them. Rows that cannot run here are left out with a note.

    Ratios are fastest peer time / blip3v time (> 1: blip3v is faster). The first request of each
    system (compilation, graph capture) is reported apart from the steady state.

    Memory: the expected peak (from the parameter count) is printed before the model is built and
    the measured peak (max RSS) at the end. One ONNX model is open at a time: the timing runs in
    one phase per ONNX model, the PyTorch systems timed in each, and the PyTorch model is put away
    while INT4 is quantized."""
    import argparse

    from blip3v.benchmarks import bench_decode as bd
    from blip3v.benchmarks.common import memory_lines

    args = argparse.Namespace(lm=lm, size=size, layers=layers, backend=list(backend), device=device,
                              precision=list(precision or ("fp32", "fp16", "int4")), attention=list(attention),
                              int4_block_size=int(int4_block_size), int4_accuracy_level=int(int4_accuracy_level),
                              prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats, threads=threads,
                              hf_attention="sdpa", skip_genai=skip_genai, profile=profile, seed=0)
    log = (lambda _m: None) if quiet else (lambda m: click.echo(m, err=True))
    # transformers' own bars (writing the random Phi-3's shards): silent under --quiet, and covered
    # by this command's one bar otherwise
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        result = bd.run_benchmark(args, log, progress=not (quiet or as_json))
    except ValueError as exc:
        raise InputError(str(exc).splitlines()[0]) from None
    for r in result["systems"]:
        if not all(isinstance(r[k], float) and r[k] > 0 and r[k] < float("inf") for k in ("ttft_ms", "decode_ms_per_token")):
            raise InputError(f"{r['name']} ({r['variant']}): a timing is not positive and finite")
    if results:
        # one section per (precisions, device): a run replaces its own figures, not another run's
        heading = f"{bd.SECTION_GPU if device == 'cuda' else bd.SECTION}: {', '.join(args.precision)}, {device}"
        _write_results(results, heading, bd.markdown(result, _command_line(), heading))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(bd.table(result["systems"]))
    for line in [*bd.ratio_lines(result), *bd.floor_lines(result), *bd.note_lines(result),
                 *memory_lines(result["memory"])]:
        click.echo(line)


@command.command("make-lm")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New directory for the Phi-3.")
@click.option("--size", type=click.Choice(["phi3-mini", "tiny"]), default="phi3-mini", show_default=True,
              help="phi3-mini: Phi-3-mini widths (hidden 3072, MLP 8192, 32 heads, vocab 32064); tiny: test sizes.")
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True, help="Decoder layers (32 = full depth).")
@click.option("--seed", type=int, default=0, show_default=True)
def make_lm(out, size, layers, seed) -> None:
    """Write a Hugging Face Phi-3 directory with random weights (config, safetensors, tokenizer) for
    `bench decode --lm` and for peers' builders (onnxruntime-genai)."""
    import shutil
    import tempfile

    from blip3v.benchmarks.bench_decode import make_phi3_dir

    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise InputError(f"{target} exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        make_phi3_dir(tmp, size, layers, seed)
        if target.exists():
            target.rmdir()
        tmp.replace(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    click.echo(f"wrote {target} (Phi-3 {size}, {layers} layers, random weights)")


@command.command("session")
@click.option("--engine", type=click.Path(file_okay=False), default=None,
              help="Engine directory to time. Default: export --model first.")
@click.option("--model", type=click.Choice(["demo", "real"]), default="demo", show_default=True,
              help="Without --engine: the shipped demo model, or the released architecture with random weights.")
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Decoder layers of --model real (cut for a CPU).")
@click.option("--video", type=click.Path(dir_okay=False), default=None, help="Clip to ask about (default: the sample clip).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Rounds of 4 questions, each on a cold clip.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--results", type=click.Path(dir_okay=False), default=None,
              help="Also write the table into this markdown file (benchmarks/RESULTS.md) under its own heading.")
@click.option("--quiet", is_flag=True, help="No per-round lines on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def session(engine, model, layers, video, repeats, new_tokens, results, quiet, as_json) -> None:
    """Time to first token of follow-up questions on one clip against the first question.

    The first question decodes and encodes the clip and prefills the whole prompt; a follow-up
    reuses both and prefills only its own tokens (blip3v.runtime.session).

    \b
    Examples:
      blip3v bench session                              # the demo model, exported for this run
      blip3v bench session --model real --layers 2      # released sizes, random weights
      blip3v bench session --engine engines/demo --json
    """
    from blip3v.benchmarks.bench_session import run_session_bench, table

    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    result = run_session_bench(engine, model, layers, video, repeats, new_tokens, log)
    text = table(result)
    if results:
        name = result["engine"] if engine else model
        heading = f"Session reuse: {name}"
        _write_results(results, heading, f"## {heading}\n\n`{_command_line()}`\n\n{text}\n")
    click.echo(json.dumps(result) if as_json else text)


@command.command("live")
@click.option("--engine", type=click.Path(file_okay=False), default=None,
              help="Engine directory to time (exported with the split graphs). Default: export --model first.")
@click.option("--model", type=click.Choice(["demo", "real"]), default="demo", show_default=True,
              help="Without --engine: the shipped demo model, or the released architecture with random weights.")
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Decoder layers of --model real (cut for a CPU).")
@click.option("--video", type=click.Path(dir_okay=False), default=None, help="Clip whose frames both paths see (default: the sample clip).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed rounds after one warm-up.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--memory-frames", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also push this many synthetic frames through a live session and report resident memory (e.g. 10000).")
@click.option("--results", type=click.Path(dir_okay=False), default=None,
              help="Also write the table into this markdown file (benchmarks/RESULTS.md) under its own heading.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def live(engine, model, layers, video, repeats, new_tokens, memory_frames, results, quiet, as_json) -> None:
    """Live video: per-frame encode time and frames per second, and time from a question to its first
    token in live mode against the full-clip path (`Engine.clip` + ask) on the same frames.

    \b
    Examples:
      blip3v bench live                                   # the demo model, exported for this run
      blip3v bench live --memory-frames 10000             # and resident memory over 10,000 frames
      blip3v bench live --model real --layers 2 --repeats 2
    """
    from blip3v.benchmarks.bench_live import run_live_bench, table

    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    result = run_live_bench(engine, model, layers, video, repeats, new_tokens, memory_frames, log)
    text = table(result)
    if results:
        heading = f"## Live video: {result['engine'] if engine else model}"
        _write_results(results, heading, f"{heading}\n\n`{_command_line()}`\n\n{text}\n")
    click.echo(json.dumps(result) if as_json else text)
