"""Will TensorRT 10 build this engine directory? A check that needs only `onnx`, not TensorRT.

    blip3v build --engine DIR --check-only [--json]
    from blip3v.export.trt_check import check_engine_dir
    report = check_engine_dir("engines/demo"); report.raise_if_failed()

What it checks, per graph the manifest lists (visual, decoder):
  * every node's op is one TensorRT 10's ONNX parser imports (SUPPORTED below, from onnx-tensorrt's
    docs/operators.md for the 10.x releases) at the graph's opset; com.microsoft ops (ONNX Runtime's
    contrib ops such as GroupQueryAttention) are not, and the report says to export `--attention standard`;
  * op-specific limits the parser enforces (Einsum with more than 2 inputs, reductions in ScatterElements
    TensorRT lacks, string or complex tensors);
  * no control flow TensorRT rejects: an `If` whose branches give different shapes (a cache / no-cache
    switch) and a `Loop` whose trip count is only known at run time;
  * every graph input is covered by the optimization profiles `blip3v build` derives from the manifest
    (static dims equal, dynamic ones within min <= opt <= max);
  * which nodes an fp16/bf16 build pins to FP32 (normalizations, softmax, RMSNorm's reduction chain),
    and whether the graph holds Q/DQ nodes (needed for int8/fp8).
The pure pieces (`derive_profiles`, `fp32_pins`, `quantization`) are shared with export/trt_build.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blip3v.errors import EngineError
from blip3v.runtime.manifest import (DECODER_PROFILE_CALLS, EngineSpec, Manifest, decoder_shape_ranges,
                                     load_manifest, visual_shape_ranges)

# Op -> opset from which the parser handles it ("" domain). From onnx-tensorrt docs/operators.md
# (TensorRT 10.x). Ops absent here (Col2Im, ConvInteger, DFT, Det, DynamicQuantizeLinear, MatMulInteger,
# MaxRoiPool, MaxUnpool, MelWeightMatrix, Multinomial, Optional*, QLinear*, Sequence*, STFT, String*,
# TfIdfVectorizer, Unique, loss ops, ...) are reported as unsupported.
_OPS = """
Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Cast CastLike Ceil Celu CenterCropPad Clip
Compress Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GroupNormalization HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul
Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split
Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
"""
SUPPORTED: dict[str, int] = {op: 1 for op in _OPS.split()}
# Ops the table knows only from a later opset (they do not exist earlier in ONNX either).
SUPPORTED.update({"Gelu": 20, "AffineGrid": 20, "CenterCropPad": 18, "GroupNormalization": 18,
                  "BlackmanWindow": 17, "HammingWindow": 17, "HannWindow": 17, "LayerNormalization": 17,
                  "Mish": 18, "BitwiseAnd": 18, "BitwiseNot": 18, "BitwiseOr": 18, "BitwiseXor": 18,
                  "DeformConv": 19})
MIN_OPSET, MAX_OPSET = 9, 22  # onnx-tensorrt 10.x parses opsets 9..22 (10.0-10.7: up to 20)
ONNX_DOMAINS = ("", "ai.onnx")
CONTRIB_HINT = "export with `blip3v export --attention standard` (plain ONNX ops)"
# ONNX Runtime kernels registered in the default domain (no ONNX schema): what a gqa export uses
ORT_DEFAULT_DOMAIN_OPS = {"SimplifiedLayerNormalization"}

# Normalizations and softmax run in FP32 inside an fp16/bf16 engine: their reductions overflow or
# lose the small differences that matter in half precision (TensorRT's own advice in the
# "Reduced Precision" section of its developer guide; its Normalization layer already computes in FP32).
PIN_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax", "LogSoftmax")
PIN_PRECISIONS = ("fp16", "bf16")
PRECISIONS = ("fp16", "bf16", "int8", "fp8")
DEFAULT_MAX_BATCH = 1  # the edge case: one clip at a time

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


@dataclass
class Finding:
    graph: str
    node: str
    op: str
    problem: str

    def line(self) -> str:
        where = f"node {self.node!r} ({self.op})" if self.node else self.op
        return f"{self.graph} {where}: {self.problem}"


@dataclass
class CheckReport:
    engine_dir: str
    problems: list[Finding] = field(default_factory=list)
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line, for logs and the CLI."""
        if self.ok:
            pins = sum(len(g["fp32_pins"]) for g in self.graphs.values())
            return (f"TensorRT check: ok ({', '.join(self.graphs)}; {pins} nodes pinned to FP32 in fp16/bf16 "
                    "builds)")
        more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"TensorRT check failed: {self.problems[0].line()}{more}"

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise EngineError(f"{self.engine_dir}: {self.summary()}")

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine_dir, "ok": self.ok, "summary": self.summary(),
                "problems": [asdict(p) | {"message": p.line()} for p in self.problems], "graphs": self.graphs}


# ----------------------------------------------------------------------------- profiles (pure)


