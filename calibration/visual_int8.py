"""INT8 visual graph with explicit Q/DQ nodes, calibrated on video frames.

Every MatMul / Gemm / Conv that carries a weight gets
    x -> QuantizeLinear(s_x, 0) -> DequantizeLinear -> op       symmetric int8 activation, per tensor
    W_int8 -> DequantizeLinear(s_w[c], 0, axis=out) -> op       symmetric int8 weight, per output channel
which is the form TensorRT's explicit quantization consumes (it fuses the pairs into INT8 kernels)
and ONNX Runtime runs as written. The activation ranges come from calibration clips:

    minmax      s_x = max |x| / 127 over the calibration set
    percentile  the 99.99th percentile of |x| (outliers clipped)
    entropy     the threshold minimising KL(P || Q) between the |x| histogram and its 128-level
                quantization (TensorRT's entropy calibration)

A sensitivity pass then quantizes one layer at a time and measures how far the video tokens move
(1 - cosine similarity against the float graph); the `keep` worst layers stay in float.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from blip3v.calibration.graph import (Namer, WeightNode, add_initializer, drop_unused_initializers, initializers,
                                      run_collect, session, weight_nodes)
from blip3v.errors import InputError

METHODS = ("minmax", "entropy", "percentile")
QUANT_OPS = ("MatMul", "Gemm", "Conv")
BINS = 2048
PERCENTILE = 99.99


@dataclass
class Ranges:
    """Per activation tensor: max |x| and a histogram of |x| over [0, max] (BINS bins)."""

    amax: dict[str, float] = field(default_factory=dict)
    hist: dict[str, np.ndarray] = field(default_factory=dict)


def collect_ranges(model: onnx.ModelProto, targets: list[WeightNode], feeds: list[dict[str, np.ndarray]]) -> Ranges:
    """Two passes over the calibration feeds: max |x|, then the histograms on that range."""
    names = sorted({t.activation for t in targets})
    ranges = Ranges({n: 0.0 for n in names})

    def amax(name: str, x: np.ndarray) -> None:
        ranges.amax[name] = max(ranges.amax[name], float(np.abs(x).max()))

    run_collect(model, names, feeds, amax)
    ranges.hist = {n: np.zeros(BINS, np.int64) for n in names}

    def hist(name: str, x: np.ndarray) -> None:
        top = ranges.amax[name] or 1.0
        ranges.hist[name] += np.histogram(np.abs(x), bins=BINS, range=(0.0, top))[0]

    run_collect(model, names, feeds, hist)
    return ranges


def _entropy_threshold(hist: np.ndarray, top: float, levels: int = 128) -> float:
    """TensorRT-style: the clip bin i (>= levels) minimising KL(P_i || Q_i), where P_i is the histogram
    cut at i with the clipped tail folded into its last bin, and Q_i the cut histogram *without* the
    tail merged into `levels` bins and expanded back over P's non-empty bins (so clipping a tail that
    holds mass is penalised)."""
    hist = hist.astype(np.float64)
    width = top / len(hist)
    best, best_i = np.inf, len(hist)
    for i in range(levels, len(hist) + 1, 16):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = p > 0
        if not nonzero.any():
            continue
        q = np.zeros(i)
        for chunk in np.array_split(np.arange(i), levels):
            mass, used = hist[chunk].sum(), nonzero[chunk].sum()
            if used:
                q[chunk] = np.where(nonzero[chunk], mass / used, 0.0)
        p_n, q_n = p / p.sum(), q / max(q.sum(), 1e-12)
        mask = nonzero & (q_n > 0)
        kl = float(np.sum(p_n[mask] * np.log(p_n[mask] / q_n[mask]))) + float(p_n[nonzero & ~(q_n > 0)].sum() * 1e3)
        if kl < best:
            best, best_i = kl, i
    return (best_i + 0.5) * width


def thresholds(ranges: Ranges, method: str) -> dict[str, float]:
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    out = {}
    for name, top in ranges.amax.items():
        if top == 0.0:
            out[name] = 1.0  # an all-zero tensor: any scale represents it
        elif method == "minmax":
            out[name] = top
        elif method == "percentile":
            cdf = np.cumsum(ranges.hist[name]) / max(1, ranges.hist[name].sum())
            out[name] = (int(np.searchsorted(cdf, PERCENTILE / 100.0)) + 1) * top / BINS
        else:
            out[name] = _entropy_threshold(ranges.hist[name], top)
    return out


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: -> (int8 weight, float32 scale per channel)."""
    reduce = tuple(d for d in range(w.ndim) if d != axis)
    scale = np.abs(w).max(axis=reduce) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def insert_qdq(model: onnx.ModelProto, targets: list[WeightNode], amax: dict[str, float]) -> onnx.ModelProto:
    """A copy of `model` with Q/DQ on the activations and weights of `targets`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = initializers(out)
    fresh = Namer(out)
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    dq_of: dict[str, str] = {}  # activation tensor -> its dequantized copy (shared by every consumer)
    for t in targets:
        before = new_nodes.setdefault(t.index, [])
        if t.activation not in dq_of:
            scale = add_initializer(out, fresh(f"{t.activation}_scale"), np.array(amax[t.activation] / 127.0, np.float32))
            zero = add_initializer(out, fresh(f"{t.activation}_zero"), np.array(0, np.int8))
            q, dq = fresh(f"{t.activation}_q"), fresh(f"{t.activation}_dq")
            before.append(helper.make_node("QuantizeLinear", [t.activation, scale, zero], [q], name=fresh(f"{q}_node")))
            before.append(helper.make_node("DequantizeLinear", [q, scale, zero], [dq], name=fresh(f"{dq}_node")))
            dq_of[t.activation] = dq
        w = numpy_helper.to_array(inits[t.weight]).astype(np.float32)
        wq, ws = quantize_weight(w, t.out_axis)
        wq_name = add_initializer(out, fresh(f"{t.weight}_int8"), wq)
        ws_name = add_initializer(out, fresh(f"{t.weight}_scale"), ws)
        wz_name = add_initializer(out, fresh(f"{t.weight}_zero"), np.zeros(len(ws), np.int8))
        w_dq = fresh(f"{t.weight}_dq")
        before.append(helper.make_node("DequantizeLinear", [wq_name, ws_name, wz_name], [w_dq], axis=t.out_axis,
                                       name=fresh(f"{w_dq}_node")))
        node = out.graph.node[t.index]
        node.input[0] = dq_of[t.activation]
        node.input[1] = w_dq
    nodes = []
    for i, node in enumerate(out.graph.node):
        nodes.extend(new_nodes.get(i, []))
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    drop_unused_initializers(out)
    return out


def token_error(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Video tokens (N, M, D) against the float graph's: mean cosine similarity per token, max abs diff."""
    a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    b = got.reshape(-1, got.shape[-1]).astype(np.float64)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "max_abs_diff": float(np.abs(a - b).max())}


