"""OpenAI's chat-completions protocol for `blip3v serve`: request checking, media URLs, prompt ids and
response bodies. No web framework and no torch: blip3v.runtime.server puts these on an ASGI app.

    request = parse_chat_request(body, served_model="blip3v")      # ApiError (4xx) when malformed
    data, name = load_media(request.media, policy)                  # the clip's bytes
    ids = prompt_ids(clip, request.system, request.turns)           # as `blip3v ask` / `chat` build them
    completion_body(...), chunk_body(...)                           # what goes back

How a request maps onto the sessions API (blip3v.runtime.session). The model's prompt has one video,
before the first question, so a conversation carries exactly one `video_url` (or `image_url`: a
still is a one-frame clip) part, in its first user message; later user messages are text. The
messages must be: an optional system (or developer) message, then user, assistant, user, ...,
ending with a user message. The first user turn is `encode_prompt(question)` (what `blip3v ask`
feeds), or the template with the request's system text in place of the model's; every later turn
is built as `Conversation` builds it (`<|end|>\\n<|user|>\\n{question}<|end|>\\n<|assistant|>\\n`
after the previous answer). One difference is unavoidable for a stateless server: `Conversation`
appends the answer's generated token ids, while a request carries only the answer's text, which is
tokenized again; the two agree whenever the tokenizer gives back the ids it decoded (greedy answers
of the demo and released models do). Text parts of one message are joined with a newline; the
video always precedes the question in the prompt, wherever its part stands in the message.

Media URLs: `data:<type>;base64,<data>`; a path (plain, or `file://`) under `--media-root`, with no
`..`, resolving symlinks, refused when it resolves outside the root; `http(s)://` only with
`--allow-remote`. Every source yields bytes, so the Engine's clip cache (keyed by the sha256 of the
bytes) finds a clip however it was sent.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from blip3v.errors import InputError
from blip3v.runtime.generation import SamplingConfig

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}

DEFAULT_MAX_TOKENS = SamplingConfig.max_new_tokens  # as `blip3v ask` (OpenAI's own default is the context)
MAX_STOP_STRINGS = 16
MEDIA_TYPES = ("video_url", "image_url")
READ_CHUNK = 1 << 20

# Fields this server cannot honour: accepted only with the value that means "not used".
UNSUPPORTED_UNLESS = {
    "n": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
    "functions": (None, []), "tool_choice": (None, "none"), "function_call": (None, "none"),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
    "audio": (None,), "prediction": (None,),
}


class ApiError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message.splitlines()[0] if message else ERROR_TYPES.get(status, "error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, param, code)


# -- the request --------------------------------------------------------------------------------
@dataclass
class MediaRef:
    url: str
    param: str  # where it was in the request, for messages: "messages[0].content[1].video_url.url"


@dataclass
class ChatRequest:
    model: str
    media: MediaRef
    system: str | None
    turns: list[str]  # user, assistant, user, ...: always an odd count, the first about the clip
    sampling: SamplingConfig
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: bytes, served_model: str) -> ChatRequest:
    """The body of POST /v1/chat/completions -> a checked request; ApiError 400/404 otherwise."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise bad("the request body is not UTF-8 text", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise bad(f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                  code="invalid_json") from None
    except RecursionError:
        raise bad("the request body nests too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got {_kind(data)}", code="invalid_json")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad("`model` is required: a model id from GET /v1/models", "model", "missing_model")
    if model != served_model:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served_model!r}", "model",
                       "model_not_found")
    for name, allowed in UNSUPPORTED_UNLESS.items():
        if data.get(name) not in allowed:
            raise bad(f"`{name}` is not supported by this server", name, "unsupported_parameter")
    fmt = data.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("`response_format` supports only {\"type\": \"text\"}", "response_format", "unsupported_parameter")
    modalities = data.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise bad("`modalities` supports only [\"text\"]", "modalities", "unsupported_parameter")
    stream = _flag(data, "stream")
    options = data.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise bad("`stream_options` is an object, and only with stream: true", "stream_options")
    include_usage = bool(options and _flag(options, "include_usage", "stream_options.include_usage"))
    system, turns, media = _messages(data.get("messages"))
    return ChatRequest(model, media, system, turns, _sampling(data), stream, include_usage)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _flag(data: dict, name: str, param: str | None = None) -> bool:
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"`{param or name}` must be true or false, got {_kind(value)}", param or name)
    return value