def derive_profiles(manifest: dict[str, Any] | Manifest | EngineSpec, max_batch: int = DEFAULT_MAX_BATCH,
                    max_context: int | None = None) -> dict[str, list[Profile]]:
    """Optimization profiles from the manifest alone (Polygraphy-style min/opt/max per input), from
    the runtime's one derivation (blip3v.runtime.manifest.visual_shape_ranges / decoder_shape_ranges):

    visual: one profile, batch 1..B (opt 1), T/3/S/S fixed by the manifest.
    decoder: two profiles over the same inputs (DECODER_PROFILE_CALLS: 0 prefill, 1 decode), so the
      one engine is tuned for a prompt (or chunk) of S tokens and for single-token steps.
      C = max_context (default and upper bound: the manifest's)."""
    spec = manifest.spec if isinstance(manifest, Manifest) else (
        manifest if isinstance(manifest, EngineSpec) else EngineSpec.from_dict(manifest))
    return {"visual": [visual_shape_ranges(spec, max_batch)],
            "decoder": [decoder_shape_ranges(spec, max_batch, max_context, call) for call in DECODER_PROFILE_CALLS]}


def profiles_to_json(profiles: dict[str, list[Profile]]) -> dict[str, list[dict[str, dict[str, list[int]]]]]:
    return {g: [{name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in p.items()}
                for p in ps] for g, ps in profiles.items()}


# ----------------------------------------------------------------------------- graph analysis (pure)


def _graphs(graph: Any) -> list[Any]:
    """The graph and every subgraph (If branches, Loop/Scan bodies), depth first."""
    import onnx

    out = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out += _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    out += _graphs(g)
    return out


