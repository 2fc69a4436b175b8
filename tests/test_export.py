"""Tests for blip3v.export: each graph against the PyTorch reference, the engine directory, the manifest.

Tiny random-weight presets only (32 px frames, 2-layer decoder), CPU. Tolerance: float32 max abs
difference <= 1e-4 to the reference, as the exporter itself enforces.

    python -m pytest tests/test_export.py -q
"""

from __future__ import annotations

from collections import Counter

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from blip3v.errors import EngineError, InputError
from blip3v.export import engine
from blip3v.model.config import TEMPORAL_ENCODERS, preset
from blip3v.model.xgenmm import XGenMMVideoModel
from blip3v.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, load_manifest, sha256_file

FP32_TOL = 1e-4


def tiny(kind: str = "gttm", seed: int = 0) -> XGenMMVideoModel:
    torch.manual_seed(seed)
    return XGenMMVideoModel(preset(f"tiny-{kind.replace('_', '-')}")).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[XGenMMVideoModel, Path, dict]:
    """One full engine (tiny-gttm): export_engine validates both graphs on the way. Weights are
    forced into external data files, the layout of real-size (> 2 GB) graphs."""
    model = tiny("gttm")
    out = tmp_path_factory.mktemp("engines") / "tiny-gttm"
    stages: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "EXTERNAL_DATA_BYTES", 0)
        manifest = engine.export_engine(model, engine.preset_tokenizer(model.config), out, source="test",
                                        log=stages.append)
    assert any("decoder.onnx" in s for s in stages)  # progress is reported per stage
    return model, out, manifest


@pytest.mark.parametrize("kind", TEMPORAL_ENCODERS)
def test_visual_graph_matches_pytorch(kind, exported, tmp_path):
    if kind == "gttm":  # the module's engine already holds this one's visual.onnx
        model, path = exported[0], exported[1] / "visual.onnx"
    else:
        model, path = tiny(kind), tmp_path / "visual.onnx"
        engine.export_visual(model, path, model.config.num_frames, engine.DEFAULT_OPSET)
    golden = engine.visual_golden(model, model.config.num_frames, batch=3)  # traced at batch 2: dynamic batch
    diff = engine.check_visual(path, golden, "fp32", np.dtype("float32"))
    assert golden["video_tokens"].shape == (3, model.config.num_video_tokens,
                                            model.config.text_config["hidden_size"])
    assert diff <= FP32_TOL


def test_decoder_logits_match_pytorch_over_cached_steps(exported):
    model, out, manifest = exported
    m = manifest["model"]
    # A fresh golden with more decode steps and more padding than the exporter's own check.
    golden = engine.decoder_golden(model, steps=6, prompt=9, pad=5)
    assert len(golden["logits"]) == 7
    diff = engine.check_decoder(out / "decoder.onnx", golden, "fp32", np.dtype("float32"),
                                m["num_key_value_heads"], m["head_dim"], m["num_layers"])
    assert diff <= FP32_TOL
    assert golden["logits"][0].shape == (2, model.config.num_logits)  # 32012 + 3 scheme: base + extra logits


def test_out_of_tolerance_raises_naming_output_and_difference(exported):
    model, out, manifest = exported
    m = manifest["model"]
    golden = engine.decoder_golden(model, steps=2)
    golden["logits"][2] = golden["logits"][2] + 0.5
    with pytest.raises(EngineError, match=r"logits \(decode step 2\).*max abs 0\.5"):
        engine.check_decoder(out / "decoder.onnx", golden, "fp32", np.dtype("float32"),
                             m["num_key_value_heads"], m["head_dim"], m["num_layers"])


def test_manifest_is_complete_and_hashes_match(exported):
    model, out, manifest = exported
    cfg = model.config
    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    assert on_disk == manifest
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert set(manifest["files"]) == {"visual.onnx", "visual.onnx.data", "decoder.onnx", "decoder.onnx.data",
                                      "frame.onnx", "frame.onnx.data", "temporal.onnx", "temporal.onnx.data",
                                      "embed_tokens.npy", "tokenizer.json"}
    for name, entry in manifest["files"].items():
        assert sha256_file(out / name) == entry["sha256"]
    assert manifest["model"]["num_video_tokens"] == cfg.num_video_tokens
    assert manifest["model"]["num_frames"] == cfg.num_frames
    assert manifest["special_token_ids"]["image"] == cfg.special_token_ids["image"]
    assert manifest["stop_token_ids"] == [cfg.special_token_ids["end"], cfg.special_token_ids["eos"]]
    kv = manifest["decoder"]["kv_cache"]
    assert kv["past_key"].format(layer=1) == "past_key.1"
    assert manifest["export"]["validation"]["decoder_max_abs_diff"] <= FP32_TOL
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    load_manifest(out)  # the runtime accepts it


