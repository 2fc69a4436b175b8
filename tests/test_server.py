"""`blip3v serve`, run for real: the server in a subprocess on a loopback port, called with the
official `openai` client and with raw HTTP. The shipped demo model on the PyTorch backend (it starts
in a few seconds; exporting an engine first would take longer than all of these tests).

Two servers for the whole module: `main` (an API key, a media root, remote URLs allowed, a 1 MiB
upload limit, a queue of 1) and `strict` (no key, no remote URLs, a timeout of 1 ms, so every
request that reaches the engine times out). Both are stopped by the fixture, whatever happens.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli

openai = pytest.importorskip("openai", reason="the serve extra (openai client for the tests) is not installed")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

SAMPLE = ROOT / "blip3v" / "assets" / "sample.mp4"
QUESTIONS = ("what colour does the square turn?", "which way does the circle move?")
KEY = "test-key-5f2c"
MODEL = "blip3v"


def write_mkv(path: Path, frames: int, size: int, seed: int) -> Path:
    """A clip that is cheap to write and slow-ish to read: MPEG-4 part 2 in Matroska (no frame count in
    the header, so every frame is decoded)."""
    import av

    x = np.linspace(0, 255, size, dtype=np.float32)
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            f = np.empty((size, size, 3), np.uint8)  # (H, W, 3): moving gradients, a per-clip tint
            f[..., 0] = (x[None, :] + 3 * i + 37 * seed) % 256
            f[..., 1] = (x[:, None] + 5 * i) % 256
            f[..., 2] = (i + 53 * seed) % 256
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    out: Path
    err: Path
    url: str = ""

    def wait_ready(self, timeout: float = 240.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"server {self.name} exited with {self.proc.returncode}: {self.err.read_text()[-2000:]}")
            found = re.search(r"(http://[\d.]+:\d+)/v1", self.out.read_text())
            if found:
                self.url = found.group(1)
                try:
                    if request(self, "GET", "/health")[0] == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.2)
        pytest.fail(f"server {self.name} not ready after {timeout} s: {self.err.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def metrics(self) -> dict[str, float]:
        status, _, body = request(self, "GET", "/metrics")
        assert status == 200
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def client(self, key: str | None = KEY):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=120)


def launch(name: str, tmp: Path, *args: str) -> Server:
    out, err = tmp / f"{name}.out", tmp / f"{name}.err"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("BLIP3V_API_KEY", None)
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "blip3v.cli", "serve", "--port", "0", *args], stdout=o,
                                stderr=e, stdin=subprocess.DEVNULL, env=env)
    return Server(name, proc, out, err)


def request(server: Server, method: str, path: str, body: bytes | dict | None = None,
            headers: dict[str, str] | None = None, key: str | None = None, timeout: float = 120):
    """-> (status, headers, body bytes), over a fresh connection."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        sent = {"Content-Type": "application/json", **(headers or {})}
        if key:
            sent["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def chat(url: str, question: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}]}], **extra}


def data_uri(data: bytes, kind: str = "video/mp4") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serve")
    root, outside = tmp / "media", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "sample.mp4").write_bytes(SAMPLE.read_bytes())
    (root / "inside").mkdir()
    os.symlink(root / "sample.mp4", root / "inside" / "link.mp4")  # a symlink that stays inside: allowed
    (outside / "secret.mp4").write_bytes(SAMPLE.read_bytes())
    os.symlink(outside / "secret.mp4", root / "escape.mp4")  # resolves outside: refused
    os.symlink(outside, root / "elsewhere")  # a directory symlink out of the root: refused
    (root / "notes.mp4").write_text("not a video at all\n")
    (root / "big.mp4").write_bytes(b"\0" * (1 << 20 | 1))  # over the 1 MiB limit
    for i in range(3):  # clips new to the server that take a while to decode: the queue and disconnect tests
        write_mkv(root / f"heavy{i}.mkv", 150 if i < 2 else 300, 256, seed=i + 1)
    write_mkv(root / "fresh.mkv", 48, 96, seed=9)
    return {"root": root, "outside": outside, "tmp": tmp}


