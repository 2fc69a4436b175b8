"""Live video: frames encoded as they arrive; a question runs only the temporal encoder, the
prefill and the decode. No torch for an exported engine.

    from blip3v.runtime.session import Engine
    from blip3v.runtime.live import LiveSession, Source
    engine = Engine.open(engine="engines/demo")
    with LiveSession(engine, fps=1.0) as live:          # or window=8.0: T frames over 8 s
        live.play(Source("rtsp://camera/stream"))        # or a file, udp://..., /dev/video0
        answer = live.ask("what colour does the square turn?")
        answer.text, answer.window                         # the stream seconds it covers

Why it is cheap. BLIP-3-Video's resampler turns each frame into N latents on its own, and only the
temporal encoder looks across frames (arXiv 2410.16267 sec. 2; model/xgenmm.py `encode_video =
tokens(frame_latents(pixels))`). So a frame is pushed through the per-frame graph (export/split.py
frame.onnx: SigLIP + resampler, the heavy part) once, as it arrives, and its latents wait in a ring
buffer of the last T frames. A question runs temporal.onnx over the buffer (T x N latents -> M video
tokens), then the prompt's prefill and the decode through the sessions API (blip3v.runtime.session
`Clip`, one decode loop), and says which stream window [t0, t1] it saw.

Threads and what they hold (memory stays bounded however long it runs):
  source thread   PyAV demux + decode (`Source`), paced by pts for a file played in real time;
                  a `FrameSampler` keeps one frame per 1/fps seconds of stream time; only kept
                  frames are converted to RGB (the clip reader's conversion) and queued.
  frame queue     at most `queue` RGB frames (default T). When the encoder falls behind, the
                  OLDEST waiting frame is dropped and counted (`frames_dropped`): a live answer
                  wants the newest frames. A file read as fast as it can be (realtime off)
                  blocks instead: nothing is dropped.
  encoder thread  preprocess + frame.onnx, up to `batch` queued frames a call (default 1: on the
                  CPU a batch of 8 was no faster a frame, real-sized, and 2.4x slower, demo model;
                  `blip3v bench live`), into the ring.
  ring buffer     T entries of (N, D_vis) latents with their stream times, allocated once.
  the caller      `ask`: temporal graph + prefill + decode. One model call runs at a time (`compute`
                  lock): a question waits for at most the frame being encoded, then the encoder
                  waits for the answer while frames queue up (or drop, oldest first).

Stream time: seconds since the session's first frame, from each frame's pts; continuous across a
reconnect (the wall time of the gap is added) and across a timestamp jump. Sources: a file, a
network URL (rtsp, rtmp, http(s) incl. HLS, udp, tcp, srt, rtp), or a V4L2 camera (`/dev/videoN`).
A network stream that drops is reopened with exponential backoff, at most `reconnect` times in a
row; a source that cannot be opened at all, or a camera that does not exist, is one InputError line.

Not thread-safe from the caller's side: one thread asks; the session's own threads are internal.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blip3v.errors import EngineError, InputError
from blip3v.runtime.generation import SamplingConfig
from blip3v.runtime.session import Clip, Engine, check_question

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "rtp")
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 8.0  # reconnect delays: 0.5, 1, 2, 4, 8, 8, ... seconds
MAX_BAD_PACKETS = 1_000  # packets in a row the decoder rejects before the connection counts as dropped
TIME_JUMP_S = 30.0  # a pts jump beyond this (or backwards) is a discontinuity, not elapsed stream time


# ----------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class SplitPart:
    """One graph of the split visual path: its file and its input / output tensor names."""

    file: str
    input: str
    output: str


def split_spec(manifest: Any) -> dict[str, SplitPart]:
    """{"frame", "temporal"} parts from the manifest's optional `frame` / `temporal` sections
    (written by export/split.py):

        frame:    {file, inputs: {pixel_values: NAME}, outputs: {latents: NAME}, latents_per_frame, latent_dim}
        temporal: {file, inputs: {latents: NAME}, outputs: {video_tokens: NAME}, num_frames (= model.num_frames)}

    An engine without them (exported before live mode) is one EngineError line saying to re-export.
    Their files are in `files`, so load_manifest has checked each one's size and sha256."""
    raw, where = manifest.raw, manifest.directory / "manifest.json"
    if "frame" not in raw or "temporal" not in raw:
        raise EngineError(f"{manifest.directory}: this engine has no per-frame visual graphs (frame.onnx, "
                          "temporal.onnx), which live mode needs; re-export it with this blip3v (blip3v export)")

    def part(section: str, given: str, gives: str) -> SplitPart:
        obj = raw[section]
        if not isinstance(obj, dict):
            raise EngineError(f"{where}: {section}: expected an object")
        name = obj.get("file")
        if not isinstance(name, str) or name not in raw.get("files", {}):
            raise EngineError(f"{where}: {section}.file: expected a file listed in files, got {name!r}")
        names = []
        for key, role in (("inputs", given), ("outputs", gives)):
            value = obj.get(key, {}).get(role) if isinstance(obj.get(key), dict) else None
            if not isinstance(value, str) or not value:
                raise EngineError(f"{where}: {section}.{key}.{role}: expected a tensor name, got {value!r}")
            names.append(value)
        return SplitPart(name, names[0], names[1])

    frames = raw["temporal"].get("num_frames") if isinstance(raw["temporal"], dict) else None
    if frames != raw["model"]["num_frames"]:
        raise EngineError(f"{where}: temporal.num_frames: expected model.num_frames ({raw['model']['num_frames']}), "
                          f"got {frames!r}")
    return {"frame": part("frame", "pixel_values", "latents"), "temporal": part("temporal", "latents", "video_tokens")}


