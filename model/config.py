"""Model configuration: the `config.json` of an xGen-MM-Vid checkpoint, and the named presets.

The config is saved inside every checkpoint and the model is rebuilt from it, never from a file
name. It keeps the released top-level layout (`model_type` "xgenmm", `vision_encoder_config`,
`vision_tokenizer_config`, `text_config`; see docs/MODEL.md) and adds the fields the
released files leave to code: the temporal encoder, frame count, preprocessing and token ids.

Released configs name their towers by hub id (e.g. `google/siglip-so400m-patch14-384`), or only
by the section's model_type as the published base config does, instead of listing sizes;
`KNOWN_TOWERS` fills those in, so a released config.json loads as it is.

`XGenMMConfig.from_dict` is the one validation step for a config read from a file: types, required
keys, sizes bounded by the architecture and the declared context, sizes that must agree, known
dtypes and temporal encoders, and a prompt template with one `<image>` and only `{system}` /
`{question}`. It runs before any module is built, and each fault is one `CheckpointError` line
naming the file, the dotted key and what was expected (`ConfigCheck`).
"""

from __future__ import annotations

import copy
import json
import math
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from blip3v.errors import CheckpointError, InputError

TEMPORAL_ENCODERS = ("tl", "gttm", "gttm_tl", "mean", "none")

# The Phi-3 chat prompt of the released model (docs/MODEL.md, "Prompt and generation").
DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
DEFAULT_PROMPT_TEMPLATE = (
    "<|system|>\n{system}<|end|>\n<|user|>\n<image>\n{question}<|end|>\n<|assistant|>\n"
)

# Special tokens of the released scheme, in id order after the base vocabulary: Phi-3's
# (32000..32011, with its placeholders) then xGen-MM's three additions (32012..32014).
PHI3_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>",
    "<|user|>", "<pad>",
)
XGENMM_EXTRA_TOKENS = ("<image>", "<image placeholder>", "<|endofchunk|>")

# Sizes behind the hub ids that released configs use instead of explicit fields.
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "google/siglip-so400m-patch14-384": dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        patch_size=14, image_size=384, num_channels=3, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6, vision_use_head=True,
    ),
    "microsoft/Phi-3-mini-4k-instruct": dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        original_max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
        hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000,
        pad_token_id=32000, sliding_window=2047,
    ),
}


# Released config.json files name no tower at all: `vision_encoder_config` is
# {"model_type": "xgenmm_vision_encoder", ...} and `text_config` {"model_type": "phi3", ...}, and
# the authors' config classes supply the rest (configuration_xgenmm.py: XGenMMVisionEncoderConfig's
# default model_name is SigLIP so400m; a phi3 text_config gets Phi3Config's defaults, which are
# Phi-3-mini-4k's sizes). A section that names neither a model_name nor sizes gets the same.
RELEASED_DEFAULT_TOWERS = {
    "xgenmm_vision_encoder": "google/siglip-so400m-patch14-384",
    "phi3": "microsoft/Phi-3-mini-4k-instruct",
}

# -- validation bounds ---------------------------------------------------------------------
# Far above every released and preset model (SigLIP 1152 wide, 27 layers, 384 px / 14; Phi-3 3072
# wide, 32 layers, 32064 words, 4096 positions; 8-16 frames), and low enough that no value read from
# a config.json makes anything large before the checkpoint's own tensors are checked against it.
MAX_WIDTH = 1 << 16  # hidden sizes, vocabulary-independent widths
MAX_FF_WIDTH = 1 << 18  # intermediate (feed-forward) sizes
MAX_LAYERS = 512
MAX_HEADS = 1024
MAX_MULT = 64  # feed-forward multipliers
MAX_VOCAB = 1 << 21
MAX_CONTEXT = 1 << 21  # max_position_embeddings
MAX_IMAGE_SIZE = 4096
MAX_FRAMES = 256
MAX_CLIP_PIXELS = 1 << 26  # frames x image_size^2: a (T, 3, S, S) float32 clip stays under 768 MiB
MAX_TOKENS_PER_FRAME = 1 << 16  # (image_size // patch_size)^2 SigLIP positions; 729 in the release
MAX_TOKENS = 1 << 16  # latents per frame, temporal tokens, TTM memory
MAX_TEXT = 1 << 16  # characters of system_prompt / prompt_template
MAX_SPECIAL_TOKENS = 1024
CONFIG_MAX_BYTES = 16 << 20  # a config.json is a few kB; refuse to read a huge file into memory
DTYPES = ("float32", "float16", "bfloat16")
TEMPLATE_FIELDS = ("system", "question")
IMAGE_TOKEN = "<image>"
REQUIRED_SPECIAL_IDS = ("image", "pad", "end", "eos")  # indexed by the model, the runtime and training

