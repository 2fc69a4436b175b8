"""Temporal encoders: (B, T, N, D) per-frame latents -> (B, M, D) video tokens.

Paper: arXiv 2410.16267 sec. 2 (spatio-temporal attentional pooling, grouped TTM). Layouts and
parameter names follow MODEL.md so the released `vlm.vision_tokenizer.temporal_encoder.*` keys load:
`tl` -> `final_output.*`; `gttm` -> `initial_memory`, `pos_emb.inv_freq`, `ttm_unit.*`;
`gttm_tl` -> both. `mean` and `none` are the parameter-free baselines of the paper's ablation.
"""

from __future__ import annotations

import torch
from torch import nn

from blip3v.model.config import TemporalConfig


class TokenLearner(nn.Module):
    """TL(M): soft-selects M tokens out of n. `a = mlp(norm(x))`, softmax over n, `out = a^T x`.

    The weighted sum runs over the un-normalised x (MODEL.md, "Temporal encoders").
    """

    def __init__(self, dim: int, num_tokens: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, 2 * num_tokens, bias=False),
            nn.GELU(),
            nn.Linear(2 * num_tokens, num_tokens, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.mlp(self.norm(x))  # (..., n, M)
        a = a.softmax(dim=-2)  # over the input tokens n, not over M
        return torch.einsum("...nm,...nd->...md", a, x)  # (..., M, D)


class TTMAttention(nn.Module):
    """Pre-LN self-attention of a TTM process block: q/k/v without bias, no output projection."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape  # (B', S, D)
        h = self.norm(x)
        q, k, v = (proj(h).view(b, s, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)  # (B', H, S, S)
        return (attn @ v).transpose(1, 2).reshape(b, s, -1)  # (B', S, H*dh) = (B', S, D)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LN -> Linear -> GELU -> Linear, bias-free; indices 0, 1, 3 match the released keys."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class TTMUnit(nn.Module):
    def __init__(self, dim: int, cfg: TemporalConfig):
        super().__init__()
        self.process_layers = nn.ModuleList(
            nn.ModuleList([TTMAttention(dim, cfg.heads, cfg.dim_head), feed_forward(dim, cfg.ff_mult)])
            for _ in range(cfg.process_layers)
        )
        self.read_layer = TokenLearner(dim, cfg.read_tokens)  # kept for key compatibility; never called
        self.write_layer = TokenLearner(dim, cfg.memory_size)

    def forward(self, memory: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One TTM step for every group at once. memory (G, R, D), x (G, 1, D) -> new memory (G, R, D)."""
        h = torch.cat([memory, x], dim=1)  # (G, R+1, D)
        for attn, ff in self.process_layers:
            h = h + attn(h)
            h = h + ff(h)
        return self.write_layer(torch.cat([memory, h], dim=1))  # TL(R) over (G, 2R+1, D)


class SinusoidalTimeEmbedding(nn.Module):
    """1-D sinusoids over the frame index; channel 2k = sin, 2k+1 = cos (interleaved)."""

    def __init__(self, dim: int):
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (D/2,)
        self.register_buffer("inv_freq", inv_freq)  # persistent: the release stores it

    def forward(self, num_frames: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.arange(num_frames, device=self.inv_freq.device, dtype=torch.float32)
        angles = t[:, None] * self.inv_freq[None, :]  # (T, D/2)
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1).to(dtype)  # (T, D)


class TemporalEncoder(nn.Module):
    """Dispatches on `cfg.type`; parameters live where the released key names put them."""

    def __init__(self, dim: int, num_latents: int, cfg: TemporalConfig):
        super().__init__()
        cfg.validate()
        self.kind = cfg.type
        if cfg.type in ("gttm", "gttm_tl"):
            self.initial_memory = nn.Parameter(torch.randn(num_latents, cfg.memory_size, dim) * 0.02)
            self.pos_emb = SinusoidalTimeEmbedding(dim)
            self.ttm_unit = TTMUnit(dim, cfg)
        if cfg.type in ("tl", "gttm_tl"):
            self.final_output = TokenLearner(dim, cfg.num_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n, d = x.shape  # (B, T, N, D)
        if self.kind == "none":
            return x.reshape(b, t * n, d)  # (B, T*N, D)
        if self.kind == "mean":
            return x.mean(dim=1)  # (B, N, D)
        if self.kind == "tl":
            return self.final_output(x.reshape(b, t * n, d))  # (B, M, D)
        x = x + self.pos_emb(t, x.dtype)[None, :, None, :]
        memory = self.initial_memory.expand(b, -1, -1, -1).reshape(b * n, -1, d)  # (B*N, R, D)
        for step in range(t):  # sequential over time; unrolled in exported graphs (T is fixed)
            memory = self.ttm_unit(memory, x[:, step].reshape(b * n, 1, d))
        out = memory.mean(dim=1).view(b, n, d)  # (B, N, D)
        if self.kind == "gttm_tl":
            out = self.final_output(out)  # (B, M, D)
        return out