# ----------------------------------------------------------------------------------- sources


@dataclass
class SourceOptions:
    """How a source is opened. `realtime` (None: yes for a file, no for a stream or camera, which
    come at their own pace) paces the frames by their pts (e.g. an HLS recording read from a server);
    `reconnect` bounds the reopen attempts in a row after a network stream or camera drops;
    `timeout` (s) bounds opening and each read of a network stream; `format` forces a demuxer
    (v4l2 for a camera, mpegts, ...); `options` go to FFmpeg (e.g. {"rtsp_transport": "udp"})."""

    format: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    realtime: bool | None = None
    reconnect: int = 5
    timeout: float = 10.0

    def check(self) -> None:
        if self.reconnect < 0:
            raise InputError(f"--reconnect must be 0 or more, got {self.reconnect}")
        if not self.timeout > 0:
            raise InputError(f"--timeout must be positive, got {self.timeout}")


def source_kind(spec: str, fmt: str | None = None) -> str:
    """"network", "camera" or "file" for a source string (a one-line InputError when unusable)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("the live source is empty: give a file, a stream URL or a camera (/dev/videoN)")
    if "://" in spec:
        scheme = spec.split("://", 1)[0].lower()
        if scheme not in NETWORK_SCHEMES:
            raise InputError(f"{spec}: unknown stream scheme {scheme!r}; expected one of {', '.join(NETWORK_SCHEMES)}")
        return "network"
    if fmt == "v4l2" or spec.startswith("/dev/video"):
        if not os.path.exists(spec):
            raise InputError(f"{spec}: no such camera (no V4L2 device at that path)")
        if not stat.S_ISCHR(os.stat(spec).st_mode):
            raise InputError(f"{spec}: not a camera (not a character device)")
        return "camera"
    if not os.path.exists(spec):
        raise InputError(f"{spec}: no such file")
    if os.path.isdir(spec):
        raise InputError(f"{spec}: is a directory, not a video")
    return "file"


class StreamClock:
    """Seconds of stream time since the session's first frame: pts-based within a connection,
    continuous across reconnects and timestamp jumps (the wall time elapsed is added there)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.wall_last = 0.0
        self.base = 0.0
        self.origin: float | None = None  # pts (s) of the frame that started the current stretch

    def reconnected(self) -> None:
        self.origin = None

    def time(self, pts: float | None) -> float:
        now = time.monotonic()
        since = max(now - self.wall_last, 1e-3)  # a later frame is never earlier than the last
        if pts is None:
            t = 0.0 if self.last is None else self.last + since
        else:
            jumped = (self.origin is not None and self.last is not None
                      and not -1e-6 <= self.base + pts - self.origin - self.last <= TIME_JUMP_S)
            if self.origin is None or jumped:
                self.base, self.origin = (0.0 if self.last is None else self.last + since), pts
            t = self.base + pts - self.origin
        self.last, self.wall_last = t, now
        return t


