"""The one decode loop, over a KV cache the runtime owns. Numpy only.

Every backend (ONNX Runtime, TensorRT, the PyTorch reference and its static-KV fast path) only
allocates cache storage, runs the decoder on a chunk of embeddings, and copies cache slots; what
happens between those calls (which slots are real, the positions, sampling, stop tokens,
streaming, non-finite checks and timings) is written once, here.

    cache = backend.new_cache(batch=1, capacity=256)
    logits = prefill(backend, cache, embeds, mask)                  # (B, V) of the last column
    out = decode(backend, cache, logits, sampling, stop_ids)        # new ids per row
    branch = cache.fork()                                           # one copy of the filled slots
    cache.truncate(n)                                               # rewind to the first n slots

The cache layout is the engine contract's (runtime/manifest.py): B rows of C slots; a call with S
new tokens writes them at slots [L - S, L) where L is the number of slots in use after it, and
attends over [0, L). Rows are left-padded within a call; `mask` (B, C) says which slots hold a real
token, and a token's position (RoPE) is the number of real tokens before it in its row, so a
padded row decodes exactly as it would alone. Backends with compact storage (the static PyTorch
decoder keeps slot p for position p) map slots to positions themselves.

The backend interface (`DecoderBackend`), all arrays numpy on the host unless the backend says
otherwise for `embeds` (its own `embed` produces them, the loop only passes them through):

    max_context: int                       longest sequence the decoder takes
    new_cache(batch, capacity) -> KVCache  zeroed storage for B rows of `capacity` slots
    embed(ids (B, S) int64) -> embeds      the decoder's input rows for token ids
    forward(cache, embeds (B, S, D), positions (B, S)) -> logits (B, V) float32 (last column)
                                           the S new slots are [cache.used - S, cache.used), the
                                           mask cache.mask[:, :cache.used] (already written)
    copy_cache(src, dst, slots)            dst's storage gets src's first `slots` slots
    chunked_prefill(batch) -> bool         can a call with S > 1 follow a non-empty cache?
    truncate_cache(cache, slots)           optional: storage that must forget slots (DynamicCache)
    step(cache, tokens (B,), positions (B, 1)) -> logits   optional fast path for S = 1

Not thread-safe: a cache, and the backend call on it, belong to one thread at a time. A cache's
storage belongs to it: backends that capture graphs on it (static PyTorch, TensorRT) may hand a
dropped storage to the next cache of the same shape, so never keep a storage without its KVCache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from blip3v.errors import EngineError, InputError
from blip3v.runtime.generation import Sampler, SamplingConfig


class DecoderBackend(Protocol):
    max_context: int

    def new_cache(self, batch: int, capacity: int) -> KVCache: ...

    def embed(self, ids: np.ndarray) -> Any: ...

    def forward(self, cache: KVCache, embeds: Any, positions: np.ndarray) -> np.ndarray: ...

    def copy_cache(self, src: KVCache, dst: KVCache, slots: int) -> None: ...

    def chunked_prefill(self, batch: int) -> bool: ...


class KVCache:
    """B rows of `capacity` slots: the backend's `storage` plus the slot bookkeeping every backend
    shares. `used` slots are filled (the same count in every row, rows being left-padded);
    `mask[:, :used]` says which hold real tokens; `lengths` counts them per row."""

    def __init__(self, backend: DecoderBackend, storage: Any, batch: int, capacity: int):
        self.backend = backend
        self.storage = storage
        self.batch = batch
        self.capacity = capacity
        self.mask = np.zeros((batch, capacity), dtype=np.int64)  # (B, C): 1 = a real token in that slot
        self.used = 0

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens per row (B,): the position the next token of each row takes."""
        return self.mask[:, :self.used].sum(-1)

    def nbytes(self) -> int:
        return int(getattr(self.storage, "nbytes", 0) or 0) + self.mask.nbytes

    def fork(self, capacity: int | None = None) -> KVCache:
        """A new cache holding this one's filled slots (one copy of them), with room for
        `capacity` slots (default: the same). Both can then grow apart."""
        capacity = capacity or self.capacity
        if capacity < self.used:
            raise InputError(f"a fork of {capacity} slots cannot hold the {self.used} filled ones")
        other = self.backend.new_cache(self.batch, capacity)
        if self.used:
            self.backend.copy_cache(self, other, self.used)
        other.mask[:, :self.used] = self.mask[:, :self.used]
        other.used = self.used
        return other

    def truncate(self, slots: int) -> None:
        """Rewind to the first `slots` slots (what was written after them is forgotten)."""
        if not 0 <= slots <= self.used:
            raise InputError(f"cannot truncate a cache of {self.used} filled slots to {slots}")
        hook = getattr(self.backend, "truncate_cache", None)
        if hook is not None:
            hook(self, slots)
        self.mask[:, slots:self.used] = 0
        self.used = slots


def grown(cache: KVCache, needed: int, max_context: int) -> KVCache:
    """`cache` itself if it has `needed` slots, else a fork with room (doubling, capped at the
    context), so a long conversation reallocates O(log n) times."""
    if needed > max_context:
        raise InputError(f"the conversation needs {needed} tokens, more than the model's context of {max_context}")
    if needed <= cache.capacity:
        return cache
    return cache.fork(min(max(needed, 2 * cache.capacity), max_context))


def _take_slots(cache: KVCache, mask: np.ndarray) -> np.ndarray:
    """Marks the next S slots with `mask` (B, S) and returns the new tokens' positions (B, S)."""
    batch, s = mask.shape
    if batch != cache.batch:
        raise InputError(f"a chunk of {batch} rows for a cache of {cache.batch}")
    if cache.used + s > cache.capacity:
        raise InputError(f"{cache.used} cached + {s} new tokens exceed the cache's {cache.capacity} slots")
    before = cache.lengths  # (B,)
    cache.mask[:, cache.used:cache.used + s] = mask
    cache.used += s
    return np.maximum(before[:, None] + np.cumsum(mask, axis=-1) - 1, 0)  # (B, S)


