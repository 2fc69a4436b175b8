"""Batch video QA over a corpus: the torch-free core of `blip3v batch`.

    from blip3v.runtime.batch import read_videos, Results, plan, run_local, video_settings
    videos = read_videos("corpus/qa.jsonl", ["how many shapes are there?"])  # video -> questions
    results = Results("answers.parquet")           # rows already written, and the journal
    tasks = plan(videos, results.done)             # what is left to do, one task per clip
    summary = run_local(tasks, video_settings(engine="engines/demo"),
                        lambda: Engine.open(engine="engines/demo"), SamplingConfig(), results)
    results.finish(); results.close()

What runs where. Reading a video and sampling its frames (PyAV decode + resize, the
`decode_video` stage) is CPU work that needs no model, so it runs in worker processes
(`decode_clip`), `in_flight` clips ahead of the engine; the engine lives in the calling process
and answers every question of a clip through the session API (`answer_clip`: one `Clip`, its
prompt prefix reused by the questions after the first, exactly as `blip3v ask` does). On an
ONNX Runtime CPU engine opened with `parallel_clips` (as `blip3v batch` opens it), the decoded
clips run through the visual graph in threads side by side (`encode_clip`), one intra-op thread
each, while the calling thread answers the clips already encoded. The Ray
path (blip3v.runtime.batch_ray) runs the same two functions as a Ray Data CPU stage and an
actor-pool stage.

Output and resuming. A result row is keyed by (video, question): `video` is the path as the
--videos argument produced it (list entries relative to the list file's folder), so a rerun with
the same arguments finds its rows. Rows are appended to a JSONL journal one clip at a time, each
write flushed and fsync'ed; a killed run leaves at worst a partial last line, which the next run
cuts off before appending. For `--out FILE.jsonl` the journal is the output. For `--out
FILE.parquet` (Parquet cannot be appended to) the journal is `FILE.parquet.journal.jsonl` beside
it, and at the end the existing Parquet rows and the journal are merged, written to a temporary
file and renamed over FILE.parquet; only then is the journal deleted. Merging keeps the last row
per key, so a kill between the rename and the delete costs nothing. A lock file (`.FILE.lock`,
flock'ed while the run lasts) keeps two runs from writing the same output.

A clip that cannot be read (or a question the model cannot take, e.g. too long) becomes rows with
`error` set and no answer; one bad file never stops the run. A rerun skips error rows too, unless
`retry_errors`.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import glob
import json
import multiprocessing
import os
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blip3v.errors import Blip3vError, InputError

try:
    import fcntl
except ImportError:  # Windows: no lock, documented in README
    fcntl = None  # type: ignore[assignment]

# Output columns, in order. Timings are the session API's (blip3v.runtime.session.Answer): a clip's
# decode_video and visual cost is reported on its first question's row, 0 on the others.
COLUMNS = ("video", "question", "answer", "error", "finish_reason", "decode_video_ms", "visual_ms",
           "prefill_ms", "generate_ms", "prompt_tokens", "reused_tokens")
TIMINGS = ("decode_video", "visual", "prefill", "generate")
# What --videos takes as a folder or glob: video containers (and GIF); still images are left out so a
# folder of extracted frames is not read as a corpus of one-frame clips.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg",
                  ".flv", ".wmv", ".3gp", ".ogv", ".gif")
LIST_SUFFIXES = (".jsonl", ".csv", ".parquet")
VIDEO_KEYS = ("video", "path")  # the list column naming the file (`blip3v data synth` writes "video")


Key = tuple[str, str]  # (video, question)


# --------------------------------------------------------------------------- what to decode


@dataclass(frozen=True)
class VideoSettings:
    """How the model samples a clip: all a decoding worker needs, so workers never load the model.
    `options` are load_clip's keywords (aspect, decoder, scaler: the host's `video_options`)."""

    num_frames: int
    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of_host(cls, host: Any) -> VideoSettings:
        return cls(int(host.num_frames), int(host.image_size), tuple(map(float, host.image_mean)),
                   tuple(map(float, host.image_std)), tuple(sorted((getattr(host, "video_options", None) or {}).items())))


def video_settings(model: str | os.PathLike | None = None, engine: str | os.PathLike | None = None,
                   backend: str | None = None, revision: str | None = None, video_options: dict | None = None,
                   **torch_options: Any) -> VideoSettings:
    """The frame-sampling settings of the model `open_host` would open for the same arguments, read
    from its files (an engine's manifest, a checkpoint's config.json) without loading it: with
    none of model, engine or backend, the shipped demo engine (the demo model on PyTorch when a
    PyTorch-only option is set), as open_host chooses."""
    from blip3v.runtime.backends import TORCH_ONLY_OPTIONS

    if model and engine:
        raise InputError("give either --model (PyTorch checkpoint) or --engine (exported engine), not both")
    options = tuple(sorted((video_options or {}).items()))
    torch_asked = any(torch_options.get(k) not in (None, "dense", "auto", "128", 128) for k in TORCH_ONLY_OPTIONS)
    if model is None and engine is None and backend is None and not torch_asked:
        from blip3v.assets import DEMO_ENGINE

        engine = DEMO_ENGINE
    if engine:
        from blip3v.runtime.manifest import load_manifest

        spec = load_manifest(engine, verify_hashes=False).spec.model  # hashes: checked when it opens
        return VideoSettings(spec.num_frames, spec.image_size, tuple(spec.image_mean), tuple(spec.image_std), options)
    from blip3v.model.checkpoint import load_config  # the frame count as the PyTorch backend will read it
    from blip3v.model.hub import resolve_checkpoint

    if model is None:
        from blip3v.assets import DEMO_MODEL

        model = DEMO_MODEL
    cfg, _ = load_config(resolve_checkpoint(model, revision))
    return VideoSettings(cfg.num_frames, cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std), options)


@dataclass
class Decoded:
    """A clip's pixels (T, 3, S, S) float32, or why it could not be read; decode time in ms."""

    pixels: np.ndarray | None
    error: str | None
    decode_ms: float
    pixels_file: str | None = None  # the pixels, saved by a worker (decode_to_file)

    def load(self) -> Decoded:
        """The pixels in memory (a worker's scratch file read and removed)."""
        if self.pixels_file is None:
            return self
        try:
            pixels = np.load(self.pixels_file)
        finally:
            os.unlink(self.pixels_file)
        return Decoded(pixels, None, self.decode_ms)


