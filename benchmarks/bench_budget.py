"""Latency per token budget: what each number of video tokens M costs, stage by stage.

    blip3v bench budget [--model demo|real|DIR] [--backend torch|onnxruntime] [--device cpu|cuda] \
        [--budgets 16,32,64,128,none,raw] [--repeats 3] [--new-tokens 16] [--json] [--plot FILE]

One clip, one question, one answer of exactly `--new-tokens` tokens, at every budget:

  M = 16, 32, 64, 128  the temporal encoder (`--temporal`, default gttm_tl: grouped TTM + TokenLearner(M),
                       the paper's design) pools the T x N resampler latents to M tokens
  none                 no temporal encoder: all T x N latents (8 x 128 = 1024 on the real model)
  raw                  no resampler either: every SigLIP token (8 x 729 = 5832), as peers feed their LLM;
                       the model's context is raised to fit

Stages (ms, medians over `--repeats` after `--warmup` excluded runs):
  video             decode + sample + preprocess the clip (runtime/video.py, PyAV)
  vision_tower      SigLIP over the T frames                          \\  torch: each timed on its own;
  resampler         Perceiver resampler, per frame (not on raw)        >  onnxruntime: one fused graph,
  temporal_encoder  temporal pooling to M tokens (not on none / raw)  /   reported as `visual`
  projection        norm + projection to the LM width
  prefill           splice + decoder prefill + the first greedy token = `ttft_ms`: time to first token
                    once the video is encoded (what the budget changes)
  decode            the remaining N - 1 tokens; `decode_ms_per_token` = decode / (N - 1)
`e2e_ms` is the whole request (video file to the last token) and `stages_share` each stage's part of it.

The vision tower and the resampler do not depend on M, so each repeat runs them once and every
budget's request continues from the same features (`shared_stages`); a budget's `e2e_ms` is the
sum of the shared stages and its own, all from the same repeat.

Models: `demo` (the shipped checkpoint), a checkpoint DIR, or `real`: random weights at the
released sizes (SigLIP so400m at 384 px, the 6-layer resampler to 128 latents, Phi-3-mini width)
with `--layers` decoder layers (32 = full depth; cut it to fit a small CPU). Budgets other than the
checkpoint's own get a temporal encoder with random weights: latency does not depend on weights.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blip3v.benchmarks.common import (Log, PeakRSS, device, log_stderr, memory_lines, over_memory, peak_memory, stats,
                                      versions)
from blip3v.errors import InputError
from blip3v.progress import PartBar, StepBar, null_bar

SECTION = "## Latency per token budget"
BUDGETS = ("16", "32", "64", "128", "none", "raw")
TORCH_STAGES = ("video", "vision_tower", "resampler", "temporal_encoder", "projection", "prefill", "decode")
ORT_STAGES = ("video", "visual", "prefill", "decode")
SHARED = {"torch": ("video", "vision_tower", "resampler"), "onnxruntime": ("video",)}
BACKENDS = ("torch", "onnxruntime")
TEMPORAL_KINDS = ("gttm_tl", "tl")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class BudgetOptions:
    model: str = "demo"  # "demo", "real" or a checkpoint directory
    layers: int = 2  # decoder layers of the `real` model
    backend: str = "torch"
    device: str = "cpu"
    precision: str = "fp32"
    budgets: tuple[str, ...] = BUDGETS
    temporal: str = "gttm_tl"
    repeats: int = 3
    warmup: int = 1
    new_tokens: int = 16
    video: str | None = None  # default: the shipped sample clip
    question: str = "what colour does the triangle turn?"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    decoder: str = "auto"  # torch backend: reference | static | auto
    seed: int = 0

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"unknown backend {self.backend!r}; choose {' or '.join(BACKENDS)}")
        bad = [b for b in self.budgets if b not in BUDGETS]
        if bad or not self.budgets:
            raise InputError(f"unknown budget(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(BUDGETS)}")
        if self.temporal not in TEMPORAL_KINDS:
            raise InputError(f"--temporal must be {' or '.join(TEMPORAL_KINDS)} (encoders whose M is a choice)")
        if self.precision not in DTYPES:
            raise InputError(f"unknown precision {self.precision!r}; choose from {', '.join(DTYPES)}")
        if self.backend == "onnxruntime" and self.precision == "bf16":
            raise InputError("the onnxruntime backend exports fp32 or fp16 engines, not bf16")
        if min(self.repeats, self.layers, self.threads) < 1 or self.warmup < 0 or self.new_tokens < 2:
            raise InputError("--repeats, --layers and --threads must be positive, --warmup >= 0, --new-tokens >= 2")
        if self.device not in ("cpu", "cuda"):
            raise InputError(f"unknown device {self.device!r}; choose cpu or cuda")


# ----------------------------------------------------------------------------- the model


def model_config(opts: BudgetOptions):
    """The config of the model `load_model` will make, read without its weights."""
    from blip3v.assets import DEMO_MODEL
    from blip3v.model.config import XGenMMConfig, preset

    if opts.model == "real":
        cfg = preset("xgen-mm-vid-128")
        cfg.text_config["num_hidden_layers"] = opts.layers
        return cfg
    return XGenMMConfig.load(DEMO_MODEL if opts.model == "demo" else Path(opts.model))


def load_model(opts: BudgetOptions, log: Log):
    """-> (float32 model, tokenizer, description). `real` is built with random weights, on the GPU for the
    torch backend on cuda; everything else on the CPU."""
    import torch

    from blip3v.model.checkpoint import load_checkpoint, load_tokenizer
    from blip3v.model.xgenmm import XGenMMVideoModel

    if opts.model == "real":
        from blip3v.export.engine import preset_tokenizer
        from blip3v.model.config import preset

        cfg = preset("xgen-mm-vid-128")
        cfg.text_config["num_hidden_layers"] = opts.layers
        torch.manual_seed(opts.seed)
        t0 = time.perf_counter()
        # the torch backend runs where it is built (a GPU initialises the 4B weights in seconds); export reads a CPU model
        with torch.device(opts.device if opts.backend == "torch" else "cpu"):
            model = XGenMMVideoModel(cfg).eval()
        log(f"real-sized model with random weights ({opts.layers} decoder layers) built in "
            f"{time.perf_counter() - t0:.0f} s")
        return model, preset_tokenizer(cfg), f"real-sized, random weights, {opts.layers} decoder layers"
    from blip3v.assets import DEMO_MODEL

    directory = DEMO_MODEL if opts.model == "demo" else Path(opts.model)
    model = load_checkpoint(directory).eval()
    return model, load_tokenizer(directory), ("demo model" if opts.model == "demo" else str(directory))


def budget_tokens(cfg, budget: str) -> int:
    t, n = cfg.num_frames, cfg.vision_tokenizer_config.num_vis_tokens
    return {"none": t * n, "raw": t * cfg.tokens_per_frame_in}.get(budget) or int(budget)


def temporal_for(model, budget: str, kind: str):
    """The temporal encoder of one budget (None for raw), on the model's device and dtype."""
    from blip3v.model.temporal import TemporalEncoder

    cfg = model.config
    base = cfg.temporal_encoder_config
    if budget == "raw":
        return None
    if budget == "none":
        tc = dataclasses.replace(base, type="none")
    elif base.type == kind and base.num_tokens == int(budget):
        return model.vlm.vision_tokenizer.temporal_encoder  # the checkpoint's own
    else:
        tc = dataclasses.replace(base, type=kind, num_tokens=int(budget))
    p = next(model.parameters())
    return TemporalEncoder(cfg.vision_tokenizer_config.vis_feature_dim, cfg.vision_tokenizer_config.num_vis_tokens,
                           tc).to(p.device, p.dtype).eval()


