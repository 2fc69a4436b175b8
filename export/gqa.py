"""KV-cached attention of one layer as a torch custom op that exports to com.microsoft GroupQueryAttention.

In PyTorch the op runs `cached_attention` (the same math as the standard-ONNX path of
DecoderGraph); in the exported graph it becomes ONNX Runtime's fused contrib op
(onnxruntime/contrib_ops, "GroupQueryAttention", domain com.microsoft, version 1) with past and
present bound to one buffer, which ORT then updates in place. Only ORT runs that op; engines for
other consumers (TensorRT) are exported with `attention="standard"`.

ORT limits that the runtime respects (see blip3v.runtime.ort_backend): a call with S > 1 new
tokens after a non-empty cache needs batch 1 ("chunked prefill"), so prompts are prefilled from an
empty cache in one call; rotary embedding is applied outside the op (`do_rotary` 0), from the
runtime's position ids, exactly as the reference does.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cached_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, allowed: Tensor,
                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, H, S, dh), k/v (B, Hkv, S, dh) after RoPE; past (B, Hkv, C, dh); allowed (B, 1, S, L) bool.
    Writes k/v at the last S of slots [0, L) and attends over [0, L) -> (out (B, H, S, dh), present k, v)."""
    b, kv_heads, s, dh = k.shape
    total = allowed.shape[-1]  # L
    slots = torch.arange(s, device=q.device) + (total - s)  # (S,)
    write_at = slots.view(1, 1, s, 1).expand(b, kv_heads, s, dh)  # (B, Hkv, S, dh)
    present_k = past_k.scatter(2, write_at, k)  # ScatterElements: in place under IO binding
    present_v = past_v.scatter(2, write_at, v)
    keys, values = present_k[:, :, :total], present_v[:, :, :total]  # (B, Hkv, L, dh)
    groups = q.shape[1] // kv_heads
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)  # (B, H, L, dh)
        values = values.repeat_interleave(groups, dim=1)
    scores = (q @ keys.transpose(-1, -2)).float() * scale  # (B, H, S, L), softmax in float32 as Phi-3 does
    # The dtype's min, not -inf: a fully padded query row stays finite (as transformers' sdpa masks do).
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    out = scores.softmax(dim=-1).to(q.dtype) @ values  # (B, H, S, dh)
    return out, present_k, present_v


@torch.library.custom_op("blip3v::group_query_attention", mutates_args=())
def group_query_attention(query: Tensor, key: Tensor, value: Tensor, past_key: Tensor, past_value: Tensor,
                          seqlens_k: Tensor, total_sequence_length: Tensor, attention_bias: Tensor,
                          num_heads: int, kv_num_heads: int, scale: float,
                          local_window_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """GroupQueryAttention's signature (query/key/value (B, S, heads*dh), BNSH caches, additive bias
    (B, 1, S, L) for padding; causal and the local window are the op's own)."""
    b, s, _ = query.shape
    dh = past_key.shape[-1]
    total = attention_bias.shape[-1]
    q = query.view(b, s, num_heads, dh).transpose(1, 2)  # (B, H, S, dh)
    k = key.view(b, s, kv_num_heads, dh).transpose(1, 2)  # (B, Hkv, S, dh)
    v = value.view(b, s, kv_num_heads, dh).transpose(1, 2)
    q_slot = torch.arange(s, device=query.device) + (total - s)
    k_slot = torch.arange(total, device=query.device)
    allowed = k_slot[None, :] <= q_slot[:, None]  # (S, L)
    if local_window_size >= 0:  # ORT keeps the last `local_window_size` keys up to q (checked in tests)
        allowed = allowed & (k_slot[None, :] > q_slot[:, None] - local_window_size)
    allowed = allowed[None, None] & (attention_bias == 0)  # (B, 1, S, L)
    out, present_k, present_v = cached_attention(q, k, v, past_key, past_value, allowed, scale)
    return out.transpose(1, 2).reshape(b, s, num_heads * dh), present_k, present_v


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, attention_bias, num_heads,
      kv_num_heads, scale, local_window_size):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def _gqa_op():
    """An onnxscript Op for com.microsoft::GroupQueryAttention: onnx's registry has no ORT contrib
    schemas, so the subset used here is declared (input order as in ORT's contrib_defs)."""
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript.values import Op

    def param(name: str, type_str: str, optional: bool = False) -> OpSchema.FormalParameter:
        option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
        return OpSchema.FormalParameter(name, type_str, "", param_option=option)

    schema = OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param("query", "T"), param("key", "T", True), param("value", "T", True),
                param("past_key", "T", True), param("past_value", "T", True), param("seqlens_k", "M"),
                param("total_sequence_length", "M"), param("cos_cache", "T", True), param("sin_cache", "T", True),
                param("position_ids", "P", True), param("attention_bias", "T", True)],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], ""),
                          ("P", ["tensor(int64)"], "")],
        attributes=[OpSchema.Attribute(n, t, "") for n, t in (
            ("num_heads", OpSchema.AttrType.INT), ("kv_num_heads", OpSchema.AttrType.INT),
            ("scale", OpSchema.AttrType.FLOAT), ("local_window_size", OpSchema.AttrType.INT))],
    )
    return Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", schema)


def translation_table() -> dict:
    """For torch.onnx.export(custom_translation_table=...)."""
    op = _gqa_op()

    def to_onnx(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, attention_bias,
                num_heads: int, kv_num_heads: int, scale: float, local_window_size: int):
        return op(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, None, None, None,
                  attention_bias, num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale,
                  local_window_size=local_window_size)

    return {torch.ops.blip3v.group_query_attention.default: to_onnx}