@dataclass
class Servers:
    main: Server
    strict: Server
    greedy: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def servers(media) -> Iterator[Servers]:
    tmp = media["tmp"]
    started: list[Server] = []
    try:
        started.append(launch("main", tmp, "--api-key", KEY, "--media-root", str(media["root"]), "--allow-remote",
                              "--max-upload-mb", "1", "--max-queue", "1"))
        started.append(launch("strict", tmp, "--media-root", str(media["root"]), "--timeout", "0.001"))
        with ThreadPoolExecutor(1) as pool:  # `blip3v ask`'s greedy answers, while the servers load
            asked = pool.submit(run_cli, "ask", str(SAMPLE), *QUESTIONS, "--json")
            for server in started:
                server.wait_ready()
            done = asked.result()
        assert done.returncode == 0, done.stderr
        greedy = {row["question"]: row["answer"] for row in map(json.loads, done.stdout.splitlines())}
        yield Servers(started[0], started[1], greedy)
    finally:
        for server in started:
            server.stop()


def stream_text(client, body: dict) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(stream=True, **body))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# -- answers --------------------------------------------------------------------------------------
def test_answers_equal_blip3v_ask(servers):
    main, greedy = servers.main, servers.greedy
    client = main.client()
    q1, q2 = QUESTIONS
    done = client.chat.completions.create(**chat("sample.mp4", q1, max_tokens=32, temperature=0))
    assert done.choices[0].message.content == greedy[q1]
    assert done.choices[0].finish_reason == "stop"
    assert done.model == MODEL and done.object == "chat.completion"
    assert done.usage.prompt_tokens > 16  # the demo model's 16 video tokens are counted
    assert done.usage.completion_tokens >= 1
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    text, chunks = stream_text(client, chat("sample.mp4", q2, max_tokens=32, stream_options={"include_usage": True}))
    assert text == greedy[q2]
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == done.usage.prompt_tokens


def test_base64_clip_and_same_bytes_hit_the_clip_cache(servers):
    main, greedy = servers.main, servers.greedy
    q1 = QUESTIONS[0]
    client = main.client()
    client.chat.completions.create(**chat("sample.mp4", q1))  # the file is cached (if it was not already)
    before = main.metrics()
    done = client.chat.completions.create(**chat(data_uri(SAMPLE.read_bytes()), q1))
    after = main.metrics()
    assert done.choices[0].message.content == greedy[q1]
    assert after["blip3v_clip_cache_hits_total"] == before["blip3v_clip_cache_hits_total"] + 1
    assert after["blip3v_clip_cache_misses_total"] == before["blip3v_clip_cache_misses_total"]
    assert done.usage.prompt_tokens_details.cached_tokens > 16  # the prompt prefix came from the cache


def test_follow_up_is_a_clip_cache_hit(servers):
    main = servers.main
    client = main.client()
    before = main.metrics()
    t0 = time.perf_counter()
    first = client.chat.completions.create(**chat("fresh.mkv", QUESTIONS[0]))
    t1 = time.perf_counter()
    middle = main.metrics()
    second = client.chat.completions.create(**chat("fresh.mkv", QUESTIONS[1]))
    t2 = time.perf_counter()
    after = main.metrics()
    assert middle["blip3v_clip_cache_misses_total"] == before["blip3v_clip_cache_misses_total"] + 1
    assert after["blip3v_clip_cache_hits_total"] == middle["blip3v_clip_cache_hits_total"] + 1
    assert after["blip3v_clip_cache_misses_total"] == middle["blip3v_clip_cache_misses_total"]
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens_details.cached_tokens
    print(f"\nfirst question (clip miss) {1e3 * (t1 - t0):.0f} ms, follow-up (clip hit) {1e3 * (t2 - t1):.0f} ms")


@pytest.fixture(scope="module")
def reference():
    """The demo model in this process, as the server runs it: the reference for what `ask` cannot say."""
    from blip3v.assets import DEMO_MODEL
    from blip3v.runtime.session import Engine

    return Engine.open(model=DEMO_MODEL)


