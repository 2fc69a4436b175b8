"""`blip3v serve`: an OpenAI-compatible HTTP server over one Engine (Starlette on uvicorn).

    engine = Engine.open(engine="engines/demo")
    serve(engine, ServeConfig(model_name="blip3v", media_root=Path("clips")), host="127.0.0.1", port=8000)

Endpoints: POST /v1/chat/completions (blip3v.runtime.openai_api says what a request may hold), GET
/v1/models, GET /health, GET /metrics (Prometheus text).

Threads. The Engine is not thread-safe, so ONE worker thread owns it: every request that reaches
the model becomes a `Job` on the worker's queue, and the worker's answer comes back to the event
loop as events (`text` pieces, `done`, `error`) through `loop.call_soon_threadsafe`. The event loop
only parses, reads media (in a helper thread: base64, files, remote fetches) and writes responses.
A clip seen before (the same bytes, however they came) is the Engine's clip cache's: its encoding
and its cached prompt prefix are reused, and the worker copies `engine.stats` into the metrics
after each job, so no other thread touches the Engine.

Limits. At most `max_queue` requests wait while one runs: one more gets 429 with Retry-After (an
estimate: the mean service time times the queue). A request's `timeout` runs from its arrival,
through the queue, to its last token: past it the generation is stopped and the client gets 504
(or an error event, when the stream has started). A body over `max_upload_bytes` gets 413 before it
is read. A client that disconnects cancels its job: skipped if still queued, stopped at the next
token (`should_stop`) if running.

Importing this module needs neither torch nor the web stack; `serve` and `Server.app` import
starlette and uvicorn (the `serve` extra).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import math
import queue
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip3v.errors import Blip3vError, InputError
from blip3v.runtime.openai_api import (
    ApiError,
    ChatRequest,
    MediaPolicy,
    StopHoldback,
    chunk_body,
    completion_body,
    finish_reason,
    load_media,
    model_card,
    new_id,
    parse_chat_request,
    prompt_ids,
    sse,
)

CHAT_PATH = "/v1/chat/completions"
KNOWN_PATHS = (CHAT_PATH, "/v1/models", "/health", "/metrics")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, math.inf)
DISCONNECTED = 499  # nginx's status for a client that went away; never sent, only counted


@dataclass
class ServeConfig:
    model_name: str = "blip3v"
    api_key: str | None = None
    media_root: Path | None = None
    allow_remote: bool = False
    max_queue: int = 32
    timeout: float = 120.0  # seconds, arrival to last token
    max_upload_bytes: int = 64 << 20


# -- metrics ------------------------------------------------------------------------------------
class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{"+Inf" if math.isinf(b) else repr(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


class Metrics:
    """Counters kept by the event loop and the worker (one lock), rendered as Prometheus text."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency = Histogram()  # chat completions, arrival to the last byte
        self.first_token = Histogram()  # streamed chat completions, arrival to the first text chunk
        self.cancelled: Counter[str] = Counter()  # by where the job was: queued / encoding / generating
        self.tokens: Counter[str] = Counter()  # prompt, completion, reused
        self.engine = {"clip_hits": 0, "clip_misses": 0, "evictions": 0}
        self.cache_bytes = 0
        self.cache_clips = 0

    def request(self, path: str, status: int, seconds: float | None) -> None:
        with self.lock:
            self.requests[(path if path in KNOWN_PATHS or path.startswith("/v1/models/") else "other", status)] += 1
            if seconds is not None:
                self.latency.observe(seconds)

    def render(self, waiting: int, running: int) -> str:
        def block(name: str, kind: str, help_text: str, lines: list[str]) -> list[str]:
            return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines]

        with self.lock:
            out = block("blip3v_requests_total", "counter", "HTTP requests answered, by path and status (499: the "
                        "client went away).", [f'blip3v_requests_total{{path="{p}",status="{s}"}} {n}'
                                               for (p, s), n in sorted(self.requests.items())])
            out += block("blip3v_request_duration_seconds", "histogram", "Chat completions, arrival to the last byte.",
                         self.latency.lines("blip3v_request_duration_seconds"))
            out += block("blip3v_time_to_first_token_seconds", "histogram", "Streamed chat completions, arrival to "
                         "the first text chunk.", self.first_token.lines("blip3v_time_to_first_token_seconds"))
            out += block("blip3v_queue_depth", "gauge", "Requests admitted and waiting for the engine.",
                         [f"blip3v_queue_depth {waiting}"])
            out += block("blip3v_requests_running", "gauge", "Requests the engine is answering (0 or 1).",
                         [f"blip3v_requests_running {running}"])
            out += block("blip3v_requests_cancelled_total", "counter", "Jobs stopped because the client went away or "
                         "the timeout passed, by where they were: queued, encoding the clip, generating.",
                         [f'blip3v_requests_cancelled_total{{stage="{s}"}} {self.cancelled[s]}'
                          for s in ("queued", "encoding", "generating")])
            for key, help_text in (("prompt", "Prompt tokens, video tokens included."), ("completion", "Generated "
                                   "tokens."), ("reused", "Prompt tokens whose KV came from a cached prefix.")):
                name = f"blip3v_{key}_tokens_total"
                out += block(name, "counter", help_text, [f"{name} {self.tokens[key]}"])
            for key, name, help_text in (("clip_hits", "blip3v_clip_cache_hits_total", "Clips found in the clip "
                                          "cache (same bytes): no decode, no visual encoder."),
                                         ("clip_misses", "blip3v_clip_cache_misses_total", "Clips decoded and encoded."),
                                         ("evictions", "blip3v_clip_cache_evictions_total", "Clips evicted (LRU).")):
                out += block(name, "counter", help_text, [f"{name} {self.engine.get(key, 0)}"])
            out += block("blip3v_clip_cache_bytes", "gauge", "Bytes held by cached clips.",
                         [f"blip3v_clip_cache_bytes {self.cache_bytes}"])
            out += block("blip3v_clip_cache_clips", "gauge", "Clips in the cache.",
                         [f"blip3v_clip_cache_clips {self.cache_clips}"])
        return "\n".join(out) + "\n"