def decode_clip(path: str, settings: VideoSettings) -> Decoded:
    """Reads and samples one clip as the engine's `load_video` would (the same `load_clip`), so a
    clip decoded here gives the same answers as `blip3v ask`. Never raises: runs in workers."""
    from blip3v.runtime.video import load_clip

    t0 = time.perf_counter()
    try:
        pixels = load_clip(path, settings.num_frames, settings.image_size, settings.image_mean, settings.image_std,
                           **dict(settings.options))
        error = None
    except Blip3vError as exc:
        pixels, error = None, one_line(str(exc))
    except Exception as exc:  # noqa: BLE001 (a decoder bug on one file must not stop the corpus)
        pixels, error = None, one_line(f"cannot read video {path!r}: {type(exc).__name__}: {exc}")
    return Decoded(pixels, error, (time.perf_counter() - t0) * 1e3)


def one_line(message: str) -> str:
    return " ".join(message.split()) or "unknown error"


# What a worker sends back stays below PIPE_BUF (4096 bytes on Linux), so the pipe write is atomic:
# CPython's ProcessPoolExecutor (3.11) hangs for good when a worker dies in the middle of writing a
# result (its reader blocks on the rest of the message; the parent holds the pipe's write end, so
# no EOF ever comes). Pixels therefore travel through a scratch file, and messages are clipped.
MAX_ERROR_CHARS = 1000


