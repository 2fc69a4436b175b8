"""Where `blip3v eval`'s loop spends its CPU on an ONNX Runtime engine: the figures behind
benchmarks/RESULTS.md, "`blip3v eval` end to end" (third pass), and OrtBackend's `parallel_clips`.

    python benchmarks/eval_parts.py --engine blip3v/assets/demo-engine --data /tmp/e200

1. The visual graph alone on one clip at a time, with one intra-op thread and with ONNX Runtime's
   default (every core): wall and process CPU per clip.
2. Each clip decoded (`load_clip`) and encoded (`encode_video`) in one thread, with 1 and then
   `--workers` threads side by side: wall for all clips and each part's CPU summed over the threads
   (`time.thread_time`), so what decoding costs alone and beside other decoders shows.
3. The visual graph's nodes counted by the model module that made them (the exporter's name scopes).
"""

from __future__ import annotations

import argparse
import ast
import collections
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def visual_per_clip(engine: str, threads: int | None, clips: int = 200) -> tuple[float, float]:
    """(wall ms, CPU ms) per clip of visual.onnx on random pixels, batch 1."""
    from blip3v.runtime.manifest import load_manifest
    from blip3v.runtime.ort_backend import create_session, session_options

    manifest = load_manifest(engine)
    providers = ["CPUExecutionProvider"]
    session = create_session(manifest.path("visual"), session_options(providers, threads, spinning=False), providers)
    model = manifest.model
    pixels = np.random.default_rng(0).standard_normal(
        (1, model["num_frames"], 3, model["image_size"], model["image_size"])).astype(np.float32)  # (1, T, 3, S, S)
    name = session.get_inputs()[0].name
    for _ in range(10):
        session.run(None, {name: pixels})
    wall, cpu = time.perf_counter(), process_cpu()
    for _ in range(clips):
        session.run(None, {name: pixels})
    return (time.perf_counter() - wall) / clips * 1e3, (process_cpu() - cpu) / clips * 1e3


def decode_and_encode(engine: str, paths: list[str], workers: int) -> dict[str, float]:
    """Every clip read and encoded in one of `workers` threads (eval's parallel_clips path)."""
    from blip3v.runtime.ort_backend import OrtBackend
    from blip3v.runtime.video import load_clip

    host = OrtBackend.load(engine, spinning=False, parallel_clips=True)
    spent: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def one(path: str) -> None:
        c0 = time.thread_time()
        pixels = load_clip(path, host.num_frames, host.image_size, host.image_mean, host.image_std)
        c1 = time.thread_time()
        host.encode_video(pixels[None])
        c2 = time.thread_time()
        with lock:
            spent["decode_cpu_s"] += c1 - c0
            spent["visual_cpu_s"] += c2 - c1

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, paths[:10]))  # warm-up
        spent.clear()
        start = time.perf_counter()
        list(pool.map(one, paths))
        spent["wall_s"] = time.perf_counter() - start
    return {k: round(v, 3) for k, v in spent.items()}


def nodes_by_scope(engine: str) -> list[tuple[str, int]]:
    import onnx

    from blip3v.runtime.manifest import load_manifest

    graph = onnx.load(str(load_manifest(engine).path("visual")), load_external_data=False).graph
    counts: collections.Counter = collections.Counter()
    for node in graph.node:
        scopes = ast.literal_eval({p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "[]"))
        counts[scopes[2] if len(scopes) > 2 else (scopes[-1] if scopes else "(none)")] += 1
    return counts.most_common(6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", required=True, help="Exported engine directory (the demo engine).")
    ap.add_argument("--data", required=True, help="Folder from `blip3v data synth` (qa.jsonl + clips/).")
    ap.add_argument("--workers", type=int, default=None, help="Threads side by side (default: eval's, cores + 1).")
    args = ap.parse_args()

    from blip3v.data.synth import read_dataset
    from blip3v.runtime.ort_backend import OrtBackend

    paths = [row["path"] for row in read_dataset(args.data)]
    workers = args.workers or OrtBackend.load(args.engine, parallel_clips=True).encode_workers
    for threads, label in ((1, "one intra-op thread"), (None, "ONNX Runtime's default threads")):
        wall, cpu = visual_per_clip(args.engine, threads)
        print(f"visual graph, {label}: {wall:.2f} ms wall, {cpu:.2f} ms CPU per clip")
    for n in (1, workers):
        print(f"{len(paths)} clips decoded + encoded by {n} thread(s): {decode_and_encode(args.engine, paths, n)}")
    print("visual graph nodes by module:", nodes_by_scope(args.engine))


if __name__ == "__main__":
    main()