def _integer(data: dict, name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"`{name}` must be an integer, got {_kind(value)}", name)
    return value


def _number(data: dict, name: str, default: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"`{name}` must be a finite number, got {_kind(value)}", name)
    return float(value)


def _sampling(data: dict) -> SamplingConfig:
    """max_completion_tokens (or the older max_tokens), temperature (default 0: greedy, the project's
    reference behaviour; OpenAI's default is 1), top_p, seed, stop."""
    tokens = _integer(data, "max_completion_tokens")
    name = "max_completion_tokens"
    if tokens is None:
        tokens, name = _integer(data, "max_tokens"), "max_tokens"
    stop = data.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_STRINGS:
        stops = tuple(stop)
    else:
        raise bad(f"`stop` must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    cfg = SamplingConfig(max_new_tokens=DEFAULT_MAX_TOKENS if tokens is None else tokens,
                         temperature=_number(data, "temperature", 0.0), top_p=_number(data, "top_p", 1.0),
                         seed=_integer(data, "seed"), stop=stops)
    try:
        cfg.validate()
    except InputError as exc:
        message = str(exc).replace("max_new_tokens", name)
        param = next((p for p in (name, "temperature", "top_p", "seed", "stop") if p in message), None)
        raise bad(message, param) from None
    return cfg


def _text(value: str, param: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"`{param}` is not valid UTF-8 text (a lone surrogate?)", param) from None
    return value


def _parts(content: Any, param: str) -> tuple[str, list[MediaRef]]:
    """A message's content (a string, or an array of parts) -> (its text, its media parts)."""
    if isinstance(content, str):
        return _text(content, param), []
    if not isinstance(content, list) or not content:
        raise bad(f"`{param}` must be a string or a non-empty array of content parts, got {_kind(content)}", param)
    texts: list[str] = []
    media: list[MediaRef] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise bad(f"`{where}` must be an object with a `type`, got {_kind(part)}", where)
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(f"`{where}.text` must be a string, got {_kind(text)}", f"{where}.text")
            texts.append(_text(text, f"{where}.text"))
        elif kind in MEDIA_TYPES:
            ref = part.get(kind)
            if not isinstance(ref, dict) or not isinstance(ref.get("url"), str) or not ref["url"]:
                raise bad(f"`{where}.{kind}` must be an object with a non-empty string `url`", f"{where}.{kind}")
            media.append(MediaRef(ref["url"], f"{where}.{kind}.url"))
        else:
            raise bad(f"`{where}.type` must be one of text, video_url, image_url; got {kind!r}"
                      if isinstance(kind, str) else f"`{where}.type` is missing", f"{where}.type")
    return "\n".join(texts), media


def _messages(messages: Any) -> tuple[str | None, list[str], MediaRef]:
    """-> (system text or None, turns: user, assistant, user, ..., the clip)."""
    if not isinstance(messages, list) or not messages:
        raise bad("`messages` must be a non-empty array", "messages")
    system: str | None = None
    turns: list[str] = []
    found: list[MediaRef] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"`{where}` must be an object with a `role`, got {_kind(message)}", where)
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"`{where}.role` must be system, developer, user or assistant; got {role!r}", f"{where}.role")
        text, media = _parts(message.get("content"), f"{where}.content")
        if role in ("system", "developer"):
            if turns or system is not None:
                raise bad(f"`{where}`: one system message, before the first user message", where)
            if media:
                raise bad(f"`{where}`: a system message holds text only", where)
            system = text
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise bad(f"`{where}.role`: messages must alternate user and assistant, starting and ending with user; "
                      f"expected {expected}", f"{where}.role")
        if media and (role != "user" or turns):
            raise bad(f"`{where}`: the clip (video_url / image_url) goes in the first user message only",
                      media[0].param)
        if len(media) > 1:
            raise bad(f"`{where}`: one video_url or image_url per conversation, got {len(media)}", media[1].param)
        if role == "user" and not text.strip():
            raise bad(f"`{where}`: the question is empty (no text part)", f"{where}.content")
        found += media
        turns.append(text)
    if len(turns) % 2 == 0:
        raise bad("the last message must be a user message (the question to answer)", "messages")
    if not found:
        raise bad("the first user message needs a video_url (or image_url) part: this model answers questions "
                  "about a clip", "messages")
    return system, turns, found[0]


