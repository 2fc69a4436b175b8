"""The two graphs an engine holds, as small wrapper modules whose `forward` is exactly the graph.

    VisualGraph:  pixel_values (B, T, 3, S, S) -> video_tokens (B, M, D)
                  SigLIP + Perceiver resampler + temporal encoder + norm + projection.
    DecoderGraph: inputs_embeds (B, S, D), attention_mask (B, L), position_ids (B, S),
                  past_key.{i} / past_value.{i} (B, Hkv, C, dh)
                  -> logits (B, V+3) of the last position, present_key.{i} / present_value.{i}.

The decoder is Phi-3 written out on explicit K/V tensors with the reference model's own weights
(no transformers cache objects reach the exporter). Its KV cache is a fixed-capacity buffer per
layer and per K/V, (B, Hkv, C, dh): the S new keys/values go to slots [L - S, L), where L is the
attention mask's width, and attention reads slots [0, L). The runtime binds the same OrtValue as
`past_key.{i}` and `present_key.{i}`, so each buffer is allocated once per batch and written in
place; nothing is reallocated or copied whole between steps. One graph serves prefill (S = prompt)
and decode (S = 1): both are the same computation, with no `If` on "has past".

Two ways to write that step, same inputs/outputs (chosen at export, recorded in the manifest):
  "gqa" (default)  com.microsoft GroupQueryAttention per layer, past and present sharing the
                   buffer: ORT's fused kernel writes the new slots and attends without copies.
  "standard"       ScatterElements into the buffer, Slice [0, L), MatMul/Softmax: plain ONNX, for
                   TensorRT and other consumers that lack ORT's contrib ops.
Why "gqa" won (`python -m blip3v.export.bench_kv`, onnxruntime 1.32 CPU, 1 thread, shared 2-core
box, best of 3): ms/token at cached length 128 / 1024 / 3072 for a 4-layer decoder of 8 heads x 96
  gqa 4.6 / 5.3 / 7.3    standard 4.7 / 6.6 / 11.2    standard, 4096-slot buffer 4.8 / 6.4 / 12.9
  standard without shared buffers 5.2 / 8.6 / 18.5    concat cache (optimum's layout) 4.9 / 7.2 / 15.5
and one layer of the released size (32 heads x 96) alone: gqa 0.11 / 1.3 / 2.5 ms, standard
0.45 / 2.3 / 12.0 ms. The standard graph pays for the Slice copy and a strided MatMul over K;
the fixed buffer itself costs nothing extra (4096 slots ~ the exact size), while reallocating
(concat) or not sharing the buffer grows with the context.

Logits: only the last position's (B, V+3), in prefill and decode alike. Generation needs no more,
and a full (B, S, V+3) prefill output would cost S x V x D multiply-adds for nothing (20 GFLOP for
a 200-token prompt of the released model). Rows are left-padded, so the last position is real.
"""

from __future__ import annotations

import torch
from torch import nn

from blip3v.export.gqa import cached_attention, group_query_attention
from blip3v.export.ort_ops import rms_norm, rotary_embedding, rotate_half, skip_rms_norm
from blip3v.model.xgenmm import XGenMMVideoModel