def run_visual(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], output: str) -> np.ndarray:
    sess = session(model)
    return np.concatenate([sess.run([output], f)[0] for f in feeds])


def quantize_visual(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], output: str, method: str = "entropy",
                    keep: int = 2, sensitivity_clips: int = 4, log=lambda _m: None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """-> (the INT8 Q/DQ graph, report). `keep` most sensitive layers stay float."""
    targets = weight_nodes(model, QUANT_OPS)
    if not targets:
        raise InputError("the visual graph has no MatMul/Gemm/Conv with weights to quantize")
    log(f"  {len(targets)} weight layers; collecting activation ranges on {len(feeds)} clips ({method})")
    amax = thresholds(collect_ranges(model, targets, feeds), method)
    probe = feeds[:sensitivity_clips]
    ref = run_visual(model, probe, output)
    log(f"  sensitivity: quantizing one layer at a time on {len(probe)} clips")
    per_layer = []
    for t in targets:
        err = token_error(ref, run_visual(insert_qdq(model, [t], amax), probe, output))
        per_layer.append({"layer": t.name, "op": t.op, "weight": t.weight, **err})
    ranked = sorted(range(len(targets)), key=lambda i: per_layer[i]["cosine"])  # most harmful first
    kept = set(ranked[:max(0, min(keep, len(targets)))])
    quantized = [t for i, t in enumerate(targets) if i not in kept]
    qmodel = insert_qdq(model, quantized, amax)
    full = token_error(ref, run_visual(qmodel, probe, output))
    report = {"method": method, "layers": len(targets), "quantized_layers": len(quantized),
              "kept_float": [per_layer[i]["layer"] for i in sorted(kept)],
              "per_layer": per_layer, "video_tokens_vs_float": full}
    return qmodel, report
