"""Checkpoint I/O in the released layout: round trip, key names, errors, tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


def _rewrite_shard(ckpt: Path, edit) -> None:
    """Applies `edit(dict)` to the tensors of the shard holding `latents`, keeping the index in sync."""
    index_path = ckpt / INDEX_NAME
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["vlm.vision_tokenizer.latents"]
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
    pixels = torch.randn(1, cfg.num_frames, 3, cfg.image_size, cfg.image_size).numpy()
    out = backend.answer_batch(pixels, ["what colour does the square turn?"], SamplingConfig(max_new_tokens=3))
    assert len(out) == 1 and len(out[0]) <= 3


def test_tokenizer_config_disagreement_is_an_error(tiny_ckpt, tmp_path):
    from blip3v.model.tokenizer import check_tokenizer

    cfg = XGenMMConfig.load(tiny_ckpt)
    cfg.special_token_ids["end"] += 1
    with pytest.raises(CheckpointError, match="disagree"):
        check_tokenizer(cfg, load_tokenizer(tiny_ckpt))