class Source:
    """A video source through PyAV: frames with their stream time, reconnecting a dropped stream."""

    def __init__(self, spec: str, options: SourceOptions | None = None):
        self.options = options or SourceOptions()
        self.options.check()
        self.spec = spec
        self.kind = source_kind(spec, self.options.format)
        self.realtime = self.kind == "file" if self.options.realtime is None else bool(self.options.realtime)
        self.reconnects = 0  # successful reopens so far

    @property
    def live(self) -> bool:
        """Frames come at the source's pace (a stream, a camera, anything paced): drop, never block."""
        return self.kind != "file" or self.realtime

    def open(self):
        """The opened container; a one-line InputError when it cannot be opened."""
        import av

        opts = dict(self.options.options)
        kwargs: dict[str, Any] = {"format": self.options.format or ("v4l2" if self.kind == "camera" else None)}
        if self.kind == "network":
            kwargs["timeout"] = (self.options.timeout, self.options.timeout)
            if self.spec.lower().startswith(("rtsp://", "rtsps://")):
                opts.setdefault("rtsp_transport", "tcp")  # no packet loss on busy links; cameras serve both
        if opts:
            kwargs["options"] = opts
        try:
            container = av.open(self.spec, **{k: v for k, v in kwargs.items() if v is not None})
        except Exception as exc:  # noqa: BLE001 (FFmpeg errors, OSError, timeouts: all mean "cannot open")
            raise InputError(f"cannot open live source {self.spec!r}: {_problem(exc)}") from None
        if not container.streams.video:
            container.close()
            raise InputError(f"cannot open live source {self.spec!r}: no video stream")
        return container

    def frames(self, container, stop: threading.Event) -> Iterator[tuple[float, Any]]:
        """(stream time s, av.VideoFrame) from an opened container until the end of a file, `stop`,
        or a dropped stream that `reconnect` attempts could not reopen (InputError).

        A stream or camera that ends is reopened like one that fails: a live server that stops
        looks the same as one that finished (an HLS playlist that ends replays from its start).
        With `reconnect` 0 a clean end is the end; a failure is the error line."""
        clock = StreamClock()
        while True:
            problem = None
            try:
                for pts, frame in self._decode(container, stop):
                    t = clock.time(pts)
                    if self.realtime:
                        self._pace(t, stop)
                    yield t, frame
            except Exception as exc:  # noqa: BLE001 (a network read failing is a drop)
                problem = _problem(exc)
            finally:
                container.close()
            if stop.is_set() or self.kind == "file" or (problem is None and not self.options.reconnect):
                return
            problem = problem or "the stream ended"
            container = self._reopen(problem, stop)
            if container is None:
                return
            clock.reconnected()

    def _decode(self, container, stop: threading.Event) -> Iterator[tuple[float | None, Any]]:
        from blip3v.runtime.video import _video_stream  # the clip reader's choice: no cover art; codec
        # threads only for large frames (they add latency and cost more than they save on small ones)

        stream = _video_stream(container, self.spec)
        bad = 0
        for packet in container.demux(stream):
            if stop.is_set():
                return
            try:
                decoded = stream.decode(packet)
            except Exception:  # noqa: BLE001 (a corrupt packet: skip it, as the clip reader does)
                bad += 1
                if bad > MAX_BAD_PACKETS:
                    raise InputError("the decoder rejected every packet for a while") from None
                continue
            bad = 0
            for frame in decoded:
                yield frame.time, frame

    def _pace(self, t: float, stop: threading.Event) -> None:
        now = time.monotonic()
        if not hasattr(self, "_wall0"):
            self._wall0 = now - t
        wait = self._wall0 + t - now
        if wait > 0:
            stop.wait(wait)

    def _reopen(self, problem: str, stop: threading.Event):
        """Reopens after a drop with exponential backoff; None when stopped meanwhile."""
        attempts = self.options.reconnect
        if not attempts:
            raise InputError(f"live source {self.spec!r} dropped ({problem}); not reconnecting (--reconnect 0)")
        for attempt in range(attempts):
            if stop.wait(min(BACKOFF_FIRST_S * 2 ** attempt, BACKOFF_MAX_S)):
                return None
            try:
                container = self.open()
            except InputError as exc:
                problem = str(exc).split(f"{self.spec!r}: ", 1)[-1]  # the reason, not the name again
                continue
            self.reconnects += 1
            return container
        raise InputError(f"live source {self.spec!r} dropped ({problem}) and {attempts} reconnect attempt"
                         f"{'' if attempts == 1 else 's'} failed")


def _problem(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:300]


# ----------------------------------------------------------------------------------- buffers


