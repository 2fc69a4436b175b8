"""Weight-only INT4 / INT8 decoder: every weight MatMul becomes ONNX Runtime's `MatMulNBits`,
packed by ORT's `MatMulNBitsQuantizer` (symmetric blocks of `block_size` along K, its default
round-to-nearest algorithm). What ORT lacks, and this module adds before it packs:

    awq  activation-aware scales (after AWQ, arXiv 2306.00978), from the inputs each MatMul
         actually sees on calibration prompts that carry real video tokens: a per-input-channel
         scale s = mean|x|^alpha (alpha searched on a grid, alpha = 0 is plain RTN) moves rounding
         error away from the channels with large activations. The float graph is rewritten so that
         ORT quantizes W' = diag(s) W and the MatMul is fed x / s, with 1/s folded into the
         preceding RMSNorm weight where that is the only consumer, or into the columns of the
         MatMul that produces the input (o_proj: V of qkv; down_proj: up of gate_up), else one Mul.
         Scaling a whole output column leaves its rounded integers unchanged (per-block absmax
         scales), so the column fold is exact. The search scores each alpha with ORT's own
         rounding, so on the calibration activations AWQ's output error is never above RTN's.
    rtn  ORT's quantizer on the float weights as they are.

AWQ's second step, a per-block clipping-ratio search, is left out on evidence: on the demo decoder
it lowered the calibration output error further but changed the first answer token on 2 of 400
held-out clips, where scaling alone and RTN changed none.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model
from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer,
                                                             MatMulNBitsQuantizer)

from blip3v.calibration.graph import quiet_ort, run_collect
from blip3v.errors import InputError

SCHEMES = {"int4": 4, "int8": 8}
METHODS = ("awq", "rtn")
BLOCK_SIZES = (16, 32, 64, 128, 256)
ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
MAX_ROWS = 256  # calibration activation rows kept per MatMul


def _config(bits: int, block: int, accuracy_level: int = 0) -> DefaultWeightOnlyQuantConfig:
    return DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits,
                                        accuracy_level=accuracy_level or None)


def rtn_dequantized(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """W (K, N) rounded by ORT's own kernel exactly as MatMulNBitsQuantizer packs it, back in float:
    MatMulNBits' B is (N, K_blocks, block * bits / 8) uint8, low nibble first, zero point 2^(bits-1)."""
    w = np.ascontiguousarray(w, dtype=np.float32)  # the C++ kernel reads the buffer row-major, views or not
    packed, scales, _ = DefaultWeightOnlyQuantizer(_config(bits, block)).qbits_block_quant(w)
    n = packed.shape[0]
    q = np.stack([packed & 15, packed >> 4], -1).reshape(n, -1) if bits == 4 else packed.reshape(n, -1)
    w_hat = (q.astype(np.float32) - 2 ** (bits - 1)).reshape(n, -1, block) * scales[:, :, None]  # (N, nb, B)
    return w_hat.reshape(n, -1)[:, : w.shape[0]].T