def decode_to_file(path: str, settings: VideoSettings, scratch: str, name: str) -> Decoded:
    """`decode_clip` in a worker process: the pixels go to `scratch/name.npy`, the result names that
    file (`Decoded.load` reads it back in the parent)."""
    decoded = decode_clip(path, settings)
    if decoded.pixels is None:
        return Decoded(None, (decoded.error or "")[:MAX_ERROR_CHARS], decoded.decode_ms)
    target = os.path.join(scratch, name + ".npy")
    try:
        np.save(target, decoded.pixels)
    except OSError:  # scratch space full: send them the slow way rather than fail the clip
        return decoded
    return Decoded(None, None, decoded.decode_ms, pixels_file=target)


# --------------------------------------------------------------------------- the --videos argument


def read_videos(spec: str, questions: Iterable[str] = ()) -> OrderedDict[str, list[str]]:
    """--videos (a folder, a glob, one video, or a .jsonl/.csv/.parquet list) + --question ->
    {video: [questions]} in input order. A list row may carry its own `question`; it is asked
    before the --question ones. Every video needs at least one question."""
    from blip3v.runtime.session import check_question

    common = [check_question(q) for q in questions]
    if not spec or not spec.strip():
        raise InputError("--videos is empty: give a folder, a glob or a .jsonl/.csv/.parquet list")
    path = Path(spec)
    if path.suffix.lower() in LIST_SUFFIXES and path.is_file():
        rows = _read_list(path)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise InputError(f"--videos {spec}: no video files in this folder ({', '.join(VIDEO_SUFFIXES[:6])}, ...)")
        rows = [(str(p), None) for p in files]
    elif glob.has_magic(spec):
        found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not found:
            raise InputError(f"--videos {spec}: the pattern matches no file")
        rows = [(p, None) for p in found]
    elif path.exists():
        rows = [(spec, None)]  # one video
    else:
        raise InputError(f"--videos {spec}: no such file, folder or list")
    out: OrderedDict[str, list[str]] = OrderedDict()
    for video, question in rows:
        asked = out.setdefault(video, [])
        for q in ([question] if question else []) + common:
            if q not in asked:
                asked.append(q)
    bare = [v for v, qs in out.items() if not qs]
    if bare:
        raise InputError(f"no question for {bare[0]}" + (f" (and {len(bare) - 1} more)" if len(bare) > 1 else "")
                         + ": give --question, or a `question` column in the list")
    return out