class FrameSampler:
    """Keeps one frame per 1/fps seconds of stream time (every frame when fps is None)."""

    def __init__(self, fps: float | None):
        if fps is not None and not (fps > 0 and np.isfinite(fps)):
            raise InputError(f"--fps must be a positive number, got {fps}")
        self.period = 1.0 / fps if fps else 0.0
        self.next: float | None = None

    def take(self, t: float) -> bool:
        if self.next is not None and t < self.next - 1e-6:
            return False
        # On a grid from the first kept frame; after a gap (or a late frame) the grid restarts here.
        self.next = t + self.period if self.next is None or self.next + self.period <= t else self.next + self.period
        return True


class FrameQueue:
    """At most `size` items waiting for the encoder; a full queue drops its oldest item (counted)
    or, with `block`, makes the producer wait. Guarded by the session's condition."""

    def __init__(self, size: int, cond: threading.Condition):
        self.size = size
        self.cond = cond
        self.items: deque = deque()
        self.in_flight = 0  # taken by the encoder, not yet in the ring
        self.dropped = 0
        self.closed = False

    def put(self, item: Any, block: bool = False) -> None:
        with self.cond:
            while block and len(self.items) >= self.size and not self.closed:
                self.cond.wait(0.1)
            if self.closed:
                return
            if len(self.items) >= self.size:
                self.items.popleft()
                self.dropped += 1
            self.items.append(item)
            self.cond.notify_all()

    def take(self, most: int, timeout: float) -> list:
        with self.cond:
            if not self.items and not self.closed:
                self.cond.wait(timeout)
            out = [self.items.popleft() for _ in range(min(most, len(self.items)))]
            self.in_flight += len(out)
            self.cond.notify_all()
            return out

    def done(self, n: int) -> None:
        with self.cond:
            self.in_flight -= n
            self.cond.notify_all()

    @property
    def drained(self) -> bool:
        return not self.items and not self.in_flight


class LatentRing:
    """The last `capacity` frames' latents (N, D) and stream times, in one array allocated once."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.data: np.ndarray | None = None  # (T, N, D)
        self.times = np.zeros(capacity, dtype=np.float64)
        self.count = 0
        self.head = 0  # the slot the next frame goes to

    def add(self, latents: np.ndarray, times: list[float]) -> None:
        if self.data is None:
            self.data = np.empty((self.capacity, *latents.shape[1:]), dtype=latents.dtype)
        for row, t in zip(latents, times):
            self.data[self.head] = row
            self.times[self.head] = t
            self.head = (self.head + 1) % self.capacity
            self.count = min(self.count + 1, self.capacity)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the buffered latents (n, N, D) and times (n,), oldest first."""
        order = [(self.head - self.count + i) % self.capacity for i in range(self.count)]
        assert self.data is not None
        return self.data[order], self.times[order]

    def nbytes(self) -> int:
        return (0 if self.data is None else self.data.nbytes) + self.times.nbytes


# ----------------------------------------------------------------------------------- session


@dataclass
class LiveAnswer:
    """An answer over the window [t0, t1] (stream seconds of the first and last buffered frame).
    timings_ms: wait (for a full buffer), temporal, prefill (to the first token), generate,
    ttft (from the question, buffer ready, to the first token: temporal + prefill + waiting for a
    frame being encoded)."""

    question: str
    text: str
    token_ids: list[int]
    window: tuple[float, float]
    frames: int  # distinct frames in the window (< T only before the buffer first fills)
    timings_ms: dict[str, float]
    finish_reason: str
    counts: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"question": self.question, "window": [round(self.window[0], 3), round(self.window[1], 3)],
                "answer": self.text, "frames": self.frames, "finish_reason": self.finish_reason,
                "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()}, **self.counts}


