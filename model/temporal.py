"""Temporal encoders: (B, T, N, D) per-frame latents -> (B, M, D) video tokens.

Paper: arXiv 2410.16267 sec. 2 (spatio-temporal attentional pooling, grouped TTM). Layouts and
parameter names follow docs/MODEL.md so the released `vlm.vision_tokenizer.temporal_encoder.*` keys load:
`tl` -> `final_output.*`; `gttm` -> `initial_memory`, `pos_emb.inv_freq`, `ttm_unit.*`;
`gttm_tl` -> both. `mean` and `none` are the parameter-free baselines of the paper's ablation.

The gTTM is already batched over its groups: one `TTMUnit` call per frame runs every token slot of
every clip (B*N groups of R+1 tokens) through each process block at once; only the frames are
sequential (each step reads the memory the previous one wrote). Beside that reference math, an
inference path (`TemporalEncoder.path`: "reference", "fast", or "auto" = fast on CUDA outside
autograd and export) runs the same step with q/k/v fused into one matmul, attention through
`scaled_dot_product_attention` (flash kernels on GPU) and the TokenLearner's softmax + weighted
sum fused (blip3v.kernels.token_learner). It adds no parameters or buffers: the checkpoint keys
and the exported graphs are the reference's. tests/test_gpu_paths.py holds it to the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from blip3v.model.config import TemporalConfig


class TokenLearner(nn.Module):
    """TL(M): soft-selects M tokens out of n. `a = mlp(norm(x))`, softmax over n, `out = a^T x`.

    The weighted sum runs over the un-normalised x (docs/MODEL.md, "Temporal encoders").
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

    def fast_step(self, kernels: str = "auto") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """`forward`'s math for inference: q/k/v as one matmul, SDPA, the write layer's softmax +
        weighted sum as one kernel (`kernels`: the dispatcher's backend, "auto" = Triton on CUDA).
        The fused q/k/v weights are concatenated here, once per clip rather than once per frame,
        and held by the returned step only (nothing is registered, nothing goes stale)."""
        from blip3v.kernels.token_learner import token_learner

        blocks = [(attn, torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]), ff)  # (3*H*dh, D)
                  for attn, ff in self.process_layers]
        write = self.write_layer

        def step(memory: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            h = torch.cat([memory, x], dim=1)  # (G, R+1, D)
            g, s, _ = h.shape
            for attn, qkv_weight, ff in blocks:
                qkv = F.linear(attn.norm(h), qkv_weight).view(g, s, 3, attn.heads, -1)  # (G, S, 3, H, dh)
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (G, H, S, dh)
                out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (G, H, S, dh)
                h = h + out.transpose(1, 2).reshape(g, s, -1)  # (G, S, H*dh)
                h = h + ff(h)
            return token_learner(write, torch.cat([memory, h], dim=1), kernels)  # (G, R, D)

        return step


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


PATHS = ("auto", "reference", "fast")


class TemporalEncoder(nn.Module):
    """Dispatches on `cfg.type`; parameters live where the released key names put them.

    `path` picks the gTTM's implementation (module docstring); `kernels` the fast path's kernel
    backend ("auto" | "triton" | "torch"). Plain attributes, not part of the state dict."""

    path = "auto"
    kernels = "auto"

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
        fast = self.uses_fast_path(x)
        unit = self.ttm_unit.fast_step(self.kernels) if fast else self.ttm_unit
        x = x + self.pos_emb(t, x.dtype)[None, :, None, :]
        memory = self.initial_memory.expand(b, -1, -1, -1).reshape(b * n, -1, d)  # (B*N, R, D)
        for step in range(t):  # sequential over time; unrolled in exported graphs (T is fixed)
            memory = unit(memory, x[:, step].reshape(b * n, 1, d))
        out = memory.mean(dim=1).view(b, n, d)  # (B, N, D)
        if self.kind == "gttm_tl":
            if fast:
                from blip3v.kernels.token_learner import token_learner

                return token_learner(self.final_output, out, self.kernels)  # (B, M, D)
            out = self.final_output(out)  # (B, M, D)
        return out

    def uses_fast_path(self, x: torch.Tensor) -> bool:
        """Whether forward(x) runs the fast gTTM: `path` "fast" / "reference" say so; "auto" takes
        it on CUDA for inference only (its fused kernel has no backward, and an export or trace
        records the reference graph)."""
        if self.path not in PATHS:
            raise ValueError(f"TemporalEncoder.path must be one of {PATHS}, got {self.path!r}")
        if self.path != "auto":
            return self.path == "fast"
        exporting = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_exporting()
        return x.is_cuda and not torch.is_grad_enabled() and not exporting

