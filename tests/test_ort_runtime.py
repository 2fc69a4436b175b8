"""Tests for the ONNX Runtime backend (blip3v.runtime.ort_backend) against the PyTorch backend.

A tiny random-weight checkpoint (tiny-gttm, some weights scaled up so greedy tokens depend on the
input and do not hit a stop id at once) is exported with the CLI, then both backends answer the
same clips. Greedy ids must match token for token; stop ids are disabled where the test needs
many steps, and every comparison asserts that several distinct tokens came out.

    python -m pytest tests/test_ort_runtime.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from blip3v.errors import EngineError, InputError
from blip3v.runtime.generation import SamplingConfig
from conftest import CliJob, head_start, in_background

# At the default init (std 0.02) a 2-layer model says the same thing to every prompt: larger token
# embeddings and attention projections make attention, and so the answer, depend on the input, while
# logits stay O(1) so the exporter's 1e-4 absolute check still means something.
WEIGHT_SCALE = 10.0
SCALED = ("embed_tokens", "qkv_proj", "o_proj")
QUESTIONS = ["what colour does the square turn?",
             "which way does the circle move, from the left to the right or from the right to the left?"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip3v.cli", *args], capture_output=True, text=True,
                          check=False, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@head_start("checkpoint")
def _checkpoint(request) -> Path:
    from blip3v.export.engine import preset_tokenizer
    from blip3v.model.checkpoint import save_checkpoint
    from blip3v.model.config import preset
    from blip3v.model.xgenmm import XGenMMVideoModel

    torch.manual_seed(0)
    cfg = preset("tiny-gttm")
    model = XGenMMVideoModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in SCALED):
                p.mul_(WEIGHT_SCALE)
    return save_checkpoint(model, request.getfixturevalue("tmp_path_factory").mktemp("ckpt") / "tiny",
                           preset_tokenizer(cfg))


@pytest.fixture(scope="module")
def checkpoint(request) -> Path:
    return _checkpoint(request)


def _export_job(request, name: str, *options: str) -> tuple[Path, CliJob]:
    """`blip3v export --model CHECKPOINT --json` into a new directory, queued to start with the session."""
    out = request.getfixturevalue("tmp_path_factory").mktemp("engines") / name
    return out, in_background(CliJob("export", "--model", _checkpoint(request), "--out", out, "--json", *options,
                                      timeout=300))


@head_start("engine_dir")
def _engine_job(request) -> tuple[Path, CliJob]:
    return _export_job(request, "tiny")


@head_start("standard_engine")
def _standard_job(request) -> tuple[Path, CliJob]:
    return _export_job(request, "std", "--attention", "standard")


def _exported(out: Path, job: CliJob) -> tuple[Path, dict]:
    done = job.result()
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)  # stdout holds only the JSON
    assert manifest["files"] and "decoder.onnx" in done.stderr  # --json: step lines on stderr, no bar
    return out, manifest


@pytest.fixture(scope="module")
def engine_dir(request) -> Path:
    return _exported(*_engine_job(request))[0]


@pytest.fixture(scope="module")
def standard_engine(request) -> tuple[Path, dict]:
    """The same checkpoint exported with `--attention standard`: (DIR, its manifest)."""
    return _exported(*_standard_job(request))


@pytest.fixture(scope="module")
def backends(checkpoint, engine_dir):
    from blip3v.model.generate import TorchBackend
    from blip3v.runtime.ort_backend import OrtBackend

    return TorchBackend.load(checkpoint), OrtBackend.load(engine_dir)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    from blip3v.data.synth import write_mp4

    rng = np.random.default_rng(3)
    frames = np.repeat(rng.integers(0, 255, (12, 1, 1, 3), dtype=np.uint8), 48, axis=1)
    frames = np.repeat(frames, 48, axis=2)  # (12, 48, 48, 3): flat colours changing every frame
    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    write_mp4(path, frames)
    return path


def pixels(torch_backend, n: int, seed: int = 0) -> np.ndarray:
    cfg = torch_backend.cfg
    return np.random.default_rng(seed).normal(size=(n, cfg.num_frames, 3, cfg.image_size, cfg.image_size)).astype(np.float32)


def without_stops(*backs):
    saved = [b.stop_ids for b in backs]
    for b in backs:
        b.stop_ids = ()
    return saved


def test_runtime_imports_no_torch():
    code = ("import sys, blip3v.runtime.ort_backend, blip3v.runtime.manifest, blip3v.runtime.tokenizer; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'blip3v.model', 'blip3v.export'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_greedy_tokens_match_torch_batch_of_two(backends):
    tb, ob = backends
    saved = without_stops(tb, ob)
    try:
        px = pixels(tb, 2)
        sampling = SamplingConfig(max_new_tokens=8)
        want = tb.answer_batch(px, QUESTIONS, sampling)
        got = ob.answer_batch(px, QUESTIONS, sampling)
        # The prompts differ in length, so row 0 is left-padded: each row must equal its solo run.
        solo = [ob.answer_batch(px[i:i + 1], QUESTIONS[i:i + 1], sampling)[0] for i in range(2)]
    finally:
        tb.stop_ids, ob.stop_ids = saved
    assert got == want
    assert solo == want
    assert all(len(row) == 8 for row in got)
    assert all(len(set(row)) >= 3 for row in got)  # not one token repeated: real multi-step decoding
    assert got[0] != got[1]  # the answers depend on the input


def test_cpu_sessions_allocate_from_the_shared_env_arena(backends):
    """Both graphs' CPU sessions use the process-wide arena (runtime.ort_backend.session_options);
    the token-for-token checks in this file run through them."""
    _, ob = backends
    for session in (ob.visual, ob.decoder):
        assert session.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"


def test_non_spinning_sessions_answer_the_same(backends, engine_dir):
    """eval/batch/live open the engine with spinning off (idle ORT threads yield the cores to the
    video decoding beside them); the sessions carry the setting and the greedy tokens are the same."""
    from blip3v.runtime.ort_backend import OrtBackend

    tb, ob = backends
    quiet = OrtBackend.load(engine_dir, spinning=False)
    for session in (quiet.visual, quiet.decoder):
        assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError):  # ORT's default (spinning) is left alone elsewhere
        ob.visual.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    px, sampling = pixels(tb, 2, seed=5), SamplingConfig(max_new_tokens=6)
    saved = without_stops(ob, quiet)
    try:
        assert quiet.answer_batch(px, QUESTIONS, sampling) == ob.answer_batch(px, QUESTIONS, sampling)
    finally:
        ob.stop_ids, quiet.stop_ids = saved

def test_standard_attention_engine_gives_the_same_tokens(backends, standard_engine):
    """The plain-ONNX decoder (for TensorRT and others) runs through the same runtime code."""
    from blip3v.runtime.ort_backend import OrtBackend

    tb, ob = backends
    std_dir, manifest = standard_engine
    assert manifest["decoder"]["attention"] == "standard"
    std = OrtBackend.load(std_dir)
    saved = without_stops(ob, std)
    try:
        px = pixels(tb, 2, seed=4)
        sampling = SamplingConfig(max_new_tokens=8)
        want = ob.answer_batch(px, QUESTIONS, sampling)
        assert std.answer_batch(px, QUESTIONS, sampling) == want
    finally:
        ob.stop_ids, std.stop_ids = saved
    assert all(len(set(row)) >= 3 for row in want)


def test_stop_ids_end_answers_the_same_way(backends):
    tb, ob = backends
    px = pixels(tb, 2, seed=1)
    sampling = SamplingConfig(max_new_tokens=12)
    assert ob.answer_batch(px, QUESTIONS, sampling) == tb.answer_batch(px, QUESTIONS, sampling)


def test_sampling_is_seeded_and_stays_in_vocabulary(backends):
    tb, ob = backends
    px = pixels(tb, 1)
    sampling = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.9}
    a = ob.answer_batch(px, QUESTIONS[:1], SamplingConfig(seed=5, **sampling))
    b = ob.answer_batch(px, QUESTIONS[:1], SamplingConfig(seed=5, **sampling))
    assert a == b
    assert all(0 <= t < ob.manifest.model["num_logits"] for t in a[0])


def test_ask_streams_text_and_reports_timings(backends, clip):
    tb, ob = backends
    pieces: list[str] = []
    answer = ob.ask(clip, QUESTIONS[0], SamplingConfig(max_new_tokens=8), on_text=pieces.append)
    assert {"decode_video", "video_decode", "visual", "prefill", "generate"} <= set(answer.timings_ms)
    assert "".join(pieces).strip() == answer.text
    assert answer.video_tokens == tb.cfg.num_video_tokens
    ref = tb.ask(clip, QUESTIONS[0], SamplingConfig(max_new_tokens=8))
    assert (answer.token_ids, answer.text) == (ref.token_ids, ref.text)


def test_prompt_longer_than_context_is_an_input_error(backends):
    _, ob = backends
    with pytest.raises(InputError, match="exceeds the model's context"):
        ob.answer_batch(pixels(backends[0], 1), ["what happens?"], SamplingConfig(max_new_tokens=ob.max_context))


def test_unavailable_device_is_an_engine_error(engine_dir):
    import onnxruntime as ort

    from blip3v.runtime.ort_backend import OrtBackend

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(EngineError, match="CUDAExecutionProvider"):
        OrtBackend.load(engine_dir, device="cuda")


def test_cli_ask_with_engine_matches_torch(engine_dir, checkpoint, clip):
    with ThreadPoolExecutor(2) as pool:  # two independent CLI runs, side by side on the two cores
        ort_run, torch_run = pool.map(lambda source: run_cli("ask", str(clip), QUESTIONS[1], *source, "--json",
                                                             "--max-new-tokens", "8"),
                                      [("--engine", str(engine_dir)), ("--model", str(checkpoint))])
    assert ort_run.returncode == 0, ort_run.stderr
    assert torch_run.returncode == 0, torch_run.stderr
    got, want = json.loads(ort_run.stdout), json.loads(torch_run.stdout)
    assert got["answer"] == want["answer"]
    assert got["video_tokens"] == want["video_tokens"]
    assert {"decode_video", "video_decode", "visual", "prefill", "generate"} <= set(got["timings_ms"])


def _copy_engine(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _break_no_manifest(e: Path) -> str:
    (e / "manifest.json").unlink()
    return "no manifest.json"


def _break_hash(e: Path) -> str:
    data = bytearray((e / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    (e / "decoder.onnx").write_bytes(bytes(data))
    return "decoder.onnx does not match its sha256"


def _break_schema(e: Path) -> str:
    m = json.loads((e / "manifest.json").read_text())
    m["schema_version"] = 99
    (e / "manifest.json").write_text(json.dumps(m))
    return "schema version 99"


def _break_missing_file(e: Path) -> str:
    (e / "embed_tokens.npy").unlink()
    return "missing file embed_tokens.npy"


def _break_truncated(e: Path) -> str:
    data = (e / "visual.onnx").read_bytes()
    (e / "visual.onnx").write_bytes(data[: len(data) // 2])
    return "visual.onnx has"


@pytest.mark.parametrize("breaker", [_break_no_manifest, _break_hash, _break_schema, _break_missing_file,
                                     _break_truncated], ids=lambda f: f.__name__[7:])
def test_bad_engine_dirs_exit_2_with_one_line(engine_dir, clip, tmp_path, breaker):
    bad = _copy_engine(engine_dir, tmp_path / "engine")
    expected = breaker(bad)
    done = run_cli("ask", str(clip), "what happens?", "--engine", str(bad), "--json")
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert expected in lines[0]
    assert "Traceback" not in done.stderr
