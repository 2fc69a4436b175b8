"""Engine directory (ONNX, `--attention standard`) -> TensorRT 10 plans: visual.plan and decoder.plan.

    blip3v build --engine engines/demo --precision fp16
    from blip3v.export.trt_build import build_engines; build_engines("engines/demo")

Pure logic first (no tensorrt import; unit-tested on any machine): `select_flags` (precision -> builder
flags / strongly typed network), `should_pin` (which TensorRT layers stay FP32), `build_settings` and
`provenance` (what the manifest's `tensorrt` section records) and `stale` (what differs from a
previous build). Then `_build_plan`, the only code that calls TensorRT, imported lazily.
Profiles come from blip3v.export.trt_check.derive_profiles, which takes them from the runtime's one
derivation of binding shapes (blip3v.runtime.manifest.decoder_shape_ranges / visual_shape_ranges).
Writes are atomic: plans go to temporary files renamed into place, then the manifest (its `files`
hashes updated and a `tensorrt` section added) is checked, sealed and written by
blip3v.runtime.manifest.write_manifest (a temporary file, renamed).
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip3v.errors import EngineError
from blip3v.export.trt_check import (DEFAULT_MAX_BATCH, PIN_PRECISIONS, PRECISIONS, Profile, check_engine_dir,
                                     derive_profiles, no_qdq_message, profiles_to_json)
from blip3v.runtime.manifest import MANIFEST_NAME, file_entries, load_manifest, write_manifest
from blip3v.runtime.trt_backend import DEVICE_KEYS, CudaRuntime, import_tensorrt, provenance_diff

if TYPE_CHECKING:  # for annotations only: at run time tensorrt is imported inside the functions that use it
    import tensorrt as trt

PLANS = {"visual": "visual.plan", "decoder": "decoder.plan"}
TIMING_CACHE = "timing.cache"  # default: next to the plans, reused by every rebuild
MIN_CC = {"fp16": (5, 3), "bf16": (8, 0), "int8": (6, 1), "fp8": (8, 9)}  # Ada/Hopper for fp8; Orin is 8.7
PIN_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX")  # always FP32 in fp16/bf16 builds, whatever their names

Log = Callable[[str], None]


@dataclass(frozen=True)
class Flags:
    builder_flags: tuple[str, ...]  # names of trt.BuilderFlag members
    strongly_typed: bool  # explicit quantization: types come from the graph's Q/DQ, not from flags
    pin_fp32: bool


def select_flags(precision: str, quantized: list[str]) -> Flags:
    """fp16/bf16: the precision flag + OBEY_PRECISION_CONSTRAINTS so pinned layers really stay FP32.
    int8/fp8: only from Q/DQ graphs (explicit quantization), as a strongly typed network, where TensorRT
    forbids precision flags and per-layer precisions (TensorRT 10 developer guide, "Strongly Typed
    Networks"); `quantized` is what `trt_check.quantization` found in the graph."""
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision in PIN_PRECISIONS:
        return Flags((precision.upper(), "OBEY_PRECISION_CONSTRAINTS"), False, True)
    if precision not in quantized:
        raise EngineError(no_qdq_message(precision, quantized))
    return Flags((), True, False)


def precision_problem(precision: str, compute_capability: str) -> str | None:
    major, minor = (int(x) for x in compute_capability.split(".")[:2])
    need = MIN_CC[precision]
    if (major, minor) < need:
        return f"{precision} needs compute capability {need[0]}.{need[1]} or newer; this GPU has {compute_capability}"
    return None


def should_pin(layer_type: str, layer_name: str, pinned_nodes: set[str]) -> bool:
    """A TensorRT layer stays FP32 if its type is a normalization/softmax, or it came from a pinned ONNX
    node: the parser names a node's layers after the node (the node name, or it plus a suffix)."""
    if layer_type in PIN_LAYER_TYPES:
        return True
    return layer_name in pinned_nodes or any(layer_name.startswith(n + s) for n in pinned_nodes for s in ("_", "/", "."))


def build_settings(precision: str, max_batch: int, max_context: int, workspace_gb: float) -> dict[str, Any]:
    return {"precision": precision, "max_batch": max_batch, "max_context": max_context, "workspace_gb": workspace_gb}


def source_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """sha256 of the ONNX graphs (and their external data) the plans are built from, from the manifest."""
    names = [manifest[g]["file"] for g in PLANS]
    names += [n + ".data" for n in names if n + ".data" in manifest["files"]]
    return {n: manifest["files"][n]["sha256"] for n in sorted(names)}


def provenance(device: dict[str, str], manifest: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The comparable part of the `tensorrt` section: device keys, ONNX hashes, build settings."""
    return {**device, "onnx_sha256": source_hashes(manifest), **settings}


def stale(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a previous build's record and this one (empty: the plans are current)."""
    keys = (*DEVICE_KEYS, "onnx_sha256", "precision", "max_batch", "max_context")
    return provenance_diff(recorded, current, keys)


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- TensorRT calls


def _parse_errors(parser: trt.OnnxParser) -> str:
    errors = []
    for i in range(parser.num_errors):
        err: trt.ParserError = parser.get_error(i)  # annotated: the stubs type get_error's result as `...`
        where = f" (node {err.node_name()})" if err.node_name() else ""
        errors.append(f"{err.desc()}{where}")
    return "; ".join(errors) or "no message"


def _build_plan(logger: trt.ILogger, onnx_path: Path, profiles: list[Profile], flags: Flags, pins: set[str],
                workspace_gb: float, cache_bytes: bytes | None) -> tuple[bytes, bytes, int]:
    """One ONNX graph -> (serialized plan, timing cache bytes, number of layers pinned to FP32)."""
    import tensorrt as trt  # build_engines checked it is installed (import_tensorrt)

    builder = trt.Builder(logger)
    creation = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if flags.strongly_typed else 0
    network = builder.create_network(creation)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads NAME.onnx.data next to it too
        raise EngineError(f"{onnx_path.name}: TensorRT's ONNX parser failed: {_parse_errors(parser)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for name in flags.builder_flags:
        config.set_flag(trt.BuilderFlag.__members__[name])  # typed, unlike getattr
    cache = config.create_timing_cache(cache_bytes or b"")
    config.set_timing_cache(cache, False)
    for profile in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            p.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        config.add_optimization_profile(p)
    pinned = 0
    if flags.pin_fp32:
        float_types = (trt.float32, trt.float16, trt.bfloat16)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if not should_pin(layer.type.name, layer.name, pins):
                continue
            outputs = [layer.get_output(k) for k in range(layer.num_outputs)]
            if not outputs or any(t.dtype not in float_types for t in outputs):
                continue  # shape/int layers keep their types
            layer.precision = trt.float32
            for k in range(layer.num_outputs):
                layer.set_output_type(k, trt.float32)
            pinned += 1
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{onnx_path.name}: TensorRT could not build an engine (see the TensorRT log above)")
    return bytes(memoryview(plan)), bytes(memoryview(config.get_timing_cache().serialize())), pinned


def build_engines(engine_dir: str | Path, precision: str = "fp16", workspace_gb: float = 4.0,
                  timing_cache: str | Path | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                  max_context: int | None = None, rebuild: bool = False, log: Log | None = None) -> dict[str, Any]:
    """Builds (or confirms current) visual.plan and decoder.plan; returns the manifest's `tensorrt` section."""
    log = log or (lambda _msg: None)
    root = Path(engine_dir)
    manifest = load_manifest(root)
    raw = manifest.raw
    report = check_engine_dir(root, max_batch, max_context, precision, verify_hashes=False)
    report.raise_if_failed()
    ctx = int(max_context or manifest.spec.model.max_context)
    flags = {g: select_flags(precision, report.graphs[g]["quantization"]) for g in PLANS}

    import_tensorrt()  # one clear EngineError if TensorRT is missing
    import tensorrt as trt

    gpu, cc = CudaRuntime().device()
    problem = precision_problem(precision, cc)
    if problem:
        raise EngineError(f"{problem} ({gpu}); choose another --precision")
    device = {"tensorrt_version": trt.__version__, "gpu": gpu, "compute_capability": cc}
    current = provenance(device, raw, build_settings(precision, max_batch, ctx, workspace_gb))
    recorded = raw.get("tensorrt")
    if isinstance(recorded, dict) and all((root / p).is_file() for p in PLANS.values()) and not rebuild:
        differs = stale(recorded, current)
        if differs:
            raise EngineError(f"{root}: existing TensorRT engines were built for something else ({'; '.join(differs)}); "
                              "rerun with --rebuild")
        log("TensorRT engines are up to date (use --rebuild to build them again)")
        return recorded

    cache_path = Path(timing_cache) if timing_cache else root / TIMING_CACHE
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else None
    logger = trt.Logger(trt.Logger.WARNING)
    profiles = derive_profiles(manifest, max_batch, ctx)
    tmp_files: list[Path] = []
    pinned: dict[str, int] = {}
    try:
        for graph, plan_name in PLANS.items():
            onnx_path = manifest.path(graph)
            log(f"building {plan_name} from {onnx_path.name} ({precision}, {len(profiles[graph])} profile(s))")
            pins = set(report.graphs[graph]["fp32_pins"])
            plan, cache_bytes, pinned[graph] = _build_plan(logger, onnx_path, profiles[graph], flags[graph], pins,
                                                           workspace_gb, cache_bytes)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{plan_name}.", dir=root)
            tmp_files.append(Path(tmp_name))
            with os.fdopen(fd, "wb") as f:
                f.write(plan)
        for done, plan_name in zip(tmp_files, PLANS.values()):
            os.chmod(done, 0o644)
            os.replace(done, root / plan_name)
        tmp_files = []
    finally:
        for leftover in tmp_files:
            leftover.unlink(missing_ok=True)
    if cache_bytes:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_path, cache_bytes)

    section = {**current, "plans": dict(PLANS), "builder_flags": {g: list(f.builder_flags) for g, f in flags.items()},
               "strongly_typed": {g: f.strongly_typed for g, f in flags.items()},
               "layers_pinned_fp32": pinned, "profiles": profiles_to_json(profiles),
               "timing_cache": str(cache_path),
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    updated = dict(raw)
    updated["tensorrt"] = section
    updated["files"] = {**raw["files"], **file_entries(root, list(PLANS.values()))}
    write_manifest(root, updated)  # checked against the typed model and re-sealed (manifest_sha256)
    log(f"wrote {', '.join(PLANS.values())} and updated {MANIFEST_NAME}")
    return section

