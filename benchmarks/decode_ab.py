"""INT4 decode against onnxruntime-genai, one runtime setting at a time: the A/B behind the
runtime's session setup (benchmarks/RESULTS.md, decode section).

Only the two INT4 models are loaded. Every run is a fresh process (the env arena is registered
once per process, and huge pages are decided when the session is created), and runs alternate
between the settings:

    shipped   what `blip3v.runtime.ort_backend` does: env arena, weights on huge pages
    session   ORT's default arena per session instead of the env arena (huge pages kept)
    4k        weights left on 4 KiB pages (BLIP3V_HUGE_PAGES=0; env arena kept)

Two ways to pair the systems (`--mode`):

    requests  whole requests, blip3v then genai, `--pairs` times (what `blip3v bench decode` does)
    steps     within each of `--pairs` requests, one decode step of blip3v, then one of genai, with a
              pause before each step so neither starts while the other's thread pool still spins
              (genai's step runs inside the on_token callback of blip3v's decode loop, the shipped
              `blip3v.runtime.decoding.generate`, between two of its steps).
              The box's speed regime (it switches between about 12 and 16 ms/token from one request
              to the next) is then the same for both sides of every pair; steps start from parked
              threads, so absolute times are a little longer than in `requests`.

    python -m blip3v.benchmarks.decode_ab --work /tmp/decode-ab --settings shipped,4k --mode steps --runs 3

The first call builds the random Phi-3 (4 layers, Phi-3-mini width), blip3v's INT4 decoder and the
builder's INT4 model into --work (about 5 minutes on the dev box); later calls reuse them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from blip3v.benchmarks import bench_decode as bd
from blip3v.benchmarks.common import log_stderr

SETTINGS = ("shipped", "session", "4k")
INT4 = {"block_size": 32, "accuracy_level": 4}
STEP_PAUSE_S = 0.05  # longer than ORT's idle spin, so each step starts from parked threads


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


def blip3v_backend(work: Path, setting: str, threads: int):
    """-> (the INT4 decoder as the runtime runs it, the Phi-3 config)."""
    import onnxruntime as ort
    from transformers import AutoConfig

    options = None  # the runtime's own session options (env arena)
    if setting == "session":
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
    conf = AutoConfig.from_pretrained(work / "phi3")
    backend = bd.blip3v_backend(work / "decoder-gqa-fp32-int4.onnx", np.load(work / "embeddings.npy"), conf,
                                threads, options=options, attention="gqa")  # huge pages unless BLIP3V_HUGE_PAGES=0
    return backend, conf


def stepped_request(backend, model, prompt: np.ndarray, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """One request on each system, their decode steps alternating -> per-step ms (blip3v, genai).

    blip3v's request is the shipped decode loop (blip3v.runtime.decoding.generate); genai's prefill
    and each of its steps run inside that loop's on_token callback, so the two alternate without a
    thread. A blip3v step is timed from the callback's return to the next callback (the host work
    between runs included), genai's around generate_next_token + get_next_tokens."""
    import onnxruntime_genai as og

    from blip3v.runtime.decoding import generate
    from blip3v.runtime.generation import SamplingConfig

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens,
                              do_sample=False)
    generator = og.Generator(model, params)
    ours: list[float] = []
    theirs: list[float] = []
    resumed: list[float] = []

    def on_token(_row: int, _tok: int) -> None:
        if resumed:
            ours.append(time.perf_counter() - resumed[-1])
        time.sleep(STEP_PAUSE_S)
        if not resumed:  # blip3v's prefill and first id are done: genai's prefill and first id
            generator.append_tokens(prompt.astype(np.int32))
            generator.generate_next_token()
        else:
            t0 = time.perf_counter()
            generator.generate_next_token()
            generator.get_next_tokens()
            theirs.append(time.perf_counter() - t0)
        time.sleep(STEP_PAUSE_S)
        resumed.append(time.perf_counter())

    embeds = backend.embed(prompt[None].astype(np.int64))  # (1, P, D)
    generate(backend, embeds, np.ones((1, len(prompt)), np.int64), SamplingConfig(max_new_tokens=new_tokens), (),
             on_token)
    return np.array(ours) * 1e3, np.array(theirs) * 1e3


def child(work: Path, setting: str, mode: str, pairs: int, threads: int) -> dict:
    """One process: blip3v INT4 with `setting` beside genai INT4 -> ms/token per pair."""
    backend, conf = blip3v_backend(work, setting, threads)
    prompt = np.random.default_rng(0).integers(3, min(32000, conf.vocab_size - 64), size=128)  # as bench decode
    if mode == "requests":
        systems = [bd.blip3v_system(backend, bd.ORT_VARIANT.format("gqa"), "int4"),
                   bd.genai_system(work / "genai-int4", "int4")]
        bd.measure(systems, prompt, 64, pairs, lambda _m: None)
        ours, genai = ([r.decode_ms for r in s.requests] for s in systems)
    else:
        import onnxruntime_genai as og

        model = og.Model(str(work / "genai-int4"))
        stepped_request(backend, model, prompt, 8)  # warm-up
        ours, genai = [], []
        for _ in range(pairs):
            a, b = stepped_request(backend, model, prompt, 64)
            ours.append(float(a.mean()))
            genai.append(float(b.mean()))
    return {"setting": setting, "blip3v_ms": ours, "genai_ms": genai,
            "ratio_median": float(np.median([g / b for b, g in zip(ours, genai)]))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="Folder for the models (built on first use).")
    p.add_argument("--size", choices=["phi3-mini", "tiny"], default="phi3-mini")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--settings", default="shipped,4k", help=f"Comma-separated, from {', '.join(SETTINGS)}.")
    p.add_argument("--mode", choices=["requests", "steps"], default="steps", help="How the two systems are paired.")
    p.add_argument("--runs", type=int, default=3, help="Runs (processes) per setting, alternating.")
    p.add_argument("--pairs", type=int, default=4, help="Paired requests per run.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.work, args.child, args.mode, args.pairs, args.threads)))
        return 0
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        p.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    build(args.work, args.size, args.layers, args.threads)
    ratios: dict[str, list[float]] = {s: [] for s in settings}
    for run in range(args.runs):
        for setting in settings:
            env = {**os.environ, **({"BLIP3V_HUGE_PAGES": "0"} if setting == "4k" else {})}
            done = subprocess.run([sys.executable, "-m", "blip3v.benchmarks.decode_ab", "--work", str(args.work),
                                   "--child", setting, "--mode", args.mode, "--pairs", str(args.pairs),
                                   "--threads", str(args.threads)],
                                  capture_output=True, text=True, check=False, env=env)
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