class VisualGraph(nn.Module):
    """pixel_values (B, T, 3, S, S) -> video_tokens (B, M, D_lm): the whole visual path."""

    def __init__(self, model: XGenMMVideoModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_video(pixel_values)


ATTENTION = ("gqa", "standard")


class DecoderGraph(nn.Module):
    """Phi-3 + DecoupledLinear head on explicit fixed-capacity KV buffers (see module docstring).

    Follows transformers' Phi3Attention/Phi3DecoderLayer (models/phi3/modeling_phi3.py): fused
    qkv_proj, rotate-half RoPE from `position_ids`, softmax in float32, the sliding-window overlay
    `kv > q - window` of masking_utils over cache slots.
    `attention`: "gqa" exports each layer's cache update + attention as com.microsoft
    GroupQueryAttention (ONNX Runtime only), with RMSNorm, the residual adds and RoPE as ORT's fused
    kernels (export/ort_ops.py); "standard" as ScatterElements + Slice + MatMul/Softmax and plain
    ONNX arithmetic (any ONNX consumer). Inputs, outputs and the buffer contract are the same.
    """

    def __init__(self, model: XGenMMVideoModel, attention: str = "gqa"):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        lm = model.vlm.lang_model
        conf = lm.config
        self.attention = attention
        self.layers = lm.model.layers
        self.norm = lm.model.norm
        self.lm_head = lm.lm_head
        self.num_heads = int(conf.num_attention_heads)
        self.num_kv_heads = int(conf.num_key_value_heads)
        self.head_dim = int(getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads)
        self.sliding_window = getattr(conf, "sliding_window", None)
        rotary = lm.model.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scaling = float(rotary.attention_scaling)
        self.epsilon = float(conf.rms_norm_eps)
        if attention == "gqa":  # GroupQueryAttention's rotary tables: every position the context allows
            angles = torch.arange(int(conf.max_position_embeddings)).float()[:, None] * self.inv_freq  # (P, dh/2)
            self.register_buffer("cos_cache", angles.cos() * self.rope_scaling, persistent=False)
            self.register_buffer("sin_cache", angles.sin() * self.rope_scaling, persistent=False)

    cached_attention = staticmethod(cached_attention)  # the "standard" cache + attention step

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """inputs_embeds (B, S, D); attention_mask (B, L) over the slots in use once this call's S
        tokens are written (1 = real token, 0 = padding), so they go to slots [L - S, L);
        position_ids (B, S) RoPE positions; past (B, Hkv, C, dh) per layer, K then V, C >= L."""
        b, s, _ = inputs_embeds.shape  # (B, S, D)
        dtype = inputs_embeds.dtype
        total = attention_mask.shape[1]  # L

        if self.attention == "gqa":
            # GQA masks causally (and by window) itself; padding comes in as an additive bias.
            bias = torch.where(attention_mask.bool(), 0.0, torch.finfo(dtype).min).to(dtype)
            bias = bias[:, None, None, :].expand(b, 1, s, total)  # (B, 1, S, L)
            seqlens_k = torch.full((b,), total - 1, dtype=torch.int32)  # ORT: total length - 1 per row
            total_len = torch.full((), total, dtype=torch.int32)
            window = self.sliding_window or -1  # GQA keeps keys (q - w, q], as transformers does
            return self._fused_layers(inputs_embeds, position_ids, past, bias, seqlens_k, total_len, window)

        freqs = position_ids[..., None].float() * self.inv_freq  # (B, S, dh/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (B, S, dh)
        cos = (emb.cos() * self.rope_scaling).to(dtype)[:, None]  # (B, 1, S, dh)
        sin = (emb.sin() * self.rope_scaling).to(dtype)[:, None]
        q_slot = torch.arange(s, device=inputs_embeds.device) + (total - s)  # (S,)
        k_slot = torch.arange(total, device=inputs_embeds.device)  # (L,)
        allowed = k_slot[None, :] <= q_slot[:, None]  # (S, L) causal over slots
        if self.sliding_window is not None:
            allowed = allowed & (k_slot[None, :] > q_slot[:, None] - self.sliding_window)
        allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, S, L)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        hidden = inputs_embeds
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            qkv = attn.qkv_proj(layer.input_layernorm(hidden))  # (B, S, (H + 2 Hkv) dh)
            q = qkv[..., :q_size].reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, dh)
            k = qkv[..., q_size:q_size + kv_size].reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = qkv[..., q_size + kv_size:].reshape(b, s, self.num_kv_heads, self.head_dim)  # (B, S, Hkv, dh)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            out, k_cache, v_cache = self.cached_attention(q, k, v.transpose(1, 2), past[2 * i],
                                                          past[2 * i + 1], allowed, float(attn.scaling))
            out = out.transpose(1, 2).reshape(b, s, q_size)  # (B, S, H*dh)
            presents += [k_cache, v_cache]
            hidden = residual + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

        last = self.norm(hidden[:, -1])  # (B, D)
        return (self.lm_head(last), *presents)  # logits (B, V+3)

    def _fused_layers(self, inputs_embeds, position_ids, past, bias, seqlens_k, total_len, window):
        """The "gqa" body: per layer norm -> qkv -> GQA (RoPE inside, or before it for head sizes
        ORT's rotary does not take) -> o_proj -> add + norm -> MLP, where each residual add rides in
        the next SkipSimplifiedLayerNormalization."""
        dtype = inputs_embeds.dtype
        cos, sin = self.cos_cache.to(dtype), self.sin_cache.to(dtype)
        hidden = inputs_embeds  # the residual stream
        normed = rms_norm(hidden, self.layers[0].input_layernorm.weight, self.epsilon)
        presents: list[torch.Tensor] = []
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv = attn.qkv_proj(normed)  # (B, S, (H + 2 Hkv) dh)
            if self.head_dim % 16 == 0:  # packed, RoPE inside the op (ORT's rotary: head_dim % 16 == 0)
                q, k, v, tables = qkv, None, None, (cos, sin, None)  # slot positions: export/gqa.py
            else:
                q = rotary_embedding(qkv[..., :q_size], position_ids, cos, sin, self.num_heads)
                k = rotary_embedding(qkv[..., q_size:q_size + kv_size], position_ids, cos, sin, self.num_kv_heads)
                v, tables = qkv[..., q_size + kv_size:], (None, None, None)
            out, k_cache, v_cache = group_query_attention(
                q, k, v, past[2 * i], past[2 * i + 1], seqlens_k, total_len, *tables, bias, self.num_heads,
                self.num_kv_heads, float(attn.scaling), window)  # out (B, S, H*dh)
            presents += [k_cache, v_cache]
            normed, hidden = skip_rms_norm(attn.o_proj(out), hidden, layer.post_attention_layernorm.weight,
                                           self.epsilon)
            mlp = layer.mlp(normed)
            if i + 1 < len(self.layers):
                normed, hidden = skip_rms_norm(mlp, hidden, self.layers[i + 1].input_layernorm.weight, self.epsilon)
        last = rms_norm(hidden[:, -1] + mlp[:, -1], self.norm.weight, self.epsilon)  # (B, D)
        return (self.lm_head(last), *presents)  # logits (B, V+3)