def test_multi_turn_equals_conversation(servers, reference):
    """A request carrying the history answers as `Conversation` (blip3v chat) does."""
    conversation = reference.clip(SAMPLE).chat()
    a1 = conversation.ask(QUESTIONS[0]).text
    a2 = conversation.ask(QUESTIONS[1])
    body = chat("sample.mp4", QUESTIONS[0])
    body["messages"] += [{"role": "assistant", "content": a1}, {"role": "user", "content": QUESTIONS[1]}]
    done = servers.main.client().chat.completions.create(**body)
    assert done.choices[0].message.content == a2.text
    assert done.usage.prompt_tokens == a2.prompt_tokens  # the same history, token for token


def test_system_message_takes_the_system_prompts_place(servers, reference):
    """The model's own system text sent as a system message gives the very prompt `ask` feeds."""
    client = servers.main.client()
    plain = client.chat.completions.create(**chat("sample.mp4", QUESTIONS[0]))
    body = chat("sample.mp4", QUESTIONS[0])
    body["messages"].insert(0, {"role": "system", "content": reference.host.cfg.system_prompt})
    same = client.chat.completions.create(**body)
    assert same.choices[0].message.content == plain.choices[0].message.content == servers.greedy[QUESTIONS[0]]
    assert same.usage.prompt_tokens == plain.usage.prompt_tokens
    assert same.usage.prompt_tokens_details.cached_tokens == same.usage.prompt_tokens - 1  # the whole prompt hit


def test_image_url_still(servers, reference, media):
    """A still (image_url, base64 PNG) is a clip of one repeated frame, answered as the library answers it."""
    import io

    from PIL import Image

    frame = np.zeros((64, 64, 3), np.uint8)
    frame[16:48, 8:40] = (255, 0, 0)  # a red square on black
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    expected = reference.clip(buffer.getvalue()).ask(QUESTIONS[0]).text
    body = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": QUESTIONS[0]},
        {"type": "image_url", "image_url": {"url": data_uri(buffer.getvalue(), "image/png")}}]}]}
    done = servers.main.client().chat.completions.create(**body)
    assert done.choices[0].message.content == expected


def test_stop_strings_cut_streamed_and_whole_answers_alike(servers):
    client = servers.main.client()
    q1 = QUESTIONS[0]
    full = servers.greedy[q1]
    stop = full[1:3] if len(full) >= 3 else full
    whole = client.chat.completions.create(**chat("sample.mp4", q1, stop=[stop]))
    streamed, _ = stream_text(client, chat("sample.mp4", q1, stop=stop))
    assert whole.choices[0].message.content == full[:full.find(stop)]
    assert streamed == whole.choices[0].message.content


def test_remote_url_with_allow_remote(servers, media):
    """--allow-remote fetches http(s) URLs: here from a file server on loopback."""
    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            lambda *a, **k: quiet(*a, directory=str(media["root"]), **k))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{files.server_address[1]}/sample.mp4"
        done = servers.main.client().chat.completions.create(**chat(url, QUESTIONS[0]))
        assert done.choices[0].message.content == servers.greedy[QUESTIONS[0]]
    finally:
        files.shutdown()
        files.server_close()


# -- security -------------------------------------------------------------------------------------
def error_of(status_body) -> dict:
    status, _, body = status_body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"]
    return {"status": status, **error}


@pytest.mark.parametrize("url", ["{outside}/secret.mp4", "file://{outside}/secret.mp4", "../outside/secret.mp4",
                                 "inside/../../outside/secret.mp4", "escape.mp4", "elsewhere/secret.mp4"])
def test_paths_outside_the_media_root_are_refused(servers, media, url):
    url = url.format(outside=media["outside"])
    error = error_of(request(servers.main, "POST", "/v1/chat/completions", chat(url, "q"), key=KEY))
    assert error["status"] == 403 and error["code"] == "media_path_refused", error
    assert error["param"] == "messages[0].content[0].video_url.url"


