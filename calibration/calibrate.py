"""`blip3v calibrate`: an fp32 engine directory -> a quantized engine directory and a report.

    visual   int8: Q/DQ graphs from ONNX Runtime's static quantizer calibrated on video frames
             (calibration/visual_int8.py): the fused visual.onnx, and the per-frame frame.onnx of
             the split visual path (live mode) where the engine has one | fp32: as is
    decoder  int4 / int8: weight-only MatMulNBits packed by ORT, activation-aware scales from
             prompts that carry the visual graph's own video tokens (calibration/weight_only.py)
             | fp32: as is

The report times every quantized graph against its float original on the same inputs and flags
one that is slower (`slower_than_fp32`): INT8 Q/DQ pays off on TensorRT's INT8 kernels, and on a
CPU without fast int8 paths it can cost more than it saves.

The new engine is the old one with its graph files replaced and the manifest extended by a
`quantization` block (precision, method, sample count, sha256 of the calibration set). It is built
in a temporary folder beside the output that takes the output's name only when complete
(blip3v.atomic.atomic_dir).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from blip3v.calibration.data import CalibrationSet
from blip3v.errors import InputError
from blip3v.progress import StepBar

VISUAL_CHOICES = ("int8", "fp32")
DECODER_CHOICES = ("int4", "int8", "fp32")
CALIBRATION_SEED = 424_242  # synthetic calibration clips: far from eval seeds and the training stream
HELD_OUT_SEED = 31_337  # synthetic clips for the agreement check
SLOWER_MARGIN = 1.05  # a quantized graph over 5 % slower than fp32 is flagged (below that: timing noise)
TIMING_ROUNDS = 10


@dataclass
class CalibrateOptions:
    visual: str = "int8"
    decoder: str = "int4"
    method: str = "entropy"  # visual activation ranges
    weights: str = "awq"  # decoder scales: awq | rtn
    block_size: int = 32
    accuracy_level: int = 0  # MatMulNBits compute: 0 = unset (float), 4 = int8 activations
    samples: int = 32
    keep: int = 2  # visual layers kept in float by the sensitivity pass
    eval_n: int = 200
    compare_rtn: bool = True  # also score round-to-nearest on the held-out clips

    def check(self) -> None:
        if self.visual == "fp16" or self.decoder == "fp16":
            raise InputError("fp16 is an export precision: use `blip3v export --precision fp16` (calibrate quantizes "
                             "an fp32 engine to int8/int4)")
        if self.visual not in VISUAL_CHOICES:
            raise InputError(f"--visual must be one of {', '.join(VISUAL_CHOICES)}")
        if self.decoder not in DECODER_CHOICES:
            raise InputError(f"--decoder must be one of {', '.join(DECODER_CHOICES)}")
        if self.visual == "fp32" and self.decoder == "fp32":
            raise InputError("nothing to do: --visual fp32 and --decoder fp32")


def _synth(folder: Path, n: int, seed: int) -> Path:
    from blip3v.data.synth import write_dataset

    write_dataset(folder, n=n, seed=seed, progress=False)
    return folder


def decoder_feeds(backend, calib: CalibrationSet, encode=None) -> list[dict[str, np.ndarray]]:
    """One prefill feed per calibration clip: its question's prompt with the clip's video tokens
    (from `encode`, pixels (1, T, 3, S, S) -> tokens; default the engine's float visual graph)
    spliced in, an empty KV cache of the prompt's size."""
    feeds = []
    for clip, question in zip(calib.clips, calib.questions):
        video = (encode or backend.encode_video)(clip[None])
        embeds, mask = backend.splice([backend.tokenizer.encode_prompt(question)], video)
        s = embeds.shape[1]
        feed = {backend.embeds_name: embeds, backend.mask_name: mask,
                backend.position_name: np.arange(s, dtype=np.int64)[None]}
        for name in backend.past_names:
            feed[name] = np.zeros((1, backend.kv_heads, s, backend.head_dim), backend.dtype)
        feeds.append(feed)
    return feeds


def _sizes(directory: Path, names: list[str]) -> dict[str, int]:
    return {n: sum(p.stat().st_size for p in directory.glob(n + "*")) for n in names}


def decode_timing(before: Path, after: Path, clips: np.ndarray, question: str, new_tokens: int = 16,
                  passes: int = 4) -> dict[str, Any]:
    """Decode ms/token of two engines on the same clips and prompt (exactly `new_tokens` tokens
    each): per clip the median step, the best over `passes` passes after a warm-up one, the two
    engines alternating clip by clip (as graph_timing)."""
    from blip3v.runtime.decoding import generate
    from blip3v.runtime.generation import SamplingConfig
    from blip3v.runtime.ort_backend import OrtBackend

    backends = {"fp32_ms_per_token": OrtBackend.load(before), "quantized_ms_per_token": OrtBackend.load(after)}
    best = {k: np.full(len(clips), np.inf) for k in backends}
    for pass_ in range(passes + 1):
        for i, clip in enumerate(clips):
            for key, backend in backends.items():
                prompt = [backend.tokenizer.encode_prompt(question)]
                embeds, mask = backend.splice(prompt, backend.encode_video(clip[None]))
                marks: list[float] = []
                generate(backend, embeds, mask, SamplingConfig(max_new_tokens=new_tokens), (),  # no stop ids
                         on_token=lambda _r, _t: marks.append(time.perf_counter()))
                if pass_:  # pass 0 warms up
                    best[key][i] = min(best[key][i], float(np.median(np.diff(marks))) * 1e3)
    out: dict[str, Any] = {k: float(v.mean()) for k, v in best.items()}
    out["slower_than_fp32"] = out["quantized_ms_per_token"] > SLOWER_MARGIN * out["fp32_ms_per_token"]
    return out


def graph_timing(before: Path, after: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """ms per feed of the float graph and its quantized copy on the same feeds, one thread each:
    per feed the best of TIMING_ROUNDS runs (timeit's rule: load from other processes only ever
    adds time), the two graphs alternating run by run so that a busy spell on a shared machine
    hits both."""
    from blip3v.calibration.graph import session

    sessions = {"fp32_ms": session(before, threads=1), "quantized_ms": session(after, threads=1)}
    best = {k: np.full(len(feeds), np.inf) for k in sessions}
    for round_ in range(TIMING_ROUNDS + 1):
        for i, feed in enumerate(feeds):
            for key, sess in sessions.items():
                t0 = time.perf_counter()
                sess.run(None, feed)
                if round_:  # round 0 warms up
                    best[key][i] = min(best[key][i], (time.perf_counter() - t0) * 1e3)
    out: dict[str, Any] = {k: float(v.mean()) for k, v in best.items()}
    out["slower_than_fp32"] = out["quantized_ms"] > SLOWER_MARGIN * out["fp32_ms"]
    return out


def _answers(engine: Path, data: Path) -> dict[str, Any]:
    from blip3v.data.evaluate import evaluate
    from blip3v.runtime.ort_backend import OrtBackend
    from blip3v.runtime.session import Engine

    # clips decode (and encode, in evaluate's workers) beside the engine: its threads must not spin
    return evaluate(Engine(OrtBackend.load(engine, spinning=False, parallel_clips=True)), data, batch_size=16,
                    progress=False)


def _agreement(a: dict[str, Any], b: dict[str, Any]) -> float:
    from blip3v.data.synth import normalise_answer

    pairs = zip(a["predictions"], b["predictions"])
    same = [normalise_answer(x["prediction"]) == normalise_answer(y["prediction"]) for x, y in pairs]
    return float(np.mean(same))


def _write_engine(source: Path, out: Path, graphs: dict[str, onnx.ModelProto], quantization: dict[str, Any]) -> None:
    from blip3v.atomic import atomic_dir
    from blip3v.calibration.graph import save_model
    from blip3v.runtime.manifest import file_entries, load_manifest, write_manifest

    manifest = load_manifest(source, verify_hashes=False).raw  # checked and migrated; hashed by the caller's load
    files = manifest["files"]
    with atomic_dir(out) as tmp:  # `out` appears only complete (blip3v/atomic.py)
        for name in files:
            if not any(name == manifest[g]["file"] or name.startswith(manifest[g]["file"] + ".") for g in graphs):
                shutil.copy2(source / name, tmp / name)
        names = [n for n in files if (tmp / n).exists()]
        for role, model in graphs.items():
            path = tmp / manifest[role]["file"]
            save_model(model, path)
            names += [p.name for p in tmp.glob(path.name + "*")]
        manifest = dict(manifest, quantization=quantization, files=file_entries(tmp, sorted(set(names))))
        write_manifest(tmp, manifest)  # checked against the typed model and sealed


def calibrate_engine(engine: str | Path, out: str | Path, videos: str | Path | None, opts: CalibrateOptions,
                     eval_data: str | Path | None = None, log=lambda _m: None,
                     progress: bool = False) -> dict[str, Any]:
    """Quantizes `engine` into `out`; returns the report (also stored, without per-layer detail, in
    the new manifest's `quantization` block). `progress`: one bar with an ETA on stderr over the
    steps below (log lines then go above it)."""
    from blip3v.calibration.data import FrameReader
    from blip3v.calibration.visual_int8 import quantize_visual, run_graph, token_error
    from blip3v.calibration.weight_only import quantize_decoder
    from blip3v.runtime.manifest import load_manifest
    from blip3v.runtime.ort_backend import OrtBackend

    opts.check()
    engine, out = Path(engine), Path(out)
    if engine.resolve() == out.resolve():
        raise InputError("--out must be a new directory, not the source engine")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty")
    manifest = load_manifest(engine)
    if manifest["dtype"] != "float32":
        raise InputError(f"{engine}: a {manifest['precision']} engine; calibrate quantizes an fp32 engine "
                         "(`blip3v export --precision fp32`)")
    if "quantization" in manifest.raw:
        raise InputError(f"{engine} is already quantized; calibrate its fp32 source engine")
    backend = OrtBackend.load(engine)
    split = opts.visual == "int8" and "frame" in manifest.raw  # the per-frame graph of live mode
    rtn = opts.compare_rtn and opts.decoder != "fp32" and opts.weights == "awq"
    if eval_data is not None and not Path(eval_data).is_dir():
        raise InputError(f"{eval_data}: held-out folder not found (--eval-data: a folder written by blip3v data synth)")
    t_start = time.perf_counter()
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="blip3v-calibrate-"))
        # The calibration clips are read before the bar starts: a bad video is then one error line.
        if videos is None:
            log(f"calibration videos: {opts.samples} synthetic clips (seed {CALIBRATION_SEED})")
            videos = _synth(Path(tmp) / "calib", opts.samples, CALIBRATION_SEED)
        calib = CalibrationSet.from_folder(videos, backend.num_frames, backend.image_size, backend.image_mean,
                                           backend.image_std, samples=opts.samples)
        # Each step's share of the bar: rough relative cost on the demo engine (the sensitivity
        # pass moves its share layer by layer).
        weights = {"visual": 6.0 if opts.keep else 1.0, "frame": 1.5 if opts.keep else 0.5, "decoder": 1.0,
                   "write": 0.3, "held-out answers": 3.0, "round-to-nearest": 2.0, "timing": 1.5}
        skip = {"visual": opts.visual == "fp32", "frame": not split, "decoder": opts.decoder == "fp32",
                "round-to-nearest": not rtn}
        bar = stack.enter_context(StepBar({k: v for k, v in weights.items() if not skip.get(k)}, desc="calibrate",
                                          enabled=progress))
        if progress:
            log = bar.write
        log(f"calibration set: {len(calib)} clips from {videos}")
        source = "synthetic" if Path(videos).is_relative_to(tmp) else str(videos)
        quantization: dict[str, Any] = {"samples": len(calib), "calibration_sha256": calib.digest(),
                                        "calibration_source": source}
        report: dict[str, Any] = {"engine": str(engine), "out": str(out)}
        graphs: dict[str, onnx.ModelProto] = {}
        timing: dict[str, dict[str, Any]] = {}
        probe = calib.clips[:3]
        if opts.visual == "int8":
            roles = [("visual", backend.pixel_name, backend.video_name, False)]
            if split:
                frame = manifest.raw["frame"]
                roles.append(("frame", frame["inputs"]["pixel_values"], frame["outputs"]["latents"], True))
            for role, given, gives, per_frame in roles:
                path = manifest.path("visual") if role == "visual" else engine / manifest.raw[role]["file"]
                n_layers = len(_layers(path))
                with bar.step(role, total=n_layers if opts.keep else None) as advance:
                    log(f"[{role}] INT8 Q/DQ ({opts.method}) through onnxruntime.quantization, sensitivity pass "
                        f"keeps {opts.keep} layer(s) in float")
                    reader = (lambda g=given, f=per_frame: FrameReader(calib, g, per_frame=f))
                    graphs[role], vis = quantize_visual(path, reader, gives, opts.method, opts.keep, log=log,
                                                        advance=advance)
                    feeds = list(reader())
                    vis["vs_float_all_clips"] = token_error(run_graph(path, feeds, gives),
                                                            run_graph(graphs[role], feeds, gives))
                    report[role] = vis
                    quantization[role] = {"precision": "int8", "format": "qdq",
                                          "quantizer": "onnxruntime.quantize_static",
                                          "activations": "symmetric per tensor",
                                          "weights": "symmetric per output channel", "method": opts.method,
                                          "kept_float": vis["kept_float"],
                                          f"{gives}_cosine": vis["vs_float_all_clips"]["cosine"]}
                    timing[role] = graph_timing(path, graphs[role], feeds[:len(probe)])
        if opts.decoder != "fp32":
            with bar.step("decoder"):
                log(f"[decoder] weight-only {opts.decoder} ({opts.weights}, block {opts.block_size}) on prompts with "
                    "real video tokens, packed by onnxruntime's MatMulNBitsQuantizer")
                # The decoder is calibrated on the video tokens it will be fed: the quantized visual
                # graph's where there is one. (Demo model: with the float graph's tokens instead, AWQ
                # changed the first answer token on 2 of 400 held-out clips behind the INT8 visual
                # graph; with the INT8 graph's tokens on none, as round-to-nearest.)
                encode = None
                if "visual" in graphs:
                    from blip3v.calibration.graph import session

                    visual_session = session(graphs["visual"])

                    def encode(pixels: np.ndarray) -> np.ndarray:
                        return visual_session.run([backend.video_name], {backend.pixel_name: pixels})[0]
                dec_feeds = decoder_feeds(backend, calib, encode)
                dec_float = onnx.load(str(manifest.path("decoder")))
                graphs["decoder"], dec = quantize_decoder(dec_float, dec_feeds, opts.decoder, opts.weights,
                                                          opts.block_size, opts.accuracy_level, log=log)
                report["decoder"] = dec
                quantization["decoder"] = {"precision": opts.decoder, "format": "MatMulNBits", "method": opts.weights,
                                           "block_size": opts.block_size, "accuracy_level": opts.accuracy_level,
                                           "packer": "onnxruntime MatMulNBitsQuantizer"}
        with bar.step("write"):
            log(f"writing {out}")
            _write_engine(engine, out, graphs, quantization)
        names = [manifest.raw[role]["file"] for role in ("visual", "frame", "decoder") if role in manifest.raw]
        report["size_bytes"] = {"before": _sizes(engine, names), "after": _sizes(out, names)}
        with bar.step("held-out answers"):
            log("agreement with the fp32 engine on held-out clips")
            data = Path(eval_data) if eval_data else _synth(Path(tmp) / "heldout", opts.eval_n, HELD_OUT_SEED)
            ref, got = _answers(engine, data), _answers(out, data)
            agreement = {"clips": ref["n"], "data": str(eval_data or f"synthetic seed {HELD_OUT_SEED}"),
                         "same_answer": _agreement(ref, got), "accuracy_fp32": ref["accuracy"],
                         "accuracy_quantized": got["accuracy"]}
        if rtn:
            with bar.step("round-to-nearest"):
                log("  scoring round-to-nearest weights on the same clips, for comparison")
                rtn_out = Path(tmp) / "rtn-engine"
                rtn_graphs = dict(graphs)
                rtn_graphs["decoder"], _ = quantize_decoder(dec_float, dec_feeds, opts.decoder, "rtn", opts.block_size,
                                                            opts.accuracy_level)
                _write_engine(engine, rtn_out, rtn_graphs, quantization)
                rtn_answers = _answers(rtn_out, data)
                agreement.update(same_answer_rtn=_agreement(ref, rtn_answers), accuracy_rtn=rtn_answers["accuracy"])
        report["agreement"] = agreement
        with bar.step("timing"):
            log("timing each quantized graph against its float original on the same inputs")
            if opts.decoder != "fp32":
                timing["decoder"] = decode_timing(engine, out, probe, calib.questions[0])
        report["timing"] = timing
        report["slower_than_fp32"] = [role for role, t in timing.items() if t["slower_than_fp32"]]
    report["quantization"] = quantization
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def _layers(path: Path) -> list[str]:
    from blip3v.calibration.visual_int8 import weight_layers

    return weight_layers(onnx.load(str(path), load_external_data=False))


