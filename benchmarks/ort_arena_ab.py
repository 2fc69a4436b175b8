"""INT4 decode against onnxruntime-genai with each CPU-arena setting of the blip3v session.

The figures behind `blip3v.runtime.ort_backend.session_options` (benchmarks/RESULTS.md, decode
section): only the two INT4 models are loaded, and each run times `--pairs` interleaved requests
(blip3v, then genai) in a fresh process, since the env arena is registered once per process.
Runs alternate between the settings:

    session  ORT's default, an arena per session
    env      one CPU arena on ORT's environment, `session.use_env_allocators` (what ships)

    python -m blip3v.benchmarks.ort_arena_ab --work /tmp/arena-ab --runs 4 --pairs 10

The first call builds the random Phi-3 (4 layers, Phi-3-mini width), blip3v's INT4 decoder and the
builder's INT4 model into --work (about 5 minutes on the dev box); later calls reuse them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from blip3v.benchmarks import bench_decode as bd
from blip3v.benchmarks.common import log_stderr

SETTINGS = ("session", "env")
INT4 = {"block_size": 32, "accuracy_level": 4}


def build(work: Path, size: str, layers: int, threads: int) -> None:
    """The benchmark's models, made the way `bench decode` makes them, kept in `work`."""
    from blip3v.export.engine import decoder_golden

    if (work / "genai-int4" / "genai_config.json").is_file():
        return
    model = bd.make_phi3_dir(work / "phi3", size, layers)
    embeddings = model.model.embed_tokens.weight.detach().float().numpy().copy()
    np.save(work / "embeddings.npy", embeddings)
    golden = decoder_golden(bd._engine_shim(model))
    fp32 = bd.export_blip3v(model, work, ["gqa"], "fp32", golden, log_stderr)["gqa"]["path"]
    bd.quantize_blip3v_int4(fp32, embeddings, model.config, INT4["block_size"], INT4["accuracy_level"], log_stderr)
    bd.build_genai(work / "phi3", work / "genai-int4", threads, log_stderr, "int4", INT4)


def child(work: Path, setting: str, pairs: int, threads: int) -> dict:
    """One process: blip3v INT4 with `setting` beside genai INT4 -> ms/token per pair."""
    import onnxruntime as ort
    from transformers import AutoConfig

    graph = work / "decoder-gqa-fp32-int4.onnx"
    conf = AutoConfig.from_pretrained(work / "phi3")
    backend = bd.blip3v_backend(graph, np.load(work / "embeddings.npy"), conf, threads)  # shipped options (env arena)
    if setting == "session":
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        backend.decoder = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    systems = [bd.blip3v_system(backend, "gqa", "int4"), bd.genai_system(work / "genai-int4", "int4")]
    prompt = np.random.default_rng(0).integers(3, min(32000, conf.vocab_size - 64), size=128)  # as bench decode
    bd.measure(systems, prompt, 64, pairs, lambda _m: None)
    ours, genai = ([r.decode_ms for r in s.requests] for s in systems)
    return {"setting": setting, "blip3v_ms": ours, "genai_ms": genai,
            "ratio_median": float(np.median([g / b for b, g in zip(ours, genai)]))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="Folder for the models (built on first use).")
    p.add_argument("--size", choices=["phi3-mini", "tiny"], default="phi3-mini")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--runs", type=int, default=4, help="Runs per setting, alternating.")
    p.add_argument("--pairs", type=int, default=10, help="Interleaved request pairs per run.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.work, args.child, args.pairs, args.threads)))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    build(args.work, args.size, args.layers, args.threads)
    ratios: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for run in range(args.runs):
        for setting in SETTINGS:
            done = subprocess.run([sys.executable, "-m", "blip3v.benchmarks.ort_arena_ab", "--work", str(args.work),
                                   "--child", setting, "--pairs", str(args.pairs), "--threads", str(args.threads)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"error: the {setting} run failed: {done.stderr.strip().splitlines()[-1:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            ratios[setting].append(r["ratio_median"])
            print(f"run {run + 1}/{args.runs} {setting:<8} blip3v {np.median(r['blip3v_ms']):6.2f} ms/token  "
                  f"genai {np.median(r['genai_ms']):6.2f}  ratio (genai / blip3v, median of pairs) "
                  f"{r['ratio_median']:.3f}", flush=True)
    for setting, rs in ratios.items():
        print(f"{setting}: ratios {', '.join(f'{x:.3f}' for x in rs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