def _constants(graph: Any) -> set[str]:
    return {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def fp32_pins(graph: Any) -> list[str]:
    """Names of the nodes an fp16/bf16 build keeps in FP32: PIN_OPS, and RMSNorm written out
    (transformers' Phi3RMSNorm exports as Pow(x, 2) -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal
    -> Mul): the chain from a ReduceMean fed by a square up to the Mul that applies the scale."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    pins: list[str] = []
    for n in graph.node:
        if n.op_type in PIN_OPS:
            pins.append(n.name)
        elif n.op_type == "ReduceMean" and n.input:
            src = producers.get(n.input[0])
            squared = src is not None and (src.op_type == "Pow" or (src.op_type == "Mul" and len(set(src.input)) == 1))
            if not squared:
                continue
            chain = [src.name, n.name]
            node = n
            for _ in range(4):  # Add(eps) -> Sqrt -> Reciprocal | Div -> Mul
                nxt = [c for c in consumers.get(node.output[0], [])
                       if c.op_type in ("Add", "Sqrt", "Reciprocal", "Div", "Mul")]
                if len(nxt) != 1:
                    break
                node = nxt[0]
                chain.append(node.name)
                if node.op_type == "Mul":
                    break
            pins += chain
    return list(dict.fromkeys(pins))


def quantization(graph: Any) -> list[str]:
    """Kinds of explicit quantization in the graph: "int8", "fp8", "int4" (from Q/DQ zero points or
    output types); [] when it has no QuantizeLinear/DequantizeLinear nodes."""
    import onnx

    types = {t.name: t.data_type for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    names = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "int8",
             onnx.TensorProto.FLOAT8E4M3FN: "fp8", onnx.TensorProto.INT4: "int4"}
    kinds: set[str] = set()
    for n in graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = n.input[2] if len(n.input) > 2 and n.input[2] else None
        attr_type = next((a.i for a in n.attribute if a.name == "output_dtype"), 0)
        kind = names.get(types.get(zero, 0) if zero else attr_type) or "int8"  # no zero point: uint8 default
        kinds.add(kind)
    return sorted(kinds)


def check_graph(model: Any, label: str) -> tuple[list[Finding], dict[str, Any]]:
    """Parser-level problems of one ONNX model (loaded without external data) and its facts."""
    import onnx

    if model.functions:
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    problems: list[Finding] = []
    opset = next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), 0)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        problems.append(Finding(label, "", f"opset {opset}",
                                f"TensorRT 10's ONNX parser reads opsets {MIN_OPSET}..{MAX_OPSET}; re-export with "
                                f"--opset {min(max(opset, MIN_OPSET), MAX_OPSET)}"))
    bad_types = {onnx.TensorProto.STRING, onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
    ops: dict[str, int] = {}
    for g in _graphs(model.graph):
        constants = _constants(g)
        for n in g.node:
            key = n.op_type if n.domain in ONNX_DOMAINS else f"{n.domain}.{n.op_type}"
            ops[key] = ops.get(key, 0) + 1
            if n.domain not in ONNX_DOMAINS:
                hint = CONTRIB_HINT if n.domain == "com.microsoft" else "register a TensorRT plugin for it or remove it"
                problems.append(Finding(label, n.name, key, f"domain {n.domain} is not imported by TensorRT's "
                                                            f"ONNX parser; {hint}"))
                continue
            since = SUPPORTED.get(n.op_type)
            if since is None:
                hint = f"; {CONTRIB_HINT}" if n.op_type in ORT_DEFAULT_DOMAIN_OPS else ""
                problems.append(Finding(label, n.name, n.op_type, f"not supported by TensorRT 10's ONNX parser{hint}"))
                continue
            if opset < since:
                problems.append(Finding(label, n.name, n.op_type, f"needs opset {since}, the graph has {opset}"))
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "ScatterElements" and attrs.get("reduction", b"none") not in (b"none", "none"):
                problems.append(Finding(label, n.name, n.op_type, f"reduction {attrs['reduction']!r} is not "
                                                                  "supported (only 'none')"))
            if n.op_type == "Einsum" and len(n.input) > 2:
                problems.append(Finding(label, n.name, n.op_type, "more than 2 operands"))
            if n.op_type == "Cast" and attrs.get("to") in bad_types:
                problems.append(Finding(label, n.name, n.op_type, "casts to a string/complex type"))
            if n.op_type == "Loop" and (not n.input[0] or n.input[0] not in constants):
                problems.append(Finding(label, n.name, n.op_type, "trip count is data-dependent; TensorRT needs "
                                                                  "it known when the engine is built"))
            if n.op_type == "If":
                then_g, else_g = attrs.get("then_branch"), attrs.get("else_branch")
                if then_g is not None and else_g is not None and (
                        [_dims(o) for o in then_g.output] != [_dims(o) for o in else_g.output]):
                    problems.append(Finding(label, n.name, n.op_type,
                                            "branches give differently shaped outputs (e.g. a cache / no-cache "
                                            "switch); TensorRT needs one shape: export one graph for both calls"))
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.type.tensor_type.elem_type in bad_types:
            problems.append(Finding(label, "", f"tensor {vi.name}", "has a string/complex type"))
    facts = {"opset": opset, "nodes": sum(ops.values()), "ops": dict(sorted(ops.items())),
             "fp32_pins": fp32_pins(model.graph), "quantization": quantization(model.graph),
             "inputs": {i.name: _dims(i) for i in model.graph.input}}
    return problems, facts


def check_profiles(label: str, inputs: dict[str, list[int | str]], profiles: list[Profile]) -> list[Finding]:
    """Every graph input has a min/opt/max in each profile that its static dims agree with."""
    problems: list[Finding] = []
    for k, profile in enumerate(profiles):
        for name in sorted(set(profile) - set(inputs)):
            problems.append(Finding(label, "", f"input {name}", f"profile {k} names an input the graph lacks"))
        for name, dims in inputs.items():
            if name not in profile:
                problems.append(Finding(label, "", f"input {name}", f"no shape range in profile {k}"))
                continue
            lo, opt, hi = profile[name]
            if not len(lo) == len(opt) == len(hi) == len(dims):
                problems.append(Finding(label, "", f"input {name}", f"rank {len(dims)}, profile {k} gives {len(lo)}"))
                continue
            for axis, dim in enumerate(dims):
                if not 1 <= lo[axis] <= opt[axis] <= hi[axis]:
                    problems.append(Finding(label, "", f"input {name}",
                                            f"profile {k} axis {axis}: not 1 <= min <= opt <= max ({lo}, {opt}, {hi})"))
                elif isinstance(dim, int) and dim > 0 and not lo[axis] == hi[axis] == dim:
                    problems.append(Finding(label, "", f"input {name}",
                                            f"axis {axis} is fixed at {dim} in the graph, profile {k} gives "
                                            f"{lo[axis]}..{hi[axis]}"))
    return problems


def check_engine_dir(engine_dir: str | Path, max_batch: int = DEFAULT_MAX_BATCH, max_context: int | None = None,
                     precision: str = "fp16", verify_hashes: bool = True) -> CheckReport:
    """The whole check of an engine directory (see the module docstring). Never imports tensorrt.
    Problems are collected in the report; a broken directory (no manifest, bad hashes) raises EngineError."""
    import onnx

    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    manifest = load_manifest(engine_dir, verify_hashes=verify_hashes)
    report = CheckReport(str(engine_dir))
    profiles = derive_profiles(manifest, max_batch, max_context)
    for label in ("visual", "decoder"):
        path = manifest.path(label)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 (protobuf's DecodeError and friends)
            raise EngineError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        problems, facts = check_graph(model, path.name)
        problems += check_profiles(path.name, facts["inputs"], profiles[label])
        if precision in ("int8", "fp8") and precision not in facts["quantization"]:
            problems.append(Finding(path.name, "", precision, no_qdq_message(precision, facts["quantization"])))
        facts["file"] = path.name
        facts["profiles"] = profiles_to_json({label: profiles[label]})[label]
        if precision not in PIN_PRECISIONS:
            facts["fp32_pins"] = []
        report.graphs[label] = facts
        report.problems += problems
    return report


def no_qdq_message(precision: str, found: list[str]) -> str:
    have = f"it holds {', '.join(found)} Q/DQ nodes only" if found else "it has no QuantizeLinear/DequantizeLinear nodes"
    return (f"{precision} needs explicit quantization (Q/DQ nodes, built as a strongly typed network) and {have}; "
            "build --precision fp16, or quantize the graph first")