_ABSENT = object()
_JSON_TYPES = ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"),
               (str, "string"), (list, "list"), (dict, "object"))


def _describe(value: Any) -> str:
    """A JSON value as an error message shows it: its JSON type and a short one-line repr."""
    kind = next((name for t, name in _JSON_TYPES if isinstance(value, t)), type(value).__name__)
    text = repr(value)  # repr escapes newlines, so the message stays one line
    return kind if value is None else f"{kind} {text if len(text) <= 48 else text[:45] + '...'}"


class ConfigCheck:
    """Reads typed values out of one parsed JSON file. Each bad value raises one `CheckpointError`
    line naming the file, the dotted key and what was expected."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, expected: str, value: Any = _ABSENT, *, defaulted: bool = False) -> NoReturn:
        """Raises the one-line error. `defaulted`: `value` is the default of a key the file lacks."""
        if value is _ABSENT:
            got = "missing"
        elif defaulted:
            got = f"missing, and the default {value!r} does not fit"
        else:
            got = f"got {_describe(value)}"
        raise CheckpointError(f"{self.source}: {key}: expected {expected}, {got}")

    @staticmethod
    def _get(section: dict[str, Any], key: str, default: Any) -> tuple[Any, bool]:
        value = section.get(key, _ABSENT)
        return (default, True) if value is _ABSENT else (value, False)

    def section(self, raw: dict[str, Any], prefix: str, key: str, *, nullable: bool = False) -> dict[str, Any]:
        """An object member; absent means empty. Lists, strings and (unless `nullable`) nulls fail."""
        value = raw.get(key, _ABSENT)
        if value is _ABSENT or (nullable and value is None):
            return {}
        if not isinstance(value, dict):
            self.fail(_join(prefix, key), "an object", value)
        return value

    def integer(self, section: dict[str, Any], prefix: str, key: str, lo: int, hi: int,
                default: Any = _ABSENT, nullable: bool = False) -> int | None:
        value, defaulted = self._get(section, key, default)
        expected = f"an integer in {lo}..{hi}" + (" or null" if nullable else "")
        if nullable and value is None:
            return None
        if value is _ABSENT:
            self.fail(_join(prefix, key), expected)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(_join(prefix, key), expected, value, defaulted=defaulted)
        return value

    def number(self, section: dict[str, Any], prefix: str, key: str, lo: float, hi: float,
               default: Any = _ABSENT) -> float:
        """A finite number with lo < value <= hi (booleans and numeric strings fail)."""
        value, _ = self._get(section, key, default)
        expected = f"a number above {lo:g} and at most {hi:g}"
        if value is _ABSENT:
            self.fail(_join(prefix, key), expected)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value <= hi:
            self.fail(_join(prefix, key), expected, value)  # NaN fails the comparison too
        return float(value)

    def boolean(self, section: dict[str, Any], prefix: str, key: str) -> None:
        value = section.get(key, _ABSENT)
        if value is not _ABSENT and not isinstance(value, bool):
            self.fail(_join(prefix, key), "true or false", value)

    def text(self, section: dict[str, Any], prefix: str, key: str, default: Any = _ABSENT,
             choices: tuple[str, ...] | None = None, nullable: bool = False) -> str | None:
        value, _ = self._get(section, key, default)
        if choices:
            expected = "one of " + ", ".join(repr(c) for c in choices) + (" or null" if nullable else "")
        else:
            expected = f"a string of at most {MAX_TEXT} characters"
        if nullable and value is None:
            return None
        if value is _ABSENT:
            self.fail(_join(prefix, key), expected)
        if not isinstance(value, str) or (choices and value not in choices) or len(value) > MAX_TEXT:
            self.fail(_join(prefix, key), expected, value)
        return value

    def numbers(self, section: dict[str, Any], prefix: str, key: str, count: int, default: tuple[float, ...],
                positive: bool = False) -> tuple[float, ...]:
        value, _ = self._get(section, key, default)
        expected = f"a list of {count} finite numbers" + (" above 0" if positive else "")
        if not isinstance(value, (list, tuple)) or len(value) != count or not all(
                not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
                and (v > 0 or not positive) for v in value):
            self.fail(_join(prefix, key), expected, value)
        return tuple(float(v) for v in value)

    def dtypes(self, section: dict[str, Any], prefix: str) -> None:
        """`torch_dtype` (transformers 4) and `dtype` (5) are informational here, but must be known
        names: transformers resolves them with getattr(torch, name) when it builds a config."""
        for key in ("torch_dtype", "dtype"):
            self.text(section, prefix, key, default=None, choices=DTYPES, nullable=True)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def check_prompt_template(template: str, system: str, check: ConfigCheck,
                          template_key: str = "prompt_template", system_key: str = "system_prompt") -> None:
    """The chat template holds exactly one `<image>`, a `{question}`, and no format field other than
    `{system}` / `{question}` (no conversions or specs: `str.format` would raise on them at ask time)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:  # an unbalanced or stray brace
        check.fail(template_key, f"a template whose only braces are {{system}} and {{question}} ({exc})", template)
    fields = [(name, conversion, spec) for _, name, spec, conversion in parts if name is not None]
    for name, conversion, spec in fields:
        if name not in TEMPLATE_FIELDS or conversion or spec:
            check.fail(template_key, "only the format fields {system} and {question}",
                       "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
    if "question" not in (name for name, _, _ in fields):
        check.fail(template_key, "a template with a {question} field", template)
    literal = "".join(text for text, _, _, _ in parts)
    if literal.count(IMAGE_TOKEN) != 1:
        check.fail(template_key, f"exactly one {IMAGE_TOKEN} (found {literal.count(IMAGE_TOKEN)})", template)
    if IMAGE_TOKEN in system:
        check.fail(system_key, f"a system prompt without {IMAGE_TOKEN} (the template places the only one)", system)


@dataclass
class TemporalConfig:
    """Temporal encoder: maps (B, T, N, D) frame latents to (B, M, D) video tokens."""

    type: str = "gttm"  # one of TEMPORAL_ENCODERS
    num_tokens: int = 128  # M for tl / gttm_tl; gttm gives N, mean gives N, none gives T*N
    memory_size: int = 4  # TTM memory tokens per group
    process_layers: int = 4
    heads: int = 8
    dim_head: int = 144
    ff_mult: int = 4
    read_tokens: int = 128  # the TTM read layer TL(128): in the checkpoint, never called

    def validate(self) -> None:
        if self.type not in TEMPORAL_ENCODERS:
            raise InputError(
                f"unknown temporal encoder {self.type!r}; choose one of {', '.join(TEMPORAL_ENCODERS)}"
            )


@dataclass
class ResamplerConfig:
    """Perceiver resampler (`vision_tokenizer`) sizes; names follow the released config."""

    vis_feature_dim: int = 1152
    lang_embedding_dim: int = 3072
    num_vis_tokens: int = 128  # latents per frame (N)
    depth: int = 6
    heads: int = 16
    dim_head: int = 96
    ff_mult: int = 4


# Bounds of every integer field of the two dataclasses above, as read from config.json.
_RESAMPLER_BOUNDS = dict(vis_feature_dim=MAX_WIDTH, lang_embedding_dim=MAX_WIDTH, num_vis_tokens=MAX_TOKENS,
                         depth=MAX_LAYERS, heads=MAX_HEADS, dim_head=MAX_WIDTH, ff_mult=MAX_MULT)
_TEMPORAL_BOUNDS = dict(num_tokens=MAX_TOKENS, memory_size=MAX_TOKENS, process_layers=MAX_LAYERS,
                        heads=MAX_HEADS, dim_head=MAX_WIDTH, ff_mult=MAX_MULT, read_tokens=MAX_TOKENS)


@dataclass
class XGenMMConfig:
    vision_encoder_config: dict[str, Any]
    vision_tokenizer_config: ResamplerConfig
    temporal_encoder_config: TemporalConfig
    text_config: dict[str, Any]
    num_frames: int = 8
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # First id served by `additional_embedding` / `additional_fc` (docs/MODEL.md: 32012 in the release).
    additional_vocab_start: int = 32012
    num_additional_tokens: int = 3
    special_token_ids: dict[str, int] = field(default_factory=dict)
    system_prompt: str = DEFAULT_SYSTEM
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE

    # -- derived sizes -------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.vision_encoder_config["image_size"])

    @property
    def tokens_per_frame_in(self) -> int:
        """SigLIP tokens per frame (729 at 384/14)."""
        v = self.vision_encoder_config
        return (int(v["image_size"]) // int(v["patch_size"])) ** 2

    @property
    def num_video_tokens(self) -> int:
        """M: how many embeddings replace `<image>` in the prompt."""
        t = self.temporal_encoder_config
        n = self.vision_tokenizer_config.num_vis_tokens
        return {
            "tl": t.num_tokens, "gttm_tl": t.num_tokens, "gttm": n, "mean": n,
            "none": self.num_frames * n,
        }[t.type]

    @property
    def num_logits(self) -> int:
        return self.additional_vocab_start + self.num_additional_tokens

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        tokenizer_cfg = asdict(self.vision_tokenizer_config)
        tokenizer_cfg["temporal_encoder"] = asdict(self.temporal_encoder_config)
        return {
            "model_type": "xgenmm",
            "architectures": ["XGenMMVideoModel"],
            "vision_encoder_config": copy.deepcopy(self.vision_encoder_config),
            "vision_tokenizer_config": tokenizer_cfg,
            "text_config": copy.deepcopy(self.text_config),
            "video_config": {
                "num_frames": self.num_frames,
                "image_mean": list(self.image_mean),
                "image_std": list(self.image_std),
            },
            "additional_vocab_start": self.additional_vocab_start,
            "num_additional_tokens": self.num_additional_tokens,
            "special_token_ids": dict(self.special_token_ids),
            "system_prompt": self.system_prompt,
            "prompt_template": self.prompt_template,
        }

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config.json") -> "XGenMMConfig":
        """Validates a parsed config.json and builds the config from it. This is the one validation
        step: types, required keys, bounded sizes, the sizes' agreement with each other, known
        dtypes, the prompt template. Each fault is one `CheckpointError` line naming `source`, the
        dotted key and what was expected; nothing is built from a value before it is checked."""
        check = ConfigCheck(source)
        if not isinstance(raw, dict):
            check.fail("(top level)", "a JSON object", raw)
        if raw.get("model_type") != "xgenmm":
            check.fail("model_type", "'xgenmm'", raw.get("model_type", _ABSENT))
        check.dtypes(raw, "")
        vision = _vision_tower(check, raw)
        text = _text_tower(check, raw)
        resampler, temporal = _vision_tokenizer(check, raw)
        video = check.section(raw, "", "video_config")
        channels = vision["num_channels"]
        additional_start = check.integer(raw, "", "additional_vocab_start", 1, text["vocab_size"], default=32012)
        num_additional = check.integer(raw, "", "num_additional_tokens", 1, MAX_SPECIAL_TOKENS, default=3)
        cfg = cls(
            vision_encoder_config=vision,
            vision_tokenizer_config=resampler,
            temporal_encoder_config=temporal,
            text_config=text,
            num_frames=check.integer(video, "video_config", "num_frames", 1, MAX_FRAMES, default=8),
            image_mean=check.numbers(video, "video_config", "image_mean", channels, (0.5,) * channels),
            image_std=check.numbers(video, "video_config", "image_std", channels, (0.5,) * channels, positive=True),
            additional_vocab_start=additional_start,
            num_additional_tokens=num_additional,
            special_token_ids=_special_ids(check, raw, additional_start + num_additional),
            system_prompt=check.text(raw, "", "system_prompt", default=DEFAULT_SYSTEM),
            prompt_template=check.text(raw, "", "prompt_template", default=DEFAULT_PROMPT_TEMPLATE),
        )
        check_sizes(cfg, check)
        return cfg

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "XGenMMConfig":
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{directory}: no config.json (not a checkpoint directory)")
        return cls.from_dict(read_json(path, "not valid JSON", CONFIG_MAX_BYTES), source=str(path))


def read_json(path: Path, invalid: str, max_bytes: int) -> Any:
    """A small JSON file parsed, or one `CheckpointError` line: too large, unreadable, not UTF-8
    (a binary file), or not JSON (including what Python's parser refuses: nesting too deep for its
    recursion limit, integers of more than 4300 digits). `invalid` starts the message."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CheckpointError(f"{path}: {size:,} bytes; a {path.name} is expected to be under {max_bytes:,}")
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: {invalid} (not UTF-8 text)") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc).split(":")[0]
        raise CheckpointError(f"{path}: {invalid} ({detail or 'nested too deeply'})") from None


def _tower(check: ConfigCheck, raw: dict[str, Any], key: str) -> dict[str, Any]:
    """Explicit fields win; a config naming only a hub id (or, as the released files do, only the
    section's model_type) gets that tower's sizes from `KNOWN_TOWERS`."""
    section = check.section(raw, "", key)
    name = section.get("model_name", _ABSENT)
    if name is not _ABSENT and not isinstance(name, str):
        check.fail(f"{key}.model_name", "a hub id string", name)
    if name is _ABSENT:
        model_type = section.get("model_type")
        name = RELEASED_DEFAULT_TOWERS.get(model_type, "") if isinstance(model_type, str) else ""
    out = dict(KNOWN_TOWERS.get(name, {}))
    out.update(section)
    if "hidden_size" not in out:
        known = f"explicit sizes or a model_name among {', '.join(KNOWN_TOWERS)}"
        if name:
            check.fail(f"{key}.model_name", known, name)
        check.fail(f"{key}.hidden_size", known)
    check.dtypes(out, key)
    return out


def _vision_tower(check: ConfigCheck, raw: dict[str, Any]) -> dict[str, Any]:
    v = _tower(check, raw, "vision_encoder_config")
    p = "vision_encoder_config"
    for key, hi in (("hidden_size", MAX_WIDTH), ("intermediate_size", MAX_FF_WIDTH),
                    ("num_hidden_layers", MAX_LAYERS), ("num_attention_heads", MAX_HEADS),
                    ("image_size", MAX_IMAGE_SIZE), ("patch_size", MAX_IMAGE_SIZE)):
        check.integer(v, p, key, 1, hi)
    check.integer(v, p, "num_channels", 3, 3, default=3)  # frames are decoded to RGB
    v.setdefault("num_channels", 3)
    check.number(v, p, "layer_norm_eps", 0.0, 1.0, default=1e-6)
    _activation(check, v, p, default="gelu_pytorch_tanh")
    check.boolean(v, p, "vision_use_head")
    return v


def _text_tower(check: ConfigCheck, raw: dict[str, Any]) -> dict[str, Any]:
    t = _tower(check, raw, "text_config")
    p = "text_config"
    for key, hi in (("vocab_size", MAX_VOCAB), ("hidden_size", MAX_WIDTH), ("intermediate_size", MAX_FF_WIDTH),
                    ("num_hidden_layers", MAX_LAYERS), ("num_attention_heads", MAX_HEADS),
                    ("max_position_embeddings", MAX_CONTEXT)):
        check.integer(t, p, key, 1, hi)
    check.integer(t, p, "num_key_value_heads", 1, MAX_HEADS, default=None, nullable=True)
    check.integer(t, p, "original_max_position_embeddings", 1, MAX_CONTEXT, default=None, nullable=True)
    check.integer(t, p, "sliding_window", 1, MAX_CONTEXT, default=None, nullable=True)
    check.number(t, p, "rope_theta", 0.0, 1e12, default=10000.0)
    check.number(t, p, "rms_norm_eps", 0.0, 1.0, default=1e-5)
    _activation(check, t, p, default="silu")
    check.boolean(t, p, "tie_word_embeddings")
    vocab = t["vocab_size"]
    for key in ("bos_token_id", "pad_token_id"):
        check.integer(t, p, key, 0, vocab - 1, default=None, nullable=True)
    eos = t.get("eos_token_id")
    if isinstance(eos, list):  # transformers allows several end ids
        for i in range(len(eos)):
            check.integer({str(i): eos[i]}, f"{p}.eos_token_id", str(i), 0, vocab - 1)
    else:
        check.integer(t, p, "eos_token_id", 0, vocab - 1, default=None, nullable=True)
    return t


def _activation(check: ConfigCheck, section: dict[str, Any], prefix: str, default: str) -> None:
    try:  # transformers is absent in the torch-free runtime install, which never builds a model
        from transformers.activations import ACT2FN
    except ImportError:
        check.text(section, prefix, "hidden_act", default=default)
        return
    value = section.get("hidden_act", default)
    if not isinstance(value, str) or value not in ACT2FN:
        check.fail(_join(prefix, "hidden_act"), f"a transformers activation name such as {default!r}", value)


def _vision_tokenizer(check: ConfigCheck, raw: dict[str, Any]) -> tuple[ResamplerConfig, TemporalConfig]:
    p = "vision_tokenizer_config"
    tok = check.section(raw, "", p)
    resampler = ResamplerConfig(**{
        key: check.integer(tok, p, key, 1, hi, default=getattr(ResamplerConfig, key))
        for key, hi in _RESAMPLER_BOUNDS.items()})
    # The temporal encoder sits inside the tokenizer section (as its module sits inside the
    # resampler); an older layout kept it at the top level as `temporal_encoder_config`.
    if tok.get("temporal_encoder") is not None:
        tp, temporal = f"{p}.temporal_encoder", check.section(tok, p, "temporal_encoder")
    else:
        tp, temporal = "temporal_encoder_config", check.section(raw, "", "temporal_encoder_config", nullable=True)
    kind = check.text(temporal, tp, "type", default=TemporalConfig.type, choices=TEMPORAL_ENCODERS)
    sizes = {key: check.integer(temporal, tp, key, 1, hi, default=getattr(TemporalConfig, key))
             for key, hi in _TEMPORAL_BOUNDS.items()}
    return resampler, TemporalConfig(type=kind, **sizes)


def _special_ids(check: ConfigCheck, raw: dict[str, Any], num_logits: int) -> dict[str, int]:
    """Named special-token ids; absent means the released scheme's ids (`_released_special_ids`)."""
    if "special_token_ids" not in raw:
        ids, defaulted = _released_special_ids(), True
    else:
        ids, defaulted = check.section(raw, "", "special_token_ids"), False
    if len(ids) > MAX_SPECIAL_TOKENS:
        check.fail("special_token_ids", f"at most {MAX_SPECIAL_TOKENS} names", ids)
    for name in REQUIRED_SPECIAL_IDS:
        if name not in ids:
            check.fail(f"special_token_ids.{name}", "the id of that special token")
    for name in ids:
        value = ids[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_logits:
            expected = f"an id in 0..{num_logits - 1} (the model's logits)"
            check.fail(f"special_token_ids.{name}", expected, value, defaulted=defaulted)
    return dict(ids)


def check_sizes(cfg: XGenMMConfig, check: ConfigCheck) -> None:
    """The checks between fields: sizes that must divide or match each other, and what must fit in
    the declared context and the frame budget. Run on every config read from a file or preset."""
    v, t = cfg.vision_encoder_config, cfg.text_config
    r, te = cfg.vision_tokenizer_config, cfg.temporal_encoder_config
    if v["hidden_size"] % v["num_attention_heads"]:
        check.fail("vision_encoder_config.num_attention_heads",
                   f"a divisor of hidden_size {v['hidden_size']}", v["num_attention_heads"])
    if v["patch_size"] > v["image_size"]:
        check.fail("vision_encoder_config.patch_size", f"at most image_size {v['image_size']}", v["patch_size"])
    if cfg.tokens_per_frame_in > MAX_TOKENS_PER_FRAME:
        check.fail("vision_encoder_config.patch_size",
                   f"(image_size // patch_size)^2 of at most {MAX_TOKENS_PER_FRAME} tokens per frame", v["patch_size"])
    if cfg.num_frames * v["image_size"] ** 2 > MAX_CLIP_PIXELS:
        check.fail("video_config.num_frames", f"num_frames x image_size^2 of at most {MAX_CLIP_PIXELS:,} pixels "
                   f"(image_size {v['image_size']})", cfg.num_frames)
    head_dim, rem = divmod(t["hidden_size"], t["num_attention_heads"])
    if rem or head_dim % 2:  # rotary embeddings rotate pairs of channels
        check.fail("text_config.num_attention_heads",
                   f"a divisor of hidden_size {t['hidden_size']} giving an even head size", t["num_attention_heads"])
    kv = t.get("num_key_value_heads") or t["num_attention_heads"]
    if kv > t["num_attention_heads"] or t["num_attention_heads"] % kv:
        check.fail("text_config.num_key_value_heads",
                   f"a divisor of num_attention_heads {t['num_attention_heads']}", kv)
    if r.vis_feature_dim != v["hidden_size"]:
        check.fail("vision_tokenizer_config.vis_feature_dim",
                   f"the vision tower's hidden_size {v['hidden_size']}", r.vis_feature_dim)
    if r.lang_embedding_dim != t["hidden_size"]:
        check.fail("vision_tokenizer_config.lang_embedding_dim",
                   f"the text tower's hidden_size {t['hidden_size']}", r.lang_embedding_dim)
    if te.type in ("gttm", "gttm_tl"):
        prefix = "vision_tokenizer_config.temporal_encoder"
        if te.heads * te.dim_head != r.vis_feature_dim:  # TTM attention has no output projection
            check.fail(f"{prefix}.dim_head", f"heads x dim_head = vis_feature_dim {r.vis_feature_dim} "
                       f"(heads {te.heads})", te.dim_head)
        if r.vis_feature_dim % 2:  # the time embedding interleaves sin/cos channel pairs
            check.fail("vision_tokenizer_config.vis_feature_dim", "an even width for the gttm time embedding",
                       r.vis_feature_dim)
    context = t["max_position_embeddings"]
    if cfg.num_video_tokens >= context:  # the prompt and the answer need positions too
        key, value = {
            "tl": ("vision_tokenizer_config.temporal_encoder.num_tokens", te.num_tokens),
            "gttm_tl": ("vision_tokenizer_config.temporal_encoder.num_tokens", te.num_tokens),
            "none": ("video_config.num_frames", cfg.num_frames),
        }.get(te.type, ("vision_tokenizer_config.num_vis_tokens", r.num_vis_tokens))
        check.fail(key, f"fewer video tokens than the context of {context} positions "
                   f"(temporal encoder {te.type} gives {cfg.num_video_tokens})", value)
    check_prompt_template(cfg.prompt_template, cfg.system_prompt, check)


# ---------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------

def _released_special_ids() -> dict[str, int]:
    names = {"<|endoftext|>": "eos", "<|assistant|>": "assistant", "<|system|>": "system",
             "<|end|>": "end", "<|user|>": "user", "<pad>": "pad", "<image>": "image",
             "<image placeholder>": "image_placeholder", "<|endofchunk|>": "endofchunk"}
    ids = {}
    for i, tok in enumerate(PHI3_SPECIAL_TOKENS + XGENMM_EXTRA_TOKENS):
        if tok in names:
            ids[names[tok]] = 32000 + i
    ids["bos"] = 1
    return ids


def _full(temporal: TemporalConfig, num_frames: int) -> XGenMMConfig:
    vision = dict(KNOWN_TOWERS["google/siglip-so400m-patch14-384"], model_name="google/siglip-so400m-patch14-384")
    text = dict(KNOWN_TOWERS["microsoft/Phi-3-mini-4k-instruct"], model_name="microsoft/Phi-3-mini-4k-instruct")
    return XGenMMConfig(
        vision_encoder_config=vision,
        vision_tokenizer_config=ResamplerConfig(),
        temporal_encoder_config=temporal,
        text_config=text,
        num_frames=num_frames,
        special_token_ids=_released_special_ids(),
    )


def _small(temporal: TemporalConfig, *, vocab_base: int = 96, width: int = 64, text_width: int = 96,
           image_size: int = 32, patch: int = 8, latents: int = 8, frames: int = 4,
           vision_layers: int = 2, text_layers: int = 2, resampler_depth: int = 1) -> XGenMMConfig:
    """A small model of the same architecture. Its tokenizer follows the released scheme: the
    15 special tokens sit right after a `vocab_base`-word vocabulary, so ids are data, not code."""
    special = {}
    names = {"<|endoftext|>": "eos", "<|assistant|>": "assistant", "<|system|>": "system",
             "<|end|>": "end", "<|user|>": "user", "<pad>": "pad", "<image>": "image",
             "<image placeholder>": "image_placeholder", "<|endofchunk|>": "endofchunk"}
    for i, tok in enumerate(PHI3_SPECIAL_TOKENS + XGENMM_EXTRA_TOKENS):
        if tok in names:
            special[names[tok]] = vocab_base + i
    special["bos"] = 1
    additional_start = vocab_base + len(PHI3_SPECIAL_TOKENS)
    vision = dict(hidden_size=width, intermediate_size=width * 4, num_hidden_layers=vision_layers,
                  num_attention_heads=4, patch_size=patch, image_size=image_size, num_channels=3,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True)
    text = dict(vocab_size=-(-additional_start // 16) * 16, hidden_size=text_width,
                intermediate_size=text_width * 2, num_hidden_layers=text_layers, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=512, original_max_position_embeddings=512,
                rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=special["eos"], pad_token_id=special["eos"], sliding_window=None)
    return XGenMMConfig(
        vision_encoder_config=vision,
        vision_tokenizer_config=ResamplerConfig(
            vis_feature_dim=width, lang_embedding_dim=text_width, num_vis_tokens=latents,
            depth=resampler_depth, heads=4, dim_head=width // 4, ff_mult=4),
        temporal_encoder_config=temporal,
        text_config=text,
        num_frames=frames,
        additional_vocab_start=additional_start,
        special_token_ids=special,
    )


def _tiny_temporal(kind: str, m: int = 4, width: int = 64) -> TemporalConfig:
    return TemporalConfig(type=kind, num_tokens=m, memory_size=2, process_layers=1, heads=2,
                          dim_head=width // 2, ff_mult=2, read_tokens=4)


PRESETS: dict[str, Any] = {
    # Released video checkpoints (Salesforce/xgen-mm-vid-phi3-mini-r-v1.5-*). The 32-token one is
    # `tl` or `gttm`+TL(32); docs/MODEL.md says which is not public, `tl` is the default here.
    "xgen-mm-vid-32": lambda: _full(TemporalConfig(type="tl", num_tokens=32), 8),
    "xgen-mm-vid-32-gttm": lambda: _full(TemporalConfig(type="gttm_tl", num_tokens=32), 8),
    "xgen-mm-vid-128": lambda: _full(TemporalConfig(type="gttm", num_tokens=128), 8),
    "xgen-mm-vid-128-16f": lambda: _full(TemporalConfig(type="gttm", num_tokens=128), 16),
    # The image model (xgen-mm-phi3-mini-base-r-v1.5) with per-frame tokens kept: no temporal encoder.
    "xgen-mm-image": lambda: _full(TemporalConfig(type="none"), 1),
    # Small models of the same architecture, for tests.
    **{f"tiny-{k.replace('_', '-')}": (lambda k=k: _small(_tiny_temporal(k))) for k in TEMPORAL_ENCODERS},
}


def register_preset(name: str, factory: Any) -> None:
    PRESETS[name] = factory


def preset(name: str) -> XGenMMConfig:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[name]()
    cfg.temporal_encoder_config.validate()
    XGenMMConfig.from_dict(cfg.to_dict(), source=f"preset {name}")  # the file checks hold for presets too
    return cfg