def _read_list(path: Path) -> list[tuple[str, str | None]]:
    """(video, question or None) per row of a list file; relative videos are under the list's folder."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        records = _parquet_records(path)
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            records = [(n, r) for n, r in enumerate(csv.DictReader(fh), 2)]  # line 1 is the header
    else:
        records = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    records.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    rows = []
    for n, record in records:
        where = f"{path}:{n}" if suffix != ".parquet" else f"{path} row {n}"
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected an object with a `video` key")
        key = next((k for k in VIDEO_KEYS if record.get(k) not in (None, "")), None)
        if key is None:
            raise InputError(f"{where}: no `video` (or `path`) value")
        video, question = record[key], record.get("question")
        if not isinstance(video, str):
            raise InputError(f"{where}: `{key}` must be a path string, got {type(video).__name__}")
        if question is not None and not isinstance(question, str):
            raise InputError(f"{where}: `question` must be text, got {type(question).__name__}")
        if question is not None and not question.strip():
            question = None  # an empty cell: this row asks only the --question ones
        if question is not None:
            from blip3v.runtime.session import check_question

            try:
                check_question(question)
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
        if not os.path.isabs(video):
            video = os.path.normpath(os.path.join(os.path.dirname(str(path)), video))
        rows.append((video, question))
    if not rows:
        raise InputError(f"{path}: the list is empty")
    return rows


def _parquet_records(path: Path) -> list[tuple[int, dict]]:
    pq = _pyarrow_parquet("reading a .parquet list")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 (pyarrow raises ArrowInvalid, OSError... for a bad file)
        raise InputError(f"{path}: not a readable Parquet file ({one_line(str(exc))})") from None
    wanted = [c for c in (*VIDEO_KEYS, "question") if c in table.column_names]
    return list(enumerate(table.select(wanted).to_pylist()))


def _pyarrow_parquet(why: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{why} needs pyarrow, which is not installed: pip install 'blip3v[batch]'") from None
    return pq


# --------------------------------------------------------------------------- the output


class Results:
    """The output file of a run: rows already done, appending, the final write. See the module
    docstring for the layout; `done` maps (video, question) -> row."""

    def __init__(self, path: str | os.PathLike, retry_errors: bool = False):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".jsonl", ".parquet"):
            raise InputError(f"--out {self.path}: give a .jsonl or .parquet file name")
        if not self.path.parent.is_dir():
            raise InputError(f"--out {self.path}: folder {self.path.parent} does not exist")
        if self.path.is_dir():
            raise InputError(f"--out {self.path}: is a folder")
        self.parquet = suffix == ".parquet"
        if self.parquet:
            _pyarrow_parquet("--out FILE.parquet")
        self.journal = self.path.with_name(self.path.name + ".journal.jsonl") if self.parquet else self.path
        self._fh: Any = None
        self._lock_fd = self._lock()
        try:
            self._load(retry_errors)
        except BaseException:
            self.close()
            raise

    def _load(self, retry_errors: bool) -> None:
        for stale in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            stale.unlink(missing_ok=True)  # a Parquet write that was killed; we hold the lock
        rows: list[dict] = []
        if self.parquet and self.path.exists():
            rows += _read_parquet_rows(self.path)
        rows += _read_journal(self.journal)
        self.done: dict[Key, dict] = {}
        for row in rows:
            self.done[(row["video"], row["question"])] = row  # the last row of a key wins
        if retry_errors:
            self.done = {k: r for k, r in self.done.items() if r.get("error") is None}
            if not self.parquet and len(self.done) < len(rows):
                _atomic_write_text(self.journal, "".join(_line(r) for r in self.done.values()))

    def _lock(self) -> int | None:
        """An exclusive flock on `.FILE.lock`, removed again by close(). After locking, the file must
        still be the one at that name: a run that opened it just before another's close() removed
        it would otherwise hold a lock nobody else sees."""
        if fcntl is None:
            return None
        name = self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        while True:
            fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise InputError(f"--out {self.path}: another `blip3v batch` is writing it") from None
            try:
                if os.stat(name).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def write(self, rows: list[dict]) -> None:
        """Appends rows (one clip's) as complete lines and makes them durable before returning."""
        if not rows:
            return
        if self._fh is None:
            self._fh = open(self.journal, "ab")  # on the first row: a run that fails first leaves no file
        self._fh.write("".join(_line(r) for r in rows).encode("utf-8"))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        for r in rows:
            self.done[(r["video"], r["question"])] = r

    def finish(self, order: dict[Key, int] | None = None) -> None:
        """For Parquet: writes every row (ordered by `order`, unknown keys last) to FILE.parquet
        atomically and deletes the journal. JSONL needs nothing: every line is already durable."""
        if not self.parquet:
            return
        if self.path.exists() and not (self.journal.exists() and self.journal.stat().st_size):
            return  # nothing new since the Parquet was written
        rank = order or {}
        rows = sorted(self.done.values(), key=lambda r: rank.get((r["video"], r["question"]), len(rank)))
        import pyarrow as pa

        pq = _pyarrow_parquet("--out FILE.parquet")
        table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=_schema())
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.journal.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.parquet and self.journal.exists() and not self.journal.stat().st_size:
            self.journal.unlink()
        if self._lock_fd is not None:
            self.lock_path.unlink(missing_ok=True)  # while still holding it: see _lock
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ROW_START = b'{"video": '  # how every line we write begins (a cut-off line is recognised by it)


def _line(row: dict) -> str:
    return json.dumps({c: row.get(c) for c in COLUMNS}, ensure_ascii=False) + "\n"


def _schema():
    import pyarrow as pa

    types = {"prompt_tokens": pa.int64(), "reused_tokens": pa.int64()}
    types.update({f"{t}_ms": pa.float64() for t in TIMINGS})
    return pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])


