"""Atomic replacement of output folders (blip3v.atomic.atomic_dir): the name always holds a complete
folder, failures leave the old one, killed runs' temporary folders are cleaned at the next write.
The last tests kill a real `blip3v export` subprocess while it writes.

    python -m pytest tests/test_atomic.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from blip3v.atomic import atomic_dir, clean_stale, exchange_supported
from blip3v.runtime.manifest import MANIFEST_NAME, load_manifest, manifest_digest


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def write_version(target: Path, version: int, **kwargs) -> None:
    with atomic_dir(target, **kwargs) as tmp:
        for name in ("a", "b", "c"):
            (tmp / name).write_text(f"{version}")


@pytest.mark.skipif(not exchange_supported(), reason="no atomic exchange on this OS (the fallback has a window)")
def test_replacements_never_leave_the_name_empty(tmp_path):
    """A reader opening the folder's files by path during 300 replacements always finds each of
    them, complete (a version number, never an empty or missing file): the exchange swaps whole
    folders in one step, and each file was complete before its folder took the name."""
    target = tmp_path / "engine"
    write_version(target, 0)
    stop, seen, problems = threading.Event(), set(), []

    def poll() -> None:
        while not stop.is_set():
            for name in ("a", "b", "c"):
                try:
                    text = (target / name).read_text()
                except OSError as exc:  # FileNotFoundError above all
                    problems.append(f"{name}: {exc!r}")
                    continue
                if not text.isdigit():
                    problems.append(f"{name}: {text!r}")
                seen.add(text)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for version in range(1, 301):
            write_version(target, version)
    finally:
        stop.set()
        reader.join()
    assert problems == []
    assert len(seen) > 2  # the reader really read during the replacements
    assert (target / "a").read_text() == "300" and leftovers(tmp_path) == []


@pytest.mark.parametrize("allow_exchange", [True, False], ids=["exchange", "fallback"])
def test_replacement_and_failure(tmp_path, allow_exchange):
    target = tmp_path / "out"
    write_version(target, 1, allow_exchange=allow_exchange)  # a new name
    write_version(target, 2, allow_exchange=allow_exchange)  # replacing a folder
    assert (target / "c").read_text() == "2" and leftovers(tmp_path) == []
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_dir(target, allow_exchange=allow_exchange) as tmp:
            (tmp / "a").write_text("3")
            raise RuntimeError("failed half-way")
    assert sorted(os.listdir(target)) == ["a", "b", "c"] and (target / "a").read_text() == "2"
    assert leftovers(tmp_path) == []
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # an ordinary folder, not mkdtemp's 0700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stale_temp_folders_are_cleaned_but_live_ones_kept(tmp_path):
    target = tmp_path / "engine"
    write_version(target, 1)
    # what killed runs leave: a temporary folder (no process holds its lock) and an aside folder
    stale = tmp_path / ".engine.tmp-999999-deadbeef"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "visual.onnx").write_bytes(b"half")
    (tmp_path / ".engine.old-1-cafe").mkdir()
    (tmp_path / ".engine.old").mkdir()  # the aside name of earlier versions
    unrelated = [tmp_path / ".engine2.tmp-1-aa", tmp_path / ".other.tmp-1-aa", tmp_path / "engine.tmp-1-aa"]
    for path in unrelated:
        path.mkdir()
    # a live writer in another process, holding its temporary folder open
    code = ("import sys; from pathlib import Path; from blip3v.atomic import atomic_dir\n"
            f"with atomic_dir(Path({str(target)!r})) as tmp:\n"
            "    print(tmp, flush=True); sys.stdin.readline()\n")
    writer = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        live = Path(writer.stdout.readline().strip())
        assert live.is_dir() and live.name.startswith(".engine.tmp-")
        write_version(target, 2)
        assert live.is_dir()  # locked: another writer's folder is not touched
        assert not stale.exists() and not (tmp_path / ".engine.old-1-cafe").exists()
        assert not (tmp_path / ".engine.old").exists()
        assert all(p.is_dir() for p in unrelated)
        assert (target / "a").read_text() == "2"
    finally:
        writer.stdin.write("\n")
        writer.stdin.close()
        assert writer.wait(timeout=60) == 0
    assert os.listdir(target) == []  # the live writer (an empty folder) finished after us and took the name
    assert clean_stale(target) == []


def test_a_writer_killed_mid_write_leaves_the_old_folder(tmp_path):
    """A process SIGKILLed while it writes (deterministically: it waits half-way) leaves the old
    folder as it was and its half-written temporary folder beside it; the next write removes it."""
    target = tmp_path / "out"
    write_version(target, 1)
    code = ("import sys; from pathlib import Path; from blip3v.atomic import atomic_dir\n"
            f"with atomic_dir(Path({str(target)!r})) as tmp:\n"
            "    (tmp / 'a').write_text('2'); print(tmp, flush=True); sys.stdin.readline()\n")
    writer = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    half = Path(writer.stdout.readline().strip())
    writer.kill()
    assert writer.wait(timeout=60) == -signal.SIGKILL
    assert (half / "a").read_text() == "2" and (target / "a").read_text() == "1"
    write_version(target, 3)
    assert not half.exists() and leftovers(tmp_path) == [] and (target / "a").read_text() == "3"


def test_target_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "x").write_text("mine")
    with pytest.raises(NotADirectoryError):
        with atomic_dir(tmp_path / "x"):
            pass
    assert (tmp_path / "x").read_text() == "mine" and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- a killed export


def _start_export(out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "blip3v.cli", "export", "--preset", "tiny-mean", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _kill_at(proc: subprocess.Popen, stage: str) -> list[str]:
    """Reads the export's progress lines until `stage`, then SIGKILLs it: it dies in the middle of
    writing (the stages after it take seconds: graph export and its check)."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith(stage):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, lines  # it was killed, not finished
    return lines


def _fake_engine(directory: Path) -> Path:
    from test_manifest import make_engine

    return make_engine(directory)


@pytest.mark.slow  # two exports' start-up (torch, onnx): 20-45 s on a 2-core machine
def test_killed_export_leaves_the_old_engine_and_the_next_export_cleans_up(tmp_path):
    """SIGKILL after the export has written its first files: --out still holds the old engine,
    byte for byte; the killed run's half-written folder sits beside it under the temporary name.
    The next export removes it as it starts writing (it is killed too, once past that point)."""
    out = _fake_engine(tmp_path / "engine")  # an engine already at --out (valid manifest, stand-in graphs)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _kill_at(_start_export(out), "[3/6]")  # tokenizer.json and embed_tokens.npy are written by then
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    load_manifest(out)
    (half,) = [p for p in tmp_path.iterdir() if p.name.startswith(".engine.tmp-")]
    assert {"tokenizer.json", "embed_tokens.npy"} <= set(os.listdir(half)) and MANIFEST_NAME not in os.listdir(half)

    second = _start_export(out)
    _kill_at(second, "[2/6]")  # past atomic_dir's entry: the cleanup has run
    assert not half.exists()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".engine.tmp-")]) == 1  # its own
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.slow
def test_export_after_a_killed_export_replaces_the_engine_cleanly(tmp_path):
    """The export that follows a killed one completes: the new engine at --out, nothing left beside it."""
    out = _fake_engine(tmp_path / "engine")
    old_hash = manifest_digest(load_manifest(out).raw)
    _kill_at(_start_export(out), "[3/6]")
    done = _start_export(out)
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err
    assert leftovers(tmp_path) == []
    manifest = load_manifest(out)
    assert manifest_digest(manifest.raw) != old_hash
    assert manifest.spec.export["source"] == "preset:tiny-mean"
