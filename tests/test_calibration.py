"""Calibration and quantization (calibration/): Q/DQ placement and symmetry, determinism, the
quantized graphs against the float ones within stated bounds, MatMulNBits against its numpy
definition, activation-aware scales against round-to-nearest, and `blip3v calibrate` end to end
on a small exported engine, including bad calibration input.

The engine is the shipped demo model exported to fp32 (a trained model: random weights have none
of the structure quantization relies on). Error bounds, on synthetic clips:
  visual INT8 Q/DQ      mean cosine similarity of video tokens vs float >= 0.99
  decoder weights       next-token log-probabilities after the prefill, on prompts not used for
                        calibration: KL(fp32 || quantized) <= 1e-3 (INT4) / 1e-5 (INT8) nats
                        (logits themselves may shift by a constant, which changes nothing)
  MatMulNBits           equals x @ dequantized W within 1e-4
"""

from __future__ import annotations

from collections import Counter

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import assert_one_line_error, run_cli

pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    from blip3v.assets import DEMO_MODEL

    out = tmp_path_factory.mktemp("calib-engines") / "fp32"
    done = run_cli("export", "--model", str(DEMO_MODEL), "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def calib(engine, synth_dir):
    from blip3v.calibration.data import CalibrationSet
    from blip3v.runtime.ort_backend import OrtBackend

    backend = OrtBackend.load(engine)
    cs = CalibrationSet.from_folder(synth_dir, backend.num_frames, backend.image_size, samples=4)
    return backend, cs


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def test_qdq_placement_and_symmetry(engine, calib):
    from blip3v.calibration.graph import weight_nodes
    from blip3v.calibration.visual_int8 import QUANT_OPS, quantize_visual

    backend, cs = calib
    model = onnx.load(str(engine / "visual.onnx"))
    feeds = list(cs.visual_feeds(backend.pixel_name, np.float32))
    qmodel, report = quantize_visual(model, feeds, backend.video_name, "minmax", keep=1)
    assert report["layers"] == len(weight_nodes(model, QUANT_OPS)) and len(report["kept_float"]) == 1
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    made = _producers(qmodel)
    quantized = 0
    for node in qmodel.graph.node:
        if node.op_type not in QUANT_OPS:
            continue
        act, wt = made.get(node.input[0]), made.get(node.input[1])
        weighted = node.input[1] in inits or (wt is not None and wt.op_type == "DequantizeLinear")
        if not weighted:
            continue  # e.g. attention's activation x activation MatMuls: no weight, not quantized
        if act is None or act.op_type != "DequantizeLinear":
            assert node.name in report["kept_float"]
            continue
        quantized += 1
        assert wt is not None and wt.op_type == "DequantizeLinear"
        q = made[act.input[0]]
        assert q.op_type == "QuantizeLinear"
        assert inits[q.input[2]].dtype == np.int8 and inits[q.input[2]] == 0  # symmetric activations
        assert inits[q.input[1]].ndim == 0 and inits[q.input[1]] > 0  # one scale per tensor
        w, ws, wz = inits[wt.input[0]], inits[wt.input[1]], inits[wt.input[2]]
        axis = next(a.i for a in wt.attribute if a.name == "axis")
        assert w.dtype == np.int8 and np.abs(w).max() <= 127  # symmetric weights: -128 never used
        assert ws.shape == (w.shape[axis],) and (ws > 0).all() and not wz.any()  # per output channel
    assert quantized == report["quantized_layers"] > 0


def test_visual_int8_within_bound_for_every_method(engine, calib):
    from blip3v.calibration.visual_int8 import quantize_visual, run_visual, token_error

    backend, cs = calib
    model = onnx.load(str(engine / "visual.onnx"))
    feeds = list(cs.visual_feeds(backend.pixel_name, np.float32))[:2]  # two clips: three methods stay quick
    ref = run_visual(model, feeds, backend.video_name)
    for method in ("minmax", "percentile", "entropy"):
        qmodel, _ = quantize_visual(model, feeds, backend.video_name, method, keep=0)
        err = token_error(ref, run_visual(qmodel, feeds, backend.video_name))
        assert err["cosine"] >= 0.99, (method, err)


def test_entropy_threshold_clips_outliers_but_not_the_bulk():
    from blip3v.calibration.visual_int8 import BINS, _entropy_threshold

    rng = np.random.default_rng(0)
    x = np.abs(np.concatenate([rng.normal(0, 1, 200_000), [40.0]]))  # bulk within ~5, one outlier at 40
    hist = np.histogram(x, bins=BINS, range=(0, 40.0))[0]
    t = _entropy_threshold(hist, 40.0)
    assert 3.0 < t < 20.0, t
    spike = np.zeros(BINS, np.int64)
    spike[1500] = 1000  # all mass in one bin: clipping below it would lose everything
    assert _entropy_threshold(spike, 1.0) >= 1500 / BINS


def test_calibration_is_deterministic(engine, calib):
    from blip3v.calibration.calibrate import decoder_feeds
    from blip3v.calibration.visual_int8 import quantize_visual
    from blip3v.calibration.weight_only import quantize_decoder

    backend, cs = calib
    vis = onnx.load(str(engine / "visual.onnx"))
    feeds = list(cs.visual_feeds(backend.pixel_name, np.float32))[:2]
    a, _ = quantize_visual(vis, feeds, backend.video_name, "percentile", keep=0)
    b, _ = quantize_visual(vis, feeds, backend.video_name, "percentile", keep=0)
    assert a.SerializeToString() == b.SerializeToString()
    dec = onnx.load(str(engine / "decoder.onnx"))
    dfeeds = decoder_feeds(backend, cs)
    c, _ = quantize_decoder(dec, dfeeds, "int4", "awq", 32)
    d, _ = quantize_decoder(dec, dfeeds, "int4", "awq", 32)
    assert c.SerializeToString() == d.SerializeToString()


@pytest.mark.parametrize("bits, block, k", [(4, 32, 80), (8, 16, 64), (4, 64, 200)])
def test_matmul_nbits_matches_numpy_dequant(bits, block, k):
    from onnx import TensorProto, helper

    from blip3v.calibration.graph import session
    from blip3v.calibration.weight_only import quantize_awq, quantize_rtn, to_matmul_nbits

    rng = np.random.default_rng(bits + block)
    w = rng.normal(0, 0.05, (k, 24)).astype(np.float32)
    x = (rng.normal(0, 1, (64, k)) * np.linspace(0.1, 5, k)).astype(np.float32)  # uneven channels, as in LLMs
    rtn = quantize_rtn(w, bits, block)
    awq = quantize_awq(w, x, bits, block)
    from blip3v.calibration.weight_only import output_error

    assert output_error(x, w, awq) <= output_error(x, w, rtn)
    for qw in (rtn, awq):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 24])],
            [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        from blip3v.calibration.graph import weight_nodes

        target = weight_nodes(model, ("MatMul",))[0]
        qmodel, _ = to_matmul_nbits(model, {"mm": (target, qw)})
        assert [n.op_type for n in qmodel.graph.node][-1] == "MatMulNBits"
        got = session(qmodel).run(["y"], {"x": x})[0]
        np.testing.assert_allclose(got, x @ qw.dequantize(), atol=1e-4, rtol=1e-4)


def test_awq_scale_folds_into_producer_columns():
    """down_proj reads silu(gate) * up: its AWQ input scale moves into the block scales of the up
    columns of gate_up (no Mul left), and the graph still computes silu(gate) * up @ W2 exactly."""
    from onnx import TensorProto, helper

    from blip3v.calibration.graph import session, weight_nodes
    from blip3v.calibration.weight_only import quantize_awq, quantize_rtn, to_matmul_nbits

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
    targets = {t.name: t for t in weight_nodes(model, ("MatMul",))}
    q1 = quantize_rtn(w1, 4, 32)
    gate, up = np.split(x @ q1.dequantize(), 2, axis=-1)
    h = gate / (1 + np.exp(-gate)) * up
    skewed = (h.reshape(-1, inter) * np.linspace(0.1, 8, inter)).astype(np.float32)  # uneven channels: alpha > 0
    q2 = quantize_awq(w2, skewed, 4, 32)
    assert q2.in_scale is not None
    qmodel, counts = to_matmul_nbits(model, {"gate_up": (targets["gate_up"], q1), "down": (targets["down"], q2)})
    assert counts["folded_into_matmul"] == 1 and counts["mul_nodes"] == 0
    assert [nd.op_type for nd in qmodel.graph.node].count("Mul") == 2  # silu and the product only
    got = session(qmodel).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(got, h @ q2.dequantize(), atol=1e-4, rtol=1e-4)


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
    assert report["layers"] == sum(n.op_type == "MatMulNBits" for n in qdec.graph.node) > 0
    # qkv and gate_up read a fused (Skip)SimplifiedLayerNormalization: an AWQ input scale folds into
    # its weight (copied first where the exporter shares one initializer), never a Mul node. (The
    # decoupled LM head's two MatMuls share the final norm's output: that one keeps its Muls.)
    producer = {o: n for n in qdec.graph.node for o in n.output}
    readers = Counter(i for n in dec.graph.node for i in n.input)
    for node in qdec.graph.node:
        if node.op_type == "Mul" and node.name.endswith("_awq") and readers[node.input[0]] == 1:
            assert "LayerNormalization" not in producer[node.input[0]].op_type, node.name
    assert report["folded"] > 0
    # o_proj reads GroupQueryAttention's output and down_proj silu(gate) * up: their scales go into
    # the V columns of qkv and the up columns of gate_up (the demo has a KV head per query head).
    for node in qdec.graph.node:
        if node.op_type == "Mul" and node.name.endswith("_awq"):
            assert producer[node.input[0]].op_type not in ("GroupQueryAttention", "Mul"), node.name
    held_out = CalibrationSet.from_folder(synth_dir, backend.num_frames, backend.image_size, samples=6, seed=1)
    ref_sess, q_sess = session(dec), session(qdec)
    for feed in decoder_feeds(backend, held_out):
        ref = _log_softmax(ref_sess.run([backend.logits_name], feed)[0])
        got = _log_softmax(q_sess.run([backend.logits_name], feed)[0])
        kl = float((np.exp(ref) * (ref - got)).sum(-1).max())
        assert kl <= bound, kl


def test_calibrate_cli_end_to_end(engine, synth_dir, tmp_path):
    out = tmp_path / "w4v8"
    report_path = tmp_path / "report.json"
    proc = run_cli("calibrate", "--engine", str(engine), "--out", str(out), "--videos", str(synth_dir),
                   "--samples", "4", "--keep", "1", "--eval-data", str(synth_dir), "--report", str(report_path),
                   "--json", "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert json.loads(report_path.read_text()) == report
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["samples"] == 4 and len(q["calibration_sha256"]) == 64
    assert q["visual"]["precision"] == "int8" and q["visual"]["method"] == "percentile"
    assert q["decoder"] == {"precision": "int4", "format": "MatMulNBits", "method": "awq", "block_size": 32,
                            "accuracy_level": 0}
    before, after = report["size_bytes"]["before"], report["size_bytes"]["after"]
    assert after["decoder.onnx"] < before["decoder.onnx"] / 2 and after["visual.onnx"] < before["visual.onnx"]
    g = report["agreement"]
    assert g["clips"] == 6 and 0 <= g["same_answer"] <= 1 and "same_answer_rtn" in g
    assert all(v > 0 for t in report["timing"].values() for v in t.values())
    assert not list(tmp_path.glob(".w4v8.*"))  # nothing half-written left behind
    # the quantized engine is a normal engine: hashes verify and it answers
    ask = run_cli("ask", str(next((synth_dir / "clips").glob("*.mp4"))), "how many shapes are there?",
                  "--engine", str(out))
    assert ask.returncode == 0 and ask.stdout.strip(), ask.stderr[-2000:]


def test_calibrate_bad_input(engine, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert_one_line_error(run_cli("calibrate", "--engine", str(engine), "--out", str(out), "--videos", str(empty)),
                          "no videos")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    assert_one_line_error(run_cli("calibrate", "--engine", str(engine), "--out", str(out), "--videos", str(broken)),
                          "clip.mp4")
    assert_one_line_error(run_cli("calibrate", "--engine", str(engine), "--out", str(out), "--visual", "fp16"),
                          "fp16")
    assert_one_line_error(run_cli("calibrate", "--engine", str(engine), "--out", str(engine)), "new directory")
    assert_one_line_error(run_cli("calibrate", "--engine", str(tmp_path / "nope"), "--out", str(out)), "nope")
    assert not out.exists()


def test_gemm_head_with_bias_becomes_matmul_nbits():
    from onnx import TensorProto, helper

    from blip3v.calibration.graph import session
    from blip3v.calibration.weight_only import decoder_targets, quantize_rtn, to_matmul_nbits, weight_kn

    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.05, (40, 96)).astype(np.float32)  # (N, K): Gemm with transB=1, as an LM head
    bias = rng.normal(0, 1, 40).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="head", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 40])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    (target,) = decoder_targets(model)
    kn = weight_kn(model, target)
    assert kn.shape == (96, 40)
    qw = quantize_rtn(kn, 4, 32)
    qmodel, _ = to_matmul_nbits(model, {"head": (target, qw)})
    x = rng.normal(0, 1, (3, 96)).astype(np.float32)
    np.testing.assert_allclose(session(qmodel).run(["y"], {"x": x})[0], x @ qw.dequantize() + bias, atol=1e-4, rtol=1e-4)