def test_symlink_inside_the_root_and_file_url_work(servers, media):
    client = servers.main.client()
    for url in ("inside/link.mp4", f"file://{media['root']}/sample.mp4", f"{media['root']}/sample.mp4"):
        done = client.chat.completions.create(**chat(url, QUESTIONS[0]))
        assert done.choices[0].message.content == servers.greedy[QUESTIONS[0]]


def test_remote_url_refused_without_allow_remote(servers):
    for url in ("http://127.0.0.1:9/clip.mp4", "https://example.com/clip.mp4"):
        error = error_of(request(servers.strict, "POST", "/v1/chat/completions", chat(url, "q")))
        assert error["status"] == 403 and error["code"] == "remote_media_refused", error


def test_api_key(servers):
    main = servers.main
    with pytest.raises(openai.AuthenticationError):
        main.client(key="wrong").chat.completions.create(**chat("sample.mp4", "q"))
    for key in (None, "wrong"):
        for method, path, body in (("POST", "/v1/chat/completions", chat("sample.mp4", "q")),
                                   ("GET", "/v1/models", None)):
            status, headers, raw = request(main, method, path, body, key=key)
            assert status == 401, (key, path, raw)
            assert error_of((status, headers, raw))["type"] == "authentication_error"
    assert request(main, "GET", "/health")[0] == 200  # health and metrics stay open for probes
    models = main.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_oversized_upload_is_413(servers):
    big = chat(data_uri(np.random.default_rng(0).bytes(1 << 20)), "q")  # ~1.4 MB of JSON
    error = error_of(request(servers.main, "POST", "/v1/chat/completions", big, key=KEY))
    assert error["status"] == 413, error
    error = error_of(request(servers.main, "POST", "/v1/chat/completions", chat("big.mp4", "q"), key=KEY))
    assert error["status"] == 413 and error["code"] == "media_too_large", error
    with pytest.raises(openai.APIStatusError) as caught:
        servers.main.client().chat.completions.create(**big)
    assert caught.value.status_code == 413


def test_unknown_model_and_path_are_404(servers):
    error = error_of(request(servers.main, "POST", "/v1/chat/completions", {**chat("sample.mp4", "q"), "model": "gpt"},
                             key=KEY))
    assert error["status"] == 404 and error["code"] == "model_not_found"
    assert error_of(request(servers.main, "GET", "/v1/nothing", key=KEY))["status"] == 404
    with pytest.raises(openai.NotFoundError):
        servers.main.client().chat.completions.create(**{**chat("sample.mp4", "q"), "model": "gpt"})


# -- limits ---------------------------------------------------------------------------------------
def test_timeout_is_504(servers):
    """The strict server's timeout (1 ms) has passed before any token."""
    for stream in (False, True):
        error = error_of(request(servers.strict, "POST", "/v1/chat/completions",
                                 chat("sample.mp4", QUESTIONS[0], stream=stream)))
        assert error["status"] == 504 and error["code"] == "timeout", error
    assert request(servers.strict, "GET", "/health")[0] == 200


def test_full_queue_is_429_with_retry_after(servers):
    """One heavy request runs, one waits (--max-queue 1): the rest of a burst gets 429."""
    main = servers.main

    def send(i):
        return request(main, "POST", "/v1/chat/completions", chat(f"heavy{min(i, 1)}.mkv", QUESTIONS[0]), key=KEY)

    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(send, 0)
        end = time.monotonic() + 60
        while main.metrics()["blip3v_requests_running"] == 0 and time.monotonic() < end:
            time.sleep(0.01)  # until the engine works on the first one (a new clip: it decodes a while)
        rest = [pool.submit(send, i) for i in range(1, 6)]
        results = [first.result()] + [f.result() for f in rest]
    statuses = [r[0] for r in results]
    assert statuses[0] == 200, results[0]
    assert 429 in statuses and set(statuses) <= {200, 429}, statuses
    for status, headers, body in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert json.loads(body)["error"]["type"] == "rate_limit_error"


