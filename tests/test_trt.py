"""Tests for the TensorRT path: the parser-compatibility check, profile/flag/provenance logic, the
`blip3v build` CLI, mypy against tensorrt-stubs, and (marked `tensorrt`, GPU + TensorRT only) real builds.

One tiny engine (tiny-none, `--attention standard`) is exported for the module by the CLI (~20 s on
CPU), started with the session (conftest's head starts).

    python -m pytest tests/test_trt.py -q
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import helper

from blip3v.errors import EngineError
from blip3v.export import trt_build
from blip3v.export.trt_check import check_engine_dir, derive_profiles, fp32_pins
from blip3v.runtime.manifest import MANIFEST_NAME, file_entries, load_manifest, write_manifest
from blip3v.runtime.trt_backend import provenance_diff
from conftest import ROOT, CliJob, assert_one_line_error, head_start, in_background, run_cli


@head_start("standard")
def _standard_job(request) -> tuple[Path, CliJob]:
    """`blip3v export --preset tiny-none --seed 0 --attention standard --max-context 64`, queued to
    start with the session."""
    out = request.getfixturevalue("tmp_path_factory").mktemp("trt") / "tiny-none"
    return out, in_background(CliJob("export", "--preset", "tiny-none", "--seed", "0", "--out", out,
                                      "--attention", "standard", "--max-context", "64", "--quiet"))


@pytest.fixture(scope="module")
def standard(request) -> Path:
    out, job = _standard_job(request)
    done = job.result()
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _plant(src: Path, dst: Path, op: str, domain: str = "") -> Path:
    """A copy of the engine whose decoder has one node replaced by `op` (manifest hashes updated)."""
    copy = Path(shutil.copytree(src, dst))
    model = onnx.load(str(copy / "decoder.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "Softmax")
    node.op_type, node.domain = op, domain
    if domain and not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))
    onnx.save(model, str(copy / "decoder.onnx"))
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["files"].update(file_entries(copy, ["decoder.onnx"]))
    write_manifest(copy, manifest)  # resealed: its own sha256 covers the new file hash
    return copy


def test_standard_export_passes_the_check(standard):
    report = check_engine_dir(standard)
    assert report.ok, report.summary()
    assert set(report.graphs) == {"visual", "decoder"}
    dec = report.graphs["decoder"]
    assert "ScatterElements" in dec["ops"] and not any("." in op for op in dec["ops"])
    assert dec["fp32_pins"] and dec["quantization"] == []


@pytest.mark.parametrize("op,domain,needle", [("GroupQueryAttention", "com.microsoft", "--attention standard"),
                                              ("SimplifiedLayerNormalization", "", "--attention standard"),
                                              ("Unique", "", "not supported")])
def test_planted_unsupported_op_fails_with_one_line(standard, tmp_path, op, domain, needle):
    report = check_engine_dir(_plant(standard, tmp_path / "e", op, domain))
    assert not report.ok
    assert op in report.summary() and needle in report.summary()
    with pytest.raises(EngineError) as err:
        report.raise_if_failed()
    assert len(str(err.value).splitlines()) == 1


def test_int8_without_qdq_is_refused(standard):
    report = check_engine_dir(standard, precision="int8")
    assert "no QuantizeLinear/DequantizeLinear" in report.summary()
    with pytest.raises(EngineError, match="explicit quantization"):
        trt_build.select_flags("int8", [])
    assert trt_build.select_flags("int8", ["int8"]).strongly_typed
    fp16 = trt_build.select_flags("fp16", [])
    assert fp16.builder_flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS") and fp16.pin_fp32


def test_profiles_follow_the_manifest(standard):
    raw = load_manifest(standard).raw
    m = raw["model"]
    profiles = derive_profiles(raw, max_batch=3, max_context=32)
    (visual,) = profiles["visual"]
    lo, opt, hi = visual["pixel_values"]
    assert lo[0] == 1 and hi[0] == 3 and lo[1:] == hi[1:] == (m["num_frames"], 3, m["image_size"], m["image_size"])
    prefill, decode = profiles["decoder"]
    assert decode["inputs_embeds"][0][1] == decode["inputs_embeds"][2][1] == 1  # S = 1
    assert prefill["inputs_embeds"][2] == (3, 32, m["hidden_size"])
    assert prefill["past_key.0"][2] == (3, m["num_key_value_heads"], 32, m["head_dim"])
    with pytest.raises(EngineError, match="max-context"):
        derive_profiles(raw, max_context=10**6)


def test_rmsnorm_chain_and_layer_pinning():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Pow", ["x", "two"], ["p"], name="pow"),
             helper.make_node("ReduceMean", ["p"], ["m"], name="mean"),
             helper.make_node("Add", ["m", "eps"], ["a"], name="add"),
             helper.make_node("Sqrt", ["a"], ["s"], name="sqrt"),
             helper.make_node("Reciprocal", ["s"], ["r"], name="rsqrt"),
             helper.make_node("Mul", ["x", "r"], ["y"], name="scale"),
             helper.make_node("Relu", ["x"], ["unused"], name="relu")]
    graph = helper.make_graph(nodes, "g", [x], [y])
    assert fp32_pins(graph) == ["pow", "mean", "add", "sqrt", "rsqrt", "scale"]
    pins = {"mean"}
    assert trt_build.should_pin("SOFTMAX", "anything", set())
    assert trt_build.should_pin("REDUCE", "mean", pins) and trt_build.should_pin("REDUCE", "mean_1", pins)
    assert not trt_build.should_pin("REDUCE", "meaning", pins)


def test_provenance_diff_names_what_differs(standard):
    raw = load_manifest(standard).raw
    device = {"tensorrt_version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    settings = trt_build.build_settings("fp16", 1, 64, 4.0)
    recorded = trt_build.provenance(device, raw, settings)
    assert trt_build.stale(recorded, dict(recorded)) == []
    moved = trt_build.provenance({**device, "gpu": "NVIDIA H100", "compute_capability": "9.0"}, raw, settings)
    differs = trt_build.stale(recorded, moved)
    assert any(d.startswith("gpu: 'Orin' -> 'NVIDIA H100'") for d in differs) and len(differs) == 2
    assert "decoder.onnx" in recorded["onnx_sha256"]
    assert provenance_diff({"a": 1}, {"a": 2}) == ["a: 1 -> 2"]
    assert trt_build.precision_problem("fp8", "8.7") and not trt_build.precision_problem("bf16", "8.7")


def test_cli_check_only(standard, tmp_path):
    ok = run_cli("build", "--engine", standard, "--check-only", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    bad = run_cli("build", "--engine", _plant(standard, tmp_path / "e", "GroupQueryAttention", "com.microsoft"),
                  "--check-only")
    assert_one_line_error(bad, "GroupQueryAttention", "--attention standard")


@pytest.fixture(scope="module")
def trt_stubs(tmp_path_factory) -> Path:
    """A MYPYPATH folder with tensorrt-stubs (they lack py.typed), their syntax errors patched: a parameter
    named `in`, and a required parameter after defaults in add_scale_nd. Skips without mypy or the stubs."""
    pytest.importorskip("mypy")
    import importlib.util

    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tensorrt-stubs not installed")
    site = Path(list(spec.submodule_search_locations)[0]).parent
    if not (site / "tensorrt_bindings" / "tensorrt.pyi").is_file():
        pytest.skip("tensorrt-stubs not installed")
    stubs = tmp_path_factory.mktemp("trt-stubs")
    for pkg in ("tensorrt", "tensorrt_bindings"):
        (stubs / pkg).mkdir()
        for f in (site / pkg).glob("*.pyi"):
            text = re.sub(r"([(,]\s*)in(\s*:)", r"\1in_\2", f.read_text())
            text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
            (stubs / pkg / f.name).write_text(text)
    return stubs


def _mypy_trt(stubs: Path, cwd: Path, *files: str) -> tuple[int, list[str]]:
    """`mypy --config-file mypy-trt.ini FILES` in `cwd` against the stubs: exit code, lines about our files."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy-trt.ini", "--cache-dir",
                           str(stubs / ".mypy_cache"), *files],
                          cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"MYPYPATH": str(stubs), "PATH": "/usr/bin:/bin"})
    return proc.returncode, [line for line in proc.stdout.splitlines() if not line.startswith(str(stubs))]


