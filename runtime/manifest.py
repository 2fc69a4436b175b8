"""`manifest.json`: the whole contract between an exported engine directory and the runtime.

Export writes it; every runtime reads only it (and the files it lists), never the model code,
and never branches on the model type: file names, tensor names per role, the KV-cache layout and
name templates, sizes, preprocessing, token ids, prompt, precision, versions and sha256 hashes are
all data here (modelled on onnxruntime-genai's genai_config.json). Standard library only.

It is read and written through one typed model, `EngineSpec` (dataclasses below), and checked in
full before anything is allocated: types, required keys, sizes within what the architecture and the
declared context allow, known dtypes, tensor-name templates, the prompt template, token ids inside
the embedding table. Each fault is one `EngineError` line naming manifest.json, the dotted key and
what was expected.

Schema version 2 (keys a runtime relies on; `export`, `model.temporal_encoder` are informational):

    format: "blip3v-engine"            schema_version: 2
    precision: "fp32" | "fp16"         dtype: numpy name of float inputs/outputs ("float32" | "float16")
    model: {temporal_encoder, num_frames, image_size, image_mean[3], image_std[3], num_video_tokens (M),
            hidden_size (D), num_logits, num_layers, num_attention_heads, num_key_value_heads, head_dim,
            max_context, sliding_window (null or int)}
    visual:  {file, inputs: {pixel_values: NAME}, outputs: {video_tokens: NAME}}
    decoder: {file, inputs: {inputs_embeds, attention_mask, position_ids: NAME}, outputs: {logits: NAME},
              logits: "last" (B, num_logits), attention: "gqa" | "standard" (informational),
              calls: one of DECODER_CALLS (which (S, cache length) calls the graph accepts),
              kv_cache: {layout: ["batch", "kv_heads", "capacity", "head_dim"], capacity_axis: 2,
                         past_key, past_value, present_key, present_value: "....{layer}" templates,
                         write_slots: the call's S tokens go to the last S of the mask's L slots,
                         update: "group_query_attention" | "scatter_elements", past_present_share_buffer: true}}
    embeddings: {file (.npy, rows indexed by token id), rows, dim, dtype}
    tokenizer: {file (tokenizer.json), add_special_tokens: false, padding_side: "left"}
    prompt: {template (one <image>, fields {system} and {question} only), system, image_token}
    special_token_ids: {image, pad, end, eos, bos, ...}     stop_token_ids: [...]
    export: {exporter, opset, versions: {...}, source, validation: {...}}
    files: {NAME: {sha256, bytes}}     (every file above, plus ONNX external-data files and plans)
    tensorrt: {plans: {visual, decoder}, max_batch, max_context, ...}   (written by `blip3v build`)
    quantization: {...}                                                  (written by `blip3v calibrate`)
    manifest_sha256: sha256 of this manifest's canonical JSON without this key (`manifest_digest`)

Version 1 (before the typed model) had no `manifest_sha256`, and `num_attention_heads`,
`sliding_window`, `embeddings.dtype`, `tokenizer.*` flags, `prompt.image_token`, `decoder.logits`,
`decoder.calls` and `kv_cache.update` were optional. `migrate` turns it into version 2 in memory
(defaults are what the version-1 exporter always wrote). A version-1 manifest cannot be checked
against itself: it is accepted with its listed files verified (`Manifest.sealed` is False), because
the self-hash, like the file hashes, guards against corruption and stray edits, not against someone
who can rewrite the folder (who could recompute any hash); re-exporting seals it.

The shapes an engine is bound and built with come from here too: `visual_shape_ranges` and
`decoder_shape_ranges` give Polygraphy-style {input: (min, opt, max)} for TensorRT plans and
ONNX Runtime's TensorRT provider alike.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip3v.errors import EngineError

MANIFEST_NAME = "manifest.json"
FORMAT = "blip3v-engine"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
HASH_CHUNK = 1 << 20
SELF_HASH_KEY = "manifest_sha256"
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KiB; never read a huge file into memory

PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16"}
DTYPES = tuple(PRECISION_DTYPES.values())
ATTENTIONS = ("gqa", "standard")
KV_UPDATES = {"gqa": "group_query_attention", "standard": "scatter_elements"}
KV_LAYOUT = ("batch", "kv_heads", "capacity", "head_dim")
KV_ROLES = ("past_key", "past_value", "present_key", "present_value")
# What a decoder call may look like. "prefill_then_single_tokens": S tokens from an empty cache,
# then S = 1 per call (what GroupQueryAttention allowed for B > 1 when this was written);
# "chunks": a chunk of S >= 1 tokens on a cache of any length (prefix reuse, issue 19).
DECODER_CALLS = ("prefill_then_single_tokens", "chunks")
PROMPT_FIELDS = ("system", "question")
REQUIRED_TOKEN_IDS = ("image", "pad")  # the host splices at `image` and left-pads with `pad`

# Plausible sizes: generous for any xGen-MM-style model, small enough that nothing derived from
# them can ask for absurd memory before a file is even opened (issue 18: num_frames 1e9 -> MemoryError).
LIMITS = {
    "num_frames": 512, "image_size": 4096, "num_video_tokens": 1 << 16, "hidden_size": 1 << 16,
    "num_logits": 1 << 21, "num_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
    "head_dim": 1024, "max_context": 1 << 20, "sliding_window": 1 << 20, "rows": 1 << 21,
    "max_batch": 4096,
}
MAX_PIXELS_PER_CLIP = 1 << 26  # T * 3 * S * S elements of one clip (256 MiB as float32; 64 frames of 576 px fit)

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)
ShapeRanges = dict[str, ShapeRange]  # input name -> its range: one optimization profile


# ----------------------------------------------------------------------------------- hashing


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


def manifest_digest(raw: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace, ASCII) without the
    `manifest_sha256` key: independent of how the file is formatted, changed by any edit of a value."""
    body = {k: v for k, v in raw.items() if k != SELF_HASH_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# ----------------------------------------------------------------------------------- checking


class _Fault(Exception):
    """One problem at a dotted key; turned into an EngineError naming the manifest file."""

    def __init__(self, key: str, expected: str, got: Any = None, show_got: bool = True):
        self.key, self.expected = key, expected
        self.got = _show(got) if show_got else None


_MISSING = object()


def _show(value: Any) -> str:
    if value is _MISSING:
        return "nothing (missing)"
    kind = {dict: "an object", list: "a list", type(None): "null", bool: "a boolean"}.get(type(value))
    if kind in ("an object", "a list"):
        return kind
    text = repr(value) if kind is None else ("null" if value is None else str(value).lower())
    return text if len(text) <= 60 else text[:57] + "..."


def _at(obj: dict[str, Any], key: str, name: str, default: Any = _MISSING) -> Any:
    value = obj.get(name, default)
    if value is _MISSING:
        raise _Fault(f"{key}.{name}" if key else name, "a value (required key)", _MISSING)
    return value


def _dict(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Fault(key, "an object", value)
    return value


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Fault(key, f"an integer in {lo}..{hi}", value)
    if not lo <= value <= hi:
        raise _Fault(key, f"an integer in {lo}..{hi}", value)
    return value


def _str(value: Any, key: str, choices: tuple[str, ...] | None = None, nonempty: bool = True) -> str:
    if choices is not None:
        if not isinstance(value, str) or value not in choices:
            raise _Fault(key, "one of " + ", ".join(repr(c) for c in choices), value)
        return value
    if not isinstance(value, str) or (nonempty and not value):
        raise _Fault(key, "a non-empty string" if nonempty else "a string", value)
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _Fault(key, "true or false", value)
    return value


def _floats(value: Any, key: str, n: int, positive: bool = False) -> tuple[float, ...]:
    what = f"a list of {n} {'positive ' if positive else ''}finite numbers"
    if not isinstance(value, list) or len(value) != n:
        raise _Fault(key, what, value)
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise _Fault(key, what, value)
        if positive and v <= 0:
            raise _Fault(key, what, value)
        out.append(float(v))
    return tuple(out)


def _file_name(value: Any, key: str) -> str:
    """File names in a manifest are bare names inside the engine directory, nothing else."""
    if (not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value
            or "\0" in value):
        raise _Fault(key, "a bare file name inside the engine directory", value)
    return value


def _tensor_name(value: Any, key: str) -> str:
    return _str(value, key)


def _template(value: Any, key: str) -> str:
    """A KV tensor-name template: text with exactly one `{layer}` field and no other braces."""
    expected = "a tensor-name template with exactly one {layer} field and no other braces"
    if not isinstance(value, str) or not value:
        raise _Fault(key, expected, value)
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(value) if name is not None]
    except ValueError:  # an unbalanced brace
        raise _Fault(key, expected, value) from None
    if fields != [("layer", "", None)] or value.count("{") != 1 or value.count("}") != 1:
        raise _Fault(key, expected, value)
    return value


def _prompt_template(value: Any, key: str, image_token: str) -> str:
    expected = (f"a prompt template with exactly one {image_token}, a {{question}} field and only the fields "
                "{system} and {question}")
    if not isinstance(value, str):
        raise _Fault(key, expected, value)
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError:
        raise _Fault(key, expected + " (unbalanced brace)", value) from None
    fields = []
    for _, name, spec, conv in parts:
        if name is None:
            continue
        if name not in PROMPT_FIELDS or spec or conv:
            raise _Fault(key, expected + f" (found {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}})",
                         value)
        fields.append(name)
    if fields.count("question") != 1 or fields.count("system") > 1:
        raise _Fault(key, expected, value)
    if value.count(image_token) != 1:
        raise _Fault(key, expected + f" (found {value.count(image_token)} {image_token})", value)
    return value


def _error(source: str, fault: _Fault) -> EngineError:
    got = f", got {fault.got}" if fault.got is not None else ""
    return EngineError(f"{source}: {fault.key}: expected {fault.expected}{got}")


# ----------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSpec:
    num_frames: int
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    num_video_tokens: int  # M
    hidden_size: int  # D
    num_logits: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_context: int
    sliding_window: int | None = None
    temporal_encoder: str = ""  # informational

    @classmethod
    def parse(cls, obj: Any, key: str = "model") -> ModelSpec:
        obj = _dict(obj, key)

        def size(name: str, lo: int = 1, hi: int | None = None) -> int:
            return _int(_at(obj, key, name), f"{key}.{name}", lo, LIMITS[name] if hi is None else hi)

        frames, image = size("num_frames"), size("image_size")
        if frames * 3 * image * image > MAX_PIXELS_PER_CLIP:
            raise _Fault(f"{key}.image_size", f"num_frames * 3 * image_size^2 <= {MAX_PIXELS_PER_CLIP} "
                                              f"(num_frames is {frames})", image)
        max_context = size("max_context", lo=2)
        video = size("num_video_tokens", hi=min(LIMITS["num_video_tokens"], max_context - 1))
        hidden = size("hidden_size")
        heads = size("num_attention_heads")
        kv_heads = size("num_key_value_heads", hi=heads)
        if heads % kv_heads:
            raise _Fault(f"{key}.num_key_value_heads", f"a divisor of num_attention_heads ({heads})", kv_heads)
        head_dim = size("head_dim")
        if heads * head_dim != hidden:
            raise _Fault(f"{key}.head_dim", f"hidden_size / num_attention_heads = {hidden} / {heads}", head_dim)
        window = obj.get("sliding_window")
        if window is not None:
            window = _int(window, f"{key}.sliding_window", 1, LIMITS["sliding_window"])
        temporal = obj.get("temporal_encoder", "")
        return cls(num_frames=frames, image_size=image,
                   image_mean=_floats(_at(obj, key, "image_mean"), f"{key}.image_mean", 3),  # type: ignore[arg-type]
                   image_std=_floats(_at(obj, key, "image_std"), f"{key}.image_std", 3, positive=True),  # type: ignore[arg-type]
                   num_video_tokens=video, hidden_size=hidden, num_logits=size("num_logits"),
                   num_layers=size("num_layers"), num_attention_heads=heads, num_key_value_heads=kv_heads,
                   head_dim=head_dim, max_context=max_context, sliding_window=window,
                   temporal_encoder=_str(temporal, f"{key}.temporal_encoder", nonempty=False))

    def to_dict(self) -> dict[str, Any]:
        return {"temporal_encoder": self.temporal_encoder, "num_frames": self.num_frames,
                "image_size": self.image_size, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "num_video_tokens": self.num_video_tokens, "hidden_size": self.hidden_size,
                "num_logits": self.num_logits, "num_layers": self.num_layers,
                "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim, "max_context": self.max_context, "sliding_window": self.sliding_window}


def _names(obj: Any, key: str, roles: tuple[str, ...]) -> dict[str, str]:
    obj = _dict(obj, key)
    return {r: _tensor_name(_at(obj, key, r), f"{key}.{r}") for r in roles}


@dataclass(frozen=True)
class VisualSpec:
    file: str
    pixel_values: str  # input tensor name
    video_tokens: str  # output tensor name

    @classmethod
    def parse(cls, obj: Any, key: str = "visual") -> VisualSpec:
        obj = _dict(obj, key)
        inputs = _names(_at(obj, key, "inputs"), f"{key}.inputs", ("pixel_values",))
        outputs = _names(_at(obj, key, "outputs"), f"{key}.outputs", ("video_tokens",))
        return cls(_file_name(_at(obj, key, "file"), f"{key}.file"), inputs["pixel_values"], outputs["video_tokens"])

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "inputs": {"pixel_values": self.pixel_values},
                "outputs": {"video_tokens": self.video_tokens}}


@dataclass(frozen=True)
class KVCacheSpec:
    past_key: str  # templates with one {layer}
    past_value: str
    present_key: str
    present_value: str
    update: str  # "group_query_attention" | "scatter_elements"
    layout: tuple[str, ...] = KV_LAYOUT
    capacity_axis: int = 2
    write_slots: str = "last S of attention_mask's L"
    past_present_share_buffer: bool = True

    def names(self, role: str, num_layers: int) -> list[str]:
        """Tensor names of `role` (one of KV_ROLES), one per layer."""
        return [getattr(self, role).format(layer=i) for i in range(num_layers)]

    @classmethod
    def parse(cls, obj: Any, key: str = "decoder.kv_cache") -> KVCacheSpec:
        obj = _dict(obj, key)
        layout = _at(obj, key, "layout")
        if layout != list(KV_LAYOUT):
            raise _Fault(f"{key}.layout", str(list(KV_LAYOUT)), layout)
        axis = _int(_at(obj, key, "capacity_axis"), f"{key}.capacity_axis", 2, 2)
        templates = {r: _template(_at(obj, key, r), f"{key}.{r}") for r in KV_ROLES}
        if len(set(templates.values())) != len(KV_ROLES):
            raise _Fault(f"{key}.present_value", "four different templates for past/present key/value",
                         templates["present_value"])
        update = _str(_at(obj, key, "update"), f"{key}.update", tuple(KV_UPDATES.values()))
        share = _bool(_at(obj, key, "past_present_share_buffer"), f"{key}.past_present_share_buffer")
        slots = _str(obj.get("write_slots", cls.write_slots), f"{key}.write_slots")
        return cls(layout=tuple(layout), capacity_axis=axis, update=update, write_slots=slots,
                   past_present_share_buffer=share, **templates)

    def to_dict(self) -> dict[str, Any]:
        return {"layout": list(self.layout), "capacity_axis": self.capacity_axis, "past_key": self.past_key,
                "past_value": self.past_value, "present_key": self.present_key, "present_value": self.present_value,
                "write_slots": self.write_slots, "update": self.update,
                "past_present_share_buffer": self.past_present_share_buffer}


@dataclass(frozen=True)
class DecoderSpec:
    file: str
    inputs_embeds: str  # tensor names
    attention_mask: str
    position_ids: str
    logits: str
    attention: str  # "gqa" | "standard" (informational)
    calls: str  # one of DECODER_CALLS
    kv_cache: KVCacheSpec
    logits_mode: str = "last"  # the graph returns the last position's logits (B, num_logits)

    @classmethod
    def parse(cls, obj: Any, key: str = "decoder") -> DecoderSpec:
        obj = _dict(obj, key)
        inputs = _names(_at(obj, key, "inputs"), f"{key}.inputs", ("inputs_embeds", "attention_mask", "position_ids"))
        outputs = _names(_at(obj, key, "outputs"), f"{key}.outputs", ("logits",))
        kv = KVCacheSpec.parse(_at(obj, key, "kv_cache"), f"{key}.kv_cache")
        attention = _str(_at(obj, key, "attention"), f"{key}.attention", ATTENTIONS)
        return cls(file=_file_name(_at(obj, key, "file"), f"{key}.file"), logits=outputs["logits"],
                   attention=attention, calls=_str(_at(obj, key, "calls"), f"{key}.calls", DECODER_CALLS),
                   logits_mode=_str(_at(obj, key, "logits"), f"{key}.logits", ("last",)), kv_cache=kv, **inputs)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file,
                "inputs": {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask,
                           "position_ids": self.position_ids},
                "outputs": {"logits": self.logits}, "logits": self.logits_mode, "attention": self.attention,
                "calls": self.calls, "kv_cache": self.kv_cache.to_dict()}


