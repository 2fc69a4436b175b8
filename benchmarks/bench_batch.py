"""Throughput of `blip3v batch`: the default path (decoding workers feeding the engine) and the Ray
path, against a plain sequential loop (decode a clip, answer its questions, next clip), on the same
clips, questions and engine.

    blip3v export --model blip3v/assets/demo-model --out /tmp/demo-engine
    python benchmarks/bench_batch.py --engine /tmp/demo-engine [--n 200] [--repeats 2] [--json out.json]

Each path answers every clip of a fresh synthetic corpus (`blip3v data synth`, --n clips) with the
same 2 questions, greedy. The engine is opened before the clock starts for the sequential and the
default path (both run it in this process; the default path's as `blip3v batch` opens it, clips
encoded side by side on the CPU); the Ray path is timed from a running local Ray
(`ray.init` before the clock) through actor start-up, which opens its own engine, to the last row.
Paths run in turns (sequential, default, Ray, repeated), so a machine shared with other work
slows them alike; the median of --repeats is reported, and every path's answers must equal the
sequential loop's. clips/s counts clips with both answers written.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # common.py, when run as a script

QUESTIONS = ("how many shapes are there?", "what colour is the circle?")


def sequential(engine, clips: list[str], sampling) -> tuple[float, dict]:
    """The plain loop: `Engine.clip` (decode + visual) then each question, one clip after another."""
    answers = {}
    t0 = time.perf_counter()
    for path in clips:
        clip = engine.clip(path)
        for q in QUESTIONS:
            answers[(path, q)] = clip.ask(q, sampling).text
    seconds = time.perf_counter() - t0
    engine.clear()  # the next pass must decode again
    return seconds, answers


def batch_path(kind: str, engine, engine_dir: str, clips: list[str], sampling, out_dir: Path, *,
               workers: int | None, actors: int, batch_size: int) -> tuple[float, dict]:
    from collections import OrderedDict

    from blip3v.runtime import batch

    videos = OrderedDict((p, list(QUESTIONS)) for p in clips)
    out = out_dir / f"{kind}-{time.monotonic_ns()}.jsonl"
    settings = batch.VideoSettings.of_host(engine.host)
    with batch.Results(out) as results:
        tasks = batch.plan(videos, results.done)
        t0 = time.perf_counter()
        if kind == "default":
            batch.run_local(tasks, settings, lambda: engine, sampling, results, workers=workers, progress=False)
        else:
            from blip3v.runtime.batch_ray import run_ray

            run_ray(tasks, settings, {"engine": os.path.abspath(engine_dir)}, sampling, results, actors=actors,
                    batch_size=batch_size, progress=False)
        seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    out.unlink()
    return seconds, {(r["video"], r["question"]): r["answer"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", required=True, help="Exported engine directory (the demo engine).")
    ap.add_argument("--n", type=int, default=200, help="Synthetic clips.")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size", type=int, default=128, help="Clip width and height in pixels (synth --size).")
    ap.add_argument("--repeats", type=int, default=2, help="Turns of all paths; the median is reported.")
    ap.add_argument("--workers", type=int, default=None, help="Decoding processes of the default path.")
    ap.add_argument("--ray-actors", type=int, default=1)
    ap.add_argument("--ray-batch-size", type=int, default=8)
    ap.add_argument("--no-ray", action="store_true", help="Skip the Ray path.")
    ap.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = ap.parse_args()

    from common import device, versions

    from blip3v.data.synth import write_dataset
    from blip3v.runtime.batch import default_workers
    from blip3v.runtime.generation import SamplingConfig
    from blip3v.runtime.session import Engine

    sampling = SamplingConfig()
    workers = default_workers() if args.workers is None else args.workers
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        corpus = write_dataset(Path(tmp) / "corpus", n=args.n, seed=args.seed, size=args.size, progress=False)
        clips = sorted(str(p) for p in (corpus / "clips").glob("*.mp4"))
        machine = device(threads=os.cpu_count() or 1)
        t0 = time.perf_counter()
        engine = Engine.open(engine=args.engine)
        open_s = time.perf_counter() - t0
        # The default path on the engine as `blip3v batch` opens it: on the CPU, clips go through
        # the visual graph in threads side by side (OrtBackend parallel_clips).
        from blip3v.runtime.ort_backend import OrtBackend

        side_by_side = Engine(OrtBackend.load(args.engine, spinning=False, parallel_clips=True))
        kinds = ["sequential", "default"] + ([] if args.no_ray else ["ray"])
        ray_init_s = None
        if not args.no_ray:
            import logging

            import ray

            t0 = time.perf_counter()
            ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            ray_init_s = time.perf_counter() - t0
        times: dict[str, list[float]] = {k: [] for k in kinds}
        reference = None
        try:
            for turn in range(args.repeats):
                for kind in kinds:
                    if kind == "sequential":
                        seconds, answers = sequential(engine, clips, sampling)
                    else:
                        seconds, answers = batch_path(kind, side_by_side if kind == "default" else engine,
                                                      args.engine, clips, sampling, Path(tmp),
                                                      workers=workers, actors=args.ray_actors,
                                                      batch_size=args.ray_batch_size)
                    reference = reference or answers
                    if answers != reference:
                        raise SystemExit(f"{kind}: answers differ from the sequential loop's")
                    times[kind].append(seconds)
                    print(f"turn {turn + 1} {kind:<10} {seconds:7.2f} s  {len(clips) / seconds:6.2f} clips/s "
                          f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        finally:
            if not args.no_ray:
                ray.shutdown()
    median = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: len(clips) / s for k, s in median.items()}
    result = {
        "clips": len(clips), "questions": len(QUESTIONS), "clip_size": args.size, "engine": args.engine,
        "workers": workers, "ray_actors": args.ray_actors, "ray_batch_size": args.ray_batch_size,
        "engine_open_s": round(open_s, 3), "ray_init_s": ray_init_s and round(ray_init_s, 3),
        "seconds": {k: [round(s, 3) for s in v] for k, v in times.items()},
        "clips_per_s": {k: round(v, 3) for k, v in rate.items()},
        "vs_sequential": {k: round(v / rate["sequential"], 3) for k, v in rate.items()},
        "distinct_answers": len(set(reference.values())) if reference else 0,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "device": machine, "versions": versions(("blip3v", "onnxruntime", "numpy", "av", "ray", "pyarrow")),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