def test_client_that_disconnects_cancels_its_job(servers):
    """A streamed request whose client leaves while the engine reads its (new, slow to decode) clip
    is stopped before it generates anything."""
    main = servers.main
    before = main.metrics()
    body = json.dumps(chat("heavy2.mkv", QUESTIONS[0], stream=True)).encode()
    host, port = main.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        end = time.monotonic() + 60
        while main.metrics()["blip3v_requests_running"] == 0 and time.monotonic() < end:
            time.sleep(0.01)  # until the worker has taken the job: the clip is being decoded
    stages = [f'blip3v_requests_cancelled_total{{stage="{s}"}}' for s in ("queued", "encoding", "generating")]
    gone = 'blip3v_requests_total{path="/v1/chat/completions",status="499"}'
    end = time.monotonic() + 60
    while time.monotonic() < end:
        after = main.metrics()
        if sum(after[s] for s in stages) > sum(before[s] for s in stages):
            break
        time.sleep(0.1)
    assert after[stages[1]] + after[stages[2]] == before[stages[1]] + before[stages[2]] + 1, after
    assert after[gone] == before.get(gone, 0) + 1
    assert after["blip3v_completion_tokens_total"] == before["blip3v_completion_tokens_total"]


# -- malformed requests ---------------------------------------------------------------------------
def malformed_bodies(n: int, seed: int) -> list[bytes]:
    """`n` bad requests cycling through broken JSON, wrong content-part shapes, broken base64 and
    broken videos; random bytes vary per request."""
    rng = np.random.default_rng(seed)
    good_part = {"type": "text", "text": "q"}
    sample = SAMPLE.read_bytes()

    def with_part(part) -> bytes:
        return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [part, good_part]}]}).encode()

    def with_url(url) -> bytes:
        return with_part({"type": "video_url", "video_url": {"url": url}})

    def with_messages(messages) -> bytes:
        return json.dumps({"model": MODEL, "messages": messages}).encode()

    video = {"type": "video_url", "video_url": {"url": "sample.mp4"}}
    makers = [
        # broken JSON
        lambda: b"{", lambda: b"", lambda: b"not json", lambda: b'{"model": "blip3v", "messages": [',
        lambda: rng.bytes(int(rng.integers(1, 200))), lambda: b"\xff\xfe\x00{", lambda: b"[" * 50_000,
        lambda: b'{"model": "blip3v", "messages": [{"role": "user", "content": "\\ud800"}]}',
        lambda: b"null", lambda: b'"a string"',
        # wrong shapes
        lambda: with_messages({"role": "user"}), lambda: with_messages("hello"), lambda: with_messages([]),
        lambda: with_part({"video_url": {"url": "sample.mp4"}}), lambda: with_part({"type": "audio", "audio": {}}),
        lambda: with_part({"type": "video_url", "video_url": "sample.mp4"}),
        lambda: with_part({"type": "video_url", "video_url": {"url": 5}}),
        lambda: with_part({"type": "image_url", "image_url": {}}), lambda: with_part({"type": "text", "text": 7}),
        lambda: with_part("just a string"), lambda: with_part(None),
        lambda: with_messages([{"role": "tool", "content": "x"}]),
        lambda: with_messages([{"role": "user", "content": [video, video, good_part]}]),
        lambda: with_messages([{"role": "user", "content": [video, good_part]},
                               {"role": "assistant", "content": "a"}]),
        lambda: with_messages([{"role": "user", "content": [video, good_part]}, {"role": "assistant", "content": "a"},
                               {"role": "user", "content": [video, good_part]}]),
        lambda: with_messages([{"role": "user", "content": [video]}]),
        lambda: with_messages([{"role": "user", "content": "no video"}]),
        lambda: json.dumps({"messages": [{"role": "user", "content": [video, good_part]}]}).encode(),
        lambda: json.dumps({"model": MODEL, "max_tokens": "ten", "messages": [{"role": "user",
                            "content": [video, good_part]}]}).encode(),
        lambda: json.dumps({"model": MODEL, "temperature": -1, "messages": [{"role": "user",
                            "content": [video, good_part]}]}).encode(),
        lambda: json.dumps({"model": MODEL, "n": 3, "messages": [{"role": "user",
                            "content": [video, good_part]}]}).encode(),
        lambda: json.dumps({"model": MODEL, "stop": 5, "messages": [{"role": "user",
                            "content": [video, good_part]}]}).encode(),
        # broken base64
        lambda: with_url("data:video/mp4;base64,!!!!"), lambda: with_url("data:video/mp4;base64,abc"),
        lambda: with_url("data:video/mp4,rawbytes"), lambda: with_url("data:video/mp4;base64,"),
        lambda: with_url("data:video/mp4;base64," + base64.b64encode(rng.bytes(300)).decode()[:-3] + "*=="),
        # broken videos
        lambda: with_url(data_uri(rng.bytes(int(rng.integers(16, 4000))))),
        lambda: with_url(data_uri(sample[: int(rng.integers(16, len(sample) - 200))])),
        lambda: with_url(data_uri(b"\x89PNG\r\n\x1a\n" + rng.bytes(64), "image/png")),
        lambda: with_url("notes.mp4"), lambda: with_url("missing.mp4"),
        lambda: with_part({"type": "image_url", "image_url": {"url": data_uri(b"GIF89a" + rng.bytes(40), "image/gif")}}),
    ]
    return [makers[i % len(makers)]() for i in range(n)]