@dataclass(frozen=True)
class EmbeddingsSpec:
    file: str  # .npy, (rows, dim), row i = token id i
    rows: int
    dim: int
    dtype: str

    @classmethod
    def parse(cls, obj: Any, key: str = "embeddings") -> EmbeddingsSpec:
        obj = _dict(obj, key)
        return cls(file=_file_name(_at(obj, key, "file"), f"{key}.file"),
                   rows=_int(_at(obj, key, "rows"), f"{key}.rows", 1, LIMITS["rows"]),
                   dim=_int(_at(obj, key, "dim"), f"{key}.dim", 1, LIMITS["hidden_size"]),
                   dtype=_str(_at(obj, key, "dtype"), f"{key}.dtype", DTYPES))

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "rows": self.rows, "dim": self.dim, "dtype": self.dtype}


@dataclass(frozen=True)
class TokenizerSpec:
    file: str  # tokenizer.json (the `tokenizers` library)
    add_special_tokens: bool = False
    padding_side: str = "left"

    @classmethod
    def parse(cls, obj: Any, key: str = "tokenizer") -> TokenizerSpec:
        obj = _dict(obj, key)
        return cls(file=_file_name(_at(obj, key, "file"), f"{key}.file"),
                   add_special_tokens=_bool(_at(obj, key, "add_special_tokens"), f"{key}.add_special_tokens"),
                   padding_side=_str(_at(obj, key, "padding_side"), f"{key}.padding_side", ("left",)))

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "add_special_tokens": self.add_special_tokens, "padding_side": self.padding_side}


