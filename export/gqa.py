"""KV-cached attention of one layer as a torch custom op that exports to com.microsoft GroupQueryAttention.

In PyTorch the op runs `cached_attention` (the same math as the standard-ONNX path of
DecoderGraph); in the exported graph it becomes ONNX Runtime's fused contrib op
(onnxruntime/contrib_ops, "GroupQueryAttention", domain com.microsoft, version 1) with past and
present bound to one buffer, which ORT then updates in place. Only ORT runs that op; engines for
other consumers (TensorRT) are exported with `attention="standard"`.

ORT limits that the runtime respects (see blip3v.runtime.ort_backend): a call with S > 1 new
tokens after a non-empty cache needs batch 1 ("chunked prefill"), so prompts are prefilled from an
empty cache in one call.

Where ORT allows it (head_dim a multiple of 16: its rotary kernel's constraint) the op takes the
packed qkv projection and applies rotary embedding itself (`do_rotary` 1). A layer then has no
Split of qkv and no separate RotaryEmbedding nodes: 3 fewer kernels a layer, which is what a
batch-1 decode step pays for. Its positions are the cache slots, not the runtime's position ids:
ORT 1.32's CPU kernel reads `position_ids` on decode steps but not on the first prompt of a
batch (measured: a left-padded row's prompt keys come out rotated at its slots), so passing them
would rotate a padded row's prompt and its later tokens inconsistently. Slots are consistent, and
RoPE makes attention depend only on the distance between two positions, which is the same
counted in slots or in real tokens of a left-padded row: the logits match the reference, which
uses real-token positions, within float rounding (tests/test_export.py, left-padded batches).
Other head sizes get q, k, v split and rotated by `RotaryEmbedding` (export/ort_ops.py) at the
runtime's positions first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from blip3v.export.ort_ops import apply_rotary


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
def group_query_attention(query: Tensor, key: Tensor | None, value: Tensor | None, past_key: Tensor,
                          past_value: Tensor, seqlens_k: Tensor, total_sequence_length: Tensor,
                          cos_cache: Tensor | None, sin_cache: Tensor | None, position_ids: Tensor | None,
                          attention_bias: Tensor, num_heads: int, kv_num_heads: int, scale: float,
                          local_window_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """GroupQueryAttention's signature. Either query/key/value (B, S, heads*dh) already rotated, or
    packed qkv (B, S, (H + 2 Hkv) dh) in `query` with key/value None and the op's own rotary
    embedding (do_rotary: rotate-half of q and k from the (P, dh/2) cos/sin tables at the cache
    slot of each token; `position_ids` is left out, see the module docstring). BNSH caches,
    additive bias (B, 1, S, L) for padding; causal and the local window are the op's own."""
    b, s, _ = query.shape
    dh = past_key.shape[-1]
    total = attention_bias.shape[-1]
    if key is None or value is None:
        q_size, kv_size = num_heads * dh, kv_num_heads * dh
        query, key, value = query[..., :q_size], query[..., q_size:q_size + kv_size], query[..., q_size + kv_size:]
        if cos_cache is not None and sin_cache is not None:
            # ORT's positions: the cache slots (the first prompt 0..S-1, a later call from seqlens_k)
            slots = (torch.arange(s, device=query.device) + (total - s)).expand(b, s)  # (B, S)
            query = apply_rotary(query, slots, cos_cache, sin_cache, num_heads)
            key = apply_rotary(key, slots, cos_cache, sin_cache, kv_num_heads)
    q = query.reshape(b, s, num_heads, dh).transpose(1, 2)  # (B, H, S, dh)
    k = key.reshape(b, s, kv_num_heads, dh).transpose(1, 2)  # (B, Hkv, S, dh)
    v = value.reshape(b, s, kv_num_heads, dh).transpose(1, 2)
    q_slot = torch.arange(s, device=query.device) + (total - s)
    k_slot = torch.arange(total, device=query.device)
    allowed = k_slot[None, :] <= q_slot[:, None]  # (S, L)
    if local_window_size >= 0:  # ORT keeps the last `local_window_size` keys up to q (checked in tests)
        allowed = allowed & (k_slot[None, :] > q_slot[:, None] - local_window_size)
    allowed = allowed[None, None] & (attention_bias == 0)  # (B, 1, S, L)
    out, present_k, present_v = cached_attention(q, k, v, past_key, past_value, allowed, scale)
    return out.transpose(1, 2).reshape(b, s, num_heads * dh), present_k, present_v


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
      position_ids, attention_bias, num_heads, kv_num_heads, scale, local_window_size):
    b, s, _ = query.shape
    return (query.new_empty((b, s, num_heads * past_key.shape[-1])), torch.empty_like(past_key),
            torch.empty_like(past_value))


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
            ("scale", OpSchema.AttrType.FLOAT), ("local_window_size", OpSchema.AttrType.INT),
            ("do_rotary", OpSchema.AttrType.INT), ("rotary_interleaved", OpSchema.AttrType.INT))],
    )
    return Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", schema)


def translation_table() -> dict:
    """For torch.onnx.export(custom_translation_table=...)."""
    op = _gqa_op()

    def to_onnx(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                position_ids, attention_bias, num_heads: int, kv_num_heads: int, scale: float,
                local_window_size: int):
        rotary = int(key is None and cos_cache is not None)
        return op(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                  position_ids, attention_bias, num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale,
                  local_window_size=local_window_size, do_rotary=rotary, rotary_interleaved=0)

    return {torch.ops.blip3v.group_query_attention.default: to_onnx}
