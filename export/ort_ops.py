"""RMSNorm, residual add + RMSNorm and rotary embedding as torch custom ops that export to ONNX
Runtime's fused kernels, for the decoder's `attention="gqa"` graph (already ONNX Runtime-only).

Why: at batch 1 a decode step runs each op on one token, so its cost is the number of kernels
launched, not the arithmetic. Exported from their PyTorch modules, Phi-3's RMSNorm is six ONNX
nodes (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul) and rotate-half RoPE about a dozen per layer;
ONNX Runtime 1.32's graph optimizer fuses none of them (the exporter writes rsqrt as
Sqrt + Reciprocal, which its SimplifiedLayerNormFusion does not match). Written as
`SimplifiedLayerNormalization`, `com.microsoft.SkipSimplifiedLayerNormalization` (the residual add
folded into the next norm) and rotary inside GroupQueryAttention (or `com.microsoft.RotaryEmbedding`
where GQA's rotary does not take the head size), a Phi-3 layer is about 10 nodes after ORT's own
optimizer instead of about 50. Left-padded batches stay exact either way: RotaryEmbedding reads the
runtime's `position_ids`, GroupQueryAttention rotates at cache slots (export/gqa.py says why that is
exact).

In PyTorch each op runs the reference math (transformers' Phi3RMSNorm: float32 statistics, weight
applied in the input dtype; rotate-half RoPE from a cos/sin table indexed by position), so the
export check compares the fused graph against the unfused model.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    """Phi-3's RoPE pairing: (x1, x2) halves of the last axis -> (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rms(x: Tensor, weight: Tensor, epsilon: float) -> Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + epsilon)
    return weight * x32.to(x.dtype)


@torch.library.custom_op("blip3v::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, epsilon: float) -> Tensor:
    """x (..., D), weight (D,) -> Phi3RMSNorm(x)."""
    return _rms(x, weight, epsilon)


@rms_norm.register_fake
def _(x, weight, epsilon):
    return torch.empty_like(x)


@torch.library.custom_op("blip3v::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: Tensor, skip: Tensor, weight: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """-> (Phi3RMSNorm(x + skip), x + skip): the residual add and the next layer's norm in one op."""
    total = x + skip
    return _rms(total, weight, epsilon), total


@skip_rms_norm.register_fake
def _(x, skip, weight, epsilon):
    return torch.empty_like(x), torch.empty_like(x)


def apply_rotary(x: Tensor, position_ids: Tensor, cos_cache: Tensor, sin_cache: Tensor, num_heads: int) -> Tensor:
    """x (B, S, H*dh), position_ids (B, S) int64, caches (P, dh/2) -> rotate-half RoPE of every head
    (also what GroupQueryAttention's `do_rotary` computes from the same tables: export/gqa.py)."""
    b, s, _ = x.shape
    cos = cos_cache[position_ids]  # (B, S, dh/2)
    sin = sin_cache[position_ids]
    cos = torch.cat([cos, cos], dim=-1)[:, :, None]  # (B, S, 1, dh)
    sin = torch.cat([sin, sin], dim=-1)[:, :, None]
    heads = x.view(b, s, num_heads, -1)  # (B, S, H, dh)
    return (heads * cos + rotate_half(heads) * sin).reshape(b, s, -1)


@torch.library.custom_op("blip3v::rotary_embedding", mutates_args=())
def rotary_embedding(x: Tensor, position_ids: Tensor, cos_cache: Tensor, sin_cache: Tensor,
                     num_heads: int) -> Tensor:
    """`apply_rotary` as com.microsoft.RotaryEmbedding: for head sizes GroupQueryAttention's own
    rotary does not take (export/gqa.py)."""
    return apply_rotary(x, position_ids, cos_cache, sin_cache, num_heads)


@rotary_embedding.register_fake
def _(x, position_ids, cos_cache, sin_cache, num_heads):
    return torch.empty_like(x)


def _op(name: str, domain: str, inputs: list[tuple[str, str, bool]], outputs: list[tuple[str, str, bool]],
        types: list[tuple[str, list[str]]], attributes: dict[str, str]):
    """An onnxscript Op for an ONNX Runtime contrib kernel (onnx's registry has no contrib schemas;
    the subset used here is declared, input order as in ORT's contrib_defs)."""
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript.values import Op

    def param(pname: str, type_str: str, optional: bool) -> OpSchema.FormalParameter:
        option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
        return OpSchema.FormalParameter(pname, type_str, "", param_option=option)

    kinds = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}
    schema = OpSchema(name, domain, 1, inputs=[param(*p) for p in inputs], outputs=[param(*p) for p in outputs],
                      type_constraints=[(t, allowed, "") for t, allowed in types],
                      attributes=[OpSchema.Attribute(a, kinds[k], "") for a, k in attributes.items()])
    return Op(onnxscript.values.Opset(domain, 1), name, schema)


FLOATS = ["tensor(float)", "tensor(float16)"]


def translation_table() -> dict:
    """For torch.onnx.export(custom_translation_table=...)."""
    simplified = _op("SimplifiedLayerNormalization", "", [("X", "T", False), ("scale", "V", False)],
                     [("Y", "V", False)], [("T", FLOATS), ("V", FLOATS)],
                     {"axis": "int", "epsilon": "float", "stash_type": "int"})
    skip = _op("SkipSimplifiedLayerNormalization", "com.microsoft",
               [("input", "T", False), ("skip", "T", False), ("gamma", "T", False), ("bias", "T", True)],
               # the two statistics outputs are declared only to reach the 4th (the sum); tiny
               [("output", "T", False), ("mean", "U", False), ("inv_std_var", "U", False),
                ("input_skip_bias_sum", "T", False)],
               [("T", FLOATS), ("U", ["tensor(float)"])], {"epsilon": "float"})
    rotary = _op("RotaryEmbedding", "com.microsoft",
                 [("input", "T", False), ("position_ids", "M", False), ("cos_cache", "T", False),
                  ("sin_cache", "T", False)], [("output", "T", False)],
                 [("T", FLOATS), ("M", ["tensor(int64)"])], {"interleaved": "int", "num_heads": "int"})

    def rms_to_onnx(x, weight, epsilon: float):
        return simplified(x, weight, axis=-1, epsilon=epsilon, stash_type=1)

    def skip_to_onnx(x, skip_, weight, epsilon: float):
        out, _, _, total = skip(x, skip_, weight, None, epsilon=epsilon)
        return out, total

    def rotary_to_onnx(x, position_ids, cos_cache, sin_cache, num_heads: int):
        return rotary(x, position_ids, cos_cache, sin_cache, interleaved=0, num_heads=num_heads)

    return {torch.ops.blip3v.rms_norm.default: rms_to_onnx,
            torch.ops.blip3v.skip_rms_norm.default: skip_to_onnx,
            torch.ops.blip3v.rotary_embedding.default: rotary_to_onnx}