def relative_error(x: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    """||x W - x W_hat||^2 / ||x W||^2 on calibration rows x (n, K)."""
    return float(((x @ (w - w_hat)) ** 2).sum() / max(float(((x @ w) ** 2).sum()), 1e-30))


def awq_scale(w: np.ndarray, x: np.ndarray, bits: int, block: int) -> tuple[np.ndarray | None, float]:
    """-> (input-channel scale s (K,) or None when RTN is best, its relative output error on `x`)."""
    mean_abs = np.abs(x).mean(0) + 1e-8  # (K,)
    best: tuple[float, np.ndarray | None] = (relative_error(x, w, rtn_dequantized(w, bits, block)), None)
    for alpha in ALPHAS[1:]:
        s = mean_abs ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = relative_error(x, w, rtn_dequantized(w * s[:, None], bits, block) / s[:, None])
        if err < best[0]:
            best = (err, s)
    return best[1], best[0]


def gemms_to_matmuls(model: onnx.ModelProto, base_dir: str = "") -> None:
    """Rewrites each plain Gemm with a weight initializer (a Phi-3's LM head, xGen-MM's additional_fc)
    as MatMul (+ Add of its bias), in place. Own code because ORT's weight-only quantizer takes
    MatMul and Gather only."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]], base_dir)
        weight = f"{node.input[1]}_kn"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T if attrs.get("transB") else w),
                                                               weight))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        out = f"{node.output[0]}_nobias" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [out], name=node.name))
        if bias:
            nodes.append(helper.make_node("Add", [out, bias], [node.output[0]], name=f"{node.name}_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMuls whose B is a 2-D float32 initializer (attention and MLP projections, rewritten heads).
    xGen-MM's LM head reads its weight through a Slice (the decoupled vocabulary), so it stays dense."""
    inits = {t.name: t for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2 and n.input[0] not in inits
            and inits[n.input[1]].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]


def collect_inputs(model: onnx.ModelProto, targets: list[onnx.NodeProto], feeds: list[dict[str, np.ndarray]],
                   seed: int = 0, base_dir: str = "") -> dict[str, np.ndarray]:
    """The distinct rows (tokens) each target's input takes over the calibration feeds, at most
    MAX_ROWS each. Repeated rows are dropped first: every calibration prompt opens with the same
    system text, whose tokens (causal attention: same prefix, same activations) would otherwise
    fill most of the sample and outweigh the video and question tokens."""
    rows: dict[str, list[np.ndarray]] = {}
    run_collect(model, sorted({t.input[0] for t in targets}), feeds,
                lambda name, x: rows.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).astype(np.float32)),
                base_dir=base_dir or None)
    rng = np.random.default_rng(seed)
    out = {}
    for name, parts in rows.items():
        x = np.unique(np.concatenate(parts), axis=0)  # sorted distinct rows: order-independent
        out[name] = x[np.sort(rng.permutation(len(x))[:MAX_ROWS])] if len(x) > MAX_ROWS else x
    return out


