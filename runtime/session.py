"""The library API: open a model once, encode a clip once, ask it many questions. No torch for an
exported engine.

    from blip3v.runtime.session import Engine
    engine = Engine.open("engines/demo")              # an engine directory, or a checkpoint (torch)
    clip = engine.clip("clip.mp4")                     # a path, bytes, a binary file object, or frames
    clip.ask("what colour does the square turn?").text
    for piece in clip.stream("which way does the circle move?"):
        print(piece, end="")
    chat = clip.chat()                                 # multi-turn, one growing KV cache
    chat.ask("how many shapes are there?"); chat.ask("and which one moves?")

How reuse works. The prompt puts the video before the question, so the system text, the user header
and the M video tokens are a prefix every question about a clip shares. A `Clip` holds the encoded
video and one KV cache, with the token ids whose keys and values it holds. A question is tokenized
as the fresh path tokenizes it (the whole prompt), the cache is rewound to the longest prefix it
shares with what is cached (`KVCache.truncate`: no copy), and only the rest is prefilled; so a
follow-up prefills its own few tokens. Greedy answers equal the fresh path's but for float rounding
of a chunked prefill (tests/test_session.py measures it). `Conversation` does the same over a
growing multi-turn history. Clips are cached by `Engine` in memory (LRU, a byte limit), keyed by a
hash of the video bytes, the frame-sampling settings and the model's fingerprint: a later question
about the same file skips decoding, the visual graph and the prefix prefill.

A model ("host") is any backend with: `num_frames, image_size, image_mean, image_std,
num_video_tokens, stop_ids, special_ids, fingerprint, max_context`, `load_video(path) -> (T, 3, S,
S)`, `encode_video(pixels (B, T, 3, S, S)) -> video (B, M, D)`, `encode_prompt(question) -> ids`,
`encode_text(text) -> ids`, `decode(ids) -> str`, `splice(rows, video) -> (embeds, mask)`, and the
decoder interface of blip3v.runtime.decoding. OrtBackend, TrtBackend and TorchBackend all are.

Thread safety: none of these objects is thread-safe. Use one Engine (and its clips) from one thread
at a time; the server runs every request through one worker thread that owns the Engine. The one
exception is a host's `encode_video` on an ONNX Runtime CPU engine opened with `parallel_clips`
(`host.encode_workers` > 0): eval and batch call it from that many threads at once, then answer
with `Engine.answer_encoded` (or a `Clip`) from one thread.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from blip3v.errors import InputError
from blip3v.runtime.decoding import KVCache, decode, generate, grown, prefill
from blip3v.runtime.generation import SamplingConfig, TextStream

DEFAULT_CACHE_BYTES = 1 << 30  # clips kept in memory (video tokens + their KV caches)
HASH_CHUNK = 1 << 20

VideoSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | np.ndarray


@dataclass
class Answer:
    """One answer: the text, its token ids, why it ended ("stop", "length", "cancelled"), the
    video tokens it saw, and timings in ms (decode_video, visual: 0 when the clip was reused;
    prefill: to the first token; generate: prefill + decode; reused_tokens: prompt tokens whose
    KV came from the cache; prompt_tokens: all of them, video tokens included)."""

    text: str
    token_ids: list[int]
    video_tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    reused_tokens: int = 0


def check_question(question: str) -> str:
    """A question as the tokenizer may take it: valid UTF-8 text, not empty."""
    if not isinstance(question, str):
        raise InputError("the question must be text")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the question is not valid UTF-8") from None
    if not question.strip():
        raise InputError("the question is empty")
    return question


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _hash_source(source: VideoSource) -> tuple[str, bytes | None, np.ndarray | None, str]:
    """-> (sha256 hex, the bytes if they came in memory, frames if an array, a display name)."""
    digest = hashlib.sha256()
    if isinstance(source, np.ndarray):
        frames = np.ascontiguousarray(source)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise InputError(f"a frame array must be (N, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
        digest.update(repr((frames.shape, str(frames.dtype))).encode())
        digest.update(frames.data)
        return digest.hexdigest(), None, frames, "<frames>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InputError("the video is empty (0 bytes)")
        digest.update(data)
        return digest.hexdigest(), data, None, "<bytes>"
    if hasattr(source, "read"):
        data = source.read()  # type: ignore[union-attr]
        if not isinstance(data, bytes):
            raise InputError("a file object for a video must be opened in binary mode")
        if not data:
            raise InputError("the video is empty (0 bytes)")
        digest.update(data)
        return digest.hexdigest(), data, None, str(getattr(source, "name", "<file object>"))
    path = Path(os.fspath(source))  # type: ignore[arg-type]
    try:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a video") from None
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return digest.hexdigest(), None, None, str(path)


class Engine:
    """A model opened once: answers about clips, with an LRU cache of encoded clips."""

    def __init__(self, host: Any, cache_bytes: int = DEFAULT_CACHE_BYTES):
        import blip3v.runtime.video  # noqa: F401  PyAV and Pillow load with the model, not in the first clip's timing

        self.host = host
        self.cache_bytes = cache_bytes
        self._clips: OrderedDict[str, Clip] = OrderedDict()
        self._lock = threading.Lock()  # guards the clip table only; see the module docstring
        self.stats = {"clip_hits": 0, "clip_misses": 0, "evictions": 0}

    @classmethod
    def open(cls, model: str | os.PathLike | None = None, engine: str | os.PathLike | None = None,
             device: str = "cpu", backend: str | None = None, **options) -> Engine:
        """An exported engine directory (ONNX Runtime by default, `backend="tensorrt"`), or a checkpoint
        directory (PyTorch: `options` go to TorchBackend.load). `Engine.open("DIR")` tells which by
        looking for a manifest.json."""
        from blip3v.runtime.backends import open_host

        return cls(open_host(model, engine, backend, device, **options))

    @property
    def num_video_tokens(self) -> int:
        return int(self.host.num_video_tokens)

    # -- clips -----------------------------------------------------------------------------
    def clip(self, source: VideoSource) -> Clip:
        """The clip of a video (path, bytes, binary file object, or frames (N, H, W, 3) uint8),
        decoded and encoded once; a clip seen before (same bytes, same model) comes from the cache."""
        t0 = time.perf_counter()
        digest, data, frames, name = _hash_source(source)
        t_hash = time.perf_counter()
        key = hashlib.sha256(f"{digest}|{self.host.fingerprint}|{self._sampling_key()}".encode()).hexdigest()
        with self._lock:
            found = self._clips.get(key)
            if found is not None:
                self._clips.move_to_end(key)
                self.stats["clip_hits"] += 1
                found.encode_timings = {}  # encoded before: this caller paid nothing for it
                return found
            self.stats["clip_misses"] += 1
        parts: dict[str, float] = {}
        pixels = self._pixels(source, data, frames, name, parts)
        t1 = time.perf_counter()
        video = self.host.encode_video(pixels[None])  # (1, M, D)
        t2 = time.perf_counter()
        # decode_video: open, sample and preprocess (its parts as video_*); hashing the bytes for the
        # cache key is reported apart (hash_video), since it is not the video stage's cost.
        clip = Clip(self, key, video, {"hash_video": (t_hash - t0) * 1e3, "decode_video": (t1 - t_hash) * 1e3,
                                       **parts, "visual": (t2 - t1) * 1e3})
        self._remember(key, clip)
        return clip

    def _sampling_key(self) -> str:
        h = self.host
        options = sorted(getattr(h, "video_options", {}).items())
        return f"{h.num_frames}|{h.image_size}|{tuple(h.image_mean)}|{tuple(h.image_std)}|{options}"

    def _pixels(self, source: VideoSource, data: bytes | None, frames: np.ndarray | None, name: str,
                timings: dict[str, float]) -> np.ndarray:
        if frames is not None:
            from blip3v.runtime.video import frame_indices, preprocess

            chosen = frames[frame_indices(len(frames), self.host.num_frames)]  # (T, H, W, 3)
            return preprocess(chosen, self.host.image_size, self.host.image_mean, self.host.image_std)
        if data is None:
            return self.host.load_video(os.fspath(source), timings)  # type: ignore[arg-type]
        # Bytes go through a temporary file, so they take the same decoding path as the file would.
        with tempfile.TemporaryDirectory(prefix="blip3v-clip-") as tmp:
            path = Path(tmp) / "clip"
            path.write_bytes(data)
            try:
                return self.host.load_video(path, timings)
            except InputError as exc:
                raise InputError(str(exc).replace(str(path), name)) from None

    def _remember(self, key: str, clip: Clip) -> None:
        with self._lock:
            self._clips[key] = clip
            self._clips.move_to_end(key)
            total = sum(c.nbytes() for c in self._clips.values())
            while total > self.cache_bytes and len(self._clips) > 1:
                _, old = self._clips.popitem(last=False)
                total -= old.nbytes()
                self.stats["evictions"] += 1

    def cached_clips(self) -> int:
        return len(self._clips)

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(c.nbytes() for c in self._clips.values())

    def clear(self) -> None:
        with self._lock:
            self._clips.clear()

    # -- one-shot and batched answers --------------------------------------------------------
    def ask(self, source: VideoSource, question: str, sampling: SamplingConfig | None = None,
            on_text: Callable[[str], None] | None = None) -> Answer:
        return self.clip(source).ask(question, sampling, on_text=on_text)

    def answer_batch(self, pixel_values: np.ndarray, questions: list[str], sampling: SamplingConfig,
                     on_token: Callable[[int, int], bool | None] | None = None,
                     timings: dict[str, float] | None = None) -> list[list[int]]:
        """The fresh path for many clips at once (eval, calibration): pixel_values (B, T, 3, S, S), one
        question per clip -> new token ids per row; left-padded rows, `max_batch` rows per call."""
        return answer_batch(self.host, pixel_values, questions, sampling, on_token, timings)

    def answer_encoded(self, video: Any, questions: list[str], sampling: SamplingConfig,
                       on_token: Callable[[int, int], bool | None] | None = None,
                       timings: dict[str, float] | None = None) -> list[list[int]]:
        """`answer_batch` for clips already through the visual graph: video (B, M, D) from
        `host.encode_video`, encoded elsewhere (eval's workers encode clip by clip, see
        `encode_workers` in blip3v.runtime.ort_backend)."""
        return answer_encoded(self.host, video, questions, sampling, on_token, timings)

    def decode(self, ids: list[int]) -> str:
        return self.host.decode(ids)

    def load_video(self, path: str | os.PathLike) -> np.ndarray:
        """(T, 3, S, S) float32 pixels of a video file, as this model samples and preprocesses it."""
        return self.host.load_video(path)


class HostConveniences:
    """`answer_batch` and `ask` on a backend itself, for scripts and tests that hold a backend: thin
    calls into the session API above (no loop of their own)."""

    def answer_batch(self, pixel_values: np.ndarray, questions: list[str], sampling: SamplingConfig,
                     on_token: Callable[[int, int], bool | None] | None = None,
                     timings: dict[str, float] | None = None) -> list[list[int]]:
        return answer_batch(self, pixel_values, questions, sampling, on_token, timings)

    def ask(self, video: VideoSource, question: str, sampling: SamplingConfig | None = None,
            on_text: Callable[[str], None] | None = None) -> Answer:
        return Engine(self).ask(video, question, sampling, on_text)


def answer_batch(host: Any, pixel_values: np.ndarray, questions: list[str], sampling: SamplingConfig,
                 on_token: Callable[[int, int], bool | None] | None = None,
                 timings: dict[str, float] | None = None) -> list[list[int]]:
    """See Engine.answer_batch; each row alone gets the same tokens (positions come from the mask)."""
    sampling.validate()
    if len(questions) != len(pixel_values):
        raise InputError(f"{len(questions)} questions for {len(pixel_values)} clips")
    t0 = time.perf_counter()
    video = host.encode_video(pixel_values)  # (B, M, D)
    visual_ms = (time.perf_counter() - t0) * 1e3
    out = answer_encoded(host, video, questions, sampling, on_token, timings)
    if timings is not None:
        timings["visual"] = visual_ms
    return out


def answer_encoded(host: Any, video: Any, questions: list[str], sampling: SamplingConfig,
                   on_token: Callable[[int, int], bool | None] | None = None,
                   timings: dict[str, float] | None = None) -> list[list[int]]:
    """See Engine.answer_encoded: the decoder half of `answer_batch` (`timings` gets "visual" 0.0)."""
    sampling.validate()
    if len(questions) != len(video):
        raise InputError(f"{len(questions)} questions for {len(video)} clips")
    t1 = time.perf_counter()
    chunk = getattr(host, "max_batch", None) or max(1, len(questions))
    out: list[list[int]] = []
    first: dict[str, float] = {}
    for start in range(0, len(questions), chunk):
        rows = [host.encode_prompt(q) for q in questions[start:start + chunk]]
        embeds, mask = host.splice(rows, video[start:start + chunk])
        report = on_token if on_token is None or not start else (lambda r, t, s=start: on_token(r + s, t))
        out += generate(host, embeds, mask, sampling, host.stop_ids, report, first if not start else None)
    if timings is not None:
        timings["visual"] = 0.0
        timings["prefill"] = first.get("prefill", 0.0)
        timings["generate"] = (time.perf_counter() - t1) * 1e3
    return out


class Clip:
    """An encoded clip and one KV cache holding its prompt prefix. Not thread-safe."""

    def __init__(self, engine: Engine, key: str, video: Any, timings: dict[str, float]):
        self.engine = engine
        self.host = engine.host
        self.key = key
        self.video = video  # (1, M, D) in the backend's own array type
        self.encode_timings = timings  # what making it cost; reported by the first question only, then {}
        self.cache: KVCache | None = None
        self.cached_ids: list[int] = []  # token ids whose K/V the cache holds (`<image>` = M slots)

    def nbytes(self) -> int:
        video = int(getattr(self.video, "nbytes", 0) or getattr(self.video, "numel", lambda: 0)() * 4)
        return video + (self.cache.nbytes() if self.cache is not None else 0)

    def _slots(self, n_ids: int, ids: list[int]) -> int:
        """Cache slots taken by the first `n_ids` of `ids` (the `<image>` id is M slots)."""
        image = self.host.special_ids["image"]
        return n_ids + (self.host.num_video_tokens - 1) * ids[:n_ids].count(image)

    def _embeds(self, ids: list[int]) -> Any:
        """Decoder input rows (1, S', D) for a run of ids, `<image>` spliced if it is among them."""
        if self.host.special_ids["image"] in ids:
            embeds, _ = self.host.splice([ids], self.video)
            return embeds
        return self.host.embed(np.asarray([ids], dtype=np.int64))

    def run(self, ids: list[int], sampling: SamplingConfig, on_token: Callable[[int, int], bool | None] | None = None
            ) -> tuple[list[int], str, dict[str, float], int]:
        """Feeds `ids` (a whole prompt, `<image>` included) reusing the longest cached prefix, then
        decodes. -> (new ids, finish reason, timings ms, reused prompt tokens)."""
        sampling.validate()
        host = self.host
        image = host.special_ids["image"]
        if ids.count(image) != 1:
            raise InputError(f"a prompt needs exactly one <image> token; found {ids.count(image)} (a question "
                             "may not contain <image>)")
        total = self._slots(len(ids), ids)
        if total + sampling.max_new_tokens > host.max_context:
            raise InputError(f"prompt of {total} tokens + {sampling.max_new_tokens} new tokens exceeds the "
                             f"model's context of {host.max_context}")
        t0 = time.perf_counter()
        keep = _common_prefix(self.cached_ids, ids) if self.cache is not None else 0
        keep = min(keep, len(ids) - 1)  # at least one token is fed, for its logits
        if keep and not host.chunked_prefill(1):
            keep = 0  # this decoder prefills from an empty cache only
        if self.cache is None or keep == 0:
            self.cache = host.new_cache(1, total + sampling.max_new_tokens)
            keep = 0
        else:
            self.cache.truncate(self._slots(keep, self.cached_ids))
            self.cache = grown(self.cache, total + sampling.max_new_tokens, host.max_context)
        self.cached_ids = []  # until the prefill has run
        logits = prefill(host, self.cache, self._embeds(ids[keep:]))
        self.cached_ids = list(ids)
        try:
            result = decode(host, self.cache, logits, sampling, host.stop_ids, on_token)
        except BaseException:
            self.cache, self.cached_ids = None, []  # a step may have failed half-way
            raise
        out = result.ids[0]
        # The cache holds the prompt and every token fed back: all of `out` when a stop id ended it,
        # all but the last otherwise (the last chosen token is never fed).
        self.cached_ids = (ids + out)[:self._ids_in_cache(ids + out)]
        end = time.perf_counter()
        timings = {"prefill": ((result.first_token_at or end) - t0) * 1e3, "generate": (end - t0) * 1e3}
        return out, result.finish[0], timings, self._slots(keep, ids)

    def _ids_in_cache(self, ids: list[int]) -> int:
        """How many of `ids` the cache's slots hold (slots -> ids, `<image>` = M slots)."""
        assert self.cache is not None
        image, m = self.host.special_ids["image"], self.host.num_video_tokens
        slots, n = 0, 0
        for tok in ids:
            width = m if tok == image else 1
            if slots + width > self.cache.used:
                break
            slots, n = slots + width, n + 1
        return n

    def ask(self, question: str, sampling: SamplingConfig | None = None,
            on_text: Callable[[str], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> Answer:
        """One question about this clip. `on_text` receives the answer as it is decoded;
        `should_stop` (checked each token) cancels it."""
        sampling = sampling or SamplingConfig()
        ids = self.host.encode_prompt(check_question(question))
        return self._answer(ids, sampling, on_text, should_stop)

    def answer(self, ids: list[int], sampling: SamplingConfig | None = None,
               on_text: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None) -> Answer:
        """An answer to a whole prompt given as token ids (one `<image>`; the server's and chat's
        multi-turn histories), reusing the longest cached prefix like `ask`."""
        return self._answer(ids, sampling or SamplingConfig(), on_text, should_stop)

    def _answer(self, ids: list[int], sampling: SamplingConfig, on_text: Callable[[str], None] | None,
                should_stop: Callable[[], bool] | None) -> Answer:
        stream = TextStream(self.host.decode, on_text) if on_text is not None else None
        stops = tuple(s for s in (sampling.stop or ()) if s)
        seen: list[int] = []
        cut: list[int] = []  # where a stop string ended the answer (chars)

        def on_token(_row: int, tok: int) -> bool:
            seen.append(tok)
            if stops:
                text = self.host.decode(seen)
                hit = min((text.find(s) for s in stops if s in text), default=-1)
                if hit >= 0:
                    cut.append(hit)
                    return True
            if stream is not None:
                stream.push(tok)
            return bool(should_stop and should_stop())

        out, finish, timings, reused = self.run(ids, sampling, on_token if (stream or stops or should_stop) else None)
        text = self.host.decode(out)
        if cut:
            text, finish = text[:cut[0]], "stop"
        if self.encode_timings:
            timings = {**self.encode_timings, **timings}
            self.encode_timings = {}
        else:
            timings = {"hash_video": 0.0, "decode_video": 0.0, "visual": 0.0, **timings}
        prompt = self._slots(len(ids), ids)
        return Answer(text, out, self.host.num_video_tokens, timings, finish, prompt, reused)

    def stream(self, question: str, sampling: SamplingConfig | None = None) -> Iterator[str]:
        """The answer as text pieces, as they are decoded. The decode loop runs in a helper thread
        that hands each piece over; closing the iterator early cancels the generation."""
        import queue

        pieces: queue.Queue = queue.Queue()
        done = object()
        error: list[BaseException] = []
        cancelled = threading.Event()

        def work() -> None:
            try:
                self.ask(question, sampling, on_text=pieces.put, should_stop=cancelled.is_set)
            except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
                error.append(exc)
            finally:
                pieces.put(done)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            while (item := pieces.get()) is not done:
                yield item
        finally:
            cancelled.set()
            worker.join()
        if error:
            raise error[0]

    def chat(self, system: str | None = None) -> Conversation:
        return Conversation(self)


class Conversation:
    """A multi-turn conversation about one clip: every turn's prompt is the whole history, and the
    cache is rewound only to where the history and the cache agree, so earlier turns are never
    prefilled again. Not thread-safe."""

    def __init__(self, clip: Clip):
        self.clip = Clip(clip.engine, clip.key, clip.video, dict(clip.encode_timings))  # its own cache
        host = clip.host
        template = host.prompt_template
        at_q, at_img = template.index("{question}"), template.index("<image>")
        self.after_question = template[at_q + len("{question}"):]  # "<|end|>\n<|assistant|>\n"
        user = template.rfind("<|user|>", 0, at_img)
        if user < 0:
            raise InputError("this model's prompt template has no <|user|> turn marker: multi-turn chat "
                             "needs the Phi-3 template")
        self.user_header = template[user:at_img]  # "<|user|>\n"
        self.end = self.after_question.split("\n")[0]  # "<|end|>"
        self.ids: list[int] = []
        self.turns: list[tuple[str, str]] = []

    def ask(self, question: str, sampling: SamplingConfig | None = None,
            on_text: Callable[[str], None] | None = None) -> Answer:
        sampling = sampling or SamplingConfig()
        host = self.clip.host
        check_question(question)
        if not self.ids:
            ids = host.encode_prompt(question)
        else:
            question = question.strip()
            turn = f"{self.end}\n{self.user_header}{question}{self.after_question}"
            ids = self.ids + host.encode_text(turn)
        answer = self.clip._answer(ids, sampling, on_text, None)
        self.ids = ids + answer.token_ids
        self.turns.append((question, answer.text))
        return answer


def read_questions(stream: io.TextIOBase) -> Iterator[str]:
    """Questions one a line (blank lines skipped), for `blip3v chat` from a terminal or a pipe."""
    for line in stream:
        line = line.strip()
        if line:
            yield line
