"""Checkpoint I/O in the released layout: round trip, key names, errors, tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blip3v.errors import CheckpointError
from blip3v.model.checkpoint import INDEX_NAME, load_checkpoint, load_tokenizer
from blip3v.model.config import XGenMMConfig
from conftest import make_tiny_checkpoint


def _all_keys(directory: Path) -> dict[str, str]:
    return json.loads((directory / INDEX_NAME).read_text())["weight_map"]


def test_round_trip_in_released_layout(tiny_ckpt):
    files = sorted(p.name for p in tiny_ckpt.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1  # sharded: the fixture caps shards at 1 MB
    assert all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    assert {"config.json", INDEX_NAME, "tokenizer.json"} <= set(files)
    index = json.loads((tiny_ckpt / INDEX_NAME).read_text())
    keys = index["weight_map"]
    assert {k.split(".")[1] for k in keys} == {"vision_encoder", "vision_tokenizer", "lang_model"}
    assert all(k.startswith("vlm.") for k in keys)
    for expected in ("vlm.vision_encoder.embeddings.patch_embedding.weight",
                     "vlm.vision_encoder.encoder.layers.0.self_attn.q_proj.weight",
                     "vlm.vision_encoder.head.probe",
                     "vlm.vision_tokenizer.latents",
                     "vlm.vision_tokenizer.layers.0.0.to_kv.weight",
                     "vlm.vision_tokenizer.layers.0.1.3.weight",
                     "vlm.vision_tokenizer.temporal_encoder.initial_memory",
                     "vlm.vision_tokenizer.temporal_encoder.pos_emb.inv_freq",
                     "vlm.vision_tokenizer.temporal_encoder.ttm_unit.process_layers.0.0.to_q.weight",
                     "vlm.vision_tokenizer.temporal_encoder.ttm_unit.read_layer.mlp.1.weight",
                     "vlm.vision_tokenizer.temporal_encoder.ttm_unit.write_layer.mlp.3.weight",
                     "vlm.vision_tokenizer.projection.bias",
                     "vlm.lang_model.model.embed_tokens.additional_embedding.weight",
                     "vlm.lang_model.model.layers.0.self_attn.qkv_proj.weight",
                     "vlm.lang_model.model.layers.0.mlp.gate_up_proj.weight",
                     "vlm.lang_model.lm_head.bias",
                     "vlm.lang_model.lm_head.additional_fc.weight"):
        assert expected in keys, expected
    # float32 storage and total_size = bytes of all tensors
    total = 0
    for shard in shards:
        with safe_open(str(tiny_ckpt / shard), framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                assert t.dtype == torch.float32
                total += t.numel() * 4
    assert index["metadata"]["total_size"] == total

    model = load_checkpoint(tiny_ckpt)
    reloaded = {}
    for shard in shards:
        with safe_open(str(tiny_ckpt / shard), framework="pt") as f:
            reloaded.update({k: f.get_tensor(k) for k in f.keys()})
    state = model.state_dict()
    assert set(state) == set(reloaded)
    assert all(torch.equal(state[k], reloaded[k]) for k in state)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def test_tl_variant_keys(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tl", temporal="tl")
    keys = _all_keys(ckpt)
    te = [k for k in keys if ".temporal_encoder." in k]
    assert te and all(".temporal_encoder.final_output." in k for k in te)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_shard(ckpt: Path, edit, key: str = "vlm.vision_tokenizer.latents") -> None:
    """Applies `edit(dict)` to the tensors of the shard holding `key`, keeping the index in sync."""
    index_path = ckpt / INDEX_NAME
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][key]
    with safe_open(str(ckpt / shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(ckpt / shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update({k: shard for k in tensors})
    index_path.write_text(json.dumps(index))


def test_missing_key_is_named(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _rewrite_shard(ckpt, lambda t: t.pop("vlm.vision_tokenizer.latents"))
    with pytest.raises(CheckpointError, match=r"missing keys: vlm\.vision_tokenizer\.latents"):
        load_checkpoint(ckpt)


def test_unexpected_key_is_named(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _rewrite_shard(ckpt, lambda t: t.update({"vlm.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: vlm\.extra\.weight"):
        load_checkpoint(ckpt)


def test_misshaped_key_is_named(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _rewrite_shard(ckpt, lambda t: t.update({"vlm.vision_tokenizer.latents": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: vlm\.vision_tokenizer\.latents \(3, 3\)"):
        load_checkpoint(ckpt)


def test_corrupt_and_missing_files(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "corrupt")
    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_checkpoint(ckpt)
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")


def _rename_all(ckpt: Path, rename) -> int:
    """Renames tensors in every shard and in the index with `rename(key)`; returns how many changed."""
    index_path = ckpt / INDEX_NAME
    index = json.loads(index_path.read_text())
    changed = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(ckpt / shard), framework="pt") as f:
            tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
            changed += sum(rename(k) != k for k in f.keys())
        save_file(tensors, str(ckpt / shard))
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return changed


def _latents(ckpt: Path) -> torch.Tensor:
    index = json.loads((ckpt / INDEX_NAME).read_text())
    with safe_open(str(ckpt / index["weight_map"]["vlm.vision_tokenizer.latents"]), framework="pt") as f:
        return f.get_tensor("vlm.vision_tokenizer.latents")


# -- dtypes of stored tensors --------------------------------------------------------------

def test_half_precision_tensors_widen_exactly(tiny_ckpt, tmp_path):
    """The model is float32; F16 / BF16 shards load by exact widening (every half value is a float32)."""
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    original = _latents(ckpt)
    norm = "vlm.vision_tokenizer.norm.weight"
    _rewrite_shard(ckpt, lambda t: t.update({"vlm.vision_tokenizer.latents": t["vlm.vision_tokenizer.latents"].half()}))
    _rewrite_shard(ckpt, lambda t: t.update({norm: t[norm].bfloat16()}), key=norm)
    model = load_checkpoint(ckpt)
    latents = model.vlm.vision_tokenizer.latents
    assert latents.dtype == torch.float32 and model.vlm.vision_tokenizer.norm.weight.dtype == torch.float32
    assert torch.equal(latents, original.half().float())
    assert not torch.equal(latents, original)  # the shard really held half precision


@pytest.mark.parametrize("dtype, name", [(torch.int8, "I8"), (torch.int32, "I32"), (torch.float64, "F64"),
                                         (torch.bool, "BOOL"), (torch.uint8, "U8")])
def test_wrong_dtype_is_named_before_data_is_read(tiny_ckpt, tmp_path, dtype, name):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _rewrite_shard(ckpt, lambda t: t.update({"vlm.vision_tokenizer.latents": t["vlm.vision_tokenizer.latents"]
                                             .to(dtype)}))
    with pytest.raises(CheckpointError, match=rf"wrong dtype .*: vlm\.vision_tokenizer\.latents {name}$") as info:
        load_checkpoint(ckpt)
    assert "\n" not in str(info.value)


# -- non-finite and all-zero weights ---------------------------------------------------------

@pytest.mark.parametrize("fill, fault", [(float("nan"), "entirely NaN/Inf"), (float("inf"), "entirely NaN/Inf"),
                                         (-float("inf"), "entirely NaN/Inf"), (0.0, "all zeros")])
def test_degenerate_weight_matrix_is_named(tiny_ckpt, tmp_path, fill, fault):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _rewrite_shard(ckpt, lambda t: t.update({"vlm.vision_tokenizer.latents":
                                             torch.full_like(t["vlm.vision_tokenizer.latents"], fill)}))
    with pytest.raises(CheckpointError, match=rf"damaged weights: vlm\.vision_tokenizer\.latents \({fault}\)"):
        load_checkpoint(ckpt)


def test_mixed_nan_inf_vector_is_caught_and_a_zero_bias_is_not(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    norm = "vlm.vision_tokenizer.norm.weight"
    bias = "vlm.vision_tokenizer.norm.bias"

    def damage(t):
        w = torch.full_like(t[norm], float("nan"))
        w[::3] = float("inf")
        t[norm] = w
        t[bias] = torch.zeros_like(t[bias])  # biases are legitimately zero: no error for 1-D tensors
    _rewrite_shard(ckpt, damage, key=norm)
    with pytest.raises(CheckpointError,
                       match=r"damaged weights: vlm\.vision_tokenizer\.norm\.weight \(entirely NaN/Inf\)$"):
        load_checkpoint(ckpt)


def test_a_single_finite_value_is_found_by_the_full_pass(tiny_ckpt, tmp_path):
    """The strided sample misses this one finite element; the full pass that follows finds it, so a
    tensor is only called entirely NaN when it is (and a partly-NaN tensor loads: the check is cheap,
    not a full audit; non-finite logits are caught at generation)."""
    from blip3v.model.checkpoint import SAMPLE, degenerate

    t = torch.full((SAMPLE * 10 + 3,), float("nan"))
    t[7] = 1.0  # off the sample's stride
    assert degenerate(t) is None
    m = torch.zeros(40, 50)
    m[3, 11] = 1e-30
    assert degenerate(m) is None
    assert degenerate(torch.zeros(40, 50)) == "all zeros" and degenerate(torch.zeros(50)) is None


def test_all_zero_checkpoint_fails_to_load(tiny_ckpt, tmp_path):
    """The issue's "weights all zero give an empty answer with exit 0": every matrix zero is named."""
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    index = json.loads((ckpt / INDEX_NAME).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(ckpt / shard), framework="pt") as f:
            tensors = {k: torch.zeros_like(f.get_tensor(k)) for k in f.keys()}
        save_file(tensors, str(ckpt / shard))
    with pytest.raises(CheckpointError, match=r"damaged weights: .*\(all zeros\) .*\.\.\. and \d+ more$"):
        load_checkpoint(ckpt)


