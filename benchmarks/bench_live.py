"""Live video: per-frame encode time, and time from a question to its first token in live mode
against the full-clip path on the same frames; optionally resident memory over a long stream.

    blip3v bench live [--engine DIR | --model demo|real] [--layers N] [--repeats R] [--memory-frames F] [--json]

What it times is what ships. Per frame: `host.encode_frames` (frame.onnx: SigLIP + resampler) on one
frame at a time, and on the T frames in one call. Live: a `LiveSession` holding the clip's T frames
(pushed through its sampler, queue and background encoder, then flushed) answers each question with
temporal.onnx + prefill + decode; its time to first token is from the question to the first chosen
token (`LiveAnswer.timings_ms["ttft"]`). Full clip: `Engine.clip(video)` on a fresh clip cache + `ask`,
decode_video + visual (fused visual.onnx) + prefill, as `blip3v ask` pays. Both see the same T
frames (those the clip reader picks), so their greedy answers must be the same; the result says so.

`--memory-frames F` pushes F synthetic frames as fast as the session encodes them (each push waits
for room in the queue, so every frame goes through preprocessing, frame.onnx and the ring buffer),
asking a question every 1,000 frames, and records the resident set size (VmRSS) after a warm-up of
1,000 frames and at the end: it must not grow by 5 % or more.

`--model real` exports the released architecture with random weights and `--layers` decoder layers
(blip3v.benchmarks.bench_session.export_for), split graphs included.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

QUESTION = "what colour does the triangle turn?"
WARMUP_FRAMES = 1_000
ASK_EVERY = 1_000


def rss_mib() -> float:
    """Resident set size of this process (VmRSS), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def memory_run(engine, frames: int, size: int, log: Callable[[str], None], seed: int = 0) -> dict[str, Any]:
    """Pushes `frames` synthetic frames through a live session (every one encoded); RSS after
    warm-up and at the end."""
    from blip3v.runtime.generation import SamplingConfig
    from blip3v.runtime.live import LiveSession

    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8)  # frames cycle through a small pool
    sampling = SamplingConfig(max_new_tokens=4)
    samples: list[tuple[int, float]] = []
    answers = 0
    t0 = time.perf_counter()
    with LiveSession(engine, fps=None) as live:
        for i in range(frames):
            live.push(pool[i % len(pool)], t=i / 30.0, block=True)  # a 30 fps stream, every frame encoded
            if (i + 1) % ASK_EVERY == 0:
                live.ask(QUESTION, sampling)
                answers += 1
            if i + 1 == min(WARMUP_FRAMES, frames) or (i + 1) % 2_000 == 0 or i + 1 == frames:
                samples.append((i + 1, round(rss_mib(), 1)))
                log(f"  {i + 1} frames: RSS {samples[-1][1]:.1f} MiB, {live.counts()}")
        live.end()
        live.flush()
        counts = live.counts()
    after_warmup = samples[0][1]
    end = samples[-1][1]
    return {"frames": frames, "seconds": round(time.perf_counter() - t0, 1), "answers": answers,
            "rss_after_warmup_mib": after_warmup, "rss_end_mib": end, "rss_max_mib": max(v for _, v in samples),
            "growth_pct": round(100 * (end - after_warmup) / after_warmup, 2), "rss_samples": samples, **counts}