@dataclass(frozen=True)
class PromptSpec:
    template: str  # one image_token, fields {system} (optional) and {question}
    system: str
    image_token: str = "<image>"

    @classmethod
    def parse(cls, obj: Any, key: str = "prompt") -> PromptSpec:
        obj = _dict(obj, key)
        image = _str(_at(obj, key, "image_token"), f"{key}.image_token")
        system = _str(_at(obj, key, "system"), f"{key}.system", nonempty=False)
        if image in system:
            raise _Fault(f"{key}.system", f"a system prompt without {image}", system)
        return cls(template=_prompt_template(_at(obj, key, "template"), f"{key}.template", image),
                   system=system, image_token=image)

    def to_dict(self) -> dict[str, Any]:
        return {"template": self.template, "system": self.system, "image_token": self.image_token}


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int | None = None

    @classmethod
    def parse(cls, obj: Any, key: str) -> FileEntry:
        obj = _dict(obj, key)
        digest = _at(obj, key, "sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise _Fault(f"{key}.sha256", "64 lowercase hex digits", digest)
        size = obj.get("bytes")
        return cls(digest, None if size is None else _int(size, f"{key}.bytes", 0, 1 << 50))

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256} | ({} if self.bytes is None else {"bytes": self.bytes})


@dataclass(frozen=True)
class TensorRTSpec:
    """What a TensorRT runtime needs from the `tensorrt` section `blip3v build` writes; the section's
    other keys (device, flags, profiles, provenance) stay in `EngineSpec.extra["tensorrt"]`."""

    visual_plan: str
    decoder_plan: str
    max_batch: int
    max_context: int

    @classmethod
    def parse(cls, obj: Any, model: ModelSpec, key: str = "tensorrt") -> TensorRTSpec:
        obj = _dict(obj, key)
        plans = _dict(_at(obj, key, "plans"), f"{key}.plans")
        return cls(visual_plan=_file_name(_at(plans, f"{key}.plans", "visual"), f"{key}.plans.visual"),
                   decoder_plan=_file_name(_at(plans, f"{key}.plans", "decoder"), f"{key}.plans.decoder"),
                   max_batch=_int(_at(obj, key, "max_batch"), f"{key}.max_batch", 1, LIMITS["max_batch"]),
                   max_context=_int(_at(obj, key, "max_context"), f"{key}.max_context", 1, model.max_context))