def test_cli_nan_and_int8_weights_are_one_line_errors(tiny_ckpt, tmp_path):
    from conftest import ROOT, assert_one_line_error, run_clis

    clip = ROOT / "blip3v" / "assets" / "sample.mp4"
    nan = _copy(tiny_ckpt, tmp_path / "nan")
    _rewrite_shard(nan, lambda t: t.update({"vlm.vision_tokenizer.latents":
                                            torch.full_like(t["vlm.vision_tokenizer.latents"], float("nan"))}))
    int8 = _copy(tiny_ckpt, tmp_path / "int8")
    _rewrite_shard(int8, lambda t: t.update({"vlm.vision_tokenizer.latents":
                                             t["vlm.vision_tokenizer.latents"].to(torch.int8)}))
    nan_run, int8_run = run_clis(("ask", clip, "what happens?", "--model", nan),
                                 ("ask", clip, "what happens?", "--model", int8))
    assert_one_line_error(nan_run, "vlm.vision_tokenizer.latents", "entirely NaN/Inf")
    assert_one_line_error(int8_run, "vlm.vision_tokenizer.latents I8")


# -- the authors' temporal-module names ------------------------------------------------------

@pytest.mark.parametrize("alias", ["gttm", "ttm", "tts"])
def test_authors_temporal_names_load_and_inspect_reports_them(tiny_ckpt, tmp_path, alias):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    renamed = _rename_all(ckpt, lambda k: k.replace(".temporal_encoder.", f".{alias}."))
    assert renamed > 10
    keys = _all_keys(ckpt)
    assert not any(".temporal_encoder." in k for k in keys) and f"vlm.vision_tokenizer.{alias}.initial_memory" in keys
    model = load_checkpoint(ckpt)
    reference = load_checkpoint(tiny_ckpt).state_dict()
    state = model.state_dict()
    assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in state)

    from blip3v.model.checkpoint import canonical_names, read_weight_map

    assert canonical_names(read_weight_map(ckpt), ckpt)[1] == {alias: renamed}
    assert canonical_names(read_weight_map(tiny_ckpt), tiny_ckpt)[1] == {}


