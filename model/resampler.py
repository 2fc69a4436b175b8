"""Perceiver resampler (`vlm.vision_tokenizer`): 729 SigLIP tokens per frame -> 128 latents.

Follows open_flamingo's PerceiverResampler as used by xGen-MM (docs/MODEL.md): each frame resampled
independently; keys/values over `[media; latents]`; bias-free projections; the temporal encoder
is a child module so its keys read `vision_tokenizer.temporal_encoder.*`; then `norm` + `projection`.
"""

from __future__ import annotations

import torch
from torch import nn

from blip3v.model.config import ResamplerConfig, TemporalConfig
from blip3v.model.temporal import TemporalEncoder, feed_forward


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        b, n_lat, _ = latents.shape  # x (B', N_in, D), latents (B', N, D)
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)  # keys over N_in + N
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B', H, S, dh)
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)  # (B', H, N, N_in + N)
        out = (attn @ v).transpose(1, 2).reshape(b, n_lat, -1)  # (B', N, H*dh)
        return self.to_out(out)


class VisionTokenizer(nn.Module):
    """Resampler + temporal encoder + norm + projection: (B, T, N_in, D) -> (B, M, D_lm)."""

    def __init__(self, cfg: ResamplerConfig, temporal: TemporalConfig):
        super().__init__()
        dim = cfg.vis_feature_dim
        self.latents = nn.Parameter(torch.randn(cfg.num_vis_tokens, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, cfg.heads, cfg.dim_head), feed_forward(dim, cfg.ff_mult)])
            for _ in range(cfg.depth)
        )
        self.temporal_encoder = TemporalEncoder(dim, cfg.num_vis_tokens, temporal)
        self.norm = nn.LayerNorm(dim)
        self.projection = nn.Linear(dim, cfg.lang_embedding_dim)

    def resample(self, features: torch.Tensor) -> torch.Tensor:
        """Per-frame resampling. features (B, T, N_in, D) -> latents (B, T, N, D)."""
        b, t, n_in, d = features.shape
        x = features.reshape(b * t, n_in, d)  # (B*T, N_in, D)
        latents = self.latents.expand(b * t, -1, -1)  # (B*T, N, D)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return latents.view(b, t, -1, d)  # (B, T, N, D)

    def tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """Resampled frames (B, T, N, D) -> video tokens (B, M, D_lm): temporal encoder, norm, projection."""
        return self.projection(self.norm(self.temporal_encoder(latents)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.resample(features))