def run_live_bench(engine_dir: str | Path | None = None, model: str = "demo", layers: int = 2,
                   video: str | Path | None = None, repeats: int = 3, new_tokens: int = 8, memory_frames: int = 0,
                   log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    from blip3v.benchmarks.bench_session import engine_to_time, ttft
    from blip3v.benchmarks.common import device, versions
    from blip3v.runtime.generation import SamplingConfig
    from blip3v.runtime.live import LiveSession
    from blip3v.runtime.session import Engine
    from blip3v.runtime.video import read_frames

    if video is None:
        from blip3v.assets import SAMPLE_CLIP

        video = SAMPLE_CLIP
    with engine_to_time(engine_dir, model, layers, log, "blip3v-bench-live-") as (host, what):
        engine = Engine(host)
        sampling = SamplingConfig(max_new_tokens=new_tokens)
        t = host.num_frames
        pixels = host.load_video(video)  # (T, 3, S, S): the frames the full-clip path sees
        host.open_split()

        log("per-frame encode (frame.onnx)")
        one, batch = [], []
        for r in range(repeats + 1):
            runs = []
            for i in range(t):
                t0 = time.perf_counter()
                host.encode_frames(pixels[i:i + 1])
                runs.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            host.encode_frames(pixels)
            whole = (time.perf_counter() - t0) * 1e3 / t
            log(f"  round {r}: {statistics.median(runs):.2f} ms a frame alone, "
                f"{whole:.2f} ms a frame in a batch of {t}")
            if r:
                one += runs
                batch.append(whole)

        log("full-clip path: Engine.clip(video) + ask")
        full, full_parts, full_ids = [], {"decode_video": [], "visual": [], "prefill": []}, None
        for r in range(repeats + 1):
            answer = Engine(host).clip(video).ask(QUESTION, sampling)
            log(f"  round {r}: ttft {ttft(answer.timings_ms):.1f} ms")
            if r:
                full.append(ttft(answer.timings_ms))
                for k in full_parts:
                    full_parts[k].append(answer.timings_ms[k])
            full_ids = answer.token_ids

        log("live: the same frames pushed into a LiveSession, then questions")
        frames = read_frames(video, t)  # (T, H, W, 3): the frames load_video picked
        live_ttft, live_parts, live_ids, window = [], {"temporal": [], "prefill": []}, None, None
        with LiveSession(engine, fps=None, queue=t) as live:
            for i, frame in enumerate(frames):
                live.push(frame, t=float(i), block=True)
            live.flush()
            for r in range(repeats + 1):
                answer = live.ask(QUESTION, sampling)
                log(f"  round {r}: ttft {answer.timings_ms['ttft']:.1f} ms")
                if r:
                    live_ttft.append(answer.timings_ms["ttft"])
                    for k in live_parts:
                        live_parts[k].append(answer.timings_ms[k])
                live_ids, window = answer.token_ids, answer.window

        memory = None
        if memory_frames:
            log(f"memory: {memory_frames} synthetic frames through a live session")
            memory = memory_run(engine, memory_frames, max(64, host.image_size), log)

        frame_ms = statistics.median(one)
        full_ms, live_ms = statistics.median(full), statistics.median(live_ttft)
        return {
            "engine": what, "video": str(video), "repeats": repeats, "frames": t,
            "video_tokens": host.num_video_tokens, "image_size": host.image_size,
            "frame_encode_ms": round(frame_ms, 3), "frames_per_second": round(1e3 / frame_ms, 2),
            "frame_encode_batched_ms": _median(batch),
            "frames_per_second_batched": round(1e3 / statistics.median(batch), 2),
            "ttft_full_clip_ms": round(full_ms, 3), "ttft_live_ms": round(live_ms, 3),
            "ratio": round(live_ms / full_ms, 4),
            "full_clip_ms": {k: _median(v) for k, v in full_parts.items()},
            "live_ms": {k: _median(v) for k, v in live_parts.items()},
            "same_answer": live_ids == full_ids, "window": window, "memory": memory,
            "device": device(threads=0), "versions": versions(),
        }


def table(result: dict[str, Any]) -> str:
    f, lv = result["full_clip_ms"], result["live_ms"]
    lines = [
        f"engine: {result['engine']} ({result['frames']} frames at {result['image_size']} px, "
        f"{result['video_tokens']} video tokens), {result['repeats']} repeats, medians",
        "",
        f"per-frame encode (frame.onnx): {result['frame_encode_ms']:.2f} ms a frame alone "
        f"({result['frames_per_second']:.1f} frames/s); {result['frame_encode_batched_ms']:.2f} ms a frame in a batch "
        f"of {result['frames']} ({result['frames_per_second_batched']:.1f} frames/s)",
        "",
        "| path | time to first token (ms) | decode video | visual | temporal | prefill |",
        "|---|---|---|---|---|---|",
        f"| full clip (`Engine.clip` + ask) | {result['ttft_full_clip_ms']:.1f} | {f['decode_video']:.1f} | "
        f"{f['visual']:.1f} | (in visual) | {f['prefill']:.1f} |",
        f"| live (frames encoded on arrival) | {result['ttft_live_ms']:.1f} | 0 | 0 | {lv['temporal']:.1f} | "
        f"{lv['prefill']:.1f} |",
        "",
        f"live / full clip: {result['ratio']:.3f} (target <= 0.30 on the real-sized engine); same greedy answer: "
        f"{result['same_answer']}",
    ]
    m = result.get("memory")
    if m:
        lines += ["", f"memory: {m['frames']} frames in {m['seconds']} s ({m['frames_encoded']} encoded, "
                      f"{m['frames_dropped']} dropped, {m['answers']} answers): "
                      f"RSS {m['rss_after_warmup_mib']:.1f} MiB "
                      f"after {WARMUP_FRAMES} frames -> {m['rss_end_mib']:.1f} MiB at the end "
                      f"({m['growth_pct']:+.2f} %, max {m['rss_max_mib']:.1f} MiB; target < 5 %)"]
    return "\n".join(lines)