def test_200_malformed_requests_leave_the_server_up(servers):
    main = servers.main
    for body in malformed_bodies(45, seed=1):  # warm-up: every path once, so RSS measures a steady state
        request(main, "POST", "/v1/chat/completions", body, key=KEY)
    rss_before = main.rss_mb()
    t0 = time.perf_counter()
    statuses = []
    for body in malformed_bodies(200, seed=2):
        status, _, raw = request(main, "POST", "/v1/chat/completions", body, key=KEY)
        statuses.append(status)
        assert 400 <= status < 500, (status, body[:200], raw[:300])
        assert json.loads(raw)["error"]["message"], raw
    seconds = time.perf_counter() - t0
    rss_after = main.rss_mb()
    print(f"\n200 malformed requests in {seconds:.1f} s; server RSS {rss_before:.1f} -> {rss_after:.1f} MiB "
          f"({rss_after - rss_before:+.1f}); statuses {sorted(set(statuses))}")
    assert main.proc.poll() is None
    assert rss_after - rss_before < 50
    done = main.client().chat.completions.create(**chat("sample.mp4", QUESTIONS[0]))
    assert done.choices[0].message.content == servers.greedy[QUESTIONS[0]]


# -- without a server ---------------------------------------------------------------------------
def test_server_modules_import_without_torch_or_the_web_stack():
    code = ("import sys, blip3v.runtime.server, blip3v.runtime.openai_api; "
            "bad = [m for m in ('torch', 'starlette', 'uvicorn', 'fastapi') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_stop_holdback_never_streams_a_cut_stop_string():
    from blip3v.runtime.openai_api import StopHoldback

    hold = StopHoldback(("ite", "xyz"))
    pieces = [hold.push(p) for p in ("wh", "i", "t")]
    assert "".join(pieces) == "wh"  # "it" might begin "ite": held back
    assert hold.finish("wh") == ""
    hold = StopHoldback(("ite",))
    streamed = "".join(hold.push(p) for p in ("wh", "i", "rl")) + hold.finish("whirl")
    assert streamed == "whirl"


def test_serve_rejects_bad_options(tmp_path):
    from conftest import assert_one_line_error

    assert_one_line_error(run_cli("serve", "--media-root", tmp_path / "missing", "--port", "0"), "--media-root")
    assert_one_line_error(run_cli("serve", "--api-key", " ", "--port", "0"), "--api-key")


def test_listening_socket_says_tcp():
    """asyncio disables Nagle only on sockets whose proto is IPPROTO_TCP; with proto 0 every
    response waited ~40 ms for the client's delayed ACK."""
    import socket as sockets

    from blip3v.runtime.server import listen

    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == sockets.IPPROTO_TCP
    finally:
        sock.close()
