"""Time to first token of a follow-up question on the same clip, against the first question.

    blip3v bench session [--engine DIR | --model demo|real] [--layers N] [--repeats R] [--json]

What it times is what ships: `Engine.clip(video)` then `Clip.ask` per question (blip3v.runtime.session).
The first question pays for decoding the video, the visual graph and the whole prompt's prefill; a
follow-up reuses the clip's encoding and its cached prompt prefix and prefills only its own tokens.
Each repeat opens a fresh clip cache, so every first question is a cold clip. Time to first token
is hash_video + decode_video + visual + prefill (to the first chosen token), from the answers' own
timings.

`--model real` builds the released architecture with random weights (SigLIP so400m at 384 px, the
Perceiver resampler, the gTTM, Phi-3-mini width with `--layers` decoder layers cut for the CPU),
exports it once to a temporary engine and times that.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from blip3v.errors import InputError

QUESTIONS = ("what colour does the triangle turn?", "how many shapes are there?",
             "which way does the circle move?", "what shape is the red object?")


def ttft(timings: dict[str, float]) -> float:
    """Hashing the bytes (the clip cache key), decoding, the visual graph and the prefill."""
    return (timings.get("hash_video", 0.0) + timings.get("decode_video", 0.0) + timings.get("visual", 0.0)
            + timings["prefill"])


def export_for(model: str, layers: int, workdir: Path, log: Callable[[str], None]) -> tuple[Path, str]:
    """-> (engine directory, description) for `demo` or `real`."""
    from blip3v.export.engine import export_engine

    if model == "demo":
        from blip3v.assets import DEMO_MODEL
        from blip3v.model.checkpoint import load_checkpoint, load_tokenizer

        net, tok, what = load_checkpoint(DEMO_MODEL).eval(), load_tokenizer(DEMO_MODEL), "demo model"
    elif model == "real":
        from blip3v.benchmarks.bench_budget import BudgetOptions, load_model

        net, tok, what = load_model(BudgetOptions(model="real", layers=layers, backend="onnxruntime"), log)
    else:
        raise InputError(f"--model must be demo or real, not {model!r}")
    t0 = time.perf_counter()
    out = workdir / "engine"
    export_engine(net, tok, out, precision="fp32", max_context=1024 if model == "real" else None)
    log(f"exported {what} in {time.perf_counter() - t0:.0f} s")
    return out, what


@contextmanager
def engine_to_time(engine_dir: str | Path | None, model: str, layers: int, log: Callable[[str], None],
                   prefix: str) -> Iterator[tuple[Any, str]]:
    """-> (OrtBackend, what it is): `engine_dir`, or the `model` exported into a temporary folder
    that lasts as long as the benchmark."""
    from blip3v.runtime.ort_backend import OrtBackend

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        what = str(engine_dir)
        if engine_dir is None:
            engine_dir, what = export_for(model, layers, Path(tmp), log)
        yield OrtBackend.load(engine_dir), what


def run_session_bench(engine_dir: str | Path | None = None, model: str = "demo", layers: int = 2,
                      video: str | Path | None = None, repeats: int = 5, new_tokens: int = 8,
                      log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    from blip3v.benchmarks.common import device, versions
    from blip3v.runtime.generation import SamplingConfig
    from blip3v.runtime.session import Engine

    if video is None:
        from blip3v.assets import SAMPLE_CLIP

        video = SAMPLE_CLIP
    with engine_to_time(engine_dir, model, layers, log, "blip3v-bench-session-") as (host, what):
        sampling = SamplingConfig(max_new_tokens=new_tokens)
        first: list[float] = []
        follow: list[float] = []
        parts: dict[str, list[float]] = {"decode_video": [], "visual": [], "prefill_first": [], "prefill_follow_up": []}
        for r in range(repeats + 1):  # the first round warms the sessions up and is not counted
            engine = Engine(host)
            clip = engine.clip(video)
            answers = [clip.ask(q, sampling) for q in QUESTIONS]
            log(f"round {r}: first {ttft(answers[0].timings_ms):.1f} ms, follow-ups "
                + ", ".join(f"{ttft(a.timings_ms):.1f}" for a in answers[1:]) + " ms")
            if r == 0:
                continue
            first.append(ttft(answers[0].timings_ms))
            follow += [ttft(a.timings_ms) for a in answers[1:]]
            parts["decode_video"].append(answers[0].timings_ms["decode_video"])
            parts["visual"].append(answers[0].timings_ms["visual"])
            parts["prefill_first"].append(answers[0].timings_ms["prefill"])
            parts["prefill_follow_up"] += [a.timings_ms["prefill"] for a in answers[1:]]
            reused = [a.reused_tokens for a in answers[1:]]
        first_ms, follow_ms = statistics.median(first), statistics.median(follow)
        return {
            "engine": what, "video": str(video), "repeats": repeats, "questions": list(QUESTIONS),
            "video_tokens": host.num_video_tokens, "reused_tokens": reused,
            "ttft_first_ms": round(first_ms, 3), "ttft_follow_up_ms": round(follow_ms, 3),
            "ratio": round(follow_ms / first_ms, 4),
            "medians_ms": {k: round(statistics.median(v), 3) for k, v in parts.items()},
            "device": device(threads=0), "versions": versions(),
        }


def table(result: dict[str, Any]) -> str:
    m = result["medians_ms"]
    return "\n".join([
        f"engine: {result['engine']} ({result['video_tokens']} video tokens), {result['repeats']} repeats, medians",
        "| question | time to first token (ms) | decode video | visual | prefill |",
        "|---|---|---|---|---|",
        f"| first (cold clip) | {result['ttft_first_ms']:.1f} | {m['decode_video']:.1f} | {m['visual']:.1f} | "
        f"{m['prefill_first']:.1f} |",
        f"| follow-up (same clip) | {result['ttft_follow_up_ms']:.1f} | 0 | 0 | {m['prefill_follow_up']:.1f} |",
        f"follow-up / first: {result['ratio']:.3f} (target <= 0.25); follow-ups reused {result['reused_tokens']} "
        "prompt tokens from the cache",
    ])