def prefill(backend: DecoderBackend, cache: KVCache, embeds: Any, mask: np.ndarray | None = None) -> np.ndarray:
    """Writes a chunk (B, S, D) of embeddings after the cache's filled slots -> the last column's
    logits (B, V). `mask` (B, S) marks left padding (default: all real)."""
    batch, s = int(embeds.shape[0]), int(embeds.shape[1])
    if mask is None:
        mask = np.ones((batch, s), dtype=np.int64)
    if s > 1 and cache.used and not backend.chunked_prefill(batch):
        raise InputError(f"this decoder cannot prefill {s} tokens after a non-empty cache at batch {batch}")
    positions = _take_slots(cache, np.asarray(mask, dtype=np.int64))
    try:
        return backend.forward(cache, embeds, positions)
    except BaseException:
        cache.truncate(cache.used - s)  # the slots were never written
        raise


def _step(backend: DecoderBackend, cache: KVCache, tokens: np.ndarray) -> np.ndarray:
    positions = _take_slots(cache, np.ones((cache.batch, 1), dtype=np.int64))
    fast = getattr(backend, "step", None)
    if fast is not None:
        return fast(cache, tokens, positions)
    return backend.forward(cache, backend.embed(tokens[:, None]), positions)


def check_logits(logits: np.ndarray, tokens: np.ndarray, first: bool) -> None:
    """Stops on a broken decoder with one line. argmax picks a NaN or an infinity when there is
    one, so the chosen logit alone tells (O(1) a step); the first step also rejects rows whose
    logits are all equal, what all-zero weights give."""
    chosen = logits[np.arange(len(tokens)), tokens]
    if not np.isfinite(chosen).all() or (first and not np.isfinite(logits).all()):
        raise EngineError("the decoder produced non-finite logits (NaN or Inf): the weights are broken")
    if first and bool((logits.max(-1) == logits.min(-1)).any()):
        raise EngineError("the decoder's logits are all equal (all-zero or broken weights): no answer to give")


@dataclass
class Decoded:
    """What `decode` returns: new token ids per row (stop ids dropped), why each row ended, and
    when the first token was chosen (perf_counter seconds)."""

    ids: list[list[int]]
    finish: list[str] = field(default_factory=list)  # "stop" | "length" per row
    first_token_at: float | None = None


def decode(backend: DecoderBackend, cache: KVCache, logits: np.ndarray, sampling: SamplingConfig,
           stop_ids: tuple[int, ...], on_token: Callable[[int, int], bool | None] | None = None) -> Decoded:
    """The decode loop: choose from `logits` (the last prefill's), feed the token back, until every
    row chose a stop id or `max_new_tokens` were chosen. `on_token(row, id)` sees each kept token
    as it comes; returning True stops generation (a stop string, a client that went away). The
    cache ends holding every token fed to the decoder (the last chosen one is not)."""
    sample = Sampler(sampling)
    batch = cache.batch
    stop = set(stop_ids)
    out: list[list[int]] = [[] for _ in range(batch)]
    finish = ["length"] * batch
    done = np.zeros(batch, dtype=bool)
    first_at = None
    prepare = getattr(backend, "prepare_decode", None)
    if prepare is not None:
        prepare(cache, sampling.max_new_tokens)
    for step in range(sampling.max_new_tokens):
        if sampling.temperature and not np.isfinite(logits).all():  # softmax of a NaN cannot sample
            raise EngineError("the decoder produced non-finite logits (NaN or Inf): the weights are broken")
        tokens = sample(logits)  # (B,)
        check_logits(logits, tokens, first=step == 0)
        if step == 0:
            first_at = time.perf_counter()
        halt = False
        for row, tok in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if tok in stop:
                done[row], finish[row] = True, "stop"
                continue
            out[row].append(tok)
            if on_token is not None and on_token(row, tok):
                halt = True
        if halt or done.all() or step == sampling.max_new_tokens - 1:
            if halt:
                finish = ["stop" if d else "cancelled" for d in done]
            break
        if cache.used >= cache.capacity:
            break  # the caller sized the cache; reaching its end is the length limit
        logits = _step(backend, cache, tokens)
    return Decoded(out, finish, first_at)


def generate(backend: DecoderBackend, embeds: Any, mask: np.ndarray, sampling: SamplingConfig,
             stop_ids: tuple[int, ...], on_token: Callable[[int, int], bool | None] | None = None,
             timings: dict[str, float] | None = None) -> list[list[int]]:
    """The fresh path: a new cache sized for the prompt and the answer, one prefill of the whole
    left-padded prompt (B, S, D), then `decode`. `timings` gets prefill (to the first token) and
    generate (prefill + decode), ms."""
    sampling.validate()
    batch, width = mask.shape
    if width + sampling.max_new_tokens > backend.max_context:
        raise InputError(f"prompt of {width} tokens + {sampling.max_new_tokens} new tokens exceeds the "
                         f"model's context of {backend.max_context}")
    t0 = time.perf_counter()
    cache = backend.new_cache(batch, width + sampling.max_new_tokens)
    logits = prefill(backend, cache, embeds, mask)
    result = decode(backend, cache, logits, sampling, stop_ids, on_token)
    end = time.perf_counter()
    if timings is not None:
        timings["prefill"] = ((result.first_token_at or end) - t0) * 1e3
        timings["generate"] = (end - t0) * 1e3
    return result.ids
