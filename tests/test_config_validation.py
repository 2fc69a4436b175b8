"""The one validation step for `config.json` and `model.safetensors.index.json`.

Each case copies the tiny checkpoint, damages one value of its config or index the way the
issue-18 fuzzing did (wrong types, nulls and lists where objects belong, absurd or zero sizes,
sizes that disagree, unknown dtypes and temporal encoders, broken prompt templates, binary or
escaping index files) and loads it for real: every fault must be one `CheckpointError` line that
names the file and the dotted key. A few go through the CLI in a subprocess (rc 2, one `error:` line).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from blip3v.errors import CheckpointError
from blip3v.model.checkpoint import INDEX_NAME, build_meta_model, load_checkpoint
from blip3v.model.config import XGenMMConfig
from conftest import ROOT, assert_one_line_error, run_cli, run_clis

SAMPLE_CLIP = ROOT / "blip3v" / "assets" / "sample.mp4"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    result = edit(data)
    path.write_text(json.dumps(data if result is None else result))


def _set(path: str, value):
    """An edit that sets the dotted `path` (creating nothing: every parent must exist)."""
    def edit(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


def _delete(path: str):
    def edit(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        del node[last]
    return edit


def _load_error(ckpt: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt)
    message = str(info.value)
    assert "\n" not in message, message
    return message


TEMPLATE = "<|system|>\n{system}<|end|>\n<|user|>\n<image>\n{question}<|end|>\n<|assistant|>\n"

# (case id, edit of config.json, the dotted key the message must name, a fragment of what was expected)
CONFIG_CASES = [
    ("top-level-list", lambda c: [c], "(top level)", "a JSON object"),
    ("model-type", _set("model_type", "llava"), "model_type", "'xgenmm'"),
    ("model-type-missing", _delete("model_type"), "model_type", "missing"),
    ("tokenizer-config-list", _set("vision_tokenizer_config", [1, 2]), "vision_tokenizer_config", "an object"),
    ("video-config-null", _set("video_config", None), "video_config", "an object"),
    ("text-config-string", _set("text_config", "phi3"), "text_config", "an object"),
    ("temporal-list", _set("vision_tokenizer_config.temporal_encoder", ["gttm"]),
     "vision_tokenizer_config.temporal_encoder", "an object"),
    ("frames-string", _set("video_config.num_frames", "8"), "video_config.num_frames", "an integer"),
    ("frames-bool", _set("video_config.num_frames", True), "video_config.num_frames", "an integer"),
    ("frames-float", _set("video_config.num_frames", 8.5), "video_config.num_frames", "an integer"),
    ("frames-huge", _set("video_config.num_frames", 1_000_000_000), "video_config.num_frames", "1..256"),
    ("frames-zero", _set("video_config.num_frames", 0), "video_config.num_frames", "1..256"),
    ("frames-negative", _set("video_config.num_frames", -4), "video_config.num_frames", "1..256"),
    ("clip-pixels", lambda c: c["video_config"].update(num_frames=256) or c["vision_encoder_config"].update(
        image_size=1024), "video_config.num_frames", "pixels"),
    ("hidden-zero", _set("text_config.hidden_size", 0), "text_config.hidden_size", "an integer in 1.."),
    ("hidden-negative", _set("vision_encoder_config.hidden_size", -64), "vision_encoder_config.hidden_size", "1.."),
    ("vocab-missing", _delete("text_config.vocab_size"), "text_config.vocab_size", "missing"),
    ("patch-missing", _delete("vision_encoder_config.patch_size"), "vision_encoder_config.patch_size", "missing"),
    ("no-sizes-no-tower", _set("vision_encoder_config", {"anyres_patch_sampling": True}),
     "vision_encoder_config.hidden_size", "model_name"),
    ("unknown-tower", _set("text_config", {"model_name": "org/unknown-model"}), "text_config.model_name",
     "org/unknown-model"),
    ("vision-heads-divide", _set("vision_encoder_config.num_attention_heads", 5),
     "vision_encoder_config.num_attention_heads", "a divisor of hidden_size 64"),
    ("text-heads-divide", _set("text_config.num_attention_heads", 7), "text_config.num_attention_heads", "divisor"),
    ("kv-heads-divide", _set("text_config.num_key_value_heads", 3), "text_config.num_key_value_heads", "divisor"),
    ("patch-over-image", _set("vision_encoder_config.patch_size", 128), "vision_encoder_config.patch_size",
     "at most image_size 64"),
    ("image-size-string", _set("vision_encoder_config.image_size", "64"), "vision_encoder_config.image_size",
     "an integer"),
    ("channels", _set("vision_encoder_config.num_channels", 4), "vision_encoder_config.num_channels", "3..3"),
    ("eps-string", _set("vision_encoder_config.layer_norm_eps", "1e-6"), "vision_encoder_config.layer_norm_eps",
     "a number"),
    ("rope-negative", _set("text_config.rope_theta", -1.0), "text_config.rope_theta", "a number above 0"),
    ("activation", _set("text_config.hidden_act", "swishy"), "text_config.hidden_act",
     "activation name such as 'silu'"),
    ("pad-outside-vocab", _set("text_config.pad_token_id", 10_000), "text_config.pad_token_id", "0..79"),
    ("sliding-window-zero", _set("text_config.sliding_window", 0), "text_config.sliding_window", "or null"),
    ("feature-dim-mismatch", _set("vision_tokenizer_config.vis_feature_dim", 96),
     "vision_tokenizer_config.vis_feature_dim", "hidden_size 64"),
    ("lang-dim-mismatch", _set("vision_tokenizer_config.lang_embedding_dim", 64),
     "vision_tokenizer_config.lang_embedding_dim", "hidden_size 128"),
    ("latents-zero", _set("vision_tokenizer_config.num_vis_tokens", 0), "vision_tokenizer_config.num_vis_tokens",
     "1.."),
    ("video-tokens-over-context", _set("vision_tokenizer_config.num_vis_tokens", 600),
     "vision_tokenizer_config.num_vis_tokens", "context of 512"),
    ("temporal-type", _set("vision_tokenizer_config.temporal_encoder.type", "lstm"),
     "vision_tokenizer_config.temporal_encoder.type", "'gttm'"),
    ("temporal-type-null", _set("vision_tokenizer_config.temporal_encoder.type", None),
     "vision_tokenizer_config.temporal_encoder.type", "one of"),
    ("ttm-width", _set("vision_tokenizer_config.temporal_encoder.dim_head", 15),
     "vision_tokenizer_config.temporal_encoder.dim_head", "heads x dim_head"),
    ("memory-negative", _set("vision_tokenizer_config.temporal_encoder.memory_size", -1),
     "vision_tokenizer_config.temporal_encoder.memory_size", "1.."),
    ("dtype", _set("torch_dtype", "float8"), "torch_dtype", "'float32'"),
    ("text-dtype", _set("text_config.torch_dtype", "bogus"), "text_config.torch_dtype", "'bfloat16'"),
    ("mean-length", _set("video_config.image_mean", [0.5, 0.5]), "video_config.image_mean", "3 finite numbers"),
    ("std-zero", _set("video_config.image_std", [0.5, 0.0, 0.5]), "video_config.image_std", "above 0"),
    ("additional-start", _set("additional_vocab_start", 500), "additional_vocab_start", "1..80"),
    ("special-ids-list", _set("special_token_ids", [73]), "special_token_ids", "an object"),
    ("special-id-missing", _delete("special_token_ids.image"), "special_token_ids.image", "missing"),
    ("special-id-string", _set("special_token_ids.pad", "72"), "special_token_ids.pad", "an id in 0..75"),
    ("special-id-range", _set("special_token_ids.end", 32007), "special_token_ids.end", "an id in 0..75"),
    ("template-no-image", _set("prompt_template", TEMPLATE.replace("<image>\n", "")), "prompt_template",
     "exactly one <image> (found 0)"),
    ("template-two-images", _set("prompt_template", "<image>" + TEMPLATE), "prompt_template", "(found 2)"),
    ("template-unknown-field", _set("prompt_template", TEMPLATE.replace("{system}", "{user}")), "prompt_template",
     "{user}"),
    ("template-positional", _set("prompt_template", TEMPLATE + "{}"), "prompt_template", "only the format fields"),
    ("template-attribute", _set("prompt_template", TEMPLATE.replace("{question}", "{question.upper}")),
     "prompt_template", "{question.upper}"),
    ("template-spec", _set("prompt_template", TEMPLATE.replace("{question}", "{question:d}")), "prompt_template",
     "{question:d}"),
    ("template-unbalanced", _set("prompt_template", TEMPLATE.replace("{question}", "{question")),
     "prompt_template", "braces"),
    ("template-stray-brace", _set("prompt_template", TEMPLATE + "}"), "prompt_template", "braces"),
    ("template-no-question", _set("prompt_template", TEMPLATE.replace("{question}", "")), "prompt_template",
     "{question}"),
    ("template-number", _set("prompt_template", 42), "prompt_template", "a string"),
    ("system-with-image", _set("system_prompt", "look at <image>"), "system_prompt", "without <image>"),
]


@pytest.mark.parametrize("edit, key, expected", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_fault_is_one_line_naming_file_and_key(tiny_ckpt, tmp_path, edit, key, expected):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _edit_json(ckpt / "config.json", edit)
    message = _load_error(ckpt)
    assert message.startswith(f"{ckpt / 'config.json'}: {key}: expected"), message
    assert expected in message, message


def test_config_nan_literal_and_bad_bytes(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    config = ckpt / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN'))  # Python's json reads NaN
    assert "text_config.rms_norm_eps: expected a number above 0" in _load_error(ckpt)
    config.write_bytes(b"\xff\xfe\x00{" + bytes(range(256)))
    assert "not valid JSON (not UTF-8 text)" in _load_error(ckpt)
    config.write_text('{"model_type": ')
    assert "not valid JSON" in _load_error(ckpt)
    config.write_text("[" * 100_000)
    assert "not valid JSON (maximum recursion depth" in _load_error(ckpt)
    config.write_text('{"model_type": "xgenmm", "video_config": {"num_frames": ' + "1" * 5000 + "}}")
    assert "not valid JSON (Exceeds the limit" in _load_error(ckpt)


def test_defaults_that_do_not_fit_say_so(tiny_ckpt, tmp_path):
    """A tiny config without special_token_ids gets the released ids (32000+), which its 83 logits
    cannot hold: the message says the default does not fit rather than quoting a value never written."""
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _edit_json(ckpt / "config.json", _delete("special_token_ids"))
    message = _load_error(ckpt)
    assert "special_token_ids." in message and "missing, and the default" in message, message


def test_every_preset_and_the_saved_configs_validate(tiny_ckpt):
    from blip3v.assets import DEMO_MODEL
    from blip3v.model.config import PRESETS, preset

    for name in PRESETS:
        preset(name)  # runs the file checks on the preset
    for directory in (DEMO_MODEL, tiny_ckpt):
        cfg = XGenMMConfig.load(directory)
        assert XGenMMConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_released_base_config_loads_as_published():
    """config.json of Salesforce/xgen-mm-phi3-mini-base-r-v1.5 (mirrored in Beniko95J/eval_llm), as
    published: it names neither tower; the authors' config classes default the vision tower to SigLIP
    so400m and a `phi3` text_config to Phi3Config's defaults (Phi-3-mini-4k's sizes)."""
    raw = {
        "architectures": ["XGenMMModelForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_xgenmm.XGenMMConfig",
                     "AutoModelForVision2Seq": "modeling_xgenmm.XGenMMModelForConditionalGeneration"},
        "model_type": "xgenmm",
        "text_config": {"initial_tokenizer_len": 32012, "model_type": "phi3", "sliding_window": 2047,
                        "torch_dtype": "bfloat16"},
        "torch_dtype": "float32",
        "transformers_version": "4.41.1",
        "vision_encoder_config": {"anyres_patch_sampling": True, "image_aspect_ratio": "anyres",
                                  "model_type": "xgenmm_vision_encoder"},
        "vision_tokenizer_config": {"model_type": "xgenmm_vision_tokenizer"},
    }
    cfg = XGenMMConfig.from_dict(raw)
    assert cfg.vision_encoder_config["num_hidden_layers"] == 27 and cfg.tokens_per_frame_in == 729
    assert cfg.text_config["vocab_size"] == 32064 and cfg.text_config["sliding_window"] == 2047
    assert cfg.num_logits == 32015 and cfg.special_token_ids["image"] == 32012
    model = build_meta_model(cfg, "released config")  # text_config's bfloat16 tag changes no weight dtype
    assert {str(t.dtype) for t in model.state_dict().values()} == {"torch.float32"}


# -- the checkpoint index --------------------------------------------------------------------

def _first_key(ckpt: Path) -> str:
    return next(iter(json.loads((ckpt / INDEX_NAME).read_text())["weight_map"]))


INDEX_CASES = [
    ("top-level-list", lambda i: [i], "(top level): expected a JSON object"),
    ("weight-map-list", lambda i: i.update(weight_map=list(i["weight_map"])), "weight_map: expected an object"),
    ("weight-map-null", lambda i: i.update(weight_map=None), "weight_map: expected an object"),
    ("weight-map-missing", lambda i: i.pop("weight_map"), "weight_map: expected an object"),
    ("metadata-list", lambda i: i.update(metadata=[1]), "metadata: expected an object"),
    ("total-size-string", lambda i: i["metadata"].update(total_size="big"), "metadata.total_size"),
    ("value-number", lambda i: i["weight_map"].update({next(iter(i["weight_map"])): 3}),
     "expected a shard file name inside the checkpoint directory, got integer 3"),
    ("value-null", lambda i: i["weight_map"].update({next(iter(i["weight_map"])): None}), "got null"),
    ("value-parent", lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "../x.safetensors"}),
     "'../x.safetensors'"),
    ("value-absolute", lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "/etc/passwd"}),
     "'/etc/passwd'"),
    ("value-nested-parent", lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "a/../../x"}),
     "inside the checkpoint directory"),
    ("value-empty", lambda i: i["weight_map"].update({next(iter(i["weight_map"])): ""}), "got string ''"),
    ("value-backslash", lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "..\\x.safetensors"}),
     "inside the checkpoint directory"),
]


@pytest.mark.parametrize("edit, fragment", [c[1:] for c in INDEX_CASES], ids=[c[0] for c in INDEX_CASES])
def test_index_fault_is_one_line(tiny_ckpt, tmp_path, edit, fragment):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _edit_json(ckpt / INDEX_NAME, edit)
    message = _load_error(ckpt)
    assert message.startswith(str(ckpt / INDEX_NAME)), message
    assert fragment in message, message


def test_binary_or_non_json_index(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    index = ckpt / INDEX_NAME
    index.write_bytes(bytes(range(256)) * 4)
    assert "not a valid safetensors index (not UTF-8 text)" in _load_error(ckpt)
    index.write_text("weight_map = {}")
    assert "not a valid safetensors index (Expecting value)" in _load_error(ckpt)
    index.write_text('{"weight_map": {}, "metadata": {"total_size": ' + "9" * 5000 + "}}")
    assert "not a valid safetensors index (Exceeds the limit (4300 digits)" in _load_error(ckpt)


def test_index_naming_a_tensor_its_shard_lacks(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    index = json.loads((ckpt / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]  # a real shard, but not the one holding `key`
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    message = _load_error(ckpt)
    assert "not in their shard" in message and key in message, message


# -- through the CLI -------------------------------------------------------------------------

def test_cli_absurd_frame_count_fails_fast(tiny_ckpt, tmp_path):
    """num_frames 1e9 used to decode for minutes and end in MemoryError; now the config check stops it
    before the model or the clip reader exist (a hang would trip run_cli's timeout)."""
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _edit_json(ckpt / "config.json", _set("video_config.num_frames", 1_000_000_000))
    ask, inspect = run_clis(("ask", SAMPLE_CLIP, "what happens?", "--model", ckpt), ("inspect", ckpt), timeout=120)
    assert_one_line_error(ask, "config.json", "video_config.num_frames", "1..256")
    assert_one_line_error(inspect, "video_config.num_frames")


def test_cli_binary_index_and_bad_template(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    (ckpt / INDEX_NAME).write_bytes(b"\x89PNG\r\n\x1a\n\xff\xff")
    ckpt2 = _copy(tiny_ckpt, tmp_path / "c2")
    _edit_json(ckpt2 / "config.json", _set("prompt_template", "{question} {user}"))
    inspect, ask = run_clis(("inspect", ckpt, "--json"), ("ask", SAMPLE_CLIP, "what happens?", "--model", ckpt2))
    assert_one_line_error(inspect, INDEX_NAME, "not UTF-8")
    assert_one_line_error(ask, "prompt_template", "{user}")


def test_cli_empty_model_is_an_error_not_the_demo_model(tmp_path):
    assert_one_line_error(run_cli("ask", SAMPLE_CLIP, "what happens?", "--model", ""), "--model is empty")
    assert_one_line_error(run_cli("export", "--model", "", "--out", tmp_path / "e"), "--model is empty")
    assert not (tmp_path / "e").exists()
    assert_one_line_error(run_cli("inspect", ""), "empty")
