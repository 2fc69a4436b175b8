"""Backend-independent pieces of generation: token choice and streamed text. Numpy only.

Every backend (PyTorch, ONNX Runtime, TensorRT) picks tokens and streams text through these, so
greedy answers can be compared token for token across backends and sampling means one thing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np

from blip3v.errors import InputError


@dataclass
class SamplingConfig:
    """temperature 0 means greedy (argmax); otherwise softmax(logits / T) cut to the top-p mass."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise InputError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise InputError("top_p must be in (0, 1]")


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        cfg.validate()
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits (B, V) -> token ids (B,) int64."""
        logits = np.asarray(logits, dtype=np.float32)
        if self.cfg.temperature == 0:
            return logits.argmax(axis=-1).astype(np.int64)
        z = logits / self.cfg.temperature
        z = z - z.max(axis=-1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = np.empty(len(probs), dtype=np.int64)
        for i, p in enumerate(probs):
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.cfg.top_p) + 1)]  # smallest set with mass >= top_p
            q = p[keep] / p[keep].sum()
            out[i] = keep[self.rng.choice(len(keep), p=q)]
        return out


def accept_tokens(tokens: np.ndarray, stop_ids: tuple[int, ...], done: np.ndarray, out: list[list[int]],
                  on_token: Callable[[int, int], None] | None = None) -> bool:
    """One decode step's bookkeeping, shared by every backend: each unfinished row keeps its token
    (a stop id finishes the row instead and is not kept). Returns True when every row is done."""
    for row, tok in enumerate(tokens.tolist()):
        if done[row]:
            continue
        if tok in stop_ids:
            done[row] = True
            continue
        out[row].append(tok)
        if on_token is not None:
            on_token(row, tok)
    return bool(done.all())


class TextStream:
    """Turns a growing list of token ids into newly finished text, for printing as it comes."""

    def __init__(self, decode: Callable[[list[int]], str], on_text: Callable[[str], None]):
        self.decode = decode
        self.on_text = on_text
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token_id: int) -> None:
        self.ids.append(int(token_id))
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte piece: wait for the rest
            return
        if len(text) > self.printed:
            self.on_text(text[self.printed:])
            self.printed = len(text)


@dataclass
class Answer:
    """What every backend's `ask` returns."""

    text: str
    token_ids: list[int]
    video_tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)


def record_timings(timings: dict[str, float] | None, start: float, video_done: float, first_token: float | None,
                   end: float) -> None:
    """answer_batch's per-stage timings, ms, the same keys from every backend: visual, prefill (to the
    first token), generate (prefill + decode)."""
    if timings is not None:
        timings["visual"] = (video_done - start) * 1e3
        timings["prefill"] = ((first_token if first_token is not None else end) - video_done) * 1e3
        timings["generate"] = (end - video_done) * 1e3


class AskMixin:
    """`ask` on top of a backend's `load_video`, `answer_batch` and `decode`: one clip, one
    question, streamed text, and the same per-stage timings from every backend."""

    num_video_tokens: int

    def ask(self, video: str | Path, question: str, sampling: SamplingConfig | None = None,
            on_text: Callable[[str], None] | None = None) -> Answer:
        sampling = sampling or SamplingConfig()
        t0 = time.perf_counter()
        pixels = self.load_video(video)[None]  # type: ignore[attr-defined]  # (1, T, 3, S, S)
        timings = {"decode_video": (time.perf_counter() - t0) * 1e3}
        stream = TextStream(self.decode, on_text) if on_text is not None else None  # type: ignore[attr-defined]
        ids = self.answer_batch(pixels, [question], sampling,  # type: ignore[attr-defined]
                                on_token=(lambda _row, tok: stream.push(tok)) if stream else None,
                                timings=timings)[0]
        return Answer(self.decode(ids), ids, self.num_video_tokens, timings)  # type: ignore[attr-defined]
