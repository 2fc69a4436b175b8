"""Calibration and quantization (calibration/, over onnxruntime.quantization): Q/DQ placement and
symmetry of ORT's static quantizer as configured here, the sensitivity pass, determinism, the
quantized graphs against the float ones within stated bounds, MatMulNBits (ORT's packing) against
its float definition, activation-aware scales against round-to-nearest and their folding, and
`blip3v calibrate` end to end on an exported engine: manifest, hashes, report, timings and the
slower-than-fp32 flag, progress, the INT8 per-frame graph and live answers, bad calibration input.

The engine is the shipped demo model exported to fp32 (a trained model: random weights have none
of the structure quantization relies on). Error bounds, on synthetic clips:
  visual / frame INT8 Q/DQ   mean cosine similarity of video tokens / frame latents vs float >= 0.99
  decoder weights            next-token log-probabilities after the prefill, on prompts not used
                             for calibration: KL(fp32 || quantized) <= 1e-3 (INT4) / 1e-5 (INT8) nats
                             (logits themselves may shift by a constant, which changes nothing)
  MatMulNBits                equals x @ the float weight ORT's rounding gives, within 1e-4
  live on the INT8 engine    greedy answers token for token equal to the fused INT8 engine's on
                             5 held-out clips
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_one_line_error, run_cli, run_clis

pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def engine(demo_engine) -> Path:
    """The session's fp32 export of the demo model (conftest): only read here, every calibration
    writes a new engine directory."""
    return demo_engine


@pytest.fixture(scope="module")
def calib(engine, synth_dir):
    from blip3v.calibration.data import CalibrationSet
    from blip3v.runtime.ort_backend import OrtBackend

    backend = OrtBackend.load(engine)
    cs = CalibrationSet.from_folder(synth_dir, backend.num_frames, backend.image_size, samples=4)
    return backend, cs


def _reader(cs, per_frame: bool):
    from blip3v.calibration.data import FrameReader

    return lambda: FrameReader(cs, "pixel_values", per_frame=per_frame)


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def test_qdq_placement_symmetry_and_sensitivity_pass(engine, calib):
    from blip3v.calibration.visual_int8 import QUANT_OPS, quantize_visual, weight_layers

    _, cs = calib
    path = engine / "frame.onnx"
    layers = weight_layers(onnx.load(str(path)))
    moved: list[int] = []
    qmodel, report = quantize_visual(path, _reader(cs, True), "frame_latents", "minmax", keep=1,
                                     advance=moved.append)
    assert report["layers"] == len(layers) == len(moved) == len(report["per_layer"]) and len(report["kept_float"]) == 1
    worst = min(report["per_layer"], key=lambda p: p["cosine"])  # the pass keeps the most harmful layer
    assert report["kept_float"] == [worst["layer"]]
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    made = _producers(qmodel)
    quantized = 0
    for node in qmodel.graph.node:
        if node.op_type not in QUANT_OPS:
            continue
        act, wt = made.get(node.input[0]), made.get(node.input[1])
        if not (node.input[1] in inits or (wt is not None and wt.op_type == "DequantizeLinear")):
            assert act is None or act.op_type != "DequantizeLinear"  # attention's x @ y: left float
            continue
        if node.name in report["kept_float"]:
            assert act is None or act.op_type != "DequantizeLinear"
            continue
        quantized += 1
        assert act.op_type == "DequantizeLinear" and wt.op_type == "DequantizeLinear"
        q = made[act.input[0]]
        assert q.op_type == "QuantizeLinear"
        assert inits[q.input[2]].dtype == np.int8 and inits[q.input[2]] == 0  # symmetric activations
        assert inits[q.input[1]].ndim == 0 and inits[q.input[1]] > 0  # one scale per tensor
        w, ws, wz = inits[wt.input[0]], inits[wt.input[1]], inits[wt.input[2]]
        axis = next((a.i for a in wt.attribute if a.name == "axis"), 1)
        assert w.dtype == np.int8 and np.abs(w.astype(np.int32)).max() <= 127  # symmetric weights
        assert ws.shape == (w.shape[axis],) and (ws > 0).all() and not wz.any()  # per output channel
        assert not any(n.op_type == "QuantizeLinear" for n in qmodel.graph.node if node.output[0] in n.input)
    assert quantized == report["quantized_layers"] == len(layers) - 1


def test_int8_graphs_within_bound_for_every_method(engine, calib):
    """The per-frame graph under each method; the fused graph once (its three methods run in the
    slow calibration runs recorded in RESULTS)."""
    from blip3v.calibration.visual_int8 import quantize_visual, run_graph, token_error

    _, cs = calib
    cases = [("frame.onnx", "frame_latents", True, m) for m in ("minmax", "percentile", "entropy")]
    cases.append(("visual.onnx", "video_tokens", False, "percentile"))
    for name, output, per_frame, method in cases:
        qmodel, _ = quantize_visual(engine / name, _reader(cs, per_frame), output, method, keep=0)
        feeds = list(_reader(cs, per_frame)())
        err = token_error(run_graph(engine / name, feeds, output), run_graph(qmodel, feeds, output))
        assert err["cosine"] >= 0.99, (name, method, err)


def test_calibration_is_deterministic(engine, calib):
    from blip3v.calibration.calibrate import decoder_feeds
    from blip3v.calibration.visual_int8 import quantize_visual
    from blip3v.calibration.weight_only import quantize_decoder

    backend, cs = calib
    a, _ = quantize_visual(engine / "frame.onnx", _reader(cs, True), "frame_latents", "percentile", keep=0)
    b, _ = quantize_visual(engine / "frame.onnx", _reader(cs, True), "frame_latents", "percentile", keep=0)
    assert a.SerializeToString() == b.SerializeToString()
    dec = onnx.load(str(engine / "decoder.onnx"))
    dfeeds = decoder_feeds(backend, cs)
    c, _ = quantize_decoder(dec, dfeeds, "int4", "awq", 32)
    d, _ = quantize_decoder(dec, dfeeds, "int4", "awq", 32)
    assert c.SerializeToString() == d.SerializeToString()


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("bits, block, k", [(4, 32, 80), (8, 16, 64), (4, 64, 200)])
def test_matmul_nbits_matches_float_dequant(bits, block, k):
    """ORT's packing computes x @ rtn_dequantized(W) (so AWQ's search scores what ships), and AWQ's
    pre-scaled weight with its input Mul computes x @ rtn_dequantized(diag(s) W) / s."""
    from blip3v.calibration.graph import session
    from blip3v.calibration.weight_only import apply_awq, awq_scale, pack, relative_error, rtn_dequantized

    rng = np.random.default_rng(bits + block)
    w = rng.normal(0, 0.05, (k, 24)).astype(np.float32)
    x = (rng.normal(0, 1, (64, k)) * np.linspace(0.1, 5, k)).astype(np.float32)  # uneven channels, as in LLMs
    _, awq_err = awq_scale(w, x, bits, block)
    assert awq_err <= relative_error(x, w, rtn_dequantized(w, bits, block))  # alpha 0 (RTN) is on the grid
    s = (np.abs(x).mean(0) ** 0.5).astype(np.float32)  # any input scale: the graph must compute it exactly
    rtn = pack(_matmul_model(w), ["mm"], bits, block)
    assert [n.op_type for n in rtn.graph.node] == ["MatMulNBits"]
    np.testing.assert_allclose(session(rtn).run(["y"], {"x": x})[0], x @ rtn_dequantized(w, bits, block),
                               atol=1e-4, rtol=1e-4)
    model = _matmul_model(w)
    assert apply_awq(model, {"mm": s}) == {"folded": 0, "folded_into_matmul": 0, "mul_nodes": 1}
    awq = pack(model, ["mm"], bits, block)
    assert [n.op_type for n in awq.graph.node] == ["Mul", "MatMulNBits"]
    want = x @ (rtn_dequantized(w * s[:, None], bits, block) / s[:, None])
    np.testing.assert_allclose(session(awq).run(["y"], {"x": x})[0], want, atol=1e-4, rtol=1e-4)


def test_awq_scale_folds_into_producer_columns():
    """down_proj reads silu(gate) * up: its AWQ input scale moves into the up columns of gate_up's
    float weight before ORT packs it (no Mul left), and the graph still computes
    silu(gate) * up @ W2_hat exactly (scaling a whole column leaves its rounded integers alone)."""
    from blip3v.calibration.graph import session
    from blip3v.calibration.weight_only import apply_awq, awq_scale, pack, rtn_dequantized

    rng = np.random.default_rng(0)
    k, inter, n = 64, 96, 32
    w1 = rng.normal(0, 0.05, (k, 2 * inter)).astype(np.float32)
    w2 = rng.normal(0, 0.05, (inter, n)).astype(np.float32)
    x = rng.normal(0, 1, (16, 5, k)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["gu"], name="gate_up"),
             helper.make_node("Split", ["gu"], ["gate", "up"], name="split", axis=2, num_outputs=2),
             helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"),
             helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
             helper.make_node("Mul", ["silu", "up"], ["h"], name="product"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, n])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    gate, up = np.split(x @ rtn_dequantized(w1, 4, 32), 2, axis=-1)
    h = gate / (1 + np.exp(-gate)) * up
    skewed = (h.reshape(-1, inter) * np.linspace(0.1, 8, inter)).astype(np.float32)  # uneven channels: alpha > 0
    s, _ = awq_scale(w2, skewed, 4, 32)
    assert s is not None
    assert apply_awq(model, {"down": s}) == {"folded": 0, "folded_into_matmul": 1, "mul_nodes": 0}
    qmodel = pack(model, ["gate_up", "down"], 4, 32)
    assert [nd.op_type for nd in qmodel.graph.node].count("Mul") == 2  # silu and the product only
    want = h @ (rtn_dequantized(w2 * s[:, None], 4, 32) / s[:, None])
    np.testing.assert_allclose(session(qmodel).run(["y"], {"x": x})[0], want, atol=1e-4, rtol=1e-4)


def test_large_model_path_keeps_one_copy_and_the_model_unchanged(monkeypatch):
    """Past protobuf's 2 GB cap, sessions and intermediate-tensor runs go through a temporary file
    with external weights and leave the caller's proto exactly as it was (no copy is made of it:
    the weights are moved out while saving and read back). Forced here on a small graph."""
    import blip3v.calibration.graph as graph
    from blip3v.calibration.graph import run_collect, session

    rng = np.random.default_rng(1)
    w1, w2 = (rng.normal(0, 0.1, (32, 32)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="a"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="b")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    outputs = [o.name for o in model.graph.output]
    monkeypatch.setattr(graph, "fits_in_proto", lambda _m: False)
    x = rng.normal(size=(4, 32)).astype(np.float32)
    np.testing.assert_allclose(session(model).run(["y"], {"x": x})[0], np.maximum(x @ w1, 0) @ w2, rtol=1e-5, atol=1e-5)
    seen = {}
    run_collect(model, ["r", "y"], [{"x": x}], lambda name, v: seen.setdefault(name, v))
    np.testing.assert_allclose(seen["r"], np.maximum(x @ w1, 0), rtol=1e-5, atol=1e-5)
    # the weights are back inside (not pointing at a deleted file), no extra outputs left behind
    assert [o.name for o in model.graph.output] == outputs
    assert all(not t.external_data and t.data_location == TensorProto.DEFAULT for t in model.graph.initializer)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), w1)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[1]), w2)


def test_decoder_quantized_from_weights_left_on_disk_is_the_same(tmp_path):
    """quantize_decoder on a graph loaded without its weights (read from base_dir one at a time,
    the scaled ones spilled to a scratch file there and packed from disk) gives the same packed
    graph as on the graph loaded whole."""
    from blip3v.calibration.graph import on_disk, session
    from blip3v.calibration.weight_only import quantize_decoder

    rng = np.random.default_rng(2)
    k, inter, n = 64, 96, 64
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["xn"], name="norm", axis=-1),
             helper.make_node("MatMul", ["xn", "w1"], ["gu"], name="gate_up"),
             helper.make_node("Split", ["gu"], ["gate", "up"], name="split", axis=2, num_outputs=2),
             helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"),
             helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
             helper.make_node("Mul", ["silu", "up"], ["h"], name="product"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="down")]
    inits = [numpy_helper.from_array(rng.normal(1, 0.1, k).astype(np.float32), "g"),
             numpy_helper.from_array(rng.normal(0, 0.05, (k, 2 * inter)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.05, (inter, n)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, n])], inits)
    path = tmp_path / "decoder.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="decoder.onnx.data",
                    size_threshold=0)
    feeds = [{"x": (rng.normal(0, 1, (1, 9, k)) * np.linspace(0.2, 5, k)).astype(np.float32)} for _ in range(3)]
    whole, report = quantize_decoder(onnx.load(str(path)), feeds, "int4", "awq", 32)
    lazy = onnx.load(str(path), load_external_data=False)
    assert on_disk(lazy) == {"decoder.onnx.data"}
    parted, report2 = quantize_decoder(lazy, feeds, "int4", "awq", 32, in_place=True, base_dir=tmp_path)
    assert report2 == report and on_disk(parted) == set()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]  # no scratch left
    assert [nd.op_type for nd in parted.graph.node] == [nd.op_type for nd in whole.graph.node]
    x = feeds[0]["x"]
    np.testing.assert_array_equal(session(parted).run(["y"], {"x": x})[0], session(whole).run(["y"], {"x": x})[0])


def test_gemm_head_with_bias_becomes_matmul_nbits():
    from blip3v.calibration.graph import session
    from blip3v.calibration.weight_only import gemms_to_matmuls, pack, rtn_dequantized, weight_matmuls

    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.05, (40, 96)).astype(np.float32)  # (N, K): Gemm with transB=1, as an LM head
    bias = rng.normal(0, 1, 40).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="head", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 40])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    gemms_to_matmuls(model)
    assert [t.name for t in weight_matmuls(model)] == ["head"]
    qmodel = pack(model, ["head"], 4, 32)
    assert [n.op_type for n in qmodel.graph.node] == ["MatMulNBits", "Add"]
    x = rng.normal(0, 1, (3, 96)).astype(np.float32)
    np.testing.assert_allclose(session(qmodel).run(["y"], {"x": x})[0], x @ rtn_dequantized(w.T, 4, 32) + bias,
                               atol=1e-4, rtol=1e-4)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("scheme, bound", [("int4", 1e-3), ("int8", 1e-5)])
def test_decoder_weights_logits_within_bound(engine, calib, synth_dir, scheme, bound):
    from blip3v.calibration.calibrate import decoder_feeds
    from blip3v.calibration.data import CalibrationSet
    from blip3v.calibration.graph import session
    from blip3v.calibration.weight_only import quantize_decoder

    backend, cs = calib
    dec = onnx.load(str(engine / "decoder.onnx"))
    qdec, report = quantize_decoder(dec, decoder_feeds(backend, cs), scheme, "awq", 32)
    assert report["layers"] == sum(n.op_type == "MatMulNBits" for n in qdec.graph.node) == 9  # with additional_fc
    # qkv and gate_up read a fused (Skip)SimplifiedLayerNormalization: an AWQ input scale folds into
    # its weight (copied first where the exporter shares one initializer), never a Mul node; o_proj
    # (GroupQueryAttention's output) and down_proj (silu(gate) * up) fold into the V / up columns
    # of the producing MatMul (the demo has a KV head per query head). Only the decoupled LM head's
    # additional_fc, whose input the sliced head also reads, may keep a Mul.
    producer = _producers(qdec)
    readers = Counter(i for n in qdec.graph.node for i in n.input)
    for node in qdec.graph.node:
        if node.op_type == "Mul" and node.name.endswith("_awq") and readers[node.input[0]] == 1:
            assert producer[node.input[0]].op_type not in ("SimplifiedLayerNormalization", "GroupQueryAttention",
                                                          "Mul"), node.name
    assert report["folded"] > 0 and report["folded_into_matmul"] > 0
    held_out = CalibrationSet.from_folder(synth_dir, backend.num_frames, backend.image_size, samples=6, seed=1)
    ref_sess, q_sess = session(dec), session(qdec)
    for feed in decoder_feeds(backend, held_out):
        ref = _log_softmax(ref_sess.run([backend.logits_name], feed)[0])
        got = _log_softmax(q_sess.run([backend.logits_name], feed)[0])
        kl = float((np.exp(ref) * (ref - got)).sum(-1).max())
        assert kl <= bound, kl


@pytest.fixture(scope="module")
def calibrated(engine, synth_dir, tmp_path_factory) -> tuple[Path, dict]:
    """`blip3v calibrate --json` into a new engine (keep 0: the sensitivity pass is tested above)."""
    tmp = tmp_path_factory.mktemp("calibrated")
    out, report_path = tmp / "w4v8", tmp / "report.json"
    proc = run_cli("calibrate", "--engine", str(engine), "--out", str(out), "--videos", str(synth_dir),
                   "--samples", "4", "--keep", "0", "--eval-data", str(synth_dir), "--report", str(report_path),
                   "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "calibrate" not in proc.stderr and "%" not in proc.stderr  # --json silences the progress bar
    report = json.loads(proc.stdout)
    assert json.loads(report_path.read_text()) == report
    assert not list(tmp.glob(".w4v8.*"))  # nothing half-written left behind
    return out, report


def test_calibrate_cli_end_to_end(engine, synth_dir, calibrated):
    out, report = calibrated
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["samples"] == 4 and len(q["calibration_sha256"]) == 64
    for role in ("visual", "frame"):
        assert q[role]["precision"] == "int8" and q[role]["method"] == "percentile" and q[role]["format"] == "qdq"
    assert {k: q["decoder"][k] for k in ("precision", "format", "method", "block_size", "accuracy_level")} == {
        "precision": "int4", "format": "MatMulNBits", "method": "awq", "block_size": 32, "accuracy_level": 0}
    before, after = report["size_bytes"]["before"], report["size_bytes"]["after"]
    assert after["decoder.onnx"] < before["decoder.onnx"] / 2
    assert after["visual.onnx"] < before["visual.onnx"] and after["frame.onnx"] < before["frame.onnx"]
    fp32 = json.loads((engine / "manifest.json").read_text())["files"]
    assert manifest["files"]["frame.onnx"]["sha256"] != fp32["frame.onnx"]["sha256"]  # the INT8 one is listed
    assert manifest["files"]["temporal.onnx"] == fp32["temporal.onnx"]  # the temporal graph stays float
    g = report["agreement"]
    assert g["clips"] == 6 and 0 <= g["same_answer"] <= 1 and "same_answer_rtn" in g
    # every quantized graph is timed against its float original; the flag is exactly "slower"
    assert set(report["timing"]) == {"visual", "frame", "decoder"}
    for role, t in report["timing"].items():
        a, b = (t["fp32_ms"], t["quantized_ms"]) if role != "decoder" else (t["fp32_ms_per_token"],
                                                                            t["quantized_ms_per_token"])
        assert a > 0 and b > 0 and t["slower_than_fp32"] == (b > 1.05 * a)
    assert report["slower_than_fp32"] == [r for r, t in report["timing"].items() if t["slower_than_fp32"]]
    from blip3v.calibration.calibrate import summary

    text = "\n".join(summary(report))
    assert text.count("SLOWER THAN FP32") == len(report["slower_than_fp32"])
    # the quantized engine is a normal engine: hashes verify and it answers
    ask = run_cli("ask", str(next((synth_dir / "clips").glob("*.mp4"))), "how many shapes are there?",
                  "--engine", str(out))
    assert ask.returncode == 0 and ask.stdout.strip(), ask.stderr[-2000:]


def test_int8_frame_graph_and_live_answers(engine, calibrated, tmp_path_factory):
    """The calibrated engine's live path runs its INT8 frame.onnx: its latents stay within the
    stated cosine of the float graph's, and a LiveSession over a clip's T frames answers as the
    fused INT8 engine does on the same clip (5 held-out clips)."""
    from blip3v.calibration.visual_int8 import run_graph, token_error
    from blip3v.data.synth import read_dataset, write_dataset
    from blip3v.runtime.generation import SamplingConfig
    from blip3v.runtime.live import LiveSession
    from blip3v.runtime.session import Engine
    from blip3v.runtime.video import read_frames

    out, _ = calibrated
    rows = read_dataset(write_dataset(tmp_path_factory.mktemp("live-int8") / "val", n=5, seed=1, progress=False))
    int8 = Engine.open(engine=out)
    host = int8.host
    pixels = [host.load_video(row["path"]) for row in rows]  # (T, 3, S, S) each
    feeds = [{"pixel_values": p} for p in pixels]
    err = token_error(run_graph(engine / "frame.onnx", feeds, "frame_latents"), np.concatenate(
        [host.encode_frames(p) for p in pixels]))
    assert err["cosine"] >= 0.99 and err["max_abs_diff"] > 0, err  # INT8, and close
    sampling = SamplingConfig(max_new_tokens=8)
    for row in rows:
        want = int8.clip(row["path"]).ask(row["question"], sampling)
        with LiveSession(int8, fps=None) as live:
            for i, frame in enumerate(read_frames(row["path"], host.num_frames)):
                live.push(frame, t=i / 4, block=True)
            live.end()
            got = live.ask(row["question"], sampling)
        assert got.token_ids == want.token_ids, (row["video"], got.text, want.text)


def test_calibrate_progress_and_decoder_only(engine, synth_dir, tmp_path):
    """Without --quiet/--json one bar with an ETA on stderr; --visual fp32 leaves both visual graphs
    as exported and times only the decoder."""
    out = tmp_path / "w8"
    proc = run_cli("calibrate", "--engine", str(engine), "--out", str(out), "--videos", str(synth_dir),
                   "--samples", "2", "--visual", "fp32", "--decoder", "int8", "--weights", "rtn",
                   "--eval-data", str(synth_dir), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "calibrate (decoder)" in proc.stderr and "100%" in proc.stderr and "<" in proc.stderr  # elapsed<ETA
    assert proc.stdout.startswith(f"wrote {out}") and "decoder: fp32" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    fp32 = json.loads((engine / "manifest.json").read_text())["files"]
    assert set(manifest["quantization"]) >= {"decoder"} and "visual" not in manifest["quantization"]
    for name in ("visual.onnx", "frame.onnx", "temporal.onnx"):
        assert manifest["files"][name] == fp32[name]


def test_calibrate_bad_input(engine, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    cases = [(("--engine", engine, "--out", out, "--videos", empty), "no videos"),
             (("--engine", engine, "--out", out, "--videos", broken), "clip.mp4"),
             (("--engine", engine, "--out", out, "--visual", "fp16"), "fp16"),
             (("--engine", engine, "--out", engine), "new directory"),
             (("--engine", tmp_path / "nope", "--out", out), "nope")]
    for proc, (_, fragment) in zip(run_clis(*(("calibrate", *args) for args, _ in cases)), cases):
        assert_one_line_error(proc, fragment)
    assert not out.exists()


def test_frame_reader_feeds_clips_or_frames_and_ranges(calib):
    _, cs = calib
    reader = _reader(cs, True)()
    shapes = [f["pixel_values"].shape for f in iter(reader.get_next, None)]
    assert shapes == [cs.clips.shape[1:]] * len(cs)  # (T, 3, S, S): one batch of frames per clip
    reader = _reader(cs, False)()
    reader.set_range(1, 3)
    got = list(iter(reader.get_next, None))
    assert len(got) == 2 and np.array_equal(got[0]["pixel_values"][0], cs.clips[1])  # (1, T, 3, S, S)
