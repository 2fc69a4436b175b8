"""Model configuration: the `config.json` of an xGen-MM-Vid checkpoint, and the named presets.

The config is saved inside every checkpoint and the model is rebuilt from it, never from a file
name. It keeps the released top-level layout (`model_type` "xgenmm", `vision_encoder_config`,
`vision_tokenizer_config`, `text_config`; see ../shared/MODEL.md) and adds the fields the
released files leave to code: the temporal encoder, frame count, preprocessing and token ids.

Released configs name their towers by hub id (e.g. `google/siglip-so400m-patch14-384`) instead
of listing sizes; `KNOWN_TOWERS` fills those in, so a released config.json loads as it is.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blip3v.errors import CheckpointError, InputError

TEMPORAL_ENCODERS = ("tl", "gttm", "gttm_tl", "mean", "none")

# The Phi-3 chat prompt of the released model (MODEL.md, "Prompt and generation").
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


@dataclass
class XGenMMConfig:
    vision_encoder_config: dict[str, Any]
    vision_tokenizer_config: ResamplerConfig
    temporal_encoder_config: TemporalConfig
    text_config: dict[str, Any]
    num_frames: int = 8
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # First id served by `additional_embedding` / `additional_fc` (MODEL.md: 32012 in the release).
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
    def from_dict(cls, raw: dict[str, Any]) -> "XGenMMConfig":
        if raw.get("model_type") != "xgenmm":
            raise CheckpointError(f"config model_type is {raw.get('model_type')!r}, expected 'xgenmm'")
        vision = _fill_known(raw.get("vision_encoder_config", {}), "vision_encoder_config")
        text = _fill_known(raw.get("text_config", {}), "text_config")
        tok = dict(raw.get("vision_tokenizer_config", {}))
        temporal = dict(tok.pop("temporal_encoder", None) or raw.get("temporal_encoder_config") or {})
        resampler_fields = {k: tok[k] for k in ResamplerConfig.__dataclass_fields__ if k in tok}
        temporal_fields = {k: temporal[k] for k in TemporalConfig.__dataclass_fields__ if k in temporal}
        video = raw.get("video_config", {})
        cfg = cls(
            vision_encoder_config=vision,
            vision_tokenizer_config=ResamplerConfig(**resampler_fields),
            temporal_encoder_config=TemporalConfig(**temporal_fields),
            text_config=text,
            num_frames=int(video.get("num_frames", 8)),
            image_mean=tuple(video.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(video.get("image_std", (0.5, 0.5, 0.5))),
            additional_vocab_start=int(raw.get("additional_vocab_start", 32012)),
            num_additional_tokens=int(raw.get("num_additional_tokens", 3)),
            special_token_ids={k: int(v) for k, v in raw.get("special_token_ids", {}).items()},
            system_prompt=raw.get("system_prompt", DEFAULT_SYSTEM),
            prompt_template=raw.get("prompt_template", DEFAULT_PROMPT_TEMPLATE),
        )
        cfg.temporal_encoder_config.validate()
        return cfg

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "XGenMMConfig":
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{directory}: no config.json (not a checkpoint directory)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
        return cls.from_dict(raw)


def _fill_known(section: dict[str, Any], name: str) -> dict[str, Any]:
    """Explicit fields win; a released config naming only a hub id gets that tower's sizes."""
    out = dict(KNOWN_TOWERS.get(section.get("model_name", ""), {}))
    out.update({k: v for k, v in section.items()})
    if "hidden_size" not in out:
        raise CheckpointError(
            f"config {name} has no sizes and names no known tower ({section.get('model_name')!r})"
        )
    return out


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
    # `tl` or `gttm`+TL(32); MODEL.md says which is not public, `tl` is the default here.
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
    return cfg
