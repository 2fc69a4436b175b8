"""The xGen-MM-Vid (BLIP-3-Video) reference model in PyTorch.

    pixel_values (B, T, 3, S, S) -> SigLIP (B*T, N_in, D) -> resampler (B, T, N, D)
    -> temporal encoder (B, M, D) -> norm + projection (B, M, D_lm) -> spliced at `<image>`
    -> Phi-3 decoder -> 32012 + 3 logits.

Module names mirror the released checkpoint (`vlm.vision_encoder`, `vlm.vision_tokenizer`,
`vlm.lang_model`), so `state_dict()` keys are the released keys (docs/MODEL.md). The KV cache belongs
to the generation engine (`blip3v.model.generate`); the model only reads it.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import Phi3Config, Phi3ForCausalLM, Phi3Model, SiglipVisionConfig, SiglipVisionModel
from transformers.cache_utils import Cache

from blip3v.model.config import XGenMMConfig
from blip3v.model.resampler import VisionTokenizer

# transformers 5.24 renamed the KV-cache argument of Phi3Model.forward from `past_key_values` to
# `cache` (the old name warns on every call and is due to go in 5.40); earlier 5.x know only the old one.
_CACHE_ARG = "cache" if "cache" in inspect.signature(Phi3Model.forward).parameters else "past_key_values"


def cache_kwargs(cache: Cache | None) -> dict[str, Cache]:
    """{the installed transformers' name for the KV-cache argument: cache}, or {} for no cache."""
    return {} if cache is None else {_CACHE_ARG: cache}


class DecoupledEmbedding(nn.Embedding):
    """Phi-3's table plus xGen-MM's extra rows: ids >= `start` read `additional_embedding`."""

    def __init__(self, num_embeddings: int, dim: int, start: int, num_additional: int, padding_idx=None):
        super().__init__(num_embeddings, dim, padding_idx=padding_idx)
        self.start = start
        self.additional_embedding = nn.Embedding(num_additional, dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        extra = input_ids >= self.start
        base = super().forward(torch.where(extra, torch.zeros_like(input_ids), input_ids))
        added = self.additional_embedding((input_ids - self.start).clamp(min=0))
        return torch.where(extra[..., None], added, base)


class DecoupledLinear(nn.Linear):
    """`lm_head` with bias; logits cut to the first `start` columns, then `additional_fc`'s appended."""

    def __init__(self, dim: int, vocab_size: int, start: int, num_additional: int):
        super().__init__(dim, vocab_size, bias=True)
        self.start = start
        self.additional_fc = nn.Linear(dim, num_additional)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        base = nn.functional.linear(hidden, self.weight[: self.start], self.bias[: self.start])
        return torch.cat([base, self.additional_fc(hidden)], dim=-1)  # (..., start + 3)


def phi3_config(cfg: XGenMMConfig, attn_implementation: str = "sdpa") -> Phi3Config:
    text = {k: v for k, v in cfg.text_config.items() if k != "model_name"}
    theta = text.pop("rope_theta", 10000.0)
    text.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": theta})
    conf = Phi3Config(**text)
    conf._attn_implementation = attn_implementation
    return conf


def siglip_config(cfg: XGenMMConfig, attn_implementation: str = "sdpa") -> SiglipVisionConfig:
    conf = SiglipVisionConfig(**{k: v for k, v in cfg.vision_encoder_config.items() if k != "model_name"})
    conf._attn_implementation = attn_implementation
    return conf


class VLM(nn.Module):
    def __init__(self, cfg: XGenMMConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.vision_encoder = SiglipVisionModel(siglip_config(cfg, attn_implementation))
        self.vision_tokenizer = VisionTokenizer(cfg.vision_tokenizer_config, cfg.temporal_encoder_config)
        text = phi3_config(cfg, attn_implementation)
        self.lang_model = Phi3ForCausalLM(text)
        self.lang_model.model.embed_tokens = DecoupledEmbedding(
            text.vocab_size, text.hidden_size, cfg.additional_vocab_start, cfg.num_additional_tokens,
            padding_idx=None,
        )
        self.lang_model.lm_head = DecoupledLinear(
            text.hidden_size, text.vocab_size, cfg.additional_vocab_start, cfg.num_additional_tokens
        )
        # The swapped-in modules miss transformers' post_init; give them Phi-3's own init (normal,
        # std initializer_range). With PyTorch's N(0, 1) embedding default the residual stream dwarfs
        # every block's output and a model trained from scratch only learns the answer prior.
        std = text.initializer_range
        with torch.no_grad():
            for module in (self.lang_model.model.embed_tokens, self.lang_model.model.embed_tokens.additional_embedding,
                           self.lang_model.lm_head, self.lang_model.lm_head.additional_fc):
                if module.weight.device.type != "meta":
                    module.weight.normal_(0.0, std)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()


class XGenMMVideoModel(nn.Module):
    def __init__(self, cfg: XGenMMConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = cfg
        self.vlm = VLM(cfg, attn_implementation)

    # -- the visual path -----------------------------------------------------------------
    def encode_video(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, T, 3, S, S) -> video tokens (B, M, D_lm)."""
        return self.vlm.vision_tokenizer.tokens(self.frame_latents(pixel_values))

    def frame_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, T, 3, S, S) -> each frame's resampler latents (B, T, N, D), before the
        temporal encoder (the training-only layout loss reads them)."""
        b, t = pixel_values.shape[:2]
        frames = pixel_values.flatten(0, 1)  # (B*T, 3, S, S)
        features = self.vlm.vision_encoder(pixel_values=frames).last_hidden_state  # (B*T, N_in, D)
        features = features.view(b, t, features.shape[1], features.shape[2])  # (B, T, N_in, D)
        return self.vlm.vision_tokenizer.resample(features)

    # -- the language side ---------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.vlm.lang_model.model.embed_tokens(input_ids)

    def splice(self, input_ids: torch.Tensor, video_tokens: torch.Tensor) -> torch.Tensor:
        """Embeds `input_ids` (B, S) with the single `<image>` of each row replaced by its
        M video tokens: -> (B, S - 1 + M, D). No start/end markers (docs/MODEL.md)."""
        image_id = self.config.special_token_ids["image"]
        counts = (input_ids == image_id).sum(dim=1)
        if not bool((counts == 1).all()):
            raise ValueError(f"each prompt needs exactly one <image> token; found {counts.tolist()}")
        pos = (input_ids == image_id).int().argmax(dim=1)  # (B,)
        embeds = self.embed_tokens(input_ids)  # (B, S, D)
        rows = [torch.cat([embeds[i, : pos[i]], video_tokens[i], embeds[i, pos[i] + 1:]], dim=0)
                for i in range(input_ids.shape[0])]
        return torch.stack(rows)

    def decoder(self, inputs_embeds: torch.Tensor, cache: Cache | None = None, **kwargs):
        """Phi-3 body (KV `cache` passed in by the caller) -> (logits (B, S, V+3), outputs)."""
        out = self.vlm.lang_model.model(inputs_embeds=inputs_embeds, **cache_kwargs(cache), **kwargs)
        return self.vlm.lang_model.lm_head(out.last_hidden_state), out

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full pass for training/scoring: logits over the spliced sequence (B, S - 1 + M, V+3).
        `attention_mask` (B, S) is over the text ids and is widened across the video tokens."""
        embeds = self.splice(input_ids, self.encode_video(pixel_values))
        mask = None
        if attention_mask is not None:
            mask = self.widen_mask(input_ids, attention_mask)
        logits, _ = self.decoder(embeds, attention_mask=mask, use_cache=False)
        return logits

    def widen_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text mask (B, S) -> spliced mask (B, S - 1 + M): the `<image>` slot becomes M ones."""
        m = self.config.num_video_tokens
        image_id = self.config.special_token_ids["image"]
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            pos = int((ids == image_id).int().argmax())
            rows.append(torch.cat([mask[:pos], mask.new_ones(m), mask[pos + 1:]]))
        return torch.stack(rows)


def count_parameters(model: XGenMMVideoModel) -> dict[str, int]:
    """Parameter counts per part, as `blip3v inspect` reports them."""
    vlm = model.vlm
    temporal = sum(p.numel() for p in vlm.vision_tokenizer.temporal_encoder.parameters())
    tokenizer = sum(p.numel() for p in vlm.vision_tokenizer.parameters()) - temporal
    counts = {
        "vision_encoder": sum(p.numel() for p in vlm.vision_encoder.parameters()),
        "vision_tokenizer": tokenizer,
        "temporal_encoder": temporal,
        "lang_model": sum(p.numel() for p in vlm.lang_model.parameters()),
    }
    counts["total"] = sum(counts.values())
    return counts
