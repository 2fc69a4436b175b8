"""`manifest.json`: the whole contract between an exported engine directory and the runtime.

Export writes it; every runtime reads only it (and the files it lists), never the model code,
and never branches on the model type: file names, tensor names per role, the KV-cache layout and
name templates, sizes, preprocessing, token ids, prompt, precision, versions and sha256 hashes are
all data here (modelled on onnxruntime-genai's genai_config.json). Standard library only.

Schema version 1 (keys a runtime relies on; `export` and `model.temporal_encoder` are informational):

    format: "blip3v-engine"            schema_version: 1
    precision: "fp32" | "fp16"         dtype: numpy name of float inputs/outputs ("float32" | "float16")
    model: {temporal_encoder, num_frames, image_size, image_mean[3], image_std[3], num_video_tokens (M),
            hidden_size (D), num_logits, num_layers, num_attention_heads, num_key_value_heads, head_dim,
            max_context, sliding_window}
    visual:  {file, inputs: {pixel_values: NAME}, outputs: {video_tokens: NAME}}
    decoder: {file, inputs: {inputs_embeds, attention_mask, position_ids: NAME}, outputs: {logits: NAME},
              logits: "last" (B, num_logits), attention: "gqa" | "standard" (informational),
              calls: "prefill_then_single_tokens" (prefill from an empty cache, then S = 1 per call),
              kv_cache: {layout: ["batch", "kv_heads", "capacity", "head_dim"], capacity_axis: 2,
                         past_key, past_value, present_key, present_value: "....{layer}" templates,
                         write_slots: the call's S tokens go to the last S of the mask's L slots,
                         update: "group_query_attention" | "scatter_elements", past_present_share_buffer: true}}
    embeddings: {file (.npy, rows indexed by token id), rows, dim, dtype}
    tokenizer: {file (tokenizer.json), add_special_tokens: false, padding_side: "left"}
    prompt: {template (with {system} and {question}), system, image_token}
    special_token_ids: {image, end, eos, pad, bos, ...}     stop_token_ids: [...]
    export: {exporter, opset, versions: {...}, source, validation: {...}}
    files: {NAME: {sha256, bytes}}     (every file above, plus ONNX external-data files)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from blip3v.errors import EngineError

MANIFEST_NAME = "manifest.json"
FORMAT = "blip3v-engine"
SCHEMA_VERSION = 1
HASH_CHUNK = 1 << 20

REQUIRED = {
    "model": ("num_frames", "image_size", "image_mean", "image_std", "num_video_tokens", "hidden_size",
              "num_logits", "num_layers", "num_key_value_heads", "head_dim", "max_context"),
    "visual": ("file", "inputs", "outputs"),
    "decoder": ("file", "inputs", "outputs", "kv_cache"),
    "embeddings": ("file", "rows", "dim"),
    "tokenizer": ("file",),
    "prompt": ("template", "system"),
}


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(directory: str | os.PathLike[str], names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {sha256, bytes}} for the files of an engine directory being written."""
    root = Path(directory)
    return {n: {"sha256": sha256_file(root / n), "bytes": (root / n).stat().st_size} for n in sorted(names)}


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


class Manifest:
    """A checked manifest. `raw` is the parsed JSON; `path(role)` resolves a listed file."""

    def __init__(self, directory: Path, raw: dict[str, Any]):
        self.directory = directory
        self.raw = raw

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    @property
    def model(self) -> dict[str, Any]:
        return self.raw["model"]

    def path(self, section: str) -> Path:
        """The file of `section` ("visual", "decoder", "embeddings", "tokenizer")."""
        return self.directory / self.raw[section]["file"]

    def kv_names(self, role: str, num_layers: int | None = None) -> list[str]:
        """Tensor names for `role` in past_key / past_value / present_key / present_value, per layer."""
        template = self.raw["decoder"]["kv_cache"][role]
        return [template.format(layer=i) for i in range(num_layers or int(self.model["num_layers"]))]


def _fail(directory: Path, problem: str) -> EngineError:
    return EngineError(f"{directory}: {problem}")


def _plain_name(directory: Path, name: Any) -> str:
    """File names in a manifest are bare names inside the engine directory, nothing else."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise _fail(directory, f"{MANIFEST_NAME} lists an invalid file name {name!r}")
    return name


def load_manifest(directory: str | os.PathLike[str], verify_hashes: bool = True) -> Manifest:
    """Reads and checks `directory/manifest.json`: format, schema version, required keys, and that
    every listed file is present with its recorded size and (by default) sha256. Any problem
    raises one `EngineError` line naming the file."""
    root = Path(directory)
    if not root.is_dir():
        raise _fail(root, "engine directory not found")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise _fail(root, f"no {MANIFEST_NAME} (not an engine directory, or an export that did not finish)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(root, f"{MANIFEST_NAME} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise _fail(root, f"{MANIFEST_NAME} is not a blip3v engine manifest (format {raw.get('format') if isinstance(raw, dict) else None!r})")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise _fail(root, f"{MANIFEST_NAME} has schema version {version!r}; this runtime reads version "
                          f"{SCHEMA_VERSION}: re-export the engine with this blip3v")
    for section, keys in REQUIRED.items():
        block = raw.get(section)
        if not isinstance(block, dict):
            raise _fail(root, f"{MANIFEST_NAME} lacks the section {section!r}")
        missing = [k for k in keys if k not in block]
        if missing:
            raise _fail(root, f"{MANIFEST_NAME} section {section!r} lacks {', '.join(missing)}")
    files = raw.get("files")
    if not isinstance(files, dict) or not files:
        raise _fail(root, f"{MANIFEST_NAME} lists no files")
    for section in ("visual", "decoder", "embeddings", "tokenizer"):
        name = _plain_name(root, raw[section]["file"])
        if name not in files:
            raise _fail(root, f"{MANIFEST_NAME}: {section} file {name} has no hash entry")
    for name, entry in sorted(files.items()):
        name = _plain_name(root, name)
        file = root / name
        if not file.is_file():
            raise _fail(root, f"missing file {name} (listed in {MANIFEST_NAME})")
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise _fail(root, f"{MANIFEST_NAME}: no sha256 for {name}")
        if "bytes" in entry and file.stat().st_size != entry["bytes"]:
            raise _fail(root, f"{name} has {file.stat().st_size} bytes, the manifest says {entry['bytes']} "
                              "(truncated or modified file)")
        if verify_hashes and sha256_file(file) != entry["sha256"]:
            raise _fail(root, f"{name} does not match its sha256 in {MANIFEST_NAME} (modified or corrupt file)")
    return Manifest(root, raw)