def test_mypy_against_tensorrt_stubs(trt_stubs):
    """mypy over the TensorRT code with tensorrt-stubs: every TensorRT object is typed from the stubs."""
    code, ours = _mypy_trt(trt_stubs, ROOT, "export/trt_build.py", "runtime/trt_backend.py")
    assert code == 0, "\n".join(ours)


def test_mypy_catches_tensorrt_api_misuse(trt_stubs, tmp_path):
    """The check above can fail: a copy of trt_build.py with a misspelt TensorRT method and a str passed
    where a trt.BuilderFlag is required gets exactly those two errors."""
    src = (ROOT / "export" / "trt_build.py").read_text()
    plants = {"config.set_memory_pool_limit(": "config.set_memory_pool_limitt(",
              "config.set_flag(trt.BuilderFlag.__members__[name])": "config.set_flag(name)"}
    for real, wrong in plants.items():
        assert src.count(real) == 1, real
        src = src.replace(real, wrong)
    lines = {next(i for i, line in enumerate(src.splitlines(), 1) if wrong in line): wrong for wrong in plants.values()}
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "trt_build.py").write_text(src)
    shutil.copy(ROOT / "mypy-trt.ini", tmp_path)
    code, ours = _mypy_trt(trt_stubs, tmp_path, "export/trt_build.py")
    errors = [line for line in ours if ": error:" in line]
    assert code == 1 and len(errors) == 2, "\n".join(ours)
    attr, arg = sorted(errors, key=lambda e: int(e.split(":")[1]))
    assert 'has no attribute "set_memory_pool_limitt"' in attr and "[attr-defined]" in attr
    assert '"str"' in arg and '"BuilderFlag"' in arg and "[arg-type]" in arg
    assert {int(e.split(":")[1]) for e in errors} == set(lines)


