"""The typed engine manifest (blip3v.runtime.manifest): checks, migration, self-hash, binding shapes.

Engines here are synthetic: small stand-in files with a manifest shaped exactly like the
exporter's (tests/test_export.py checks a real export against the same reader), so every case
runs in milliseconds. One case goes through `blip3v ask` in a subprocess.

    python -m pytest tests/test_manifest.py -q
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from blip3v.errors import EngineError
from blip3v.runtime import manifest as mf
from blip3v.runtime.manifest import (MANIFEST_NAME, SCHEMA_VERSION, Manifest, decoder_shape_ranges,
                                     file_entries, load_manifest, manifest_digest, seal, visual_shape_ranges,
                                     write_manifest)
from conftest import ROOT, assert_one_line_error, run_cli

FILES = {"visual.onnx": b"visual graph", "decoder.onnx": b"decoder graph", "embed_tokens.npy": b"table",
         "tokenizer.json": b"{}"}


def base_raw(layers: int = 2) -> dict:
    """A manifest as export_engine writes it (tiny preset sizes), without files and seal."""
    return {
        "format": "blip3v-engine", "schema_version": 2, "precision": "fp32", "dtype": "float32",
        "model": {"temporal_encoder": "gttm", "num_frames": 4, "image_size": 32, "image_mean": [0.5, 0.5, 0.5],
                  "image_std": [0.5, 0.5, 0.5], "num_video_tokens": 8, "hidden_size": 96, "num_logits": 111,
                  "num_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
                  "max_context": 512, "sliding_window": None},
        "visual": {"file": "visual.onnx", "inputs": {"pixel_values": "pixel_values"},
                   "outputs": {"video_tokens": "video_tokens"}},
        "decoder": {"file": "decoder.onnx", "inputs": {"inputs_embeds": "inputs_embeds",
                                                       "attention_mask": "attention_mask",
                                                       "position_ids": "position_ids"},
                    "outputs": {"logits": "logits"}, "logits": "last", "attention": "gqa",
                    "calls": "prefill_then_single_tokens",
                    "kv_cache": {"layout": ["batch", "kv_heads", "capacity", "head_dim"], "capacity_axis": 2,
                                 "past_key": "past_key.{layer}", "past_value": "past_value.{layer}",
                                 "present_key": "present_key.{layer}", "present_value": "present_value.{layer}",
                                 "write_slots": "last S of attention_mask's L", "update": "group_query_attention",
                                 "past_present_share_buffer": True}},
        "embeddings": {"file": "embed_tokens.npy", "rows": 111, "dim": 96, "dtype": "float32"},
        "tokenizer": {"file": "tokenizer.json", "add_special_tokens": False, "padding_side": "left"},
        "prompt": {"template": "<|system|>\n{system}<|end|>\n<|user|>\n<image>\n{question}<|end|>\n<|assistant|>\n",
                   "system": "A chat.", "image_token": "<image>"},
        "special_token_ids": {"eos": 96, "end": 103, "pad": 107, "image": 108, "bos": 1},
        "stop_token_ids": [103, 96],
        "export": {"exporter": "test", "validation": {"visual_max_abs_diff": 1e-6}},
    }


def make_engine(directory: Path, raw: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in FILES.items():
        (directory / name).write_bytes(data)
    raw = copy.deepcopy(raw or base_raw())
    raw["files"] = file_entries(directory, list(FILES))
    write_manifest(directory, raw)
    return directory


@pytest.fixture()
def engine(tmp_path) -> Path:
    return make_engine(tmp_path / "engine")


def rewrite(directory: Path, change) -> None:
    """Edits manifest.json in place as a user or a corrupting tool would (no re-seal)."""
    raw = json.loads((directory / MANIFEST_NAME).read_text())
    change(raw)
    (directory / MANIFEST_NAME).write_text(json.dumps(raw))


def assert_engine_error(directory: Path, *fragments: str, verify: bool = True) -> str:
    with pytest.raises(EngineError) as err:
        load_manifest(directory, verify_hashes=verify)
    text = str(err.value)
    assert len(text.splitlines()) == 1, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


def test_load_gives_typed_and_raw_access(engine):
    m = load_manifest(engine)
    assert m.sealed and m.raw["schema_version"] == SCHEMA_VERSION == 2
    spec = m.spec
    assert spec.model.num_frames == 4 and spec.model.image_mean == (0.5, 0.5, 0.5)
    assert spec.decoder.kv_cache.update == "group_query_attention" and spec.decoder.calls in mf.DECODER_CALLS
    assert spec.embeddings.rows == 111 and spec.special_token_ids["image"] == 108 and spec.stop_token_ids == (103, 96)
    # the read API the backends use keeps working
    assert m["decoder"]["inputs"]["attention_mask"] == "attention_mask" and m.model["num_layers"] == 2
    assert m.path("decoder") == engine / "decoder.onnx" and m.directory == engine
    assert m.kv_names("present_value") == ["present_value.0", "present_value.1"] == spec.kv_names("present_value")
    assert m.kv_names("past_key", 3)[-1] == "past_key.2"
    # written = what the typed model gives back, sealed
    on_disk = json.loads((engine / MANIFEST_NAME).read_text())
    assert on_disk == seal(spec) and on_disk["manifest_sha256"] == manifest_digest(on_disk)


def test_a_hand_built_manifest_is_checked_only_when_its_spec_is_used(tmp_path):
    partial = Manifest(tmp_path, {"model": {"num_logits": 5}})  # what benchmarks/bench_decode.py builds
    assert partial.model["num_logits"] == 5
    with pytest.raises(EngineError, match="format"):
        partial.spec  # noqa: B018


# Each case: a change to a valid manifest -> fragments of the one-line error (the dotted key and
# what was expected). Covers the issue-18 classes: wrong types (lists, nulls, strings for numbers),
# absurd or non-positive sizes, inconsistent sizes, unknown dtypes, bad templates, ids outside the
# table, missing keys.
def _set(path: str, value):
    def change(raw):
        *parents, last = path.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[last] = value
    return change


def _del(path: str):
    def change(raw):
        *parents, last = path.split(".")
        node = raw
        for p in parents:
            node = node[p]
        del node[last]
    return change


BAD = {
    "model_is_a_list": (_set("model", [1, 2]), "model: expected an object, got a list"),
    "decoder_is_null": (_set("decoder", None), "decoder: expected an object, got null"),
    "frames_as_string": (_set("model.num_frames", "8"), "model.num_frames: expected an integer in 1..512, got '8'"),
    "frames_absurd": (_set("model.num_frames", 1_000_000_000), "model.num_frames: expected an integer in 1..512"),
    "frames_zero": (_set("model.num_frames", 0), "model.num_frames: expected an integer"),
    "frames_bool": (_set("model.num_frames", True), "model.num_frames"),
    "frames_float": (_set("model.num_frames", 4.0), "model.num_frames"),
    "image_negative": (_set("model.image_size", -32), "model.image_size"),
    "clip_too_big": (lambda raw: raw["model"].update(num_frames=16, image_size=4096),
                     "model.image_size: expected num_frames * 3 * image_size^2"),
    "hidden_zero": (_set("model.hidden_size", 0), "model.hidden_size"),
    "layers_missing": (_del("model.num_layers"), "model.num_layers: expected a value (required key)"),
    "heads_times_dim": (_set("model.head_dim", 25), "model.head_dim: expected hidden_size / num_attention_heads"),
    "kv_heads_not_divisor": (_set("model.num_key_value_heads", 3), "model.num_key_value_heads"),
    "kv_heads_over_heads": (_set("model.num_key_value_heads", 8), "model.num_key_value_heads"),
    "video_tokens_fill_context": (_set("model.num_video_tokens", 512), "model.num_video_tokens: expected an integer in 1..511"),
    "context_huge": (_set("model.max_context", 10**9), "model.max_context"),
    "std_zero": (_set("model.image_std", [0.5, 0, 0.5]), "model.image_std: expected a list of 3 positive"),
    "mean_nan": (_set("model.image_mean", [0.5, float("nan"), 0.5]), "model.image_mean"),
    "mean_two": (_set("model.image_mean", [0.5, 0.5]), "model.image_mean: expected a list of 3"),
    "window_string": (_set("model.sliding_window", "4"), "model.sliding_window"),
    "unknown_dtype": (_set("dtype", "float8"), "dtype: expected one of 'float32', 'float16'"),
    "unknown_precision": (_set("precision", "int3"), "precision: expected one of 'fp32', 'fp16'"),
    "dtype_vs_precision": (_set("dtype", "float16"), "dtype: expected 'float32' for precision 'fp32'"),
    "embedding_dtype": (_set("embeddings.dtype", "object"), "embeddings.dtype"),
    "embedding_dim": (_set("embeddings.dim", 64), "embeddings.dim: expected model.hidden_size (96)"),
    "embedding_rows_short": (_set("embeddings.rows", 100), "embeddings.rows: expected at least model.num_logits"),
    "template_no_layer": (_set("decoder.kv_cache.past_key", "past_key"), "decoder.kv_cache.past_key: expected a tensor-name template"),
    "template_other_field": (_set("decoder.kv_cache.past_value", "v.{layer}.{head}"), "decoder.kv_cache.past_value"),
    "template_unbalanced": (_set("decoder.kv_cache.present_key", "k.{layer"), "decoder.kv_cache.present_key"),
    "templates_collide": (_set("decoder.kv_cache.present_key", "past_key.{layer}"), "four different templates"),
    "template_list": (_set("decoder.kv_cache.present_value", ["x.{layer}"]), "decoder.kv_cache.present_value"),
    "kv_layout": (_set("decoder.kv_cache.layout", ["batch", "capacity", "kv_heads", "head_dim"]), "decoder.kv_cache.layout"),
    "kv_update": (_set("decoder.kv_cache.update", "magic"), "decoder.kv_cache.update: expected one of"),
    "calls_unknown": (_set("decoder.calls", "whatever"), "decoder.calls: expected one of"),
    "inputs_list": (_set("decoder.inputs", ["inputs_embeds"]), "decoder.inputs: expected an object"),
    "input_name_number": (_set("decoder.inputs.position_ids", 3), "decoder.inputs.position_ids: expected a non-empty string"),
    "tensor_names_clash": (_set("decoder.inputs.position_ids", "past_key.0"), "tensor names distinct"),
    "prompt_unknown_field": (_set("prompt.template", "{system} <image> {question} {answer}"), "prompt.template: expected a prompt template"),
    "prompt_unbalanced": (_set("prompt.template", "{system <image> {question}"), "prompt.template"),
    "prompt_lone_close": (_set("prompt.template", "{system} <image> {question} }"), "prompt.template"),
    "prompt_no_image": (_set("prompt.template", "{system} {question}"), "found 0 <image>"),
    "prompt_two_images": (_set("prompt.template", "<image>{system}<image>{question}"), "found 2 <image>"),
    "prompt_no_question": (_set("prompt.template", "{system}<image>"), "prompt.template"),
    "prompt_format_spec": (_set("prompt.template", "{system:>10}<image>{question}"), "prompt.template"),
    "prompt_attribute": (_set("prompt.template", "{system.__class__}<image>{question}"), "prompt.template"),
    "system_with_image": (_set("prompt.system", "look: <image>"), "prompt.system: expected a system prompt without <image>"),
    "system_number": (_set("prompt.system", 7), "prompt.system: expected a string"),
    "image_id_out_of_table": (_set("special_token_ids.image", 111), "special_token_ids.image: expected an integer in 0..110"),
    "pad_id_negative": (_set("special_token_ids.pad", -1), "special_token_ids.pad"),
    "image_id_missing": (_del("special_token_ids.image"), "special_token_ids.image: expected a value"),
    "stop_ids_empty": (_set("stop_token_ids", []), "stop_token_ids: expected a non-empty list"),
    "stop_id_huge": (_set("stop_token_ids", [103, 10**6]), "stop_token_ids[1]: expected an integer in 0..110"),
    "stop_ids_object": (_set("stop_token_ids", {"a": 1}), "stop_token_ids"),
    "files_list": (_set("files", ["visual.onnx"]), "files: expected an object"),
    "file_entry_null": (lambda raw: raw["files"].update({"visual.onnx": None}), "files.visual.onnx: expected an object"),
    "file_hash_bad": (lambda raw: raw["files"].update({"tokenizer.json": {"sha256": "abc", "bytes": 2}}),
                      "files.tokenizer.json.sha256"),
    "file_bytes_string": (lambda raw: raw["files"].update({"tokenizer.json": {"sha256": "0" * 64, "bytes": "2"}}),
                          "files.tokenizer.json.bytes"),
    "file_name_slash": (lambda raw: raw["files"].update({"../x": {"sha256": "0" * 64}}), "files.../x: expected a bare"),
    "file_outside": (_set("visual.file", "../visual.onnx"), "visual.file: expected a bare file name"),
    "section_file_unlisted": (_set("tokenizer.file", "other.json"), "tokenizer.file: expected a file listed in files"),
    "padding_right": (_set("tokenizer.padding_side", "right"), "tokenizer.padding_side"),
    "tensorrt_context": (_set("tensorrt", {"plans": {"visual": "visual.onnx", "decoder": "decoder.onnx"},
                                           "max_batch": 1, "max_context": 4096}), "tensorrt.max_context"),
    "tensorrt_list": (_set("tensorrt", []), "tensorrt: expected an object"),
    "quantization_string": (_set("quantization", "int4"), "quantization: expected an object"),
    "top_level_empty": (lambda raw: raw.clear(), "format: expected 'blip3v-engine'"),
    "hash_missing": (_del("manifest_sha256"), "manifest_sha256: expected 64 lowercase hex digits"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_values_give_one_line_naming_file_and_key(engine, name):
    change, fragment = BAD[name]
    rewrite(engine, change)
    for verify in (True, False):  # the checks run before (and without) any hashing
        text = assert_engine_error(engine, fragment, verify=verify)
        assert f"{engine / MANIFEST_NAME}: " in text


def test_writers_cannot_write_what_readers_refuse(tmp_path):
    raw = base_raw()
    raw["model"]["num_frames"] = -1
    with pytest.raises(EngineError, match="model.num_frames"):
        make_engine(tmp_path / "e", raw)
    assert not (tmp_path / "e" / MANIFEST_NAME).exists()


def test_edited_manifest_fails_its_own_hash(engine):
    rewrite(engine, _set("prompt.system", "A different, still valid, system prompt."))
    assert_engine_error(engine, "manifest.json does not match its own sha256")
    load_manifest(engine, verify_hashes=False)  # valid content, only the seal is off
    # formatting does not matter, only content: re-indented and key-reordered still verifies
    write_manifest(engine, json.loads((engine / MANIFEST_NAME).read_text()))
    raw = json.loads((engine / MANIFEST_NAME).read_text())
    (engine / MANIFEST_NAME).write_text(json.dumps(dict(reversed(list(raw.items()))), indent=7))
    load_manifest(engine)


def test_unreadable_manifests_give_one_line(engine):
    cases = {b"\x89PNG\r\n\x1a\n\x00\x00": "not valid JSON", b"{\"format\": ": "not valid JSON",
             b"[" * 100_000: "not valid JSON", b"[1, 2]": "(top level): expected an object",
             b"{\"format\": \"blip3v-engine\", \"schema_version\": 99}": "schema version 99",
             b"{\"format\": \"blip3v-engine\", \"schema_version\": true}": "schema version True",
             b"{\"format\": \"onnx-genai\"}": "format: expected 'blip3v-engine'",
             b"{\"n\": 1" + b"0" * 5000 + b"}": "not valid JSON"}
    for data, fragment in cases.items():
        (engine / MANIFEST_NAME).write_bytes(data)
        assert_engine_error(engine, fragment)


def test_version_1_manifests_are_migrated_in_memory(engine):
    """A manifest as the schema-1 exporter wrote it: no seal, the keys it left optional absent."""
    raw = json.loads((engine / MANIFEST_NAME).read_text())
    del raw["manifest_sha256"]
    raw["schema_version"] = 1
    for section, key in (("model", "num_attention_heads"), ("model", "sliding_window"), ("embeddings", "dtype"),
                         ("tokenizer", "add_special_tokens"), ("tokenizer", "padding_side"),
                         ("prompt", "image_token"), ("decoder", "logits"), ("decoder", "calls")):
        del raw[section][key]
    del raw["decoder"]["kv_cache"]["update"]
    (engine / MANIFEST_NAME).write_text(json.dumps(raw))
    m = load_manifest(engine)
    assert not m.sealed and m.raw["schema_version"] == 2 and "manifest_sha256" not in m.raw
    assert m.spec.model.num_attention_heads == 4 and m.spec.decoder.calls == "prefill_then_single_tokens"
    assert m.spec.decoder.kv_cache.update == "group_query_attention" and m.spec.prompt.image_token == "<image>"
    assert json.loads((engine / MANIFEST_NAME).read_text())["schema_version"] == 1  # the file is untouched
    # listed files are still verified for a version-1 engine
    (engine / "decoder.onnx").write_bytes(b"decoder grapH")
    assert_engine_error(engine, "decoder.onnx does not match its sha256")
    # re-writing it (e.g. `blip3v build` adding plans) seals it as version 2
    (engine / "decoder.onnx").write_bytes(FILES["decoder.onnx"])
    write_manifest(engine, m.raw)
    again = load_manifest(engine)
    assert again.sealed and again.spec == m.spec


def test_listed_files_are_verified(engine):
    (engine / "embed_tokens.npy").write_bytes(b"tablE")  # same size
    assert_engine_error(engine, "embed_tokens.npy does not match its sha256")
    load_manifest(engine, verify_hashes=False)
    (engine / "embed_tokens.npy").write_bytes(b"tab")
    assert_engine_error(engine, "embed_tokens.npy has 3 bytes, the manifest says 5", verify=False)
    (engine / "embed_tokens.npy").unlink()
    assert_engine_error(engine, "missing file embed_tokens.npy", verify=False)


def test_seeded_mutations_answer_or_raise_one_line(tmp_path):
    """Fuzz: 400 seeded mutations (a random key set to a random bad value, or deleted) of a valid
    manifest; each loads or raises one EngineError line, nothing else escapes."""
    make_engine(tmp_path / "e")
    sealed = json.loads((tmp_path / "e" / MANIFEST_NAME).read_text())
    junk = [None, [], {}, "", "x", "{", "<image>", -1, 0, 1, 2**40, 1.5, float("inf"), True, [1, 2, 3],
            {"file": "x"}, "past.{layer}", "{system}<image>{question}", "float64"]
    rng = random.Random(18)

    def paths(node, prefix=()):
        if isinstance(node, dict):
            for k, v in node.items():
                yield (*prefix, k)
                yield from paths(v, (*prefix, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield (*prefix, i)
                yield from paths(v, (*prefix, i))

    every = [p for p in paths(sealed) if p[0] != "manifest_sha256"]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        raw = copy.deepcopy(sealed)
        path = rng.choice(every)
        parent = raw
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.2 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = rng.choice(junk)
        raw["manifest_sha256"] = manifest_digest(raw)  # so the content checks, not the seal, decide
        (tmp_path / "e" / MANIFEST_NAME).write_text(json.dumps(raw))
        try:
            load_manifest(tmp_path / "e")
            outcomes["ok"] += 1
        except EngineError as exc:
            assert len(str(exc).splitlines()) == 1 and str(exc).startswith(str(tmp_path / "e")), exc
            outcomes["error"] += 1
    assert outcomes["error"] > 300, outcomes  # most mutations are faults; a few hit informational keys


def test_shape_ranges_cover_every_call_and_agree_with_the_tensorrt_check(engine):
    from blip3v.export.trt_check import derive_profiles

    spec = load_manifest(engine).spec
    m = spec.model
    for batch, ctx in ((1, None), (3, 32), (2, 1)):
        c = ctx or m.max_context
        ranges = {call: decoder_shape_ranges(spec, batch, ctx, call) for call in ("prefill", "decode", "any")}
        for rng_ in ranges.values():
            assert set(rng_) == {"inputs_embeds", "attention_mask", "position_ids",
                                 *spec.kv_names("past_key"), *spec.kv_names("past_value")}
            for lo, opt, hi in rng_.values():
                assert all(1 <= a <= b <= d for a, b, d in zip(lo, opt, hi)), (lo, opt, hi)
        pre, dec, any_ = ranges["prefill"], ranges["decode"], ranges["any"]
        assert pre["inputs_embeds"][2] == (batch, c, m.hidden_size) and dec["inputs_embeds"][2] == (batch, 1, m.hidden_size)
        assert pre["past_key.0"][2] == (batch, m.num_key_value_heads, c, m.head_dim)
        # "any" is one profile that admits every shape either call admits
        for name in any_:
            assert all(a <= p <= q <= d for a, p, q, d in zip(any_[name][0], pre[name][0], pre[name][2], any_[name][2]))
            assert all(a <= p <= q <= d for a, p, q, d in zip(any_[name][0], dec[name][0], dec[name][2], any_[name][2]))
        profiles = derive_profiles(spec, batch, ctx)  # TensorRT builds and checks exactly these
        assert profiles["decoder"] == [pre, dec]
        assert profiles["visual"] == [visual_shape_ranges(spec, batch)]
    (lo, opt, hi), = visual_shape_ranges(spec, 4).values()
    assert lo == opt == (1, 4, 3, 32, 32) and hi == (4, 4, 3, 32, 32)
    with pytest.raises(EngineError, match="max-context must be in 1..512"):
        decoder_shape_ranges(spec, 1, 513)
    with pytest.raises(EngineError, match="max-batch"):
        visual_shape_ranges(spec, 0)


def test_cli_ask_on_a_bad_manifest_is_one_error_line(engine):
    rewrite(engine, _set("model", {"num_frames": "eight"}))
    proc = run_cli("ask", str(ROOT / "blip3v" / "assets" / "sample.mp4"), "what happens?", "--engine", str(engine))
    assert_one_line_error(proc, "manifest.json", "model.num_frames")
