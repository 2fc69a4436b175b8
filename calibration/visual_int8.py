"""INT8 visual graphs (the fused visual.onnx and the per-frame frame.onnx) through ONNX Runtime's
static quantizer, calibrated on video frames.

    onnxruntime.quantization.quantize_static, QDQ format, on every MatMul / Gemm / Conv that
    carries a weight (named in nodes_to_quantize: ORT's QDQ MatMul ignores MatMulConstBOnly and
    would quantize attention's activation x activation MatMuls too):
        x -> QuantizeLinear(s_x, 0) -> DequantizeLinear -> op     int8 activation, symmetric, per tensor
        W_int8 -> DequantizeLinear(s_w[c], 0) -> op                int8 weight, symmetric, per output channel
    the op's output stays float (OpTypesToExcludeOutputQuantization), as TensorRT's explicit
    quantization wants it: it fuses each pair into an INT8 kernel. ONNX Runtime runs it as written.

The activation ranges are ORT's calibrators fed by `FrameReader` (calibration/data.py, the runtime's
own video reader): --method minmax -> MinMax, entropy -> Entropy, percentile -> Percentile (99.99th,
outliers clipped).

A sensitivity pass then quantizes one layer at a time (the ranges collected once, through ORT's
calibration cache) and measures how far the graph's output moves (1 - cosine similarity against the
float graph); the `keep` worst layers stay float (left out of `nodes_to_quantize`). On the demo model the worst
layer alone moves the video tokens ten times more than the next one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from blip3v.calibration.data import FrameReader
from blip3v.calibration.graph import PROTO_LIMIT, quiet_ort, session
from blip3v.errors import InputError

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
QUANT_OPS = ("MatMul", "Gemm", "Conv")
PERCENTILE = 99.99
OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True,
           "OpTypesToExcludeOutputQuantization": list(QUANT_OPS), "CalibPercentile": PERCENTILE,
           # one clip's intermediate tensors in memory at a time (FrameReader.set_range)
           "CalibStridedMinMax": 1}


def weight_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul / Gemm / Conv nodes whose second input is a float initializer."""
    floats = {t.name for t in model.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    return [n.name for n in model.graph.node if n.op_type in QUANT_OPS and len(n.input) > 1
            and n.input[1] in floats and n.input[0] not in floats]


def quantize(model: Path, reader: Callable[[], FrameReader], method: str, cache: Path,
             layers: list[str]) -> onnx.ModelProto:
    """`model` (a file) -> its INT8 Q/DQ graph with `layers` (node names) quantized. Ranges come
    from `cache` when it exists (written by the first call), else from running `reader()`'s feeds."""
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    with tempfile.TemporaryDirectory(prefix="blip3v-qdq-") as tmp, quiet_ort():
        out = Path(tmp) / "model.onnx"
        quantize_static(str(model), str(out), reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANT_OPS), per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=list(layers), calibrate_method=METHODS[method],
                        use_external_data_format=model.stat().st_size > PROTO_LIMIT,
                        extra_options=dict(OPTIONS), calibration_cache_path=str(cache))
        return onnx.load(str(out))


def token_error(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Outputs (..., D) against the float graph's: mean cosine similarity per row, max abs diff."""
    a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    b = got.reshape(-1, got.shape[-1]).astype(np.float64)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "max_abs_diff": float(np.abs(a - b).max())}


def run_graph(model: onnx.ModelProto | Path, feeds: list[dict[str, np.ndarray]], output: str) -> np.ndarray:
    sess = session(model)
    return np.concatenate([sess.run([output], f)[0] for f in feeds])


def quantize_visual(model: Path, reader: Callable[[], FrameReader], output: str, method: str = "percentile",
                    keep: int = 2, sensitivity_clips: int = 4,
                    log: Callable[[str], None] = lambda _m: None,
                    advance: Callable[[int], None] = lambda _n: None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """`model` (visual.onnx or frame.onnx) -> (its INT8 Q/DQ graph, report). The `keep` layers that
    move `output` most, each quantized alone, stay float. `advance(1)` after each layer tried."""
    layers = weight_layers(onnx.load(str(model), load_external_data=False))
    if not layers:
        raise InputError(f"{model.name} has no MatMul/Gemm/Conv with weights to quantize")
    probe = list(reader())[:sensitivity_clips]
    ref = run_graph(model, probe, output)
    with tempfile.TemporaryDirectory(prefix="blip3v-ranges-") as tmp:
        cache = Path(tmp) / "ranges.json"
        log(f"  {model.name}: {len(layers)} weight layers; activation ranges on {len(reader())} clips ({method})")
        full = quantize(model, reader, method, cache, layers)  # also writes the range cache the pass below reads
        per_layer: list[dict[str, Any]] = []
        if keep:
            log(f"  sensitivity: quantizing one layer at a time on {len(probe)} clips")
            for name in layers:
                alone = quantize(model, reader, method, cache, [name])
                per_layer.append({"layer": name, **token_error(ref, run_graph(alone, probe, output))})
                advance(1)
        ranked = sorted(per_layer, key=lambda p: p["cosine"])  # most harmful first
        kept = sorted(p["layer"] for p in ranked[:min(keep, len(layers))])
        qmodel = quantize(model, reader, method, cache, [n for n in layers if n not in kept]) if kept else full
    report = {"method": method, "layers": len(layers), "quantized_layers": len(layers) - len(kept),
              "kept_float": kept, "per_layer": per_layer,
              f"{output}_vs_float": token_error(ref, run_graph(qmodel, probe, output))}
    return qmodel, report