SECTIONS = ("visual", "decoder", "embeddings", "tokenizer")  # the sections that name a file
_KNOWN = ("format", "schema_version", "precision", "dtype", "model", *SECTIONS, "prompt", "special_token_ids",
          "stop_token_ids", "export", "files", SELF_HASH_KEY)


@dataclass(frozen=True)
class EngineSpec:
    """A whole manifest, checked. `extra` keeps the other top-level sections verbatim
    (`tensorrt`, `quantization`, ...); `export` is informational and kept verbatim too."""

    precision: str
    dtype: str
    model: ModelSpec
    visual: VisualSpec
    decoder: DecoderSpec
    embeddings: EmbeddingsSpec
    tokenizer: TokenizerSpec
    prompt: PromptSpec
    special_token_ids: dict[str, int]
    stop_token_ids: tuple[int, ...]
    files: dict[str, FileEntry]
    export: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    tensorrt: TensorRTSpec | None = None
    schema_version: int = SCHEMA_VERSION

    def kv_names(self, role: str, num_layers: int | None = None) -> list[str]:
        return self.decoder.kv_cache.names(role, self.model.num_layers if num_layers is None else num_layers)

    def file_of(self, section: str) -> str:
        """The file name of "visual", "decoder", "embeddings" or "tokenizer"."""
        return getattr(self, section).file

    @classmethod
    def from_dict(cls, raw: Any, source: str = MANIFEST_NAME) -> EngineSpec:
        """Checks (migrating an older schema first) and types a parsed manifest; any fault raises one
        EngineError line "SOURCE: dotted.key: expected ..., got ...". `raw` is not modified. The
        seal (`manifest_sha256`) is not required here: verifying it is `load_manifest`'s job."""
        return check(raw, source, require_seal=False)[1]

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> EngineSpec:
        precision = _str(_at(raw, "", "precision"), "precision", tuple(PRECISION_DTYPES))
        dtype = _str(_at(raw, "", "dtype"), "dtype", DTYPES)
        if dtype != PRECISION_DTYPES[precision]:
            raise _Fault("dtype", f"{PRECISION_DTYPES[precision]!r} for precision {precision!r}", dtype)
        model = ModelSpec.parse(_at(raw, "", "model"))
        embeddings = EmbeddingsSpec.parse(_at(raw, "", "embeddings"))
        if embeddings.dim != model.hidden_size:
            raise _Fault("embeddings.dim", f"model.hidden_size ({model.hidden_size})", embeddings.dim)
        if embeddings.rows < model.num_logits:
            raise _Fault("embeddings.rows", f"at least model.num_logits ({model.num_logits}): every id the "
                                            "decoder can emit needs a row", embeddings.rows)
        if embeddings.dtype != dtype:
            raise _Fault("embeddings.dtype", f"the manifest's dtype ({dtype!r})", embeddings.dtype)
        ids = _dict(_at(raw, "", "special_token_ids"), "special_token_ids")
        special = {}
        for name, value in ids.items():
            special[name] = _int(value, f"special_token_ids.{name}", 0, embeddings.rows - 1)
        for name in REQUIRED_TOKEN_IDS:
            _at(ids, "special_token_ids", name)
        stops = _at(raw, "", "stop_token_ids")
        if not isinstance(stops, list) or not stops:
            raise _Fault("stop_token_ids", "a non-empty list of token ids", stops)
        stop = tuple(_int(v, f"stop_token_ids[{i}]", 0, embeddings.rows - 1) for i, v in enumerate(stops))
        files_raw = _dict(_at(raw, "", "files"), "files")
        if not files_raw:
            raise _Fault("files", "at least the files of visual, decoder, embeddings and tokenizer", files_raw)
        files = {_file_name(name, f"files.{name}"): FileEntry.parse(entry, f"files.{name}")
                 for name, entry in files_raw.items()}
        export = _dict(raw.get("export", {}), "export")
        extra = {k: v for k, v in raw.items() if k not in _KNOWN}
        tensorrt = TensorRTSpec.parse(extra["tensorrt"], model) if "tensorrt" in extra else None
        if "quantization" in extra:
            _dict(extra["quantization"], "quantization")
        spec = cls(precision=precision, dtype=dtype, model=model, visual=VisualSpec.parse(_at(raw, "", "visual")),
                   decoder=DecoderSpec.parse(_at(raw, "", "decoder")), embeddings=embeddings,
                   tokenizer=TokenizerSpec.parse(_at(raw, "", "tokenizer")),
                   prompt=PromptSpec.parse(_at(raw, "", "prompt")), special_token_ids=special, stop_token_ids=stop,
                   files=files, export=export, extra=extra, tensorrt=tensorrt)
        listed = [(f"{s}.file", spec.file_of(s)) for s in SECTIONS]
        if tensorrt is not None:
            listed += [("tensorrt.plans.visual", tensorrt.visual_plan), ("tensorrt.plans.decoder", tensorrt.decoder_plan)]
        for key, name in listed:
            if name not in files:
                raise _Fault(key, f"a file listed in files (with its sha256); {name} is not", show_got=False)
        names = [spec.visual.pixel_values, spec.visual.video_tokens]
        dec = spec.decoder
        names2 = [dec.inputs_embeds, dec.attention_mask, dec.position_ids, dec.logits]
        kv = [n for role in KV_ROLES for n in spec.kv_names(role)]
        if len(set(names2 + kv)) != len(names2) + len(kv):
            raise _Fault("decoder.kv_cache", "tensor names distinct from each other and from the decoder's "
                                             "inputs and outputs", show_got=False)
        if len(set(names)) != 2:
            raise _Fault("visual.outputs.video_tokens", "a name other than the input's", names[1])
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON data (without `manifest_sha256`; `seal` adds it)."""
        out: dict[str, Any] = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION, "precision": self.precision, "dtype": self.dtype,
            "model": self.model.to_dict(), "visual": self.visual.to_dict(), "decoder": self.decoder.to_dict(),
            "embeddings": self.embeddings.to_dict(), "tokenizer": self.tokenizer.to_dict(),
            "prompt": self.prompt.to_dict(), "special_token_ids": dict(self.special_token_ids),
            "stop_token_ids": list(self.stop_token_ids), "export": copy.deepcopy(self.export),
            "files": {n: e.to_dict() for n, e in sorted(self.files.items())},
        }
        out.update(copy.deepcopy(self.extra))
        return out


def check(raw: Any, source: str = MANIFEST_NAME, require_seal: bool = True) -> tuple[dict[str, Any], EngineSpec]:
    """(the manifest migrated to version 2 as a dict, its typed model); one EngineError line if not valid.
    `require_seal=False` accepts a version-2 dict without `manifest_sha256` (one about to be sealed)."""
    try:
        migrated = migrate(raw, require_seal)
        return migrated, EngineSpec._parse(migrated)
    except _Fault as fault:
        raise _error(source, fault) from None


def migrate(raw: Any, require_seal: bool = True) -> dict[str, Any]:
    """A parsed manifest of any readable schema version -> a version-2 dict (a copy; the input is
    not modified). Raises _Fault for what is not a blip3v manifest of a known version."""
    if not isinstance(raw, dict):
        raise _Fault("(top level)", "an object", raw)
    if raw.get("format") != FORMAT:
        raise _Fault("format", repr(FORMAT) + " (a blip3v engine manifest)", raw.get("format", _MISSING))
    version = raw.get("schema_version", _MISSING)
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise _Fault("schema_version", f"one of {', '.join(map(str, READABLE_VERSIONS))} (this runtime); "
                                       "re-export the engine with this blip3v", version)
    out = copy.deepcopy(raw)
    if version == 1:
        # Fill what version 1 left optional with what its exporter always wrote; where a section is
        # not an object, leave it for the checks to name.
        model, dec = out.get("model"), out.get("decoder")
        if isinstance(model, dict):
            model.setdefault("sliding_window", None)
            hidden, head_dim = model.get("hidden_size"), model.get("head_dim")
            if ("num_attention_heads" not in model and isinstance(hidden, int) and isinstance(head_dim, int)
                    and head_dim > 0 and hidden % head_dim == 0):
                model["num_attention_heads"] = hidden // head_dim
        if isinstance(dec, dict):
            dec.setdefault("logits", "last")
            dec.setdefault("calls", "prefill_then_single_tokens")
            kv = dec.get("kv_cache")
            if isinstance(kv, dict):
                kv.setdefault("layout", list(KV_LAYOUT))
                kv.setdefault("capacity_axis", 2)
                kv.setdefault("past_present_share_buffer", True)
                if "update" not in kv and dec.get("attention") in KV_UPDATES:
                    kv["update"] = KV_UPDATES[dec["attention"]]
                if "attention" not in dec and kv.get("update") in KV_UPDATES.values():
                    dec["attention"] = next(a for a, u in KV_UPDATES.items() if u == kv["update"])
        if isinstance(out.get("embeddings"), dict) and "dtype" in out:
            out["embeddings"].setdefault("dtype", out["dtype"])
        if isinstance(out.get("tokenizer"), dict):
            out["tokenizer"].setdefault("add_special_tokens", False)
            out["tokenizer"].setdefault("padding_side", "left")
        if isinstance(out.get("prompt"), dict):
            out["prompt"].setdefault("image_token", "<image>")
        out["schema_version"] = SCHEMA_VERSION
    elif require_seal and (not isinstance(raw.get(SELF_HASH_KEY), str)
                           or not re.fullmatch(r"[0-9a-f]{64}", raw[SELF_HASH_KEY])):
        raise _Fault(SELF_HASH_KEY, "64 lowercase hex digits (the manifest's own sha256)", raw.get(SELF_HASH_KEY, _MISSING))
    return out


# ----------------------------------------------------------------------------------- writing


def seal(manifest: EngineSpec | dict[str, Any], source: str = MANIFEST_NAME) -> dict[str, Any]:
    """The manifest as it is written: checked (a writer can never write what a reader refuses),
    version 2, and carrying `manifest_sha256`. Accepts a spec or a (possibly older) dict."""
    spec = manifest if isinstance(manifest, EngineSpec) else check(manifest, source, require_seal=False)[1]
    raw = spec.to_dict()
    raw[SELF_HASH_KEY] = manifest_digest(raw)
    return raw


def write_manifest(directory: str | os.PathLike[str], manifest: EngineSpec | dict[str, Any]) -> Path:
    """Checks, seals and writes `directory/manifest.json` (to a temporary file, then renamed)."""
    path = Path(directory) / MANIFEST_NAME
    raw = seal(manifest, str(path))
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(raw, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------- reading


class Manifest:
    """A checked manifest of an engine directory.

    `spec` is the typed model (prefer it: `manifest.spec.model.num_frames`); `raw` is the same
    content as a version-2 dict (`manifest["decoder"]["inputs"]`, kept for existing readers);
    `sealed` says whether the file carried its own sha256 (False for a migrated version 1)."""

    def __init__(self, directory: str | os.PathLike[str], raw: dict[str, Any], spec: EngineSpec | None = None,
                 sealed: bool = True):
        self.directory = Path(directory)
        self.raw = raw
        self.sealed = sealed
        self._spec = spec

    @property
    def spec(self) -> EngineSpec:
        """The typed model (checked from `raw` on first use when the Manifest was built by hand)."""
        if self._spec is None:
            self._spec = EngineSpec.from_dict(self.raw, str(self.directory / MANIFEST_NAME))
        return self._spec

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    @property
    def model(self) -> dict[str, Any]:
        return self.raw["model"]

    def path(self, section: str) -> Path:
        """The file of `section` ("visual", "decoder", "embeddings", "tokenizer")."""
        return self.directory / self.spec.file_of(section)

    def kv_names(self, role: str, num_layers: int | None = None) -> list[str]:
        """Tensor names for `role` in past_key / past_value / present_key / present_value, per layer."""
        return self.spec.kv_names(role, num_layers or None)


def _fail(directory: Path, problem: str) -> EngineError:
    return EngineError(f"{directory}: {problem}")


def read_manifest_file(path: Path) -> Any:
    """The parsed JSON of a manifest file; one EngineError line if it is not readable JSON."""
    where = path.parent
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise _fail(where, f"{MANIFEST_NAME} is {size} bytes; expected at most {MAX_MANIFEST_BYTES}")
        data = path.read_bytes()
    except OSError as exc:
        raise _fail(where, f"{MANIFEST_NAME} cannot be read ({exc.strerror or exc})") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise _fail(where, f"{MANIFEST_NAME} is not valid JSON (not UTF-8 text)") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long integers, absurd nesting
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _fail(where, f"{MANIFEST_NAME} is not valid JSON ({first[:200]})") from None


def load_manifest(directory: str | os.PathLike[str], verify_hashes: bool = True) -> Manifest:
    """Reads and checks `directory/manifest.json`: format, schema version (older ones migrated), every
    key's type and range, then (by default) its own sha256, and that every listed file is present
    with its recorded size and (by default) sha256. Any problem raises one `EngineError` line."""
    root = Path(directory)
    if not root.is_dir():
        raise _fail(root, "engine directory not found")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise _fail(root, f"no {MANIFEST_NAME} (not an engine directory, or an export that did not finish)")
    raw = read_manifest_file(path)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        version = raw.get("schema_version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise _fail(root, f"{MANIFEST_NAME} has schema version {version!r}; this runtime reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}: re-export the engine with this blip3v")
    migrated, spec = check(raw, str(path))
    sealed = raw.get("schema_version") != 1
    if verify_hashes and sealed and manifest_digest(raw) != raw[SELF_HASH_KEY]:
        raise _fail(root, f"{MANIFEST_NAME} does not match its own sha256 ({SELF_HASH_KEY}): the manifest was "
                          "edited or is corrupt; re-export the engine")
    for name, entry in sorted(spec.files.items()):
        file = root / name
        if not file.is_file():
            raise _fail(root, f"missing file {name} (listed in {MANIFEST_NAME})")
        size = file.stat().st_size
        if entry.bytes is not None and size != entry.bytes:
            raise _fail(root, f"{name} has {size} bytes, the manifest says {entry.bytes} (truncated or modified file)")
        if verify_hashes and sha256_file(file) != entry.sha256:
            raise _fail(root, f"{name} does not match its sha256 in {MANIFEST_NAME} (modified or corrupt file)")
    return Manifest(root, migrated, spec, sealed)


# ----------------------------------------------------------------------------------- shapes


DECODER_PROFILE_CALLS = ("prefill", "decode")  # the order of the decoder's profiles in a TensorRT plan
PROMPT_OPT_EXTRA = 64  # a prefill's tuning point: the video tokens + a short prompt


def _context(spec: EngineSpec, max_context: int | None) -> int:
    limit = spec.model.max_context
    ctx = limit if max_context is None else max_context
    if isinstance(ctx, bool) or not isinstance(ctx, int) or not 1 <= ctx <= limit:
        raise EngineError(f"--max-context must be in 1..{limit} (the context this engine was exported for), "
                          f"got {ctx!r}")
    return ctx


def _batch(max_batch: int) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= LIMITS["max_batch"]:
        raise EngineError(f"--max-batch must be in 1..{LIMITS['max_batch']}, got {max_batch!r}")
    return max_batch


def visual_shape_ranges(spec: EngineSpec, max_batch: int = 1) -> ShapeRanges:
    """{pixel_values: (min, opt, max)}: batch 1..max_batch (tuned at 1), T/3/S/S fixed."""
    b = _batch(max_batch)
    frame = (spec.model.num_frames, 3, spec.model.image_size, spec.model.image_size)
    return {spec.visual.pixel_values: ((1, *frame), (1, *frame), (b, *frame))}


def decoder_shape_ranges(spec: EngineSpec, max_batch: int = 1, max_context: int | None = None,
                         call: str = "any") -> ShapeRanges:
    """The decoder's {input: (min, opt, max)} for one kind of call, C = max_context (default and
    upper bound: the manifest's):

      "prefill"  S in 1..C (tuned at M + 64), mask length L in 1..C (tuned as S): a prompt or a chunk
      "decode"   S = 1, L in 1..C (tuned at C / 2): one generated token
      "any"      one range covering both (tuned as "decode", the call made most often): for a
                 consumer that takes a single profile, such as ONNX Runtime's TensorRT provider

    KV buffers (B, Hkv, capacity, dh): capacity 1..C, tuned at C (a runtime that allocates the whole
    context once binds exactly that)."""
    if call not in (*DECODER_PROFILE_CALLS, "any"):
        raise ValueError(f"call must be one of {DECODER_PROFILE_CALLS} or 'any', not {call!r}")
    b, c = _batch(max_batch), _context(spec, max_context)
    m, dec = spec.model, spec.decoder
    d, kv, dh = m.hidden_size, m.num_key_value_heads, m.head_dim
    prompt_opt, half = min(c, m.num_video_tokens + PROMPT_OPT_EXTRA), max(1, c // 2)
    if call == "prefill":
        s_opt, s_max, l_opt = prompt_opt, c, prompt_opt
    elif call == "decode":
        s_opt, s_max, l_opt = 1, 1, half
    else:
        s_opt, s_max, l_opt = 1, c, half
    caches = {name: ((1, kv, 1, dh), (1, kv, c, dh), (b, kv, c, dh))
              for name in spec.kv_names("past_key") + spec.kv_names("past_value")}
    return {dec.inputs_embeds: ((1, 1, d), (1, s_opt, d), (b, s_max, d)),
            dec.attention_mask: ((1, 1), (1, l_opt), (b, c)),
            dec.position_ids: ((1, 1), (1, s_opt), (b, s_max)),
            **caches}
