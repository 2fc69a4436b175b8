"""Shared fixtures: tiny checkpoints in the released layout and small real clips; `run_cli` and
its helpers for running the real CLI in subprocesses, a few of them started early (`head_start`)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Triton kernels run in its CPU interpreter where there is no GPU; the flag must be set before the
# first `import triton` (transformers imports it), so it is set here, before any test module loads.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def spread_init_(model) -> None:
    """Re-initialises matrices at unit gain (std 1/sqrt(fan_in)): transformers' 0.02 init makes a
    random model's greedy output almost independent of its input, which would let parity tests
    pass vacuously."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)


def make_tiny_checkpoint(directory: Path, temporal: str = "gttm", num_tokens: int = 4, seed: int = 0,
                         max_shard_bytes: int = 5 * 1024**3) -> Path:
    """A randomly initialised small model of the demo architecture, saved in the released layout."""
    import torch

    from blip3v.model.checkpoint import save_checkpoint
    from blip3v.model.train import task_config, task_tokenizer
    from blip3v.model.xgenmm import XGenMMVideoModel

    tok = task_tokenizer()
    torch.manual_seed(seed)
    model = XGenMMVideoModel(task_config(tok, temporal, num_tokens))
    spread_init_(model)
    save_checkpoint(model, directory, tok, max_shard_bytes=max_shard_bytes)
    return directory


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-gttm", max_shard_bytes=1_000_000)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from blip3v.data.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth") / "val", n=6, seed=11, progress=False)


def run_cli(*args: str, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess (same interpreter as the tests); `env` adds
    variables to this process's environment."""
    return subprocess.run(_cli_argv(args), capture_output=True, text=True, timeout=timeout, env=_cli_env(env))


def _cli_argv(args: Sequence[Any]) -> list[str]:
    return [sys.executable, "-m", "blip3v.cli", *map(str, args)]


def _cli_env(env: dict[str, str] | None) -> dict[str, str]:
    return dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))


def run_clis(*calls: Sequence[Any], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Independent `run_cli` calls side by side, results in call order. Each is mostly Python's
    start-up and torch's imports on one core, so on the 2-core box two cost about the time of one."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(lambda args: run_cli(*args, timeout=timeout), calls))


class CliJob:
    """One `blip3v` command, run once: by the background thread when queued with `in_background`,
    else (or if the queue has not reached it yet) by the first caller of `result`."""

    def __init__(self, *args: Any, timeout: int = 600, env: dict[str, str] | None = None) -> None:
        self.argv, self.env, self.timeout = _cli_argv(args), _cli_env(env), timeout
        self._lock = threading.Lock()  # held while it runs: a second caller waits for the first run
        self._proc: subprocess.Popen | None = None
        self._done: subprocess.CompletedProcess | None = None
        self._cancelled = False

    def result(self) -> subprocess.CompletedProcess:
        with self._lock:
            if self._done is None:
                if self._cancelled:
                    raise RuntimeError(f"cancelled at the end of the session: {self.argv}")
                self._proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              env=self.env)
                try:
                    out, err = self._proc.communicate(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.communicate()
                    raise
                self._done = subprocess.CompletedProcess(self.argv, self._proc.returncode, out, err)
            return self._done

    def cancel(self) -> None:
        self._cancelled = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()


# Head starts. The suite runs on one core of the 2-core box most of the time, so the longest CLI
# runs that later modules wait for (exports, the ONNX Runtime bench) start when the session does
# and run one after another on the other core; a module's fixture then takes the finished result.
_HEAD_STARTS: list[tuple[Path, frozenset[str], Callable[[pytest.FixtureRequest], Any]]] = []
_QUEUE: list[CliJob] = []


def head_start(*fixtures: str) -> Callable:
    """Decorator for `start(request) -> value` in a test module: called once per session, at its
    start when a selected test of that module uses one of `fixtures` (else by the first fixture
    that calls it). `start` may queue CliJobs with `in_background`; `request` gives session fixtures."""
    def register(start: Callable[[pytest.FixtureRequest], Any]) -> Callable[[pytest.FixtureRequest], Any]:
        memo: list[Any] = []

        @functools.wraps(start)
        def once(request: pytest.FixtureRequest) -> Any:
            if not memo:
                memo.append(start(request))
            return memo[0]

        _HEAD_STARTS.append((Path(start.__code__.co_filename), frozenset(fixtures), once))
        return once

    return register


def in_background(job: CliJob) -> CliJob:
    _QUEUE.append(job)
    return job


@pytest.fixture(scope="session", autouse=True)
def _head_starts(request):
    items = request.session.items
    for path, fixtures, start in _HEAD_STARTS:
        if any(item.path == path and fixtures & set(item.fixturenames) for item in items):
            try:
                start(request)
            except (Exception, pytest.skip.Exception):  # noqa: BLE001 (its own fixture calls it again and reports)
                pass
    jobs = list(_QUEUE)

    def drain() -> None:
        for job in jobs:
            try:
                job.result()
            except Exception:  # noqa: BLE001 (its fixture runs it again and reports what went wrong)
                pass

    worker = threading.Thread(target=drain, name="head-starts", daemon=True)
    worker.start()
    yield
    for job in jobs:
        job.cancel()
    worker.join(timeout=30)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    for frag in fragments:
        assert frag.lower() in err.lower(), (frag, err)


@pytest.fixture(scope="session")
def demo_engine(tmp_path_factory) -> Path:
    """The shipped demo model exported once per test session (fp32, GQA decoder)."""
    from blip3v.assets import DEMO_MODEL

    out = tmp_path_factory.mktemp("demo-engine") / "engine"
    proc = run_cli("export", "--model", DEMO_MODEL, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def ort_engine(demo_engine):
    """A session Engine on the demo engine (ONNX Runtime), one per test module (its clip cache too)."""
    from blip3v.runtime.session import Engine

    return Engine.open(engine=demo_engine)


def held_out(tmp_path_factory, n: int) -> list[dict]:
    """n synthetic QA rows of seed 1 (clips the demo model was not trained on), written per call."""
    from blip3v.data.synth import read_dataset, write_dataset

    folder = write_dataset(tmp_path_factory.mktemp("held-out") / "val", n=n, seed=1, progress=False)
    return read_dataset(folder)