def test_tampered_external_data_is_caught(exported, tmp_path):
    import shutil

    _, out, _ = exported
    copy = shutil.copytree(out, tmp_path / "engine")
    data = bytearray((copy / "decoder.onnx.data").read_bytes())
    data[0] ^= 1
    (copy / "decoder.onnx.data").write_bytes(bytes(data))
    with pytest.raises(EngineError, match="decoder.onnx.data does not match its sha256"):
        load_manifest(copy)


def test_onnx_tensor_names_are_the_manifest_s(exported):
    import onnxruntime as ort

    _, out, manifest = exported
    sess = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()} | {o.name for o in sess.get_outputs()}
    kv = manifest["decoder"]["kv_cache"]
    for layer in range(manifest["model"]["num_layers"]):
        for role in ("past_key", "past_value", "present_key", "present_value"):
            assert kv[role].format(layer=layer) in names
    assert set(manifest["decoder"]["inputs"].values()) <= names
    assert sess.get_outputs()[0].shape[1] == manifest["model"]["num_logits"]


def test_embedding_table_rows_follow_decoupled_embedding(exported):
    model, out, manifest = exported
    table = np.load(out / "embed_tokens.npy")
    ids = torch.arange(manifest["embeddings"]["rows"])  # every id, the 3 extra ones included
    with torch.inference_mode():
        ref = model.embed_tokens(ids).numpy()
    np.testing.assert_array_equal(table, ref)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    model = tiny("mean")

    def broken(*args, **kwargs):
        raise EngineError("export failed half-way (test)")

    monkeypatch.setattr(engine, "export_visual", broken)  # after the tokenizer and table are written
    with pytest.raises(EngineError, match="half-way"):
        engine.export_engine(model, engine.preset_tokenizer(model.config), tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_input_errors(tmp_path):
    model = tiny("mean")
    tok = engine.preset_tokenizer(model.config)
    with pytest.raises(InputError, match="precision"):
        engine.export_engine(model, tok, tmp_path / "e", precision="int3")
    with pytest.raises(InputError, match="max-context"):
        engine.export_engine(model, tok, tmp_path / "e", max_context=10**6)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not an engine directory"):
        engine.export_engine(model, tok, tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_decoder_graph_in_pytorch_matches_the_model(attention):
    """The wrapper module itself (before export) against the model's transformers decoder."""
    from transformers import DynamicCache

    from blip3v.export.graphs import DecoderGraph

    model = tiny("tl", seed=3)
    graph = DecoderGraph(model, attention=attention).eval()
    g = torch.Generator().manual_seed(0)
    b, s, cap, d = 2, 6, 10, model.config.text_config["hidden_size"]
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    embeds = torch.randn(b, s, d, generator=g)
    past = [torch.zeros(b, graph.num_kv_heads, cap, graph.head_dim) for _ in range(2 * len(graph.layers))]
    cache = DynamicCache(config=model.vlm.lang_model.config)
    with torch.inference_mode():
        for step in range(3):
            ref, _ = model.decoder(embeds, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            logits, *past = graph(embeds, mask, pos, *past)
            torch.testing.assert_close(logits, ref[:, -1], atol=FP32_TOL, rtol=0)
            embeds = torch.randn(b, 1, d, generator=g)
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_sliding_window_decoder_matches_transformers(attention, tmp_path):
    """Phi-3's sliding window (2047 in the release) on a window of 4 over a 9-token padded prompt:
    GQA's local_window_size and the standard graph's mask both follow transformers' masks."""
    cfg = preset("tiny-none")
    cfg.text_config["sliding_window"] = 4
    torch.manual_seed(2)
    model = XGenMMVideoModel(cfg).eval()
    golden = engine.decoder_golden(model, steps=3, prompt=9, pad=2)
    path = tmp_path / "decoder.onnx"
    engine.export_decoder(model, path, engine.DEFAULT_OPSET, attention=attention)
    conf = model.vlm.lang_model.config
    diff = engine.check_decoder(path, golden, "fp32", np.dtype("float32"), conf.num_key_value_heads,
                                conf.hidden_size // conf.num_attention_heads, conf.num_hidden_layers)
    assert diff <= FP32_TOL
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("GroupQueryAttention" in ops) == (attention == "gqa")


@pytest.mark.parametrize("text_width, packed", [(128, True), (96, False)])
def test_gqa_rotary_inside_or_before_the_op(text_width, packed, tmp_path):
    """head_dim 32 (a multiple of 16): GroupQueryAttention reads the packed qkv and rotates q and k
    itself (at cache slots); head_dim 24: q, k, v are split and rotated by RotaryEmbedding first (at
    the runtime's positions). Both against the reference over a left-padded batch and cached steps."""
    from blip3v.model.config import _small, _tiny_temporal

    torch.manual_seed(4)
    model = XGenMMVideoModel(_small(_tiny_temporal("tl"), text_width=text_width)).eval()
    path = tmp_path / "decoder.onnx"
    engine.export_decoder(model, path, engine.DEFAULT_OPSET, attention="gqa")
    conf = model.vlm.lang_model.config
    head_dim = conf.hidden_size // conf.num_attention_heads
    assert (head_dim % 16 == 0) == packed
    golden = engine.decoder_golden(model, steps=4, prompt=9, pad=5)
    diff = engine.check_decoder(path, golden, "fp32", np.dtype("float32"), conf.num_key_value_heads, head_dim,
                                conf.num_hidden_layers)
    assert diff <= FP32_TOL
    graph = onnx.load(str(path)).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == conf.num_hidden_layers
    for node in gqa:
        attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        assert attrs["do_rotary"] == int(packed)
        assert bool(node.input[1]) != packed  # packed: no separate key/value inputs
    rotary = sum(n.op_type == "RotaryEmbedding" for n in graph.node)
    assert rotary == (0 if packed else 2 * conf.num_hidden_layers)


def test_fp16_decoder_within_its_stated_tolerance(tmp_path):
    """fp16 graphs are checked against the float32 reference with TOLERANCE["fp16"] relative to scale."""
    model = tiny("mean", seed=1)
    golden = engine.decoder_golden(model, steps=2)
    model = model.half()
    path = tmp_path / "decoder.onnx"
    engine.export_decoder(model, path, engine.DEFAULT_OPSET)
    conf = model.vlm.lang_model.config
    diff = engine.check_decoder(path, golden, "fp16", np.dtype("float16"), conf.num_key_value_heads,
                                conf.hidden_size // conf.num_attention_heads, conf.num_hidden_layers)
    scale = max(1.0, max(float(np.abs(l).max()) for l in golden["logits"]))
    assert 0 < diff <= engine.TOLERANCE["fp16"] * scale  # 0 < diff: it really ran in half precision


def test_decoder_graph_has_no_control_flow(exported):
    """One graph for prefill and decode: no If/Loop (TensorRT rejects an If on 'has past')."""
    graph = onnx.load(str(exported[1] / "decoder.onnx"), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    assert not ops & {"If", "Loop", "Scan"}
    assert "GroupQueryAttention" in ops  # the default: ORT's fused attention on the shared KV buffers
    # ... with RMSNorm, residual adds and RoPE as ORT's fused kernels (export/ort_ops.py), not
    # the six-node norm and dozen-node rotate-half the exporter writes from the modules
    layers = sum(node.op_type == "GroupQueryAttention" for node in graph.node)
    count = Counter(node.op_type for node in graph.node)
    assert count["RotaryEmbedding"] == 2 * layers  # head_dim 24: ORT's GQA rotary wants a multiple of 16
    assert count["SkipSimplifiedLayerNormalization"] == 2 * layers - 1
    assert count["SimplifiedLayerNormalization"] == 2  # the first layer's input norm and the final norm
    assert not ops & {"Pow", "Sqrt", "Reciprocal", "Neg", "Cos", "Sin"}
