"""Exact-match evaluation of any backend on a synthetic QA folder (`qa.jsonl` + clips).

A backend is anything with `load_video(path) -> (T, 3, S, S)`, `answer_batch(pixels, questions,
sampling) -> list[list[int]]` and `decode(ids) -> str`: the PyTorch backend and the runtime's
exported-engine backends alike, so their answers are scored by the same code.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from blip3v.data.synth import normalise_answer, read_dataset
from blip3v.runtime.generation import SamplingConfig


def _clips(backend, paths: list[str], depth: int, encode_workers: int = 0):
    """Each clip's pixels in order, the next ones decoding in a background thread while the
    current batch runs (blip3v.runtime.video.prefetch_clips); a clip that cannot be read raises.

    With `encode_workers` (an engine opened with `parallel_clips`, see blip3v.runtime.ort_backend)
    that many threads each read a clip and run the visual graph on it, and what comes out is each
    clip's video tokens (1, M, D) instead: decoding and encoding then fill every core, where one
    decoding thread beside a batched visual graph left part of a core idle."""
    host = getattr(backend, "host", None)
    if host is None:  # a bare backend: no prefetch
        for path in paths:
            yield backend.load_video(path)
        return
    from blip3v.runtime.video import prefetch_clips

    parallel = {}
    if encode_workers:
        parallel = {"workers": encode_workers, "then": lambda pixels: host.encode_video(pixels[None])}
        depth = max(depth, 2 * encode_workers)
    for _, item in prefetch_clips(paths, host.num_frames, host.image_size, host.image_mean, host.image_std,
                                  depth=depth, **parallel, **getattr(host, "video_options", {})):
        if isinstance(item, Exception):
            raise item
        yield item


def evaluate(backend, data_dir: str | Path, batch_size: int = 16, limit: int | None = None,
             progress: bool = True, max_new_tokens: int = 8) -> dict:
    """-> {"accuracy", "per_category", "n", "seconds", "predictions"} (greedy decoding)."""
    from tqdm import tqdm

    rows = read_dataset(data_dir)[:limit]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    predictions = []
    bar = tqdm(total=len(rows), disable=not progress, desc="eval", unit="clip")
    workers = int(getattr(getattr(backend, "host", None), "encode_workers", 0) or 0)
    clips = _clips(backend, [r["path"] for r in rows], depth=2 * batch_size, encode_workers=workers)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        questions = [r["question"] for r in chunk]
        if workers:  # encoded by the workers
            video = np.concatenate([next(clips) for _ in chunk])  # (B, M, D)
            outputs = backend.answer_encoded(video, questions, sampling)
        else:
            pixels = np.stack([next(clips) for _ in chunk])  # (B, T, 3, S, S)
            outputs = backend.answer_batch(pixels, questions, sampling)
        for r, ids in zip(chunk, outputs):
            predictions.append({"video": r["video"], "question": r["question"], "category": r["category"],
                                "answer": r["answer"], "prediction": backend.decode(ids)})
        bar.update(len(chunk))
    bar.close()
    per: dict[str, list[bool]] = defaultdict(list)
    for p in predictions:
        per[p["category"]].append(normalise_answer(p["prediction"]) == normalise_answer(p["answer"]))
    hits = [h for v in per.values() for h in v]
    return {
        "accuracy": float(np.mean(hits)) if hits else 0.0,
        "per_category": {k: float(np.mean(v)) for k, v in sorted(per.items())},
        "n": len(predictions),
        "seconds": round(time.perf_counter() - t0, 3),
        "predictions": predictions,
    }