# -- the worker ---------------------------------------------------------------------------------
@dataclass
class Job:
    request: ChatRequest
    media: bytes
    media_name: str
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed: the server is shutting down
            pass

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.expired()


def timeout_error(seconds: float) -> ApiError:
    return ApiError(504, f"the request took longer than the server's timeout of {seconds:g} s", None, "timeout")


class Worker:
    """The one thread that uses the Engine."""

    def __init__(self, engine: Any, metrics: Metrics, timeout: float):
        self.engine = engine
        self.metrics = metrics
        self.timeout = timeout
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.running = 0
        self.service_s = 1.0  # running mean of a job's time, for Retry-After
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="blip3v-engine", daemon=True)

    def start(self) -> None:
        self._snapshot()
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.stopping.is_set():
                job.cancelled.set()
            self.running = 1
            start = time.monotonic()
            try:
                self._run(job)
            finally:
                self.running = 0
                self.service_s = 0.8 * self.service_s + 0.2 * (time.monotonic() - start)
                self._snapshot()

    def _snapshot(self) -> None:
        stats, held, clips = dict(self.engine.stats), self.engine.cached_bytes(), self.engine.cached_clips()
        with self.metrics.lock:
            self.metrics.engine, self.metrics.cache_bytes, self.metrics.cache_clips = stats, held, clips

    def _cancelled(self, job: Job, stage: str) -> None:
        with self.metrics.lock:
            self.metrics.cancelled[stage] += 1
        job.emit("error", timeout_error(self.timeout) if job.expired() else ApiError(DISCONNECTED, "cancelled"))

    def _run(self, job: Job) -> None:
        request = job.request
        if job.should_stop():
            return self._cancelled(job, "queued")
        try:
            source = io.BytesIO(job.media)  # a broken clip's error names it by `name`
            source.name = job.media_name  # type: ignore[attr-defined]
            clip = self.engine.clip(source)
            if job.should_stop():
                return self._cancelled(job, "encoding")
            ids = prompt_ids(clip, request.system, request.turns)
            hold = StopHoldback(request.sampling.stop)

            def on_text(piece: str) -> None:
                if out := hold.push(piece):
                    job.emit("text", out)

            should_stop = lambda: job.should_stop() or self.stopping.is_set()  # noqa: E731
            answer = clip.answer(ids, request.sampling, on_text if request.stream else None, should_stop)
        except InputError as exc:
            return job.emit("error", ApiError(400, str(exc), "messages", "invalid_input"))
        except Blip3vError as exc:
            return job.emit("error", ApiError(500, str(exc), None, "engine_error"))
        except Exception as exc:  # noqa: BLE001 (a bug: logged with its traceback, the server stays up)
            traceback.print_exc(file=sys.stderr)
            return job.emit("error", ApiError(500, f"internal error ({type(exc).__name__})", None, "internal_error"))
        if answer.finish_reason == "cancelled":
            return self._cancelled(job, "generating")
        if request.stream and (rest := hold.finish(answer.text)):
            job.emit("text", rest)
        with self.metrics.lock:
            self.metrics.tokens.update(prompt=answer.prompt_tokens, completion=len(answer.token_ids),
                                       reused=answer.reused_tokens)
        self._snapshot()  # before the answer leaves: a client reading /metrics next sees this request in it
        job.emit("done", answer)