def test_inspect_reports_renamed_keys(tiny_ckpt, tmp_path):
    from conftest import run_clis

    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    gttm = _rename_all(ckpt, lambda k: k.replace(".temporal_encoder.ttm_unit.", ".gttm.ttm_unit."))
    tts = _rename_all(ckpt, lambda k: k.replace(".temporal_encoder.", ".tts."))
    as_json, proc = run_clis(("inspect", ckpt, "--json"), ("inspect", ckpt))
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["renamed_keys"] == {"gttm": gttm, "tts": tts}
    assert proc.returncode == 0, proc.stderr
    assert f"keys loaded as .temporal_encoder.: {gttm:,} named .gttm., {tts:,} named .tts." in proc.stdout


def test_unknown_and_colliding_names_are_still_rejected(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "unknown")
    _rename_all(ckpt, lambda k: k.replace(".temporal_encoder.", ".ttm_encoder."))  # not an authors' name
    with pytest.raises(CheckpointError, match=r"missing keys: .*temporal_encoder.*unexpected keys: .*ttm_encoder"):
        load_checkpoint(ckpt)
    ckpt = _copy(tiny_ckpt, tmp_path / "collide")
    _rewrite_shard(ckpt, lambda t: t.update({"vlm.vision_tokenizer.gttm.latents_extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: vlm\.vision_tokenizer\.gttm\.latents_extra"):
        load_checkpoint(ckpt)
    key = "vlm.vision_tokenizer.temporal_encoder.initial_memory"
    _rewrite_shard(ckpt, lambda t: t.update({"vlm.vision_tokenizer.gttm.initial_memory": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=rf"vlm\.vision_tokenizer\.gttm\.initial_memory .*both load as {key}"):
        load_checkpoint(ckpt)


# -- saving ----------------------------------------------------------------------------------

def test_save_replaces_an_existing_checkpoint_atomically(tmp_path):
    from blip3v.model.checkpoint import save_checkpoint
    from blip3v.model.xgenmm import XGenMMVideoModel

    cfg = XGenMMConfig.load(make_tiny_checkpoint(tmp_path / "ck", temporal="tl"))
    torch.manual_seed(1)
    other = XGenMMVideoModel(cfg)
    (tmp_path / "ck" / "stale-file").write_text("from the first save")
    save_checkpoint(other, tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary or aside folder left
    assert not (tmp_path / "ck" / "stale-file").exists()
    reloaded = load_checkpoint(tmp_path / "ck")
    assert torch.equal(reloaded.vlm.vision_tokenizer.latents, other.vlm.vision_tokenizer.latents)


def test_released_config_naming_only_hub_ids_loads():
    raw = {
        "model_type": "xgenmm",
        "vision_encoder_config": {"model_name": "google/siglip-so400m-patch14-384", "anyres_patch_sampling": True},
        "vision_tokenizer_config": {"vis_feature_dim": 1152, "lang_embedding_dim": 3072, "num_vis_tokens": 128},
        "text_config": {"model_name": "microsoft/Phi-3-mini-4k-instruct"},
    }
    cfg = XGenMMConfig.from_dict(raw)
    assert cfg.vision_encoder_config["num_hidden_layers"] == 27
    assert cfg.text_config["vocab_size"] == 32064
    assert cfg.tokens_per_frame_in == 729
    round_trip = XGenMMConfig.from_dict(cfg.to_dict())
    assert round_trip.to_dict() == cfg.to_dict()


def test_sentencepiece_llama_tokenizer_path(tmp_path):
    """The released tokenizer is a SentencePiece Llama one: train a tiny one, add the Phi-3 and
    xGen-MM specials in the released order, and run the model with it through AutoTokenizer."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from blip3v.model.config import PHI3_SPECIAL_TOKENS, XGENMM_EXTRA_TOKENS, TemporalConfig, _small
    from blip3v.model.checkpoint import save_checkpoint
    from blip3v.model.generate import TorchBackend
    from blip3v.model.tokenizer import base_vocab_size, check_tokenizer, special_token_ids
    from blip3v.model.xgenmm import XGenMMVideoModel
    from blip3v.runtime.generation import SamplingConfig
    from blip3v.runtime.session import Engine

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([
        "A chat between a curious user and an artificial intelligence assistant.",
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        "what colour does the square turn?", "which way does the circle move?",
        "which shape appears first?", "how many shapes are there?",
    ] * 4))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=96, model_type="bpe",
        character_coverage=1.0, byte_fallback=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
    )
    # The released tokenizer files: tokenizer.model + tokenizer_config.json listing the added specials.
    save_dir = tmp_path / "tok"
    save_dir.mkdir()
    shutil.copy(tmp_path / "sp.model", save_dir / "tokenizer.model")
    added = {str(96 + i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                           "normalized": False, "single_word": False}
             for i, t in enumerate(PHI3_SPECIAL_TOKENS + XGENMM_EXTRA_TOKENS)}
    (save_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
        "legacy": False, "padding_side": "left", "bos_token": "<s>", "eos_token": "<|endoftext|>",
        "unk_token": "<unk>", "pad_token": "<pad>", "added_tokens_decoder": added,
    }))
    tok = load_tokenizer(save_dir)
    assert type(tok).__name__ == "LlamaTokenizer"
    assert base_vocab_size(tok) == 96
    ids = special_token_ids(tok)
    assert ids["image"] == 96 + 12 and ids["end"] == 96 + 7 and ids["eos"] == 96

    cfg = _small(TemporalConfig(type="tl", num_tokens=4), vocab_base=96)
    check_tokenizer(cfg, tok)
    torch.manual_seed(0)
    model = XGenMMVideoModel(cfg)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tok)
    backend = TorchBackend.load(ckpt)
    prompt_ids = tok("<|user|>\n<image>\nwhat colour?<|end|>", add_special_tokens=False)["input_ids"]
    assert ids["image"] in prompt_ids and ids["user"] == prompt_ids[0]
    frames = np.random.default_rng(0).integers(0, 256, (cfg.num_frames, 48, 48, 3), dtype=np.uint8)  # (T, H, W, 3)
    answer = Engine(backend).clip(frames).ask("what colour does the square turn?", SamplingConfig(max_new_tokens=3))
    assert len(answer.token_ids) <= 3


def test_tokenizer_config_disagreement_is_an_error(tiny_ckpt, tmp_path):
    from blip3v.model.tokenizer import check_tokenizer

    cfg = XGenMMConfig.load(tiny_ckpt)
    cfg.special_token_ids["end"] += 1
    with pytest.raises(CheckpointError, match="disagree"):
        check_tokenizer(cfg, load_tokenizer(tiny_ckpt))


def _as_released(ckpt: Path) -> dict:
    """config.json stripped of what the released files leave out: the temporal encoder and frames
    (the attention sizes stay: at the tiny model's width the released defaults would not fit)."""
    raw = json.loads((ckpt / "config.json").read_text())
    section = raw["vision_tokenizer_config"]["temporal_encoder"]
    given = dict(section)
    for key in ("type", "num_tokens", "memory_size", "process_layers"):  # the rest: the released defaults' role
        section.pop(key)
    raw["video_config"].pop("num_frames")
    (ckpt / "config.json").write_text(json.dumps(raw))
    return given


@pytest.mark.parametrize("temporal,tokens", [("tl", 6), ("gttm_tl", 5), ("gttm", 4)])
def test_released_config_silent_on_the_temporal_encoder_is_read_off_the_tensors(tmp_path, temporal, tokens):
    from blip3v.model.checkpoint import load_config

    original = make_tiny_checkpoint(tmp_path / "src", temporal=temporal, num_tokens=tokens)
    want = load_checkpoint(original)
    ckpt = _copy(original, tmp_path / f"xgen-mm-vid-r-v1.5-{want.config.num_video_tokens}tokens-16frames")
    given = _as_released(ckpt)
    cfg, notes = load_config(ckpt)
    te = cfg.temporal_encoder_config
    assert te.type == given["type"]
    if temporal != "tl":  # the TTM's sizes; `tl` has none
        assert (te.memory_size, te.process_layers) == (given["memory_size"], given["process_layers"])
    assert cfg.num_video_tokens == want.config.num_video_tokens
    assert cfg.num_frames == 16 and any("16 frames" in n for n in notes)
    got = load_checkpoint(ckpt)  # the same weights load into the inferred model
    for (name, a), (_, b) in zip(want.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), name
    # What a config states wins: a wrong type stays wrong and the loader names the keys.
    raw = json.loads((ckpt / "config.json").read_text())
    raw["vision_tokenizer_config"]["temporal_encoder"] = {**given, "type": "gttm" if temporal == "tl" else "tl"}
    raw["video_config"]["num_frames"] = 8
    (ckpt / "config.json").write_text(json.dumps(raw))
    assert load_config(ckpt)[1] == []
    with pytest.raises(CheckpointError, match="does not fit its config"):
        load_checkpoint(ckpt)


def test_inspect_says_what_it_inferred(tmp_path):
    from conftest import run_cli

    ckpt = make_tiny_checkpoint(tmp_path / "xgen-mm-vid-r-v1.5-6tokens-8frames", temporal="tl", num_tokens=6)
    _as_released(ckpt)
    proc = run_cli("inspect", ckpt, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["temporal_encoder"], report["video_tokens"], report["num_frames"]) == ("tl", 6, 8)
    assert report["inferred"] == ["temporal encoder tl (from the checkpoint's tensors; config.json names none)"]


def test_frames_come_from_the_hub_cache_folder_name(tiny_ckpt, tmp_path):
    """A Hub id resolves to models--ORG--NAME/snapshots/REV: the frame count is read off NAME."""
    from blip3v.model.checkpoint import load_config

    snapshot = tmp_path / "models--Salesforce--xgen-mm-vid-phi3-mini-r-v1.5-128tokens-16frames" / "snapshots" / "0123abc"
    ckpt = _copy(tiny_ckpt, snapshot)
    assert load_config(ckpt)[0].num_frames == 8  # config.json says 8: it wins
    raw = json.loads((ckpt / "config.json").read_text())
    raw["video_config"].pop("num_frames")
    (ckpt / "config.json").write_text(json.dumps(raw))
    cfg, notes = load_config(ckpt)
    assert cfg.num_frames == 16
    assert notes == ["16 frames (from the name xgen-mm-vid-phi3-mini-r-v1.5-128tokens-16frames; config.json gives none)"]
