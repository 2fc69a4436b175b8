"""Shared fixtures: tiny checkpoints in the released layout and small real clips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess (same interpreter as the tests)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "blip3v.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


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