class _Graph:
    """Producers, reader counts and initializers of a model, for folding scales in place."""

    def __init__(self, model: onnx.ModelProto, base_dir: str = "", spill: "_Spill | None" = None):
        self.model, self.base_dir, self.spill = model, base_dir, spill
        self.inits = {t.name: t for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.readers: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.readers[name] = self.readers.get(name, 0) + 1

    def scale(self, node: onnx.NodeProto, j: int, factor: np.ndarray, axis: int) -> None:
        """Multiplies `node`'s initializer input j by `factor` along `axis` (broadcast). One that
        other nodes also read (the exporter merges equal constants: every norm weight of a freshly
        initialised model is ones) is copied for this node first, so the others keep their values."""
        name = node.input[j]
        values = numpy_helper.to_array(self.inits[name], self.base_dir)  # read from disk if not loaded
        shape = [1] * values.ndim
        shape[axis] = -1
        scaled = (values * factor.reshape(shape)).astype(values.dtype)
        if self.readers[name] > 1:
            self.readers[name] -= 1
            name = node.input[j] = f"{name}_awq_{node.name}"
            self.readers[name] = 1
            self.model.graph.initializer.append(self._tensor(scaled, name))
            self.inits[name] = self.model.graph.initializer[-1]
        else:
            self.inits[name].CopyFrom(self._tensor(scaled, name))

    def _tensor(self, values: np.ndarray, name: str) -> onnx.TensorProto:
        """The new weight: in the proto, or written to the spill file and pointed at."""
        return numpy_helper.from_array(values, name) if self.spill is None else self.spill.put(values, name)


class _Spill:
    """Scaled weights appended to a scratch file beside the graph's own weights, the tensors only
    pointing at them, so that the proto never holds every float weight at once (Python's protobuf
    frees a message's bytes only with the message: see blip3v.calibration.graph.session)."""

    def __init__(self, directory: str):
        fd, path = tempfile.mkstemp(prefix=".blip3v-awq-", suffix=".data", dir=directory)
        self.path, self.file, self.offset = Path(path), os.fdopen(fd, "wb"), 0

    def put(self, values: np.ndarray, name: str) -> onnx.TensorProto:
        data = np.ascontiguousarray(values).tobytes()
        self.file.write(data)
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(values.dtype),
                                  dims=values.shape)
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(data)))):
            entry = tensor.external_data.add()  # (onnx's set_external_data wants the bytes in raw_data first)
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL
        self.offset += len(data)
        return tensor

    def close(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


# Ops whose output 0 is multiplied by a per-channel weight (input index; None: any): where 1/s folds.
_SCALED_OUTPUT = {"Mul": None, "SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}


def _norm_weight(g: _Graph, x: str) -> tuple[onnx.NodeProto, int] | None:
    """(node, input index) of the 1-D initializer that scales `x` channel-wise (an RMSNorm weight)."""
    node = g.producer.get(x)
    if node is None or node.op_type not in _SCALED_OUTPUT or node.output[0] != x:
        return None
    for j, name in enumerate(node.input):
        if _SCALED_OUTPUT[node.op_type] in (None, j) and name in g.inits and len(g.inits[name].dims) == 1:
            return node, j
    return None


def _weight_columns(g: _Graph, name: str) -> tuple[onnx.NodeProto, slice] | None:
    """(weight MatMul, its output columns) when `name` is one output of a last-axis Split of that
    MatMul's output (gate_up -> up) and only one node reads it."""
    split = g.producer.get(name)
    if split is None or split.op_type != "Split" or g.readers.get(name) != 1:
        return None
    source = g.producer.get(split.input[0])
    attrs = {a.name: helper.get_attribute_value(a) for a in split.attribute}
    if source is None or source.op_type != "MatMul" or source.input[1] not in g.inits:
        return None
    if attrs.get("axis", 0) not in (2, -1):  # the decoder's activations are (B, S, N): columns are the last axis
        return None
    n = int(g.inits[source.input[1]].dims[1])
    sizes = ([int(v) for v in numpy_helper.to_array(g.inits[split.input[1]]).reshape(-1)]
             if len(split.input) > 1 and split.input[1] in g.inits else attrs.get("split"))
    if sizes is None:
        parts = len(split.output)
        sizes = [-(-n // parts)] * (parts - 1) + [n - (parts - 1) * -(-n // parts)]  # ONNX Split's uneven rule
    i = list(split.output).index(name)
    return source, slice(sum(sizes[:i]), sum(sizes[:i + 1]))


def _value_columns(g: _Graph, gqa: onnx.NodeProto) -> tuple[onnx.NodeProto, slice] | None:
    """(qkv MatMul, the V columns) when a GroupQueryAttention with a KV head per query head (so a
    channel of V is a channel of its output) reads packed qkv (B, S, (H + 2 Hkv) dh) straight from
    a weight MatMul nothing else reads; V, the last Hkv * dh columns, is not rotated. The KV cache
    then holds V / s, which only this graph reads."""
    packed = len(gqa.input) < 3 or not (gqa.input[1] or gqa.input[2])
    source = g.producer.get(gqa.input[0])
    if not packed or source is None or source.op_type != "MatMul" or g.readers.get(gqa.input[0]) != 1:
        return None
    if source.input[1] not in g.inits:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in gqa.attribute}
    n = int(g.inits[source.input[1]].dims[1])
    heads, kv_heads = attrs["num_heads"], attrs["kv_num_heads"]
    if heads != kv_heads or n % (heads + 2 * kv_heads):
        return None
    return source, slice(n - kv_heads * (n // (heads + 2 * kv_heads)), n)


def _fold(g: _Graph, target: onnx.NodeProto, s: np.ndarray, new_nodes: dict[str, onnx.NodeProto]) -> str:
    """Feeds `target` x / s instead of x; -> where 1/s went: "norm", "columns" or "mul"."""
    x = target.input[0]
    if g.readers.get(x) == 1:
        norm = _norm_weight(g, x)
        if norm is not None:
            g.scale(*norm, 1.0 / s, axis=0)
            return "norm"
        source = g.producer.get(x)
        found: list[tuple[onnx.NodeProto, slice] | None] = []
        if source is not None and source.op_type == "Mul":
            found = [_weight_columns(g, name) for name in source.input]
        elif source is not None and source.op_type == "GroupQueryAttention" and source.output[0] == x:
            found = [_value_columns(g, source)]
        for hit in found:
            if hit is not None and hit[1].stop - hit[1].start == s.size:
                matmul, cols = hit
                factor = np.ones(int(g.inits[matmul.input[1]].dims[1]), np.float32)
                factor[cols] = 1.0 / s
                g.scale(matmul, 1, factor, axis=1)
                return "columns"
    inv = f"{target.input[1]}_awq_inv"
    g.model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
    new_nodes[target.name] = helper.make_node("Mul", [x, inv], [f"{x}_awq_{target.name}"], name=f"{target.name}_awq")
    target.input[0] = new_nodes[target.name].output[0]
    return "mul"


def apply_awq(model: onnx.ModelProto, scales: dict[str, np.ndarray], base_dir: str = "",
              spill: _Spill | None = None) -> dict[str, int]:
    """In place: each named MatMul's weight rows times s, its input divided by s (folded where it
    can be). -> {"folded": into norms, "folded_into_matmul": into columns, "mul_nodes": Muls added}."""
    g = _Graph(model, base_dir, spill)
    counts = {"norm": 0, "columns": 0, "mul": 0}
    muls: dict[str, onnx.NodeProto] = {}
    for node in list(model.graph.node):
        if node.name in scales:
            counts[_fold(g, node, scales[node.name], muls)] += 1
            g.scale(node, 1, scales[node.name], axis=0)
    nodes = []
    for node in model.graph.node:
        if node.name in muls:
            nodes.append(muls[node.name])
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return {"folded": counts["norm"], "folded_into_matmul": counts["columns"], "mul_nodes": counts["mul"]}


def pack(model: onnx.ModelProto, names: list[str], bits: int, block: int, accuracy_level: int = 0) -> onnx.ModelProto:
    """The MatMuls `names` -> MatMulNBits through ORT's MatMulNBitsQuantizer (its default RTN
    algorithm, symmetric); other MatMuls stay float. `model` itself is modified."""
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in set(names)]
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=_config(bits, block, accuracy_level))
    with quiet_ort():
        quantizer.process()
    return quantizer.model.model


def quantize_decoder(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], scheme: str = "int4",
                     method: str = "awq", block_size: int = 32, accuracy_level: int = 0,
                     log: Callable[[str], None] = lambda _m: None, in_place: bool = False,
                     base_dir: str | Path | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """-> (the weight-only quantized decoder, report with each MatMul's calibration output error for
    this method and for RTN). `model` is not modified, unless `in_place` (a caller done with the
    float graph saves a copy of its weights: 2.6 GB for a 4-layer Phi-3-mini-wide decoder). `model`
    may leave its weights in `base_dir` (onnx.load(..., load_external_data=False)): each is then read
    when it is needed and held once (blip3v.calibration.graph.session says why that matters)."""
    if scheme not in SCHEMES:
        raise InputError(f"unknown decoder scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if method not in METHODS:
        raise InputError(f"unknown weight method {method!r}; choose from {', '.join(METHODS)}")
    if block_size not in BLOCK_SIZES:
        raise InputError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size}")
    bits = SCHEMES[scheme]
    if in_place:
        work = model
    else:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    base = str(base_dir or "")
    gemms_to_matmuls(work, base)
    targets = weight_matmuls(work)
    if not targets:
        raise InputError("the decoder graph has no weight MatMuls to quantize")
    inits = {t.name: t for t in work.graph.initializer}
    if any(inits[t.input[1]].data_type != onnx.TensorProto.FLOAT for t in targets):
        raise InputError("weight-only quantization starts from a float32 engine: export with --precision fp32")
    log(f"  {len(targets)} MatMuls; collecting their inputs on {len(feeds)} calibration prompts")
    xs = collect_inputs(work, targets, feeds, base_dir=base)
    scales, per_layer = {}, []
    for t in targets:
        w, x = numpy_helper.to_array(inits[t.input[1]], base).astype(np.float32), xs[t.input[0]]
        rtn = relative_error(x, w, rtn_dequantized(w, bits, block_size))
        row = {"layer": t.name, "weight": t.input[1], "shape": list(w.shape), "rtn_rel_error": rtn}
        if method == "awq":
            s, row["awq_rel_error"] = awq_scale(w, x, bits, block_size)
            if s is not None:
                scales[t.name] = s
        per_layer.append(row)
        log(f"    [{len(per_layer)}/{len(targets)}] {t.name} {w.shape[0]}x{w.shape[1]}: relative output error "
            f"rtn {rtn:.2e}, {method} {row[f'{method}_rel_error']:.2e}")
    report = {"scheme": scheme, "method": method, "block_size": block_size, "accuracy_level": accuracy_level,
              "layers": len(targets), "per_layer": per_layer}
    if not base:
        report.update(apply_awq(work, scales))
        return pack(work, [t.name for t in targets], bits, block_size, accuracy_level), report
    # Weights on disk: the scaled ones go to a spill file beside them, ORT's packer reads each
    # weight from disk as it reaches it (it reads external data relative to the working directory),
    # and only what stays float is read into the proto at the end.
    spill = _Spill(base)
    try:
        spill.file.flush()
        report.update(apply_awq(work, scales, base, spill))
        spill.file.close()
        with contextlib.chdir(base):
            packed = pack(work, [t.name for t in targets], bits, block_size, accuracy_level)
            load_external_data_for_model(packed, ".")
    finally:
        spill.close()
    return packed, report
