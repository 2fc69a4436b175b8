"""Weight-only INT4 / INT8 decoder: every weight MatMul becomes ONNX Runtime's `MatMulNBits`.

Weights are quantized symmetrically in blocks of `block_size` along K (one float scale per block
and output column; zero point 2^(bits-1), the op's default). Two ways to choose the scales:

    rtn  round to nearest: scale = max |w| over the block / (2^(bits-1) - 1); the baseline.
    awq  activation-aware (after AWQ, arXiv 2306.00978): from the inputs each MatMul actually sees
         on calibration prompts that carry real video tokens, (1) a per-input-channel scale
         s = mean|x|^alpha (alpha searched on a grid, alpha = 0 is RTN) moves quantization error
         away from the channels with large activations: W' = diag(s) W is quantized and x / s is
         fed in, folded into the preceding RMSNorm weight where that is the only consumer, or into
         the columns of the MatMul that produces the input (o_proj: V of qkv; down_proj: up of
         gate_up), else one Mul. The grid includes RTN's choice, so on the calibration activations AWQ's output error
         is never above RTN's.
AWQ's second step, a per-block clipping-ratio search, is left out on evidence: on the demo decoder
it lowered the calibration output error further but changed the first answer token on 2 of 400
held-out clips (0.9-1.0 ratios only: 1 of 400), where scaling alone and RTN changed none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from blip3v.calibration.graph import (Namer, WeightNode, add_initializer, drop_unused_initializers, ensure_opset,
                                      initializers, run_collect, weight_nodes)
from blip3v.errors import InputError

SCHEMES = {"int4": 4, "int8": 8}
METHODS = ("awq", "rtn")
BLOCK_SIZES = (16, 32, 64, 128, 256)
ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
MAX_ROWS = 256  # calibration activation rows kept per MatMul


@dataclass
class QuantizedWeight:
    q: np.ndarray  # (N, n_blocks * block) uint8, zero point 2^(bits-1)
    scales: np.ndarray  # (N, n_blocks) float32
    in_scale: np.ndarray | None  # (K,) AWQ input-channel scale (feed x / in_scale), None for RTN
    bits: int
    block: int
    k: int

    def dequantize(self) -> np.ndarray:
        """-> W_hat (K, N) such that x @ W_hat approximates x @ W (the input scale undone)."""
        n, padded = self.q.shape
        w = (self.q.astype(np.float32) - 2 ** (self.bits - 1)).reshape(n, -1, self.block) * self.scales[:, :, None]
        w = w.reshape(n, padded)[:, : self.k].T  # (K, N)
        return w / self.in_scale[:, None] if self.in_scale is not None else w

    def packed(self) -> np.ndarray:
        """MatMulNBits' B: (N, n_blocks, block * bits / 8) uint8, low nibble first for 4 bits."""
        n = self.q.shape[0]
        if self.bits == 8:
            return self.q.reshape(n, -1, self.block)
        return (self.q[:, 0::2] | (self.q[:, 1::2] << 4)).astype(np.uint8).reshape(n, -1, self.block // 2)


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """(K, N) -> (N, n_blocks, block), zero-padded along K."""
    k, n = w.shape
    padded = -(-k // block) * block
    wt = np.zeros((n, padded), np.float32)
    wt[:, :k] = w.T
    return wt.reshape(n, -1, block)


def _round(wb: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    return np.clip(np.round(wb / scale[..., None]), -qmax - 1, qmax)


def _rtn_scale(wb: np.ndarray, bits: int, ratio: float = 1.0) -> np.ndarray:
    scale = np.abs(wb).max(-1) * ratio / (2 ** (bits - 1) - 1)
    return np.where(scale == 0, 1.0, scale).astype(np.float32)


def _finish(wb: np.ndarray, scale: np.ndarray, bits: int, k: int, block: int, in_scale) -> QuantizedWeight:
    q = (_round(wb, scale, bits) + 2 ** (bits - 1)).astype(np.uint8).reshape(wb.shape[0], -1)
    return QuantizedWeight(q, scale.astype(np.float32), in_scale, bits, block, k)


def quantize_rtn(w: np.ndarray, bits: int, block: int) -> QuantizedWeight:
    wb = _blocks(w, block)
    return _finish(wb, _rtn_scale(wb, bits), bits, w.shape[0], block, None)


def output_error(x: np.ndarray, w: np.ndarray, qw: QuantizedWeight) -> float:
    """||x W - x W_hat||^2 / ||x W||^2 on calibration rows x (n, K)."""
    return _relative_error(x, w, qw.dequantize(), float(((x @ w) ** 2).sum()))


def _relative_error(x: np.ndarray, w: np.ndarray, w_hat: np.ndarray, ref_energy: float) -> float:
    return float(((x @ (w - w_hat)) ** 2).sum() / max(ref_energy, 1e-30))  # one matmul: x (W - W_hat)


def _dequantized_kn(wb: np.ndarray, scale: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Blocks (N, nb, B) and their scales -> the rounded weight as (K, N)."""
    return (_round(wb, scale, bits) * scale[..., None]).reshape(wb.shape[0], -1)[:, :k].T


def quantize_awq(w: np.ndarray, x: np.ndarray, bits: int, block: int) -> QuantizedWeight:
    """Activation-aware scales: input channel c is multiplied by s_c = mean|x_c|^alpha before
    rounding (and x divided by it), alpha chosen on the grid by the output error on `x`; alpha 0
    is round-to-nearest, so the search never does worse than RTN on these rows."""
    k = w.shape[0]
    mean_abs = np.abs(x).mean(0) + 1e-8  # (K,)
    ref_energy = float(((x @ w) ** 2).sum())
    best: tuple[float, np.ndarray | None] | None = None  # (error, in_scale or None for RTN)
    for alpha in ALPHAS:
        s = None
        if alpha:
            s = mean_abs ** alpha
            s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        wb = _blocks(w * s[:, None] if s is not None else w, block)
        w_hat = _dequantized_kn(wb, _rtn_scale(wb, bits), bits, k)
        err = _relative_error(x, w, w_hat / s[:, None] if s is not None else w_hat, ref_energy)
        if best is None or err < best[0]:
            best = (err, s)
    assert best is not None
    in_scale = best[1]
    wb = _blocks(w * in_scale[:, None] if in_scale is not None else w, block)  # (N, nb, B)
    return _finish(wb, _rtn_scale(wb, bits), bits, k, block, in_scale)


def decoder_targets(model: onnx.ModelProto) -> list[WeightNode]:
    """The decoder's weight MatMuls ((K, N) initializers: attention and MLP projections) and plain
    Gemms with a weight initializer (a Phi-3's LM head over the last position). xGen-MM's LM head
    reads its weight through a Slice (the decoupled vocabulary), so it stays dense."""
    out = []
    for t in weight_nodes(model, ("MatMul", "Gemm")):
        if t.op == "Gemm":
            node = model.graph.node[t.index]
            attrs = {a.name: (a.i if a.type == onnx.AttributeProto.INT else a.f) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                continue
        out.append(t)
    return out


def weight_kn(model: onnx.ModelProto, target: WeightNode) -> np.ndarray:
    """The target's weight as (K, N): x @ W."""
    w = numpy_helper.to_array(initializers(model)[target.weight]).astype(np.float32)
    return w.T if target.op == "Gemm" and target.out_axis == 0 else w


def collect_inputs(model: onnx.ModelProto, targets: list[WeightNode], feeds: list[dict[str, np.ndarray]],
                   seed: int = 0) -> dict[str, np.ndarray]:
    """The distinct rows (tokens) each target's input takes over the calibration feeds, at most
    MAX_ROWS each. Repeated rows are dropped first: every calibration prompt opens with the same
    system text, whose tokens (causal attention: same prefix, same activations) would otherwise
    fill most of the sample and outweigh the video and question tokens."""
    rows: dict[str, list[np.ndarray]] = {}
    run_collect(model, sorted({t.activation for t in targets}), feeds,
                lambda name, x: rows.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).astype(np.float32)))
    rng = np.random.default_rng(seed)
    out = {}
    for name, parts in rows.items():
        x = np.unique(np.concatenate(parts), axis=0)  # sorted distinct rows: order-independent
        out[name] = x[np.sort(rng.permutation(len(x))[:MAX_ROWS])] if len(x) > MAX_ROWS else x
    return out


# Ops whose output 0 is multiplied by a per-channel weight (input index): where AWQ's input scale folds.
_SCALED_OUTPUT = {"Mul": None, "SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}


def _fold_target(model: onnx.ModelProto, activation: str, consumers: dict[str, int]) -> tuple[onnx.NodeProto, int] | None:
    """(node, input index) of the 1-D initializer that scales `activation` channel-wise (an RMSNorm
    weight: of a Mul, or the scale of a fused (Skip)SimplifiedLayerNormalization) when `activation`
    feeds only this MatMul."""
    inits = initializers(model)
    if consumers.get(activation, 0) != 1:
        return None
    for node in model.graph.node:
        if node.op_type not in _SCALED_OUTPUT or not node.output or node.output[0] != activation:
            continue
        index = _SCALED_OUTPUT[node.op_type]
        for j, name in enumerate(node.input):
            t = inits.get(name)
            if (index is None or j == index) and t is not None and len(t.dims) == 1:
                return node, j
    return None


def _fold(model: onnx.ModelProto, node: onnx.NodeProto, j: int, in_scale: np.ndarray, consumers: dict[str, int],
          fresh: Namer) -> None:
    """Divides `node`'s input initializer j by `in_scale`. An initializer other nodes also read (the
    exporter merges equal constants: every norm weight of a freshly initialised model is ones) is
    copied for this node first, so the others keep their values."""
    name = node.input[j]
    tensor = initializers(model)[name]
    values = numpy_helper.to_array(tensor)
    scaled = (values / in_scale).astype(values.dtype)
    if consumers.get(name, 0) > 1:
        consumers[name] -= 1
        node.input[j] = fresh(f"{name}_awq")
        add_initializer(model, node.input[j], scaled)
        consumers[node.input[j]] = 1
    else:
        tensor.CopyFrom(numpy_helper.from_array(scaled, name))


def to_matmul_nbits(model: onnx.ModelProto, quantized: dict[str, tuple[WeightNode, QuantizedWeight]],
                    accuracy_level: int = 0) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of `model` with each target MatMul replaced by MatMulNBits (+ its input scale, folded
    into the preceding norm weight or producing MatMul's columns where possible)
    -> (model, {"folded": into norms, "folded_into_matmul": into columns, "mul_nodes": Muls left})."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    fresh = Namer(out)
    consumers: dict[str, int] = {}
    for node in out.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    counts = {"folded": 0, "mul_nodes": 0}
    nodes = []
    for node in out.graph.node:
        entry = quantized.get(node.name or "")
        if node.op_type not in ("MatMul", "Gemm") or entry is None:
            nodes.append(node)
            continue
        target, qw = entry
        x = node.input[0]
        k, n = qw.k, qw.q.shape[0]
        bias = [node.input[2]] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else []
        if qw.in_scale is not None:
            fold = _fold_target(out, x, consumers)
            if fold is not None:
                _fold(out, *fold, qw.in_scale, consumers, fresh)
                counts["folded"] += 1
            else:
                inv = add_initializer(out, fresh(f"{target.weight}_awq_inv"), (1.0 / qw.in_scale).astype(np.float32))
                scaled = fresh(f"{x}_awq")
                nodes.append(helper.make_node("Mul", [x, inv], [scaled], name=fresh(f"{node.name}_awq")))
                x = scaled
                counts["mul_nodes"] += 1
        b = add_initializer(out, fresh(f"{target.weight}_q{qw.bits}"), qw.packed())
        s = add_initializer(out, fresh(f"{target.weight}_scales"), qw.scales.reshape(-1))
        inputs = [x, b, s, "", "", *bias] if bias else [x, b, s]  # MatMulNBits: A, B, scales, zero_points, g_idx, bias
        nodes.append(helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name, domain="com.microsoft",
                                      K=k, N=n, bits=qw.bits, block_size=qw.block, accuracy_level=accuracy_level))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    counts["folded_into_matmul"] = _fold_muls_into_producers(out)
    counts["mul_nodes"] -= counts["folded_into_matmul"]
    drop_unused_initializers(out)
    ensure_opset(out, "com.microsoft", 1)
    return out, counts


# The decoder's activations are (B, S, N): a Split on axis 2 (or -1) picks output columns.
_LAST_AXIS = (2, -1)


def _int_attrs(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}


def _column_range(name: str, producer: dict[str, onnx.NodeProto], readers: dict[str, int],
                  inits: dict[str, onnx.TensorProto]) -> tuple[onnx.NodeProto, int, int] | None:
    """(MatMulNBits, first column, width) when `name` is an output of a last-axis Split of that
    MatMulNBits' output and is read by one node only; else None."""
    node = producer.get(name)
    if node is None or readers.get(name, 0) != 1 or node.op_type != "Split":
        return None
    source = producer.get(node.input[0])
    if source is None or source.op_type != "MatMulNBits":
        return None
    n = _int_attrs(source)["N"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("axis", 0) not in _LAST_AXIS:
        return None
    sizes_init = inits.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    sizes = ([int(v) for v in numpy_helper.to_array(sizes_init).reshape(-1)] if sizes_init is not None
             else attrs.get("split"))
    if sizes is None:
        parts = len(node.output)
        sizes = [-(-n // parts)] * (parts - 1) + [n - (parts - 1) * -(-n // parts)]  # ONNX Split's uneven rule
    i = list(node.output).index(name)
    return source, int(sum(sizes[:i])), int(sizes[i])


def _gqa_value_columns(gqa: onnx.NodeProto, producer: dict[str, onnx.NodeProto],
                       readers: dict[str, int]) -> tuple[onnx.NodeProto, int, int] | None:
    """(MatMulNBits, first column, width) of V when a GroupQueryAttention with a KV head per query
    head (so a channel of V is a channel of the output) reads packed qkv (B, S, (H + 2 Hkv) dh)
    straight from one MatMulNBits that nothing else reads; V, the last Hkv * dh columns, is not
    rotated."""
    packed = len(gqa.input) < 3 or not (gqa.input[1] or gqa.input[2])
    source = producer.get(gqa.input[0])
    if not packed or source is None or source.op_type != "MatMulNBits" or readers.get(gqa.input[0], 0) != 1:
        return None
    attrs = _int_attrs(gqa)
    n = _int_attrs(source)["N"]
    heads, kv_heads = attrs["num_heads"], attrs["kv_num_heads"]
    if heads != kv_heads or n % (heads + 2 * kv_heads):
        return None
    width = kv_heads * (n // (heads + 2 * kv_heads))
    return source, n - width, width


def _fold_muls_into_producers(model: onnx.ModelProto) -> int:
    """Removes AWQ input-scale Muls whose input is linear in one MatMul's output columns, by scaling
    those columns' MatMulNBits block scales instead (exact: a column's rounded integers do not change
    when the whole column is scaled). Two places in a Phi-3 layer:
      o_proj    reads attention output = softmax(QK^T) V: the V columns of the qkv projection (when
                every query head has its own KV head, so a channel of V is a channel of the output);
      down_proj reads silu(gate) * up: the up columns of the gate_up projection.
    The KV cache then holds V / s, which only this graph reads. -> the number of Muls removed."""
    producer = {o: node for node in model.graph.node for o in node.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    inits = initializers(model)
    removed = set()
    for mul in list(model.graph.node):
        if mul.op_type != "Mul" or not mul.name.endswith("_awq") or len(mul.input) != 2 or mul.input[1] not in inits:
            continue
        x = mul.input[0]
        source = producer.get(x)
        if source is None or readers.get(x, 0) != 1 or len(mul.output) != 1:
            continue
        inv = numpy_helper.to_array(inits[mul.input[1]]).astype(np.float32).reshape(-1)
        candidates: list[tuple[onnx.NodeProto, int, int] | None] = []
        if source.op_type == "Mul":
            candidates = [_column_range(name, producer, readers, inits) for name in source.input]
        elif source.op_type == "GroupQueryAttention" and source.output[0] == x:
            candidates = [_gqa_value_columns(source, producer, readers)]
        for found in candidates:
            if found is None or found[2] != inv.size:
                continue
            matmul, start, width = found
            scales_t = inits[matmul.input[2]]
            scales = numpy_helper.to_array(scales_t).astype(np.float32)
            view = scales.reshape(_int_attrs(matmul)["N"], -1)
            view[start:start + width] *= inv[:, None]
            scales_t.CopyFrom(numpy_helper.from_array(view.reshape(scales.shape), scales_t.name))
            if len(matmul.input) > 5 and matmul.input[5]:  # bias
                bias_t = inits[matmul.input[5]]
                bias = numpy_helper.to_array(bias_t).astype(np.float32).copy()
                bias[start:start + width] *= inv
                bias_t.CopyFrom(numpy_helper.from_array(bias, bias_t.name))
            for node in model.graph.node:
                for j, name_in in enumerate(node.input):
                    if name_in == mul.output[0]:
                        node.input[j] = x
            removed.add(id(mul))
            break
    keep = [node for node in model.graph.node if id(node) not in removed]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(removed)


def quantize_decoder(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], scheme: str = "int4",
                     method: str = "awq", block_size: int = 32, accuracy_level: int = 0,
                     log=lambda _m: None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """-> (the weight-only quantized decoder, report with each MatMul's calibration output error
    for this method and for RTN)."""
    if scheme not in SCHEMES:
        raise InputError(f"unknown decoder scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if method not in METHODS:
        raise InputError(f"unknown weight method {method!r}; choose from {', '.join(METHODS)}")
    if block_size not in BLOCK_SIZES:
        raise InputError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size}")
    bits = SCHEMES[scheme]
    targets = decoder_targets(model)
    if not targets:
        raise InputError("the decoder graph has no weight MatMuls to quantize")
    inits = initializers(model)
    if any(inits[t.weight].data_type != onnx.TensorProto.FLOAT for t in targets):
        raise InputError("weight-only quantization starts from a float32 engine: export with --precision fp32")
    log(f"  {len(targets)} MatMuls; collecting their inputs on {len(feeds)} calibration prompts")
    xs = collect_inputs(model, targets, feeds)
    quantized, per_layer = {}, []
    for t in targets:
        w = weight_kn(model, t)
        x = xs[t.activation]
        rtn = quantize_rtn(w, bits, block_size)
        qw = quantize_awq(w, x, bits, block_size) if method == "awq" else rtn
        quantized[t.name] = (t, qw)
        per_layer.append({"layer": t.name, "weight": t.weight, "shape": list(w.shape),
                          "rtn_rel_error": output_error(x, w, rtn), f"{method}_rel_error": output_error(x, w, qw)})
        log(f"    [{len(per_layer)}/{len(targets)}] {t.name} {w.shape[0]}x{w.shape[1]}: relative output error "
            f"rtn {per_layer[-1]['rtn_rel_error']:.2e}, {method} {per_layer[-1][f'{method}_rel_error']:.2e}")
    qmodel, counts = to_matmul_nbits(model, quantized, accuracy_level)
    return qmodel, {"scheme": scheme, "method": method, "block_size": block_size, "accuracy_level": accuracy_level,
                    "layers": len(targets), "per_layer": per_layer, **counts}