# -- the HTTP side ------------------------------------------------------------------------------
class Server:
    def __init__(self, engine: Any, config: ServeConfig):
        self.engine = engine
        self.config = config
        self.metrics = Metrics()
        self.worker = Worker(engine, self.metrics, config.timeout)
        self.admitted = 0  # chat requests in flight (event-loop only): one running + the queue
        self.fingerprint = f"fp_{str(getattr(engine.host, 'fingerprint', ''))[:12]}"
        self.created = int(time.time())
        self.policy = MediaPolicy(config.media_root.resolve() if config.media_root else None, config.allow_remote,
                                  config.max_upload_bytes, min(config.timeout, 60.0))

    def app(self) -> Any:
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        @asynccontextmanager
        async def lifespan(_app):
            self.worker.start()
            try:
                yield
            finally:
                await asyncio.to_thread(self.worker.stop)

        async def http_error(_request: Any, exc: Any) -> Any:  # exc: HTTPException
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            return error_response(ApiError(exc.status_code, f"{exc.detail}: {_request.method} {_request.url.path}",
                                           None, code))

        async def crash(_request: Any, exc: Exception) -> Any:
            return error_response(ApiError(500, f"internal error ({type(exc).__name__})", None, "internal_error"))

        routes = [Route(CHAT_PATH, self.chat, methods=["POST"]), Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{name:path}", self.model, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]), Route("/metrics", self.render_metrics, methods=["GET"])]
        handlers: dict[Any, Any] = {HTTPException: http_error, Exception: crash}
        app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
        return CountRequests(app, self.metrics)

    # -- small endpoints ----------------------------------------------------------------------
    def _check_key(self, request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", None, "missing_api_key",
                           {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "incorrect API key", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    async def models(self, request):
        from starlette.responses import JSONResponse

        try:
            self._check_key(request)
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse({"object": "list", "data": [model_card(self.config.model_name, self.created)]})

    async def model(self, request):
        from starlette.responses import JSONResponse

        try:
            self._check_key(request)
            name = request.path_params["name"]
            if name != self.config.model_name:
                raise ApiError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse(model_card(self.config.model_name, self.created))

    async def health(self, _request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "model": self.config.model_name, "queue_depth": self.waiting(),
                             "running": self.worker.running})

    async def render_metrics(self, _request):
        from starlette.responses import Response

        return Response(self.metrics.render(self.waiting(), self.worker.running),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    def waiting(self) -> int:
        return max(0, self.admitted - self.worker.running)

    # -- chat completions ---------------------------------------------------------------------
    async def chat(self, request):
        arrived = time.monotonic()
        try:
            self._check_key(request)
            if self.admitted >= self.config.max_queue + 1:
                wait = max(1, math.ceil(self.worker.service_s * self.admitted))
                raise ApiError(429, f"the server is busy ({self.admitted - 1} requests queued); retry in {wait} s",
                               None, "queue_full", {"Retry-After": str(wait)})
        except ApiError as exc:
            return error_response(exc)
        self.admitted += 1
        handed_over = False
        try:
            body = await self._read_body(request)
            chat, data, name = await asyncio.to_thread(self._prepare, body)
            job = Job(chat, data, name, arrived + self.config.timeout, asyncio.get_running_loop())
            self.worker.submit(job)
            handed_over = True
            return JobResponse(self, job, arrived)
        except ApiError as exc:
            return error_response(exc)
        finally:
            if not handed_over:
                self.admitted -= 1

    async def _read_body(self, request) -> bytes:
        from starlette.requests import ClientDisconnect

        limit = self.config.max_upload_bytes
        too_big = ApiError(413, f"the request body is larger than the server's limit of {limit} bytes "
                                f"(--max-upload-mb)", None, "request_too_large")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "the Content-Length header is not a number", None, "invalid_request")
            if int(length) > limit:
                raise too_big
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_big
        except ClientDisconnect:
            raise ApiError(DISCONNECTED, "the client went away while sending the request") from None
        return bytes(body)

    def _prepare(self, body: bytes) -> tuple[ChatRequest, bytes, str]:
        """Parse, check and read the clip (in a helper thread: base64, file reads and fetches block)."""
        chat = parse_chat_request(body, self.config.model_name)
        data, name = load_media(chat.media, self.policy)
        return chat, data, name


def error_response(exc: ApiError):
    from starlette.responses import JSONResponse

    if exc.status == DISCONNECTED:
        return nothing  # the client is gone; CountRequests counts the 499
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def nothing(scope, receive, send) -> None:
    """An ASGI response that sends nothing."""


class JobResponse:
    """The ASGI response of a submitted job: waits for the worker's first event (so a broken clip
    is a 400 even for a stream), then sends one JSON body or a server-sent-event stream. A task
    listens for the client going away and cancels the job."""

    def __init__(self, server: Server, job: Job, arrived: float):
        self.server = server
        self.job = job
        self.arrived = arrived
        self.id = new_id()
        self.created = int(time.time())

    async def __call__(self, scope, receive, send) -> None:
        job = self.job
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            kind, value = await self._next()
            if kind == "error":
                return await self._send_error(send, value)
            if not job.request.stream:  # the worker sent no text events: `value` is the Answer
                body = completion_body(self.id, self.created, job.request.model, self.server.fingerprint, value)
                return await self._send_json(send, 200, body)
            await self._stream(send, kind, value)
        finally:
            watcher.cancel()
            job.cancelled.set()  # a job that is done ignores it; one still going stops
            self.server.admitted -= 1

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.job.cancelled.set()
        self.job.events.put_nowait(("gone", None))

    async def _next(self) -> tuple[str, Any]:
        """The next event from the worker, or a 504 at the deadline."""
        try:
            kind, value = self.job.events.get_nowait()  # what is there already counts, deadline or not
        except asyncio.QueueEmpty:
            remaining = self.job.deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                kind, value = await asyncio.wait_for(self.job.events.get(), timeout=remaining)
            except (asyncio.TimeoutError, TimeoutError):
                self.job.cancelled.set()
                return "error", timeout_error(self.server.config.timeout)
        if kind == "gone":
            return "error", ApiError(DISCONNECTED, "the client went away")
        return kind, value

    async def _send_error(self, send, exc: ApiError) -> None:
        if exc.status == DISCONNECTED:
            return  # nobody to tell; CountRequests counts it
        await self._send_json(send, exc.status, exc.body(), exc.headers)

    async def _send_json(self, send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        import json

        payload = json.dumps(body).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload, "more_body": False})

    async def _stream(self, send, kind: str, value: Any) -> None:
        request = self.job.request
        usage_on = request.include_usage

        def chunk(delta, finish=None, answer=None):
            return sse(chunk_body(self.id, self.created, request.model, self.server.fingerprint, delta, finish,
                                  answer, usage_on))

        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no")]})
        await send({"type": "http.response.body", "body": chunk({"role": "assistant", "content": ""}),
                    "more_body": True})
        with self.server.metrics.lock:
            self.server.metrics.first_token.observe(time.monotonic() - self.arrived)
        while kind == "text":
            await send({"type": "http.response.body", "body": chunk({"content": value}), "more_body": True})
            kind, value = await self._next()
        if kind == "error":
            if value.status == DISCONNECTED:
                return
            tail = sse(value.body())  # the status is sent; OpenAI's clients raise on an `error` event
        else:
            tail = chunk({}, finish_reason(value))
            if usage_on:
                tail += sse(chunk_body(self.id, self.created, request.model, self.server.fingerprint, None, None,
                                       value, True))
        await send({"type": "http.response.body", "body": tail + sse("[DONE]"), "more_body": False})


class CountRequests:
    """ASGI middleware: counts every response by path and status, and times chat completions. A
    request that ends with nothing sent (the client left) counts as 499."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status = [DISCONNECTED]

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            path = scope.get("path", "")
            seconds = time.monotonic() - start if path == CHAT_PATH and scope.get("method") == "POST" else None
            self.metrics.request(path, status[0], seconds)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (port 0: a free one); InputError when the address is unusable."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto
    # says TCP, and without it a response's separate header and body writes meet the client's
    # delayed ACK: ~40 ms added to every request (measured).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc})") from None
    sock.listen(2048)
    return sock


def serve(engine: Any, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, access_log: bool = False,
          announce: Any = None) -> None:
    """Runs the server until SIGINT / SIGTERM. `announce(url)` is called once the socket listens."""
    import uvicorn

    sock = listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    server = Server(engine, config)
    uconfig = uvicorn.Config(server.app(), log_level="warning", access_log=access_log, lifespan="on",
                             timeout_graceful_shutdown=5, timeout_keep_alive=30)
    if announce is not None:
        announce(f"http://{shown}:{bound}")
    uvicorn.Server(uconfig).run(sockets=[sock])