def summary(report: dict[str, Any]) -> list[str]:
    """The readable report."""
    lines = []
    b, a = report["size_bytes"]["before"], report["size_bytes"]["after"]
    for name in b:
        lines.append(f"{name}: {b[name] / 2**20:.2f} MiB -> {a[name] / 2**20:.2f} MiB")
    for role in ("visual", "frame"):
        if role in report:
            v = report[role]
            err = v["vs_float_all_clips"]
            lines.append(f"{role} int8 ({v['method']}): {v['quantized_layers']}/{v['layers']} layers quantized, kept "
                         f"float: {', '.join(v['kept_float']) or 'none'}; output cosine vs fp32 {err['cosine']:.5f} "
                         f"(min {err['cosine_min']:.5f})")
            if v["per_layer"]:
                worst = sorted(v["per_layer"], key=lambda p: p["cosine"])[:5]
                lines.append("  most sensitive layers (1 - cosine of the output, that layer alone in INT8): "
                             + ", ".join(f"{p['layer']} {1 - p['cosine']:.1e}" for p in worst))
    if "decoder" in report:
        d = report["decoder"]
        m = d["method"]
        mean = np.mean([p[f"{m}_rel_error"] for p in d["per_layer"]])
        rtn = np.mean([p["rtn_rel_error"] for p in d["per_layer"]])
        lines.append(f"decoder {d['scheme']} ({m}, block {d['block_size']}): {d['layers']} MatMuls, mean relative output "
                     f"error {mean:.2e} (round-to-nearest {rtn:.2e}); input scales folded into norms {d['folded']}, into "
                     f"MatMul columns {d['folded_into_matmul']}, Mul nodes {d['mul_nodes']}")
    g = report["agreement"]
    line = (f"same answer as fp32 on {100 * g['same_answer']:.1f}% of {g['clips']} held-out clips; accuracy "
            f"{g['accuracy_fp32']:.3f} -> {g['accuracy_quantized']:.3f}")
    if "same_answer_rtn" in g:
        line += f" (round-to-nearest: {100 * g['same_answer_rtn']:.1f}% same, accuracy {g['accuracy_rtn']:.3f})"
    lines.append(line)
    for role, t in report["timing"].items():
        unit = "ms/token (decode)" if role == "decoder" else "ms"
        before, after = (t["fp32_ms_per_token"], t["quantized_ms_per_token"]) if role == "decoder" else (
            t["fp32_ms"], t["quantized_ms"])
        flag = "  SLOWER THAN FP32" if t["slower_than_fp32"] else ""
        lines.append(f"{role}: fp32 {before:.2f} -> quantized {after:.2f} {unit}{flag}")
    if report["slower_than_fp32"]:
        lines.append(f"warning: slower than fp32 on this machine: {', '.join(report['slower_than_fp32'])} (INT8 Q/DQ "
                     "pays off where the runtime has INT8 kernels, e.g. TensorRT; keep the fp32 graph otherwise)")
    return lines
