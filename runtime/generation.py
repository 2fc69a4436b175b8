"""Backend-independent pieces of generation: token choice and streamed text. Numpy only.

Every backend (PyTorch, ONNX Runtime, TensorRT) picks tokens and streams text through these, so
greedy answers can be compared token for token across backends and sampling means one thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from blip3v.errors import InputError


@dataclass
class SamplingConfig:
    """temperature 0 means greedy (argmax); otherwise softmax(logits / T) cut to the top-p mass."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # text that ends the answer (not included), as OpenAI's `stop`

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise InputError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise InputError("stop must be a list of strings")


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