def _check_row(row: Any, where: str) -> dict:
    """A row read back from an output file; anything else means --out names someone else's file."""
    missing = [c for c in COLUMNS if not isinstance(row, dict) or c not in row]
    if missing or not isinstance(row["video"], str) or not isinstance(row["question"], str):
        what = f"missing {', '.join(missing[:3])}" if missing else "video/question are not text"
        raise InputError(f"{where}: not a row of `blip3v batch` output ({what}); choose another --out")
    return row


def _read_journal(path: Path) -> list[dict]:
    """Rows of a JSONL journal. A last line without its newline is a write cut off by a kill (it
    starts as every row we write does): it is dropped and the file truncated before it, so the next append starts on a fresh line. Nothing
    else is repaired: any other unreadable line means the file is not (only) ours, and is an error."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    rows: list[dict] = []
    start = 0
    for n, raw in enumerate(data.split(b"\n"), 1):
        if start + len(raw) == len(data):  # the piece after the last newline
            if raw and not raw.startswith(ROW_START[:len(raw)]):
                raise InputError(f"{path}:{n}: not a JSON row; --out must be a file `blip3v batch` wrote")
            if raw:
                with open(path, "r+b") as fh:
                    fh.truncate(start)
                    os.fsync(fh.fileno())
            break
        start += len(raw) + 1
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{path}:{n}: not a JSON row; --out must be a file `blip3v batch` wrote") from None
        rows.append(_check_row(row, f"{path}:{n}"))
    return rows


def _read_parquet_rows(path: Path) -> list[dict]:
    pq = _pyarrow_parquet("--out FILE.parquet")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 (a file of someone else's, or not Parquet at all)
        raise InputError(f"--out {path}: exists and is not a readable Parquet file ({one_line(str(exc))})") from None
    return [_check_row(r, f"{path} row {i}") for i, r in enumerate(rows)]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still in place
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- planning and answering


@dataclass(frozen=True)
class ClipTask:
    """One clip to answer: `video` as it keys the output, `path` absolute (what workers open), and
    the questions not answered yet."""

    video: str
    path: str
    questions: tuple[str, ...]


def plan(videos: OrderedDict[str, list[str]], done: dict[Key, dict] | set[Key]) -> list[ClipTask]:
    """The clips with questions left, in input order."""
    tasks = []
    for video, questions in videos.items():
        left = tuple(q for q in questions if (video, q) not in done)
        if left:
            tasks.append(ClipTask(video, os.path.abspath(video), left))
    return tasks


def input_order(videos: OrderedDict[str, list[str]]) -> dict[Key, int]:
    return {(v, q): i for i, (v, q) in enumerate((v, q) for v, qs in videos.items() for q in qs)}


def error_row(video: str, question: str, error: str, decode_ms: float = 0.0) -> dict:
    return {"video": video, "question": question, "answer": None, "error": error, "finish_reason": None,
            "decode_video_ms": round(decode_ms, 3), "visual_ms": None, "prefill_ms": None, "generate_ms": None,
            "prompt_tokens": None, "reused_tokens": None}


def answer_row(video: str, question: str, answer: Any) -> dict:
    row = {"video": video, "question": question, "answer": answer.text, "error": None,
           "finish_reason": answer.finish_reason, "prompt_tokens": answer.prompt_tokens,
           "reused_tokens": answer.reused_tokens}
    row.update({f"{t}_ms": round(float(answer.timings_ms.get(t, 0.0)), 3) for t in TIMINGS})
    return row


def clip_from_pixels(engine: Any, pixels: np.ndarray, decode_ms: float, key: str) -> Any:
    """A session `Clip` of pixels (T, 3, S, S) decoded elsewhere: `Engine.clip` less the decoding
    (which already ran in a worker) and less the engine's clip cache (a batch asks every question of
    a clip at once, so nothing would be reused, and the cache would only hold memory)."""
    from blip3v.runtime.session import Clip

    t0 = time.perf_counter()
    video = engine.host.encode_video(pixels[None])  # (1, M, D)
    return Clip(engine, key, video, {"decode_video": decode_ms, "visual": (time.perf_counter() - t0) * 1e3})


def encode_clip(engine: Any, task: ClipTask, decoded: Decoded) -> Any:
    """The session `Clip` of a decoded clip, or the one line saying why there is none. Touches only
    the host's visual graph, so on an engine opened with `parallel_clips` threads may run it side by
    side (`run_local`)."""
    if decoded.pixels is None:
        return decoded.error or "unknown error"
    try:
        return clip_from_pixels(engine, decoded.pixels, decoded.decode_ms, f"batch:{task.path}")
    except InputError as exc:
        return one_line(str(exc))


def answer_clip(engine: Any, task: ClipTask, decoded: Decoded, sampling: Any, clip: Any = None) -> list[dict]:
    """The rows of one clip: every pending question through the session API, or error rows.
    `clip`: what `encode_clip` gave for it, when that already ran elsewhere."""
    clip = encode_clip(engine, task, decoded) if clip is None else clip
    if isinstance(clip, str):
        return [error_row(task.video, q, clip, decoded.decode_ms) for q in task.questions]
    rows = []
    for question in task.questions:
        try:
            rows.append(answer_row(task.video, question, clip.ask(question, sampling)))
        except InputError as exc:  # e.g. a question too long for the context: this row only
            rows.append(error_row(task.video, question, one_line(str(exc))))
    return rows


# --------------------------------------------------------------------------- one machine


@dataclass
class Summary:
    rows: int = 0  # written by this run
    errors: int = 0  # of those, rows with an error
    skipped: int = 0  # rows asked for that --out already held (set by the caller)
    clips: int = 0
    seconds: float = 0.0
    clips_per_s: float = 0.0
    rows_per_s: float = 0.0
    decoder_restarts: int = 0
    out: str = ""

    def add(self, rows: list[dict]) -> None:
        self.clips += 1
        self.rows += len(rows)
        self.errors += sum(r["error"] is not None for r in rows)

    def close(self, seconds: float) -> Summary:
        self.seconds = round(seconds, 3)
        self.clips_per_s = round(self.clips / seconds, 3) if seconds > 0 else 0.0
        self.rows_per_s = round(self.rows / seconds, 3) if seconds > 0 else 0.0
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def default_workers() -> int:
    """Decoding processes: every core but one (the engine's), at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class _Decoders:
    """Worker processes decoding clips ahead of the engine, at most `in_flight` at a time.

    A worker that dies (a decoder crash on some file, the OOM killer) breaks the whole pool: every
    clip in flight fails with BrokenProcessPool. Those clips ("suspects") are then decoded again one
    at a time in a fresh pool, so a file that kills its worker again while decoded alone is the
    cause and becomes an error row, and the others lose nothing but the retry."""

    def __init__(self, tasks: list[ClipTask], settings: VideoSettings, workers: int, in_flight: int):
        self.todo = list(reversed(tasks))  # popped from the end: input order
        self.settings = settings
        self.workers = workers
        self.in_flight = in_flight
        self.suspects: list[ClipTask] = []  # popped from the end too
        self.isolating = False  # the one clip in flight is a suspect decoded alone
        self.broken = False  # a submit found the pool broken (a worker died while none was busy)
        self.pending: dict[cf.Future, ClipTask] = {}
        self.restarts = 0
        self.submitted = 0
        self.scratch = tempfile.TemporaryDirectory(prefix="blip3v-batch-")  # pixels from the workers
        self.pool = self._new_pool()
        self._fill()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        # spawn: the parent may hold ONNX Runtime / torch threads, which a fork would copy mid-state.
        return cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def _submit(self, queue: list[ClipTask]) -> bool:
        task = queue.pop()
        self.submitted += 1
        try:
            future = self.pool.submit(decode_to_file, task.path, self.settings, self.scratch.name, str(self.submitted))
        except BrokenProcessPool:
            queue.append(task)
            self.broken = True
            return False
        self.pending[future] = task
        return True

    def _fill(self) -> None:
        self.isolating = bool(self.suspects)
        if self.suspects:
            if not self.pending:
                self._submit(self.suspects)
            return
        while self.todo and len(self.pending) < self.in_flight and self._submit(self.todo):
            pass

    def __bool__(self) -> bool:
        return bool(self.pending or self.todo or self.suspects)

    def next_done(self) -> list[tuple[ClipTask, Decoded]]:
        """Blocks until at least one clip is decoded (or found to kill its worker)."""
        alone = self.isolating
        out, broken = [], []
        if self.pending:
            done, _ = cf.wait(self.pending, return_when=cf.FIRST_COMPLETED)
            for future in done:
                task = self.pending.pop(future)
                try:
                    out.append((task, future.result().load()))
                except BrokenProcessPool:
                    broken.append(task)
        if broken or self.broken:
            lost = broken + list(self.pending.values())
            self.pending.clear()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()
            self.restarts += 1
            self.broken = False
            if alone and broken:
                task = broken[0]
                out.append((task, Decoded(None, f"cannot read video {task.path!r}: the decoding process died "
                                                "while reading it", 0.0)))
            else:
                self.suspects += reversed(lost)  # the earliest first
        self._fill()
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.scratch.cleanup()


def run_local(tasks: list[ClipTask], settings: VideoSettings, open_engine: Callable[[], Any], sampling: Any,
              results: Results, workers: int | None = None, in_flight: int | None = None,
              progress: bool = True) -> Summary:
    """Answers `tasks` on this machine: `workers` decoding processes (0: decode in this process),
    the engine from `open_engine()` here. Rows go to `results` clip by clip."""
    from tqdm import tqdm

    workers = default_workers() if workers is None else workers
    in_flight = in_flight or 2 * max(1, workers)
    summary = Summary(out=str(results.path))
    t0 = time.perf_counter()
    bar = tqdm(total=len(tasks), disable=not progress, desc="batch", unit="clip", dynamic_ncols=True)
    decoders = _Decoders(tasks, settings, workers, in_flight) if workers and tasks else None
    try:
        engine = open_engine() if tasks else None  # the workers are already decoding meanwhile
        if engine is not None and VideoSettings.of_host(engine.host) != settings:
            from blip3v.errors import EngineError

            raise EngineError(f"the model's frame sampling {VideoSettings.of_host(engine.host)} differs from "
                              f"what its files said ({settings}): did they change during the run?")

        def handle(task: ClipTask, decoded: Decoded, clip: Any = None) -> None:
            rows = answer_clip(engine, task, decoded, sampling, clip)
            results.write(rows)
            summary.add(rows)
            bar.update(1)
            if summary.errors:
                bar.set_postfix(errors=summary.errors, refresh=False)

        # An ONNX Runtime CPU engine opened with `parallel_clips`: decoded clips go through the
        # visual graph in `encode_workers` threads side by side, this thread answers them in order.
        workers_here = int(getattr(getattr(engine, "host", None), "encode_workers", 0) or 0)
        if decoders is None:
            for task in tasks:
                handle(task, decode_clip(task.path, settings))
        elif workers_here:
            encoders = cf.ThreadPoolExecutor(workers_here, thread_name_prefix="blip3v-encode")
            pending: deque[tuple[ClipTask, Decoded, cf.Future]] = deque()
            try:
                while decoders or pending:
                    if decoders and len(pending) < 2 * workers_here:
                        for task, decoded in decoders.next_done():
                            pending.append((task, decoded, encoders.submit(encode_clip, engine, task, decoded)))
                        while pending and pending[0][2].done():
                            task, decoded, future = pending.popleft()
                            handle(task, decoded, future.result())
                    else:  # enough encodings under way (or no more to come): answer the oldest
                        task, decoded, future = pending.popleft()
                        handle(task, decoded, future.result())
            finally:
                encoders.shutdown(wait=True, cancel_futures=True)
            summary.decoder_restarts = decoders.restarts
        else:
            while decoders:
                for task, decoded in decoders.next_done():
                    handle(task, decoded)
            summary.decoder_restarts = decoders.restarts
    finally:
        if decoders is not None:
            decoders.close()
        bar.close()
    return summary.close(time.perf_counter() - t0)