def raise_context(model, needed: int) -> None:
    """Lets `needed` positions through (rotary is computed, not tabulated, so only the checks move)."""
    conf = model.vlm.lang_model.config
    if needed > int(conf.max_position_embeddings):
        model.config.text_config["max_position_embeddings"] = needed
        conf.max_position_embeddings = needed


# ----------------------------------------------------------------------------- timing


@dataclass
class Run:
    """One request at one budget: ms per stage (video to last token)."""

    stages: dict[str, float]

    @property
    def e2e(self) -> float:
        return sum(self.stages.values())


class Clock:
    """Stage timer that waits for the GPU before reading the clock."""

    def __init__(self, cuda: bool):
        import torch

        self.sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)

    def __call__(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, (time.perf_counter() - t0) * 1e3


def _generate_marks(generate: Callable[..., Any], n: int) -> tuple[float, float]:
    """Runs `generate(on_token)` -> (ms to the first token, ms for the other N - 1)."""
    marks: list[float] = []
    t0 = time.perf_counter()
    generate(lambda _row, _tok: marks.append(time.perf_counter()))
    if len(marks) != n:
        raise RuntimeError(f"generation produced {len(marks)} tokens, not {n}")
    return (marks[0] - t0) * 1e3, (marks[-1] - marks[0]) * 1e3


class TorchPipeline:
    """The reference model cut at its stages, with one temporal encoder per budget."""

    def __init__(self, model, tokenizer, opts: BudgetOptions, needed_context: int):
        import torch

        from blip3v.model.tokenizer import encode_prompt

        self.torch = torch
        self.opts = opts
        self.dtype = getattr(torch, DTYPES[opts.precision])
        if opts.device == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda: this PyTorch build sees no CUDA GPU")
        raise_context(model, needed_context)
        # inference only: no parameter requires grad (inference-mode views of such parameters are
        # what torch.utils.flop_counter's module tracker cannot hook)
        self.model = model.to(opts.device, self.dtype).eval().requires_grad_(False)
        self.cfg = model.config
        self.ids = torch.tensor([encode_prompt(self.cfg, tokenizer, opts.question)], device=opts.device)
        self.temporal = {b: temporal_for(self.model, b, opts.temporal) for b in opts.budgets}
        self.clock = Clock(opts.device == "cuda")
        decoder = opts.decoder
        if decoder == "auto":
            decoder = "static" if opts.device == "cuda" else "reference"
        # The decoder as the runtime ships it: TorchBackend (DynamicCache or the static fast path)
        # under blip3v.runtime.decoding's loop; the stages before it are cut out of the model here.
        from blip3v.model.generate import TorchBackend

        self.backend = TorchBackend(self.model, tokenizer, opts.device, decoder=decoder, max_batch=1)
        self.decoder_name = decoder

    def shared(self, video: str) -> tuple[dict[str, float], Any]:
        from blip3v.runtime.video import load_clip

        torch, cfg, clock = self.torch, self.cfg, self.clock
        pixels, t_video = clock(lambda: load_clip(video, cfg.num_frames, cfg.image_size, cfg.image_mean, cfg.image_std))
        with torch.inference_mode():
            frames = torch.from_numpy(pixels).to(self.opts.device, self.dtype)  # (T, 3, S, S)
            features, t_vt = clock(lambda: self.model.vlm.vision_encoder(pixel_values=frames).last_hidden_state)
            features = features[None]  # (1, T, N_in, D)
            latents = None
            stages = {"video": t_video, "vision_tower": t_vt}
            if any(b != "raw" for b in self.opts.budgets):
                latents, stages["resampler"] = clock(lambda: self.model.vlm.vision_tokenizer.resample(features))
        return stages, (features, latents)

    def visual_one_call(self, video: str, repeats: int) -> dict[str, Any]:
        """The model's own visual path as the backend runs it, one `encode_video` call per clip (tower,
        resampler, its temporal encoder, projection), timed with CUDA events; beside it the call's
        FLOPs (torch.utils.flop_counter) over the fp16 matmul rate measured on this GPU."""
        from torch.utils.flop_counter import FlopCounterMode

        from blip3v.benchmarks.common import cuda_times_ms, gpu_ceilings
        from blip3v.runtime.video import load_clip

        from blip3v.model.visual_graph import GraphedVisual

        torch, cfg = self.torch, self.cfg
        pixels = load_clip(video, cfg.num_frames, cfg.image_size, cfg.image_mean, cfg.image_std)
        pixels = torch.from_numpy(pixels)[None].to(self.opts.device, self.dtype)  # (1, T, 3, S, S)
        encoder = self.model.vlm.vision_tokenizer.temporal_encoder
        graphed = GraphedVisual(self.model)  # the whole call as one CUDA graph (blip3v.model.visual_graph)
        with torch.inference_mode():
            times = cuda_times_ms(lambda: self.model.encode_video(pixels), repeats, warmup=3)
            graph_times = cuda_times_ms(lambda: graphed(pixels), repeats, warmup=1)
            encoder.path = "reference"  # the gTTM's reference math, for the before/after
            reference_times = cuda_times_ms(lambda: self.model.encode_video(pixels), repeats, warmup=1)
            encoder.path = "auto"
            with FlopCounterMode(display=False) as counter:
                self.model.encode_video(pixels)
        ceilings = gpu_ceilings()
        flops = counter.get_total_flops()
        return {"ms": stats(times), "graphed_ms": stats(graph_times), "reference_gttm_ms": stats(reference_times),
                "flops": flops, "ceilings": ceilings,
                "floor_ms": flops / ceilings["matmul_fp16_tflop_per_s"] / 1e9,
                "tokens": int(cfg.num_video_tokens), "frames": int(cfg.num_frames)}

    def budget(self, budget: str, shared: Any) -> dict[str, float]:
        from blip3v.runtime.decoding import generate
        from blip3v.runtime.generation import SamplingConfig

        torch, clock, vt = self.torch, self.clock, self.model.vlm.vision_tokenizer
        features, latents = shared
        stages: dict[str, float] = {}
        n = self.opts.new_tokens
        with torch.inference_mode():
            if budget == "raw":
                tokens = features.flatten(1, 2)  # (1, T*N_in, D): every SigLIP token
            else:
                tokens, stages["temporal_encoder"] = clock(lambda: self.temporal[budget](latents))
            video, stages["projection"] = clock(lambda: vt.projection(vt.norm(tokens)))  # (1, M, D_lm)
            sampling = SamplingConfig(max_new_tokens=n)

            def run(on_token):
                embeds = self.model.splice(self.ids, video)
                mask = np.ones(embeds.shape[:2], dtype=np.int64)
                return generate(self.backend, embeds, mask, sampling, (), on_token)  # no stop ids: N tokens

            self.clock.sync()
            stages["prefill"], stages["decode"] = _generate_marks(run, n)
        return stages


class OrtPipeline:
    """Per budget an engine exported by `blip3v export` (visual graph with that temporal encoder);
    the runtime's OrtBackend runs it. `raw` has no visual graph (the export fuses the resampler in),
    so its prefill/decode run on the first engine's decoder from the reference's SigLIP tokens and its
    visual stage is left out (marked in `notes`)."""

    def __init__(self, model, tokenizer, opts: BudgetOptions, needed_context: int, workdir: Path, log: Log,
                 bar: PartBar | None = None):
        import torch

        from blip3v.export.engine import EXPORT_STEPS, export_engine
        from blip3v.runtime.ort_backend import OrtBackend

        steps = {f"engine M={b}": 1.0 for b in opts.budgets if b != "raw"} | {"raw tokens": 0.05}
        bar = bar or null_bar(steps)  # a step per engine (its export's steps inside), then raw's tokens

        self.opts = opts
        raise_context(model, needed_context)
        model = model.float().eval()
        self.engines: dict[str, Any] = {}
        for b in opts.budgets:
            if b == "raw":
                continue
            variant = copy.deepcopy(model)
            temporal = temporal_for(variant, b, opts.temporal)
            variant.vlm.vision_tokenizer.temporal_encoder = temporal
            base = variant.config.temporal_encoder_config
            variant.config.temporal_encoder_config = (
                dataclasses.replace(base, type="none") if b == "none"
                else dataclasses.replace(base, type=temporal.kind, num_tokens=int(b)))
            t0 = time.perf_counter()
            out = workdir / f"engine-{b}"
            with bar.part(f"engine M={b}", EXPORT_STEPS) as part:
                export_engine(variant, tokenizer, out, precision=opts.precision, max_context=needed_context, bar=part)
            log(f"  engine for budget {b} exported and checked in {time.perf_counter() - t0:.0f} s")
            self.engines[b] = OrtBackend.load(out, device=opts.device)
            del variant
        self.raw_tokens = None
        if "raw" in opts.budgets:
            if not self.engines:
                raise InputError("the onnxruntime backend times raw on a budget's decoder: add another budget")
            with torch.inference_mode(), bar.step("raw tokens"):
                cfg = model.config
                frames = torch.zeros(cfg.num_frames, 3, cfg.image_size, cfg.image_size)
                feats = model.vlm.vision_encoder(pixel_values=frames).last_hidden_state.flatten(0, 1)[None]
                vt = model.vlm.vision_tokenizer
                self.raw_tokens = vt.projection(vt.norm(feats)).numpy()  # (1, T*N_in, D_lm)
        self.decoder_name = "onnxruntime " + next(iter(self.engines.values())).manifest["decoder"].get(
            "attention", "decoder") if self.engines else "onnxruntime"

    def shared(self, video: str) -> tuple[dict[str, float], Any]:
        first = next(iter(self.engines.values()))
        t0 = time.perf_counter()
        pixels = first.load_video(video)
        return {"video": (time.perf_counter() - t0) * 1e3}, pixels

    def budget(self, budget: str, pixels: Any) -> dict[str, float]:
        from blip3v.runtime.decoding import generate
        from blip3v.runtime.generation import SamplingConfig

        stages: dict[str, float] = {}
        backend = self.engines.get(budget) or next(iter(self.engines.values()))
        if budget == "raw":
            video = self.raw_tokens.astype(backend.dtype)
        else:
            t0 = time.perf_counter()
            video = backend.encode_video(pixels[None])
            stages["visual"] = (time.perf_counter() - t0) * 1e3
        rows = [backend.tokenizer.encode_prompt(self.opts.question)]
        sampling = SamplingConfig(max_new_tokens=self.opts.new_tokens)

        def run(on_token):
            embeds, mask = backend.splice(rows, video)
            return generate(backend, embeds, mask, sampling, (), on_token)  # no stop ids: N tokens

        stages["prefill"], stages["decode"] = _generate_marks(run, self.opts.new_tokens)
        return stages


# ----------------------------------------------------------------------------- memory and progress

GIB = 2**30
BASE_BYTES = 0.9 * GIB  # the interpreter with torch, transformers and ONNX Runtime, before any model
EXPORT_FACTOR = 0.8  # torch.onnx's export holds about 0.8x the weights beside the model (bench_decode)


def meta_model(cfg):
    """The model on the meta device: its parameter count without allocating its weights."""
    import torch

    from blip3v.model.xgenmm import XGenMMVideoModel

    with torch.device("meta"):
        return XGenMMVideoModel(cfg)


def expected_memory(cfg, opts: BudgetOptions) -> dict[str, float]:
    """The expected peak resident memory (GiB) of a run, from the parameter count and the longest
    prompt (the raw budget's): -> {"weights", "activations", "peak", ...}. Rough, stated up front; the
    measured peak is reported at the end. onnxruntime keeps one engine per budget loaded (each about
    the model's size) and exports each from a copy of the model."""
    width = {"fp32": 4, "fp16": 2, "bf16": 2}[opts.precision]
    params = sum(p.numel() for p in meta_model(cfg).parameters())
    weights = params * width
    lm = cfg.text_config
    d, i = int(lm["hidden_size"]), int(lm["intermediate_size"])
    heads = int(lm["num_attention_heads"])
    kv_heads = int(lm.get("num_key_value_heads") or heads)
    layers = int(lm["num_hidden_layers"])
    longest = max(budget_tokens(cfg, b) for b in opts.budgets) + 64 + opts.new_tokens  # + the prompt's text
    # one layer's hidden states and MLP activations (x2: input and output live), the causal mask,
    # and the K/V of every layer, float32 on the CPU
    activations = (longest * (3 * d + 2 * i) * 4 * 2 + longest**2 * 4 * 2
                   + 2 * layers * kv_heads * longest * (d // heads) * 4)
    # the vision tower over T frames of N_in tokens: a few hidden-state copies and one layer's
    # attention scores (SigLIP's heads are 72 wide)
    t, n_in, vis = cfg.num_frames, cfg.tokens_per_frame_in, cfg.vision_tokenizer_config.vis_feature_dim
    activations += t * n_in * vis * 4 * 8 + t * max(vis // 72, 1) * n_in**2 * 4
    out = {"weights": weights / GIB, "activations": activations / GIB}
    if opts.backend == "onnxruntime":
        engines = sum(b != "raw" for b in opts.budgets)
        out["engines"] = engines * params * width / GIB
        out["export"] = (BASE_BYTES + 2 * 4 * params + EXPORT_FACTOR * 4 * params) / GIB + out["engines"]
        out["runs"] = BASE_BYTES / GIB + out["weights"] + out["engines"] + out["activations"]
    else:
        out["runs"] = BASE_BYTES / GIB + out["weights"] + out["activations"]
    out["peak"] = max(out.get("export", 0.0), out["runs"])
    return out


def memory_line(memory: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in memory.items() if k != "peak")
    return (f"expected peak memory {memory['peak']:.2f} GiB (estimated from the parameter count: {parts} GiB); "
            "the measured peak is reported at the end")


def setup_steps(opts: BudgetOptions, params: int) -> dict[str, float]:
    """Steps of a run and their expected seconds on the dev box's CPU, for one progress bar: only
    their ratios matter to its ETA."""
    from blip3v.export.engine import EXPORT_STEPS

    billions = params / 1e9
    steps = {"model": 2 + 30 * billions, "set-up": 2 + 5 * billions}
    if opts.backend == "onnxruntime":
        engines = sum(b != "raw" for b in opts.budgets)
        steps["set-up"] = engines * (sum(EXPORT_STEPS.values()) + 60 * billions)
    steps["runs"] = (opts.warmup + opts.repeats) * len(opts.budgets) * (0.5 + 60 * billions / opts.threads)
    return steps


# ----------------------------------------------------------------------------- the benchmark


def run_budget(opts: BudgetOptions, log: Log = log_stderr, progress: bool = True) -> dict[str, Any]:
    """Every budget's stages, timed; `progress`: one bar with an ETA on stderr (the start-up's
    imports included), `log`'s lines above it. The expected peak memory is logged before the model
    is made and the measured one is in `memory`."""
    from blip3v.assets import SAMPLE_CLIP

    opts.check()
    video = str(opts.video or SAMPLE_CLIP)
    if not Path(video).is_file():
        raise InputError(f"{video}: video file not found")
    with StepBar({"start-up": 10.0}, desc="bench budget", enabled=progress) as bar:  # seconds, as setup_steps
        if progress:
            log = bar.write  # step lines above the bar
        with bar.step("start-up"):  # torch's and transformers' imports: seconds to tens of seconds
            cfg, params, memory = _start(opts, log)
        bar.add(setup_steps(opts, params))
        result = _run(opts, bar, log, video)
    result["memory"] = {"expected_gib": memory, **peak_memory()}
    return result


def _start(opts: BudgetOptions, log: Log) -> tuple[Any, int, dict[str, float]]:
    """-> (the model's config, its parameter count, the expected memory, logged)."""
    import torch

    torch.set_num_threads(opts.threads)
    if opts.device == "cuda":  # compiled kernels kept on disk between runs (blip3v.runtime.warmup)
        from blip3v.runtime.warmup import configure_compile_caches

        configure_compile_caches()
    if opts.model not in ("demo", "real") and not Path(opts.model).is_dir():
        load_model(opts, log)  # raises the checkpoint's one-line error
    cfg = model_config(opts)
    memory = expected_memory(cfg, opts)  # stated before the weights are made or read
    log(memory_line(memory))
    warning = over_memory(memory["peak"])  # a small machine can stop here
    if warning:
        log(warning)
    return cfg, sum(p.numel() for p in meta_model(cfg).parameters()), memory


def _run(opts: BudgetOptions, bar: StepBar, log: Log, video: str) -> dict[str, Any]:
    """run_budget's body: the model, its pipeline, the runs, the rows (each step on `bar`)."""
    import torch

    with bar.step("model"):
        model, tokenizer, description = load_model(opts, log)
    cfg = model.config
    from blip3v.model.tokenizer import encode_prompt

    prompt_len = len(encode_prompt(cfg, tokenizer, opts.question)) - 1
    tokens = {b: budget_tokens(cfg, b) for b in opts.budgets}
    needed = prompt_len + max(tokens.values()) + opts.new_tokens
    with tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
        if opts.backend == "torch":
            with bar.step("set-up"):
                pipe: Any = TorchPipeline(model, tokenizer, opts, needed)
        else:
            engines = [b for b in opts.budgets if b != "raw"]
            shares = {f"engine M={b}": 1.0 for b in engines} | ({"raw tokens": 0.05} if "raw" in opts.budgets else {})
            with bar.part("set-up", shares) as part:
                pipe = OrtPipeline(model, tokenizer, opts, needed, Path(tmp), log, part)
        del model
        runs: dict[str, list[Run]] = {b: [] for b in opts.budgets}
        first: dict[str, float] = {}  # e2e ms of the first (untimed) run per budget: compilation, capture
        peaks = {b: 0 for b in opts.budgets}
        shared_peak = 0
        cuda = opts.device == "cuda"
        total = opts.warmup + opts.repeats
        with bar.step("runs", total=total * len(opts.budgets)) as advance:
            for r in range(total):
                timed = r >= opts.warmup
                with PeakRSS() as rss:
                    shared_stages, shared = pipe.shared(video)
                shared_peak = max(shared_peak, rss.peak)
                for b in opts.budgets:
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    with PeakRSS() as rss:
                        own = pipe.budget(b, shared)
                    peaks[b] = max(peaks[b], rss.peak)
                    # raw feeds the SigLIP tokens on: the shared resampler run is not part of its request
                    used = {k: v for k, v in shared_stages.items() if not (b == "raw" and k == "resampler")}
                    if not timed and r == 0:
                        first[b] = Run({**used, **own}).e2e
                    if timed:
                        runs[b].append(Run({**used, **own}))
                        if cuda:
                            peaks[f"{b}/gpu"] = max(peaks.get(f"{b}/gpu", 0), torch.cuda.max_memory_allocated())
                    bar.note(f"{'repeat' if timed else 'warm-up'} {r + 1 - (opts.warmup if timed else 0)}, M={b}")
                    advance(1)
        rows = []
        for b in opts.budgets:
            stage_names = list(runs[b][0].stages)
            per_stage = {s: stats([run.stages[s] for run in runs[b]]) for s in stage_names}
            e2e = stats([run.e2e for run in runs[b]])
            ttft = per_stage["prefill"]["median"]
            row = {
                "budget": b,
                "tokens": tokens[b],
                "ttft_ms": ttft,
                "decode_ms_per_token": per_stage["decode"]["median"] / (opts.new_tokens - 1),
                "e2e_ms": e2e["median"],
                "e2e_ms_min": e2e["min"],
                "e2e_ms_max": e2e["max"],
                "stages_ms": {s: v["median"] for s, v in per_stage.items()},
                "stages_ms_min": {s: v["min"] for s, v in per_stage.items()},
                "stages_ms_max": {s: v["max"] for s, v in per_stage.items()},
                "stages_share": {s: v["median"] / e2e["median"] for s, v in per_stage.items()},
                "peak_rss_mib": max(peaks[b], shared_peak) / 2**20,
            }
            if cuda:
                row["peak_gpu_mib"] = peaks[f"{b}/gpu"] / 2**20
            if b in first:
                row["first_run_e2e_ms"] = first[b]
            rows.append(row)
    notes = []
    if opts.backend == "onnxruntime" and "raw" in opts.budgets:
        notes.append("raw on onnxruntime: no visual graph exists for it (the export fuses the resampler in); "
                     "its prefill/decode ran on another budget's decoder graph and its e2e leaves the visual stage out")
    by = {r["budget"]: r for r in rows}
    result: dict[str, Any] = {
        "budgets": rows,
        "ttft_vs_raw": {b: by[b]["ttft_ms"] / by["raw"]["ttft_ms"] for b in by if b != "raw"} if "raw" in by else {},
        "shared_stages": [s for s in SHARED[opts.backend] if s in rows[0]["stages_ms"]],
        "config": {"model": description, "backend": opts.backend, "decoder": pipe.decoder_name,
                   "device": opts.device, "precision": opts.precision, "temporal": opts.temporal,
                   "frames": cfg.num_frames, "image_size": cfg.image_size, "prompt_tokens": prompt_len,
                   "new_tokens": opts.new_tokens, "repeats": opts.repeats, "warmup": opts.warmup,
                   "threads": opts.threads, "video": video, "question": opts.question},
        "device": device(opts.threads, cuda),
        "versions": versions(),
        "notes": notes,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
    }
    if cuda and opts.backend == "torch":
        try:
            result["visual"] = pipe.visual_one_call(video, opts.repeats)
        except RuntimeError as exc:  # the budget table above stands on its own: keep it, say what failed
            result["notes"].append(f"visual one-call timing failed: {str(exc).splitlines()[0]}")
    check_finite(result)
    return result


def check_finite(result: dict[str, Any]) -> None:
    for row in result["budgets"]:
        figures = [row["ttft_ms"], row["decode_ms_per_token"], row["e2e_ms"], *row["stages_ms"].values()]
        if not all(math.isfinite(x) and x > 0 for x in figures):
            raise RuntimeError(f"budget {row['budget']}: a figure is not positive and finite: {row}")


# ----------------------------------------------------------------------------- reports


def table(result: dict[str, Any]) -> str:
    rows = result["budgets"]
    stages = list(dict.fromkeys(s for r in rows for s in r["stages_ms"]))
    head = ["budget", "tokens", *[f"{s} ms" for s in stages], "TTFT ms", "decode ms/tok", "e2e ms (min-max)",
            "peak RSS MiB"]
    gpu = any("peak_gpu_mib" in r for r in rows)
    if gpu:
        head.append("peak GPU MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["budget"], str(r["tokens"])]
        cells += [f"{r['stages_ms'][s]:.1f}" if s in r["stages_ms"] else "-" for s in stages]
        cells += [f"{r['ttft_ms']:.1f}", f"{r['decode_ms_per_token']:.2f}",
                  f"{r['e2e_ms']:.0f} ({r['e2e_ms_min']:.0f}-{r['e2e_ms_max']:.0f})", f"{r['peak_rss_mib']:.0f}"]
        if gpu:
            cells.append(f"{r['peak_gpu_mib']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    if result["ttft_vs_raw"]:
        parts = [f"M={b}: {x:.3f}" for b, x in result["ttft_vs_raw"].items()]
        lines.append("TTFT / TTFT(raw): " + ", ".join(parts))
    for r in result["budgets"]:
        share = ", ".join(f"{s} {100 * x:.0f}%" for s, x in r["stages_share"].items())
        lines.append(f"share of e2e at {r['budget']}: {share}")
    firsts = [f"M={r['budget']} {r['first_run_e2e_ms']:.0f} ms (steady {r['e2e_ms']:.0f})"
              for r in result["budgets"] if "first_run_e2e_ms" in r]
    if firsts:
        lines.append("first run, untimed (compilation, graph capture, library set-up; e2e): " + ", ".join(firsts))
    if "visual" in result:
        v = result["visual"]
        extra = ""
        if "graphed_ms" in v:
            extra = (f"; as one CUDA graph {v['graphed_ms']['median']:.2f} ms; eager with the gTTM's reference math "
                     f"{v['reference_gttm_ms']['median']:.2f} ms")
        lines.append(f"visual in one call (encode_video, {v['frames']} frames -> {v['tokens']} tokens): "
                     f"{v['ms']['median']:.2f} ms eager (min {v['ms']['min']:.2f}){extra}; {v['flops'] / 1e12:.2f} "
                     f"TFLOP, compute floor {v['floor_ms']:.2f} ms at the {v['ceilings']['matmul_fp16_tflop_per_s']:.0f} "
                     f"TFLOP/s fp16 matmul measured here")
    lines += [f"note: {n}" for n in result["notes"]]
    if "memory" in result:
        lines += memory_lines(result["memory"])
    return lines


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Stacked bars of stage latency per budget (log-scaled ms), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["budgets"]
    stages = list(dict.fromkeys(s for r in rows for s in r["stages_ms"]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{r['budget']}\n({r['tokens']} tok)" for r in rows]
    bottom = np.zeros(len(rows))
    for s in stages:
        values = np.array([r["stages_ms"].get(s, 0.0) for r in rows])
        ax.bar(labels, values, bottom=bottom, label=s)
        bottom += values
    cfg, dev = result["config"], result["device"]
    where = dev.get("gpu") or dev["cpu"]
    ax.set_ylabel("ms (median)")
    ax.set_title(f"{cfg['model']} - {cfg['backend']} {cfg['precision']} on {where}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def section_heading(title: str) -> str:
    """One RESULTS.md section per (model, backend, device) title; a re-run replaces its own."""
    return f"{SECTION}: {title}"


def markdown(result: dict[str, Any], command: str, title: str) -> str:
    cfg, dev = result["config"], result["device"]
    where = f"GPU **{dev['gpu']}**" if dev.get("gpu") else f"CPU **{dev['cpu']}** ({dev['threads']} threads)"
    return "\n".join([
        section_heading(title), "",
        f"Measured {result['date']} on {where}; load average {dev['load_average_1m_at_start']} at the start. "
        f"Model: {cfg['model']}; backend {cfg['backend']} ({cfg['decoder']}), {cfg['precision']}, temporal encoder "
        f"{cfg['temporal']}, {cfg['frames']} frames at {cfg['image_size']} px, prompt {cfg['prompt_tokens']} text tokens, "
        f"{cfg['new_tokens']} new tokens, median of {cfg['repeats']} after {cfg['warmup']} warm-up.", "",
        "```", command, "```", "", table(result), "", *[f"- {ln}" for ln in summary_lines(result)], ""])