class LiveSession:
    """Live answers over the last T frames of a stream; see the module docstring."""

    def __init__(self, engine: Engine, fps: float | None = 1.0, window: float | None = None,
                 queue: int | None = None, batch: int = 1):
        host = engine.host
        if not callable(getattr(host, "encode_frames", None)) or not callable(getattr(host, "encode_temporal", None)):
            raise EngineError(f"live mode needs the visual path split per frame, which the {type(host).__name__} "
                              "backend does not have; use --backend onnxruntime or torch")
        if window is not None:
            if not (window > 0 and np.isfinite(window)):
                raise InputError(f"--window must be a positive number of seconds, got {window}")
            fps = host.num_frames / window  # T frames over the window
        if queue is not None and queue < 1:
            raise InputError(f"--queue must be at least 1, got {queue}")
        if batch < 1:
            raise InputError(f"batch must be at least 1, got {batch}")
        # The clip reader's frame options (--aspect, --video-scaler) apply to live frames too.
        options = dict(getattr(host, "video_options", {}) or {})
        if options.get("decoder") == "cuda":
            raise InputError("live mode decodes on the CPU; --video-decoder cuda applies to clips")
        self.aspect, self.scaler = options.get("aspect", "squash"), options.get("scaler", "pillow")
        getattr(host, "open_split", lambda: None)()  # before any thread shares the backend
        self.engine, self.host = engine, host
        self.frames = int(host.num_frames)  # T
        self.fps = fps
        self.sampler = FrameSampler(fps)
        self.batch = batch
        self.cond = threading.Condition()  # guards the queue, the ring, the counters and the state
        self.compute = threading.Lock()  # one model call at a time: see the module docstring
        self.queue = FrameQueue(queue or self.frames, self.cond)
        self.ring = LatentRing(self.frames)
        self.seen = self.sampled = self.encoded = 0
        self.error: BaseException | None = None
        self.ended = False  # the source gave its last frame
        self.asking = 0  # questions waiting for or holding `compute`: the encoder lets them go first
        self.playing = False
        self._stop = threading.Event()
        self._asked = 0
        self._encoded_at_last_answer = 0
        self._source_thread: threading.Thread | None = None
        # The first run of a graph sets up its kernels: do it now, not on the first frame.
        with self.compute:
            host.encode_frames(np.zeros((1, 3, host.image_size, host.image_size), dtype=np.float32))
        self._encoder = threading.Thread(target=self._encode_loop, name="blip3v-live-encoder", daemon=True)
        self._encoder.start()

    # -- frames in ---------------------------------------------------------------------------
    def push(self, frame: np.ndarray, t: float, block: bool = False) -> bool:
        """Offers one (H, W, 3) uint8 RGB frame at stream time `t` (s); -> whether it was sampled.
        `block` waits for room in the queue instead of dropping its oldest frame."""
        if self.playing:
            raise InputError("this live session is playing a source: frames come from it, not from push")
        with self.cond:
            self.seen += 1
        if not self.sampler.take(t):
            return False
        rgb = np.asarray(frame)
        if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
            raise InputError(f"a frame must be (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
        with self.cond:
            self.sampled += 1
        self.queue.put((float(t), rgb), block=block)
        return True

    def play(self, source: Source) -> None:
        """Opens `source` here (an InputError line if it cannot be) and reads it in a background thread."""
        if self.playing:
            raise InputError("this live session is already playing a source")
        container = source.open()
        self.playing = True
        self._source_thread = threading.Thread(target=self._read_loop, args=(source, container),
                                               name="blip3v-live-source", daemon=True)
        self._source_thread.start()

    def end(self) -> None:
        """No more frames will come (for `push` callers): a question then answers over what is buffered."""
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def _read_loop(self, source: Source, container) -> None:
        import av

        from blip3v.runtime.video import _pad_colour, _ScaleInDecoder, _to_rgb

        # The clip reader's conversions: full-size RGB turned upright (Pillow resizes it later), or
        # with scaler "ffmpeg" swscale straight to S x S.
        host = self.host
        convert = (_ScaleInDecoder(host.image_size, self.aspect, _pad_colour(host.image_mean))
                   if self.scaler == "ffmpeg" else _to_rgb)
        reformatter = av.video.reformatter.VideoReformatter()
        try:
            for t, frame in source.frames(container, self._stop):
                with self.cond:
                    self.seen += 1
                if not self.sampler.take(t):
                    continue
                with self.cond:
                    self.sampled += 1
                self.queue.put((t, convert(frame, reformatter)), block=not source.live)
        except BaseException as exc:  # noqa: BLE001 (handed to the asking thread)
            with self.cond:
                self.error = exc
        finally:
            self.end()

    def _encode_loop(self) -> None:
        from blip3v.runtime.video import preprocess

        host = self.host
        try:
            while not self._stop.is_set():
                items = self.queue.take(self.batch, timeout=0.1)
                if not items:
                    continue
                try:
                    pixels = np.concatenate([preprocess(rgb[None], host.image_size, host.image_mean, host.image_std,
                                                        aspect=self.aspect) for _, rgb in items])  # (k, 3, S, S)
                    with self.cond:  # a lock is not fair: a pending question goes before the next frame
                        self.cond.wait_for(lambda: not self.asking or self._stop.is_set())
                    with self.compute:
                        latents = np.asarray(host.encode_frames(pixels))  # (k, N, D)
                    with self.cond:
                        self.ring.add(latents, [t for t, _ in items])
                        self.encoded += len(items)
                finally:
                    self.queue.done(len(items))
        except BaseException as exc:  # noqa: BLE001
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    # -- state -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self.cond:
            return {"frames_seen": self.seen, "frames_sampled": self.sampled, "frames_encoded": self.encoded,
                    "frames_dropped": self.queue.dropped}

    def _raise_error(self) -> None:
        if self.error is not None:
            if isinstance(self.error, InputError | EngineError):
                raise self.error
            raise EngineError(f"live session stopped: {_problem(self.error)}") from self.error

    def _ready(self) -> bool:
        if self.error is not None:
            return True
        if self.ended:
            return self.queue.drained
        return self.ring.count >= self.frames

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Waits until a question can be answered: T frames buffered (or, once the source ended, every
        queued frame encoded). -> False on timeout. Raises the source's or the encoder's error."""
        with self.cond:
            ok = self.cond.wait_for(self._ready, timeout)
        self._raise_error()
        return ok

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every queued frame is encoded (benchmarks and tests)."""
        with self.cond:
            ok = self.cond.wait_for(lambda: self.queue.drained or self.error is not None, timeout)
        self._raise_error()
        return ok

    def wait_until(self, deadline: float) -> None:
        """Sleeps until `deadline` (time.monotonic) or until the source ends or fails."""
        with self.cond:
            self.cond.wait_for(lambda: self.ended or self.error is not None, max(0.0, deadline - time.monotonic()))

    @property
    def new_frames(self) -> int:
        """Frames encoded since the last answer."""
        with self.cond:
            return self.encoded - self._encoded_at_last_answer

    # -- questions ---------------------------------------------------------------------------
    def ask(self, question: str, sampling: SamplingConfig | None = None,
            on_text: Callable[[str], None] | None = None, timeout: float | None = None) -> LiveAnswer:
        """Answers `question` over the buffered window: temporal graph, prefill, decode."""
        check_question(question)
        sampling = sampling or SamplingConfig()
        sampling.validate()
        t_ask = time.perf_counter()
        if not self.wait_ready(timeout):
            raise InputError(f"no full window of {self.frames} frames within {timeout} s")
        t_ready = time.perf_counter()
        with self.cond:
            self.asking += 1
        try:
            return self._answer(question, sampling, on_text, t_ask, t_ready)
        finally:
            with self.cond:
                self.asking -= 1
                self.cond.notify_all()

    def _answer(self, question: str, sampling: SamplingConfig, on_text: Callable[[str], None] | None,
                t_ask: float, t_ready: float) -> LiveAnswer:
        first: list[float] = []

        def first_token() -> bool:
            if not first:
                first.append(time.perf_counter())
            return False

        with self.compute:
            with self.cond:
                if not self.ring.count:
                    raise InputError("the live source gave no frame to answer about")
                latents, times = self.ring.snapshot()  # (n, N, D), (n,)
                counts = self.counts()
                self._encoded_at_last_answer = self.encoded
            n = len(latents)
            if n < self.frames:  # the source ended early: spread what there is, as frame_indices does
                pick = np.linspace(0, n - 1, self.frames).astype(int)
                latents = latents[pick]
            t0 = time.perf_counter()
            video = self.host.encode_temporal(latents[None])  # (1, T, N, D) -> (1, M, D)
            temporal = (time.perf_counter() - t0) * 1e3
            self._asked += 1
            clip = Clip(self.engine, f"live:{id(self)}:{self._asked}", video, {"temporal": temporal})
            answer = clip.ask(question, sampling, on_text=on_text, should_stop=first_token)
        end = time.perf_counter()
        timings = {"wait": (t_ready - t_ask) * 1e3, "temporal": temporal,
                   "prefill": answer.timings_ms.get("prefill", 0.0), "generate": answer.timings_ms.get("generate", 0.0),
                   "ttft": ((first[0] if first else end) - t_ready) * 1e3}
        return LiveAnswer(question, answer.text, answer.token_ids, (float(times[0]), float(times[-1])), n, timings,
                          answer.finish_reason, counts)

    # -- lifetime ----------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Stops the source and encoder threads (a network read ends within the source's timeout)."""
        self._stop.set()
        with self.cond:
            self.queue.closed = True
            self.cond.notify_all()
        for thread in (self._source_thread, self._encoder):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)

    def __enter__(self) -> LiveSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