def _tensorrt_gpu() -> bool:
    try:
        from blip3v.runtime.trt_backend import CudaRuntime, import_tensorrt

        import_tensorrt()
        CudaRuntime().device()
        return True
    except EngineError:
        return False


@pytest.mark.tensorrt
@pytest.mark.skipif(not _tensorrt_gpu(), reason="needs TensorRT 10 and a CUDA GPU")
def test_fp16_engines_match_onnxruntime(standard, tmp_path):
    import numpy as np

    from blip3v.runtime.generation import SamplingConfig
    from blip3v.runtime.ort_backend import OrtBackend
    from blip3v.runtime.trt_backend import TrtBackend

    engine = Path(shutil.copytree(standard, tmp_path / "e"))
    trt_build.build_engines(engine, "fp16", workspace_gb=1.0)
    load_manifest(engine)  # hashes of the new plans recorded
    ort, trt = OrtBackend.load(engine), TrtBackend.load(engine)
    pixels = np.random.default_rng(0).standard_normal((1, ort.num_frames, 3, ort.image_size, ort.image_size),
                                                      dtype=np.float32)
    ref, got = ort.encode_video(pixels), trt.encode_video(pixels)
    assert np.abs(got - ref).max() <= 2e-2 * max(1.0, float(np.abs(ref).max()))  # fp16 tolerance, as export's
    sampling = SamplingConfig(max_new_tokens=8)
    question = ["what colour does the square turn?"]
    want = ort.answer_batch(pixels, question, sampling)
    assert trt.answer_batch(pixels, question, sampling) == want
    assert trt.answer_batch(pixels, question, sampling) == want  # kept storage: decode shapes seen twice, captured
    assert trt.answer_batch(pixels, question, sampling) == want  # ... and replayed as CUDA graphs
    assert trt_build.build_engines(engine, "fp16", workspace_gb=1.0)["plans"]  # up to date: no rebuild

    # The decoder interface beyond the fresh path: a chunk after a cached prefix, on a fork (a
    # device-to-device copy of the filled slots), equals the fresh answer.
    from blip3v.runtime.decoding import decode, prefill

    embeds, mask = trt.splice([trt.encode_prompt(question[0])], trt.encode_video(pixels))
    base = trt.new_cache(1, embeds.shape[1] - 4)
    prefill(trt, base, embeds[:, :-4], mask[:, :-4])
    branch = base.fork(trt.max_context)
    logits = prefill(trt, branch, embeds[:, -4:], mask[:, -4:])
    assert decode(trt, branch, logits, sampling, trt.stop_ids).ids == want