# -- media --------------------------------------------------------------------------------------
@dataclass
class MediaPolicy:
    root: Path | None  # --media-root, resolved; None: no file paths at all
    allow_remote: bool
    max_bytes: int
    timeout: float  # seconds, for a remote fetch


def load_media(ref: MediaRef, policy: MediaPolicy) -> tuple[bytes, str]:
    """-> (the clip's bytes, a name for error messages). ApiError 400/403/413 otherwise."""
    url = ref.url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        return _data_uri(url, ref.param, policy.max_bytes), ref.param
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ApiError(403, f"`{ref.param}`: remote URLs are refused (start the server with --allow-remote)",
                           ref.param, "remote_media_refused")
        return _fetch(url, ref.param, policy), url
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise bad(f"`{ref.param}`: a file URL names no host (file:///path)", ref.param, "invalid_media_url")
        return _media_file(unquote(parts.path), ref.param, policy)
    if scheme:
        raise bad(f"`{ref.param}`: unsupported URL scheme {scheme!r} (use data:, a path under the media root, or "
                  "http(s) with --allow-remote)", ref.param, "invalid_media_url")
    return _media_file(url, ref.param, policy)


def _data_uri(url: str, param: str, max_bytes: int) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise bad(f"`{param}`: a data URI must be data:<type>;base64,<data>", param, "invalid_media_url")
    payload = "".join(payload.split())  # line breaks some encoders insert
    if len(payload) * 3 // 4 > max_bytes:
        raise ApiError(413, f"`{param}`: the clip is larger than the server's limit of {max_bytes} bytes", param,
                       "media_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"`{param}`: the data URI is not valid base64", param, "invalid_base64") from None
    if not data:
        raise bad(f"`{param}`: the data URI holds no bytes", param, "invalid_media_url")
    return data


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _media_file(raw: str, param: str, policy: MediaPolicy) -> tuple[bytes, str]:
    """A path under the media root: relative to it, or absolute inside it. `..` is refused outright; a
    symlink is followed only when it resolves inside the root; the file read is the one checked (the
    open descriptor's own path is checked again, so a swap after the check is caught on Linux)."""
    if policy.root is None:
        raise ApiError(403, f"`{param}`: file paths are refused (start the server with --media-root DIR)", param,
                       "media_path_refused")
    if "\x00" in raw or not raw:
        raise bad(f"`{param}`: not a usable path", param, "invalid_media_url")
    if ".." in PurePosixPath(raw).parts:
        raise ApiError(403, f"`{param}`: '..' is not allowed in a media path", param, "media_path_refused")
    root = str(policy.root)
    candidate = os.path.normpath(os.path.join(root, raw))  # an absolute `raw` replaces the root
    if not _under(candidate, root):
        raise ApiError(403, f"`{param}`: {raw} is outside the media root", param, "media_path_refused")
    if not _under(os.path.realpath(candidate), root):
        raise ApiError(403, f"`{param}`: {raw} resolves outside the media root (a symlink)", param,
                       "media_path_refused")
    shown = os.path.relpath(candidate, root)
    try:
        fd = os.open(os.path.realpath(candidate), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise bad(f"`{param}`: no such file under the media root: {shown}", param, "media_not_found") from None
    except OSError as exc:
        raise bad(f"`{param}`: cannot open {shown} ({exc.strerror})", param, "media_not_found") from None
    with os.fdopen(fd, "rb") as f:
        opened = f"/proc/self/fd/{fd}"
        if os.path.exists(opened) and not _under(os.path.realpath(opened), root):
            raise ApiError(403, f"`{param}`: {raw} resolves outside the media root", param, "media_path_refused")
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise bad(f"`{param}`: {shown} is not a regular file", param, "media_not_found")
        if info.st_size > policy.max_bytes:
            raise ApiError(413, f"`{param}`: {shown} is larger than the server's limit of {policy.max_bytes} bytes",
                           param, "media_too_large")
        return f.read(policy.max_bytes + 1)[:policy.max_bytes], shown


def _fetch(url: str, param: str, policy: MediaPolicy) -> bytes:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "blip3v-serve"})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout) as response:  # noqa: S310 (http(s) only)
            data = response.read(policy.max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise bad(f"`{param}`: fetching {url} gave HTTP {exc.code}", param, "media_fetch_failed") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise bad(f"`{param}`: cannot fetch {url} ({reason})", param, "media_fetch_failed") from None
    if len(data) > policy.max_bytes:
        raise ApiError(413, f"`{param}`: {url} is larger than the server's limit of {policy.max_bytes} bytes", param,
                       "media_too_large")
    if not data:
        raise bad(f"`{param}`: {url} returned no bytes", param, "media_fetch_failed")
    return data


# -- the prompt ---------------------------------------------------------------------------------
def prompt_ids(clip: Any, system: str | None, turns: list[str]) -> list[int]:
    """Token ids of a conversation about `clip`: what `blip3v ask` feeds for one turn, what
    `Conversation` feeds for more (see the module docstring for the one difference)."""
    from blip3v.runtime.session import Conversation, check_question

    host = clip.host
    question = check_question(turns[0])
    if system is None:
        ids = host.encode_prompt(question)
    else:
        ids = host.encode_text(host.prompt_template.format(system=system, question=question.strip()))
    if len(turns) > 1:
        chat = Conversation(clip)  # only for its turn markers, taken from the model's template
        for answer, question in zip(turns[1::2], turns[2::2]):
            turn = f"{chat.end}\n{chat.user_header}{check_question(question).strip()}{chat.after_question}"
            ids = ids + host.encode_text(answer.strip()) + host.encode_text(turn)
    return ids


# -- responses ----------------------------------------------------------------------------------
def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(answer: Any) -> dict:
    """Prompt tokens count the video tokens; cached_tokens are the prompt tokens whose KV was reused."""
    done = len(answer.token_ids)
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": done,
            "total_tokens": answer.prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": answer.reused_tokens}}


def finish_reason(answer: Any) -> str:
    return "length" if answer.finish_reason == "length" else "stop"


def completion_body(request_id: str, created: int, model: str, fingerprint: str, answer: Any) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason(answer)}],
            "usage": usage(answer)}


def chunk_body(request_id: str, created: int, model: str, fingerprint: str, delta: dict | None,
               finish: str | None = None, answer: Any = None, with_usage: bool = False) -> dict:
    """One `chat.completion.chunk`; `delta=None` makes the usage-only chunk (no choices)."""
    body: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "system_fingerprint": fingerprint}
    body["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish}]
    if with_usage:
        body["usage"] = usage(answer) if answer is not None else None
    return body


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def model_card(name: str, created: int | None = None) -> dict:
    return {"id": name, "object": "model", "created": created or int(time.time()), "owned_by": "blip3v"}


class StopHoldback:
    """Streamed text that never shows part of a stop string the final answer cuts: the tail that
    could begin a stop string waits until the next piece (or the end) tells."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.sent = 0

    def push(self, piece: str) -> str:
        self.text += piece
        safe = len(self.text) - self._held()
        out = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out

    def _held(self) -> int:
        held = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:k]):
                    held = k
                    break
        return held

    def finish(self, final: str) -> str:
        """The rest of `final` (the answer as returned) after what was streamed."""
        return final[self.sent:] if final.startswith(self.text[:self.sent]) else ""
