"""Decode speed of the ONNX Runtime backend against its peers, on one Phi-3 with random weights.

    python benchmarks/bench_decode.py --layers 4 --prompt-tokens 128 --new-tokens 64 --repeats 3 \
        [--json] [--out-md benchmarks/RESULTS.md] [--profile]

or `blip3v bench decode --lm HF_PHI3_DIR` on any Phi-3 directory (`blip3v bench make-lm` writes the
random one below). Without `--lm`, one run builds, in a temporary folder, a Hugging Face Phi-3 directory (Phi3ForCausalLM, random
weights) at Phi-3-mini width (hidden 3072, MLP 8192, 32 heads of 96, vocab 32064, window 2047)
with `--layers` layers, so it fits a CPU, then times the same weights and the same prompt ids in

  transformers       `generate` in PyTorch eager mode with its DynamicCache (sdpa attention by
                     default, transformers' own default), greedy, min_new_tokens = max_new_tokens
  blip3v             this project's decoder.onnx (blip3v.export.graphs.DecoderGraph, exported and
                     checked by blip3v.export.engine) driven by the runtime's one decode loop,
                     `blip3v.runtime.decoding.generate`, over OrtBackend's decoder (IO binding,
                     in-place KV buffers; blip3v.benchmarks.ort_decoder), with the prompt's rows
                     of the embedding table as inputs_embeds; once per `--attention` variant
  onnxruntime-genai  the model its builder (`python -m onnxruntime_genai.models.builder`) makes
                     from the same HF directory, run through og.Generator

all float32 on the CPU with the same thread count (`--precision fp32 fp16` adds float16 rows for
blip3v and transformers; the builder makes no fp16 CPU model). Every system produces exactly N
new tokens.
TTFT = from the prompt's ids to the first new id (prefill + its sampling, including each system's
own set-up per request: KV allocation, embedding lookup); decode ms/token = the mean interval
between the following N - 1 ids. One warm-up request per system is excluded; the R timed
repeats are interleaved across systems (so background load hits all alike; the order reverses
every other repeat) and reported as median and min/max over repeats.

Memory: each dense (fp32/fp16) ONNX model is about as large as the PyTorch model (4 layers of
Phi-3-mini: 2.6 GB), so holding them all at once (two attention variants, the builder's model,
the PyTorch model, the quantizer's copies) took 16-18 GB. Now one ONNX model is open at a time: the
timing runs in phases (`phases`), one per ONNX model, each interleaving it with the PyTorch
systems, which stay open and are therefore timed in every phase; the graphs are exported first and
their sessions opened only in their phase; the PyTorch model is put away (read back from the HF
directory) while INT4 is quantized and the builder runs. The expected peak, from the
parameter count (`expected_memory`), is logged before the model is built; the measured peak (max
RSS) is in the result's `memory`. Speed-up = peer time /
blip3v time (> 1: blip3v is faster). blip3v's CPU sessions put their weights on huge pages as the
runtime does (blip3v.runtime.hugepages; the table says how many MiB).

On a GPU (`--device cuda`) the rows are this project's PyTorch fast path (blip3v.model.fast_decode:
static KV, CUDA-graph step; fp16 and INT4) against what a user would run instead:

  transformers static  `generate(..., cache_implementation="static")`: the one argument with which
                       transformers allocates a StaticCache and compiles the decoding step itself
                       (torch.compile, reduce-overhead); the row says whether it did compile
  onnxruntime          the exported graphs (fp16, INT4 MatMulNBits, GroupQueryAttention) on ONNX
                       Runtime's CUDA execution provider, when onnxruntime-gpu is installed
  transformers eager   kept as a reference, never compared against (the peers are faster)

Ratios are against the fastest peer on each metric (INT4, which no peer runs here, against the
fastest at any precision, marked so), and the floors sit beside them: bytes per decode step over
the copy bandwidth measured on the GPU, FLOPs over its measured fp16 matmul rate
(common.gpu_ceilings). The first request of each system (untimed warm-up: compilation, graph
capture) is reported apart from the steady state; Triton's and inductor's caches go to
~/.cache/blip3v (blip3v.runtime.warmup) so a second run loads what the first compiled. Rows that
cannot run here are left out with a note (`select_rows`).

Each system keeps its own design choices in the times: the builder's graph computes logits at
every prompt position in the prefill (blip3v's graph and transformers' generate, with
logits_to_keep=1, only at the last); its generator loop is C++, blip3v's and transformers' are
Python. The greedy ids of every system are compared with transformers' as a check that all of
them run the same model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blip3v.benchmarks.common import (Log, device, log_stderr, memory_lines, over_memory, peak_memory,
                                      release_memory, stats, versions, write_section)
from blip3v.progress import StepBar

SECTION = "## Decode speed (ONNX Runtime backend vs peers)"
SECTION_GPU = "## Decode speed on a GPU (PyTorch fast path vs transformers)"

# Phi-3-mini-4k's sizes (blip3v.model.config.KNOWN_TOWERS); "tiny" keeps its shape at test size.
# Constraints from the onnxruntime-genai builder (0.18): head_dim % 16 == 0 (its GroupQueryAttention
# applies rotary itself), and no Linear but lm_head may have vocab_size outputs (it takes any such
# Linear for the LM head: `has_lm_head` in onnxruntime_genai/models/builders/base.py).
SIZES = {
    "phi3-mini": None,  # filled from KNOWN_TOWERS
    "tiny": {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 320, "num_attention_heads": 4,
             "num_key_value_heads": 4, "max_position_embeddings": 512, "original_max_position_embeddings": 512,
             "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "sliding_window": None},
}
# Between requests: the previous system's OpenMP / ORT worker threads spin a while after their last
# op; a pause keeps that off the next system's TTFT.
PAUSE_S = 0.2
ORT_VARIANT = "ORT {}, IO binding"  # the blip3v ORT rows' variant, by attention
DTYPES = {"fp32": "float32", "fp16": "float16"}

# ----------------------------------------------------------------------------- the HF directory


def phi3_sizes(size: str, layers: int) -> dict[str, Any]:
    from blip3v.model.config import KNOWN_TOWERS

    sizes = dict(SIZES[size] or KNOWN_TOWERS["microsoft/Phi-3-mini-4k-instruct"])
    sizes["num_hidden_layers"] = layers
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    linear_outs = {sizes["hidden_size"], 2 * sizes["intermediate_size"],
                   (sizes["num_attention_heads"] + 2 * sizes["num_key_value_heads"]) * head_dim}
    if head_dim % 16 or sizes["vocab_size"] in linear_outs:
        raise ValueError(f"{size}: sizes the onnxruntime-genai builder cannot take or mis-reads (see SIZES)")
    return sizes


def make_phi3(size: str, layers: int, seed: int = 0, device_name: str = "cpu"):
    """A Phi3ForCausalLM with random weights, float32, eval mode, built on `device_name` (on a GPU
    the full-depth model is initialised there in seconds instead of minutes on the host)."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    sizes = phi3_sizes(size, layers)
    theta = sizes.pop("rope_theta")
    conf = Phi3Config(**sizes, rope_parameters={"rope_type": "default", "rope_theta": theta})
    torch.manual_seed(seed)
    with torch.device(device_name):
        return Phi3ForCausalLM(conf).float().eval()


def make_phi3_dir(directory: Path, size: str, layers: int, seed: int = 0):
    """`make_phi3` saved as an HF directory (config, safetensors, a word-level tokenizer.json that
    the builder can load) -> the model, float32, eval mode, on the CPU."""
    from blip3v.model.tokenizer import BASE_SPECIALS, build_word_tokenizer

    model = make_phi3(size, layers, seed)
    conf = model.config
    model.save_pretrained(str(directory))
    # Ordinary words fill ids up to the first special (32000 at Phi-3's vocabulary of 32064).
    base = min(32000, conf.vocab_size - 64)
    words = [f"w{i:05d}" for i in range(base - len(BASE_SPECIALS))]
    tokenizer = build_word_tokenizer(words)
    assert len(tokenizer) <= conf.vocab_size
    tokenizer.save_pretrained(str(directory))
    return model


# ----------------------------------------------------------------------------- blip3v


def _engine_shim(model):
    """Phi3ForCausalLM -> the surface of XGenMMVideoModel that export/graphs.py and the export
    checks read (`vlm.lang_model`, `embed_tokens`, `decoder`, `config.num_logits`)."""
    import torch
    from torch import nn

    from blip3v.model.xgenmm import cache_kwargs

    class Phi3Engine(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.vlm = nn.Module()
            self.vlm.lang_model = lm
            self.config = type("Cfg", (), {"num_logits": int(lm.config.vocab_size)})()

        def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.vlm.lang_model.model.embed_tokens(input_ids)

        def decoder(self, inputs_embeds: torch.Tensor, cache=None, **kwargs):
            out = self.vlm.lang_model.model(inputs_embeds=inputs_embeds, **cache_kwargs(cache), **kwargs)
            return self.vlm.lang_model.lm_head(out.last_hidden_state), out

    return Phi3Engine(model).eval()


def export_blip3v(model, directory: Path, attentions: Sequence[str], precision: str, golden: dict[str, Any],
                  log: Log) -> dict[str, dict[str, Any]]:
    """decoder.onnx per attention variant from `model` (float32, or float16 for "fp16"), each
    checked against the float32 reference's `golden` outputs (prefill + cached decode steps,
    blip3v.export.engine's tolerance for the precision) -> {attention: {path, max_abs_diff}}."""
    from blip3v.export.engine import DEFAULT_OPSET, check_decoder, export_decoder

    shim = _engine_shim(model)
    conf = model.config
    head_dim = int(getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads)
    dtype = np.dtype(DTYPES[precision])
    out = {}
    for attention in attentions:
        path = directory / f"decoder-{attention}-{precision}.onnx"
        t0 = time.perf_counter()
        export_decoder(shim, path, DEFAULT_OPSET, attention)
        diff = check_decoder(path, golden, precision, dtype, int(conf.num_key_value_heads), head_dim,
                             int(conf.num_hidden_layers))
        log(f"  blip3v decoder ({attention}, {precision}) exported and checked in {time.perf_counter() - t0:.0f} s, "
            f"logits max abs diff {diff:.1e}")
        out[attention] = {"path": path, "max_abs_diff": diff}
    return out


def quantize_blip3v_int4(decoder_path: Path, embeddings: np.ndarray, conf, block_size: int, accuracy_level: int,
                        log: Log, seed: int = 0) -> Path:
    """decoder_path (fp32) -> this project's INT4 decoder (blip3v.calibration: MatMulNBits, activation-
    aware scales), calibrated on 8 random-id prompts of 64 tokens (the weights are random too)."""
    import onnx
    from blip3v.calibration.graph import save_model
    from blip3v.calibration.weight_only import quantize_decoder
    from blip3v.export.engine import KV_TEMPLATES

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed + 1)
    layers = int(conf.num_hidden_layers)
    head_dim = int(getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads)
    feeds = []
    for _ in range(8):
        ids = rng.integers(3, min(32000, conf.vocab_size - 64), size=64)
        feed = {"inputs_embeds": embeddings[ids][None].astype(np.float32), "attention_mask": np.ones((1, 64), np.int64),
                "position_ids": np.arange(64, dtype=np.int64)[None]}
        for i in range(layers):
            for role in ("past_key", "past_value"):
                feed[KV_TEMPLATES[role].format(layer=i)] = np.zeros((1, conf.num_key_value_heads, 64, head_dim), np.float32)
        feeds.append(feed)
    log(f"  quantizing the blip3v decoder to INT4 (awq, block {block_size}, accuracy level {accuracy_level})")
    # The graph without its weights: each is read from decoder_path's data file when needed, held once.
    qmodel, _ = quantize_decoder(onnx.load(str(decoder_path), load_external_data=False), feeds, "int4", "awq",
                                 block_size, accuracy_level, log=log, in_place=True, base_dir=decoder_path.parent)
    out = decoder_path.with_name(decoder_path.stem + "-int4.onnx")
    save_model(qmodel, out)
    log(f"  blip3v decoder quantized to INT4 (awq, block {block_size}, accuracy level {accuracy_level}) in "
        f"{time.perf_counter() - t0:.0f} s")
    return out


def blip3v_backend(decoder_path: Path, embeddings: np.ndarray, conf, threads: int,
                   providers: Sequence[str] = ("CPUExecutionProvider",), options=None, attention: str = "gqa"):
    """The runtime's OrtBackend decoder around a decoder graph alone (an engine directory also needs
    visual.onnx, which a plain Phi-3 has not): its session opened as the runtime opens its own
    (`session_options`, weights on huge pages on the CPU), tensor names from the export's templates.
    embeddings: in the graph's dtype; options: default the runtime's session_options."""
    from blip3v.benchmarks.ort_decoder import OrtDecoder
    from blip3v.export.engine import KV_TEMPLATES
    from blip3v.runtime.hugepages import Backed
    from blip3v.runtime.ort_backend import create_session, session_options

    layers = int(conf.num_hidden_layers)
    options = session_options(providers, threads) if options is None else options
    backed = Backed()
    session = create_session(decoder_path, options, providers, backed=backed)  # as shipped
    names = {role: [KV_TEMPLATES[role].format(layer=i) for i in range(layers)]
             for role in ("past_key", "past_value", "present_key", "present_value")}
    return OrtDecoder(
        session, embeddings, kv_heads=int(conf.num_key_value_heads),
        head_dim=int(getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads),
        max_context=int(conf.max_position_embeddings), attention=attention,
        past_names=[n for pair in zip(names["past_key"], names["past_value"]) for n in pair],
        present_names=[n for pair in zip(names["present_key"], names["present_value"]) for n in pair],
        device="cuda" if "CUDAExecutionProvider" in providers else "cpu", huge_pages=backed)


# ----------------------------------------------------------------------------- onnxruntime-genai


def build_genai(hf_dir: Path, out: Path, threads: int, log: Log, precision: str = "fp32",
                int4_options: dict[str, int] | None = None) -> Path:
    """The builder's model (fp32 or int4, cpu) from the HF directory, in a subprocess (its own
    memory and stdout); the session's intra-op threads set in genai_config.json like the other
    systems'. INT4 uses `int4_options` (block_size, accuracy_level: the same as blip3v's)."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / f"genai-cache-{precision}")]
    if precision == "int4" and int4_options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in int4_options.items())]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError("onnxruntime-genai builder failed: " + " | ".join(tail))
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=4))
    log(f"  onnxruntime-genai {precision} model built in {time.perf_counter() - t0:.0f} s")
    return out


# ----------------------------------------------------------------------------- the systems


@dataclass
class Request:
    """One timed request: when it started, when each new id was known, the ids, and when the call
    returned (default: at the last id)."""

    start: float
    marks: list[float]
    tokens: list[int]
    end: float | None = None

    @property
    def ttft_ms(self) -> float:
        return (self.marks[0] - self.start) * 1e3

    @property
    def wall_ms(self) -> float:
        """The whole request, call to return."""
        return ((self.end if self.end is not None else self.marks[-1]) - self.start) * 1e3

    @property
    def decode_ms(self) -> float:
        """Mean interval between the ids after the first (ms/token)."""
        return (self.marks[-1] - self.marks[0]) * 1e3 / (len(self.marks) - 1)


OnToken = Callable[[int, int], None]


def timed_request(generate: Callable[[OnToken], Any]) -> Request:
    """Runs `generate(on_token)` and records when it started and when each new id arrived."""
    marks: list[float] = []
    tokens: list[int] = []

    def on_token(_row: int, tok: int) -> None:
        marks.append(time.perf_counter())
        tokens.append(tok)

    start = time.perf_counter()
    generate(on_token)
    return Request(start, marks, tokens, time.perf_counter())


ROLES = ("blip3v", "peer", "reference")  # this project; what a user would pick instead; kept to compare only


@dataclass
class System:
    name: str
    variant: str
    precision: str
    run: Callable[[np.ndarray, int], Request]  # (prompt ids (P,), new tokens) -> Request
    requests: list[Request] = field(default_factory=list)
    huge_pages_mib: float = 0.0  # of its weights (blip3v's CPU sessions, blip3v.runtime.hugepages)
    role: str = "blip3v"  # one of ROLES: only "peer" rows are what the ratios compare against
    label: str = ""  # short unique name in the ratios (default: name)
    first: Request | None = None  # the warm-up request: compilation, capture, allocation (untimed)
    facts: dict[str, Any] = field(default_factory=dict)  # what the system reported about itself
    # An ONNX model (session, or the builder's model) is opened only for its own timing phase (`phases`):
    # `opener` builds the loaded System whose `run` (and huge-page figure) this one takes; `run` is
    # None while it is closed.
    opener: Callable[[], "System"] | None = None

    def open(self) -> None:
        if self.run is None and self.opener is not None:
            loaded = self.opener()
            self.run, self.huge_pages_mib = loaded.run, loaded.huge_pages_mib

    def close(self) -> None:
        if self.opener is not None:
            self.run = None  # drops the session (the run closure holds the only reference)


def transformers_system(model, attn: str, precision: str, cache: str = "dynamic", role: str = "peer") -> System:
    """transformers' own `generate`, greedy: `cache="dynamic"` is eager PyTorch over its
    DynamicCache (its default); `cache="static"` passes `cache_implementation="static"`, the one
    argument with which generate allocates a StaticCache and, on a GPU, compiles the decoding step
    (torch.compile, mode reduce-overhead: CUDA graphs) on its own; whether it did is read back
    after each request (`facts["compiled"]`)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """generate() puts the prompt once, then every new id as soon as it is chosen."""

        def __init__(self):
            self.marks: list[float] = []
            self.tokens: list[int] = []
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.marks.append(time.perf_counter())
            self.tokens += value.reshape(-1).tolist()

        def end(self):
            pass

    model.config._attn_implementation = attn
    pad = model.generation_config.pad_token_id
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    facts: dict[str, Any] = {}

    def run(ids: np.ndarray, n: int) -> Request:
        clock = Clock()
        start = time.perf_counter()
        input_ids = torch.from_numpy(ids.astype(np.int64))[None].to(model.device)  # (1, P)
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, use_cache=True, streamer=clock, pad_token_id=pad, **extra)
        end = time.perf_counter()
        if cache == "static":  # generate keeps the compiled call on the model (PreTrainedModel.get_compiled_call)
            facts["compiled"] = getattr(model, "_compiled_call", None) is not None
        return Request(start, clock.marks, clock.tokens, end)

    if cache == "static":
        variant = f"PyTorch, {attn}, StaticCache, torch.compile of the step (generate's own, on CUDA)"
        label = "transformers static+compile"
    else:
        variant, label = f"PyTorch eager, {attn}, DynamicCache", "transformers eager"
    return System("transformers", variant, precision, run, role=role, label=label, facts=facts)


def blip3v_system(backend, variant: str, precision: str, name: str = "blip3v", role: str = "blip3v",
                  label: str = "") -> System:
    """A blip3v system: the shipped decode loop (blip3v.runtime.decoding.generate: a new KV cache,
    one prefill, the steps) over `backend`, no stop ids so every request runs N steps. On a GPU
    the exported graphs on ONNX Runtime's CUDA provider are a peer (`name`/`role` say so)."""
    from blip3v.runtime.decoding import generate
    from blip3v.runtime.generation import SamplingConfig

    def body(ids: np.ndarray, n: int, on_token: OnToken) -> None:
        embeds = backend.embed(ids[None].astype(np.int64))  # (1, P, D): the runtime's table lookup
        mask = np.ones((1, len(ids)), np.int64)
        generate(backend, embeds, mask, SamplingConfig(max_new_tokens=n), (), on_token)

    def run(ids: np.ndarray, n: int) -> Request:
        return timed_request(lambda on_token: body(ids, n, on_token))

    huge = getattr(backend, "huge_pages", None)  # set by blip3v_backend: what create_session collapsed
    return System(name, variant, precision, run, huge_pages_mib=huge.bytes / 2**20 if huge is not None else 0.0,
                  role=role, label=label)


def genai_system(model_dir: Path, precision: str = "fp32", lazy: bool = False) -> System:
    """The builder's model through og.Generator; `lazy`: loaded only for its timing phase (`phases`)."""
    if lazy:
        return System("onnxruntime-genai", "builder model, og.Generator", precision, None, role="peer",
                      opener=lambda: genai_system(model_dir, precision))
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))

    def run(ids: np.ndarray, n: int) -> Request:
        marks: list[float] = []
        tokens: list[int] = []
        start = time.perf_counter()
        params = og.GeneratorParams(model)
        # min_length = max_length: end-of-text ids are masked until N ids are out, as in transformers.
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids.astype(np.int32))  # the prefill runs here
        for _ in range(n):
            gen.generate_next_token()  # picks from the last logits, running the model first if needed
            marks.append(time.perf_counter())
            tokens.append(int(gen.get_next_tokens()[0]))
        return Request(start, marks, tokens, time.perf_counter())

    return System("onnxruntime-genai", "builder model, og.Generator", precision, run, role="peer")


# ----------------------------------------------------------------------------- measuring


def phases(systems: list[System]) -> list[list[System]]:
    """The timing phases: one per system with an `opener` (an ONNX model: a dense one is about as
    large as the PyTorch model), each holding that one beside every always-open system (the PyTorch
    ones, which share the model's weights), in plan order. Without such systems, one phase of all.
    Holding one ONNX model at a time bounds the run's memory (4 layers of Phi-3-mini: 2.6 GB a
    dense copy) at the price of timing the always-open systems once per phase, each phase
    interleaved on its own."""
    switched = [s for s in systems if s.opener is not None]
    if not switched:
        return [list(systems)]
    return [[s for s in systems if s.opener is None or s is d] for d in switched]


def planned_requests(systems: list[System], repeats: int) -> int:
    """Requests `measure` makes (warm-ups included): for the progress bar."""
    return len(systems) + sum(len(p) for p in phases(systems)) * repeats


def measure(systems: list[System], prompt: np.ndarray, new_tokens: int, repeats: int, log: Log,
            advance: Callable[[float], None] = lambda _n=1: None) -> list[str]:
    """Per phase (`phases`): one untimed warm-up request per system not yet warmed up (kept in
    `first`: what the first request of a process costs, compilation and graph capture included),
    then `repeats` timed ones, interleaved. The warm-up has the timed requests' shapes: a compiled
    step is specialised on the cache length, so a shorter warm-up would leave a recompilation inside
    the first timed request. A peer that fails its first request (a compiler error on that machine,
    say) is taken out of `systems` rather than ending the run: -> one note per peer taken out.
    blip3v's own rows must run. `advance(1)` after every request."""
    dropped = []
    for phase in phases(systems):
        for s in phase:
            s.open()
        for s in list(phase):
            if s.first is not None:
                continue
            try:
                s.first = s.run(prompt, new_tokens)
            except Exception as exc:  # noqa: BLE001 (any failure of someone else's stack: reported, not fatal)
                if s.role == "blip3v":
                    raise
                systems.remove(s)
                phase.remove(s)
                s.close()
                dropped.append(f"{s.label or s.name} ({s.precision}) failed its first request and is left out: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
                log(f"note: {dropped[-1]}")
                continue
            finally:
                advance(1)
            log(f"  first request  {s.name:<18} {s.variant[:34]:<34} {s.first.wall_ms / 1e3:8.2f} s")
        for r in range(repeats):
            # Interleaved, so background load hits every system alike, and in reverse order every other
            # repeat, so no system always runs straight after the same neighbour (or always first).
            for s in (phase if r % 2 == 0 else phase[::-1]):
                time.sleep(PAUSE_S)
                req = s.run(prompt, new_tokens)
                if len(req.marks) != new_tokens:
                    raise RuntimeError(f"{s.name} ({s.variant}) produced {len(req.marks)} ids, not {new_tokens}")
                s.requests.append(req)
                advance(1)
                log(f"  repeat {r + 1}/{repeats} {s.name:<18} {s.variant[:34]:<34} TTFT {req.ttft_ms:8.1f} ms  "
                    f"decode {req.decode_ms:7.2f} ms/token")
        for s in phase:
            s.close()
        release_memory()
    return dropped


def summarize(systems: list[System]) -> list[dict[str, Any]]:
    # greedy ids to compare with: transformers' eager generate at the same precision (for int4,
    # which transformers does not run: fp32, else fp16)
    references: dict[str, list[int]] = {}
    for s in sorted((s for s in systems if s.name == "transformers"), key=lambda s: s.label != "transformers eager"):
        references.setdefault(s.precision, s.requests[0].tokens)
    rows = []
    for s in systems:
        reference = references.get(s.precision) or references.get("fp32") or references.get("fp16", [])
        ttft = stats([r.ttft_ms for r in s.requests])
        dec = stats([r.decode_ms for r in s.requests])
        wall = stats([r.wall_ms for r in s.requests])
        toks = s.requests[0].tokens
        agree = next((i for i, (a, b) in enumerate(zip(toks, reference)) if a != b), min(len(toks), len(reference)))
        row = {"name": s.name, "variant": s.variant, "precision": s.precision, "role": s.role,
               "label": s.label or s.name, "huge_pages_mib": round(s.huge_pages_mib, 1),
               "ttft_ms": ttft["median"], "ttft_ms_min": ttft["min"], "ttft_ms_max": ttft["max"],
               "decode_ms_per_token": dec["median"], "decode_ms_per_token_min": dec["min"],
               "decode_ms_per_token_max": dec["max"],
               "request_ms": wall["median"],
               "greedy_prefix_agreeing_with_transformers": agree, **s.facts}
        if s.first is not None:  # the first request's one-off cost, apart from the steady state
            row["first_request_ms"] = s.first.wall_ms
            row["first_request_ttft_ms"] = s.first.ttft_ms
            row["first_call_overhead_ms"] = max(0.0, s.first.wall_ms - wall["median"])
        rows.append(row)
    return rows


def _fastest(peers: list[dict[str, Any]], key: str) -> dict[str, Any]:
    best = min(peers, key=lambda r: r[key])
    return {"label": best["label"], "precision": best["precision"], "ms": best[key]}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per blip3v row: the speed-up over the FASTEST peer on each metric (peer time / blip3v time;
    > 1: blip3v is faster), peers being what a user would run instead (role "peer"; an eager
    reference kept beside them never counts). Peers at the row's precision, or where none ran it
    (INT4 on a GPU: transformers has no INT4 path here), the fastest at any precision, marked
    `same_precision: false`. `vs` keeps the speed-up over each non-blip3v row at the precision."""
    out = []
    everyone = [r for r in rows if r["role"] != "blip3v"]
    for ours in (r for r in rows if r["role"] == "blip3v"):
        entry: dict[str, Any] = {"blip3v": ours["variant"], "precision": ours["precision"], "vs": {}}
        for other in (r for r in everyone if r["precision"] == ours["precision"]):
            entry["vs"][other["label"]] = {
                "ttft_speedup": other["ttft_ms"] / ours["ttft_ms"],
                "decode_speedup": other["decode_ms_per_token"] / ours["decode_ms_per_token"]}
        peers = [r for r in everyone if r["role"] == "peer"]
        same = [r for r in peers if r["precision"] == ours["precision"]]
        if same or peers:
            pool = same or peers
            fastest = {"ttft": _fastest(pool, "ttft_ms"), "decode": _fastest(pool, "decode_ms_per_token")}
            fastest["ttft"]["speedup"] = fastest["ttft"]["ms"] / ours["ttft_ms"]
            fastest["decode"]["speedup"] = fastest["decode"]["ms"] / ours["decode_ms_per_token"]
            entry["fastest_peer"] = {**fastest, "same_precision": bool(same)}
            entry["target_met"] = {"ttft": fastest["ttft"]["speedup"] >= 1.0,
                                   "decode": fastest["decode"]["speedup"] >= 1.0}
        if ours["precision"] == "int4":  # the quantization's own gain: the same runtime dense (fp32, else fp16)
            dense = next((r for p in ("fp32", "fp16") for r in rows if r["name"] == "blip3v"
                          and r["precision"] == p and r["variant"] == ours["variant"]), None)
            if dense is not None:
                entry["dense_precision"] = dense["precision"]
                entry["decode_speedup_vs_own_dense"] = dense["decode_ms_per_token"] / ours["decode_ms_per_token"]
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- which rows


@dataclass(frozen=True)
class Planned:
    """One row a run will time: `kind` says which builder makes it."""

    kind: str  # "transformers-eager" | "transformers-static" | "blip3v-ort" | "ort-cuda" | "blip3v-torch" | "genai"
    precision: str
    role: str
    attention: str = ""  # the exported graph's variant, for the ONNX Runtime rows


def select_rows(device_name: str, backends: Sequence[str], precisions: Sequence[str], attentions: Sequence[str],
                *, ort_cuda: bool, genai: bool) -> tuple[list[Planned], list[str]]:
    """The rows of one run and a note for each row left out and why. `ort_cuda`: onnxruntime has
    its CUDA execution provider (onnxruntime-gpu); `genai`: onnxruntime-genai is installed and
    not skipped. On a GPU the peers are transformers' static cache + torch.compile (generate's one
    argument) and ONNX Runtime's CUDA provider on the exported graphs; transformers eager stays as
    a reference. On the CPU: transformers eager and onnxruntime-genai, the defaults there."""
    cuda = device_name == "cuda"
    rows: list[Planned] = []
    notes: list[str] = []
    dense = [p for p in precisions if p != "int4"]
    for p in dense:
        rows.append(Planned("transformers-eager", p, "reference" if cuda else "peer"))
        if cuda:
            rows.append(Planned("transformers-static", p, "peer"))
        if "onnxruntime" in backends and not cuda:
            rows += [Planned("blip3v-ort", p, "blip3v", a) for a in attentions]
        if "onnxruntime" in backends and cuda and ort_cuda:
            rows += [Planned("ort-cuda", p, "peer", a) for a in attentions]
        if "torch" in backends:
            rows.append(Planned("blip3v-torch", p, "blip3v"))
    if not cuda and dense:
        notes.append("transformers with cache_implementation='static' + torch.compile: GPU-only peer "
                     "(generate compiles the step on CUDA only), left out on cpu")
    if cuda and "onnxruntime" in backends and not ort_cuda:
        notes.append("ONNX Runtime CUDA execution provider: onnxruntime-gpu is not installed here, its rows "
                     "(fp16, INT4 MatMulNBits, GroupQueryAttention graphs) are left out")
    if "int4" in precisions:
        if "onnxruntime" in backends and not cuda:
            rows.append(Planned("blip3v-ort", "int4", "blip3v", "gqa"))
        if "onnxruntime" in backends and cuda and ort_cuda:
            rows.append(Planned("ort-cuda", "int4", "peer", "gqa"))
        if "torch" in backends and cuda:
            rows.append(Planned("blip3v-torch", "int4", "blip3v"))
        if "torch" in backends and not cuda:
            notes.append("blip3v torch INT4: its Triton kernel runs on CUDA only, left out on cpu")
        notes.append("transformers int4: no INT4 path without extra quantization packages, no row")
    if genai:
        if cuda:
            notes.append("onnxruntime-genai: the installed build runs on the CPU, left out on cuda")
        else:
            rows += [Planned("genai", p, "peer") for p in precisions if p in ("fp32", "int4")]
            if "fp16" in precisions:
                notes.append("onnxruntime-genai fp16: the builder makes no fp16 CPU model, no row")
    else:
        notes.append("onnxruntime-genai: not installed or skipped, no row")
    order = {p: i for i, p in enumerate(precisions)}
    rows.sort(key=lambda r: order[r.precision])  # stable: rows grouped by precision
    return rows, notes


# ----------------------------------------------------------------------------- profile


def trace_summary(path: Path) -> dict[str, Any]:
    """An ORT profiler trace of one request -> per op type, the prefill's ms (the first model_run)
    and the mean ms per later run (one decode step each), plus the runs' own mean wall times."""
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) < 2:
        raise RuntimeError(f"{path}: the trace holds {len(runs)} model runs, expected a prefill and decode steps")
    prefill_end = runs[0]["ts"] + runs[0]["dur"]
    steps = len(runs) - 1
    ops: dict[str, dict[str, float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            entry = ops.setdefault(e.get("args", {}).get("op_name", "?"), {"prefill_ms": 0.0, "decode_ms_per_token": 0.0})
            if e["ts"] < prefill_end:
                entry["prefill_ms"] += e["dur"] / 1e3
            else:
                entry["decode_ms_per_token"] += e["dur"] / 1e3 / steps
    return {"run_ms": {"prefill": runs[0]["dur"] / 1e3, "decode_per_token": sum(r["dur"] for r in runs[1:]) / 1e3 / steps},
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["decode_ms_per_token"]))}


def profile_blip3v(decoder_path: Path, embeddings: np.ndarray, conf, threads: int, prompt: np.ndarray,
                   new_tokens: int, workdir: Path) -> dict[str, Any]:
    """One blip3v request through a profiling session of the same graph."""
    from blip3v.runtime.ort_backend import session_options

    options = session_options(["CPUExecutionProvider"], threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / f"profile-blip3v-{decoder_path.stem}")
    backend = blip3v_backend(decoder_path, embeddings, conf, threads, options=options, attention="gqa")
    blip3v_system(backend, ORT_VARIANT.format("gqa"), "fp32").run(prompt, new_tokens)
    return trace_summary(Path(backend.decoder.end_profiling()))


def profile_genai(model_dir: Path, prompt: np.ndarray, new_tokens: int, workdir: Path) -> dict[str, Any]:
    """One onnxruntime-genai request with its session's profiler on (set in genai_config.json; the
    trace is written when the model is released)."""
    import gc

    config_path = model_dir / "genai_config.json"
    original = config_path.read_text()
    config = json.loads(original)
    prefix = workdir / f"profile-{model_dir.name}"  # one prefix per model: fp32 and int4 traces apart
    config["model"]["decoder"]["session_options"]["enable_profiling"] = str(prefix)
    config_path.write_text(json.dumps(config, indent=4))
    try:
        system = genai_system(model_dir)
        system.run(prompt, new_tokens)
        del system
        gc.collect()
    finally:
        config_path.write_text(original)
    traces = sorted(workdir.glob(f"{prefix.name}*.json"))
    if not traces:
        raise RuntimeError("onnxruntime-genai wrote no profile")
    return trace_summary(traces[-1])


# ----------------------------------------------------------------------------- report


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| system | variant | precision | TTFT ms (median, min-max) | decode ms/token (median, min-max) "
            "| first request ms (steady) | greedy ids = transformers' |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        pages = f", {r['huge_pages_mib']:.0f} MiB on huge pages" if r.get("huge_pages_mib") else ""
        role = " (reference)" if r.get("role") == "reference" else ""
        first = (f"{r['first_request_ms']:.1f} ({r['request_ms']:.1f})"
                 if "first_request_ms" in r else "-")
        lines.append(f"| {r['name']}{role} | {r['variant']}{pages} | {r['precision']} "
                     f"| {r['ttft_ms']:.1f} ({r['ttft_ms_min']:.1f}-{r['ttft_ms_max']:.1f}) "
                     f"| {r['decode_ms_per_token']:.2f} ({r['decode_ms_per_token_min']:.2f}-"
                     f"{r['decode_ms_per_token_max']:.2f}) | {first} "
                     f"| first {r['greedy_prefix_agreeing_with_transformers']} |")
    return "\n".join(lines)


def ratio_lines(result: dict[str, Any]) -> list[str]:
    """One line per blip3v row: its speed-up over the fastest peer on each metric, then over every
    other row at its precision (the eager reference among them)."""
    lines = []
    for entry in result["ratios"]:
        own = (f" Decode vs blip3v's own {entry['dense_precision']} weights: x{entry['decode_speedup_vs_own_dense']:.2f}."
               if "decode_speedup_vs_own_dense" in entry else "")
        fastest = entry.get("fastest_peer")
        if fastest is None:
            lines.append(f"- blip3v ({entry['blip3v']}, {entry['precision']}): no peer ran here.{own}")
            continue
        where = "" if fastest["same_precision"] else " (no peer ran this precision: the fastest at any precision)"
        parts = [f"{m} x{fastest[m]['speedup']:.2f} over {fastest[m]['label']} {fastest[m]['precision']} "
                 f"({fastest[m]['ms']:.2f} ms{'/token' if m == 'decode' else ''})" for m in ("decode", "ttft")]
        met = entry.get("target_met", {})
        verdict = ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in met.items())
        others = "; ".join(f"{peer}: TTFT x{v['ttft_speedup']:.2f}, decode x{v['decode_speedup']:.2f}"
                           for peer, v in entry["vs"].items())
        lines.append(f"- blip3v ({entry['blip3v']}, {entry['precision']}) against the fastest peer{where}: "
                     f"{'; '.join(parts)}. Target (at least as fast as the fastest peer): {verdict}."
                     + (f" Each row at {entry['precision']}: {others}." if others else "") + own)
    return lines


def note_lines(result: dict[str, Any]) -> list[str]:
    return [f"- note: {n}" for n in result.get("notes", [])]


def floor_lines(result: dict[str, Any]) -> list[str]:
    """The GPU run's floors beside every row's times."""
    floors = result.get("floors")
    if not floors:
        return []
    c = floors["ceilings"]
    lines = ["", f"Floors (measured on this GPU: copy {c['copy_gb_per_s']:.0f} GB/s read + write, fp16 matmul "
             f"{c['matmul_fp16_tflop_per_s']:.0f} TFLOP/s; decode at the mean context {floors['context']}, TTFT for "
             f"{floors['prompt_tokens']} prompt tokens):"]
    for precision, f in floors["per_precision"].items():
        floor = max(f["floor_ms"], f["flop_floor_ms"])
        beside = "; ".join(f"{r['label'] if r['role'] != 'blip3v' else 'blip3v ' + r['variant'].split(',')[0]} "
                           f"{r['decode_ms_per_token']:.2f} ms/token ({floor / r['decode_ms_per_token']:.0%} of the "
                           f"floor's speed), TTFT {r['ttft_ms']:.1f} ms"
                           for r in result["systems"] if r["precision"] == precision)
        lines.append(f"- {precision}: {f['bytes_per_token'] / 1e9:.2f} GB/token -> bandwidth floor {f['floor_ms']:.2f} "
                     f"ms/token ({f['floor_ms_at_3350_gb_per_s']:.2f} ms at the H100 datasheet's 3.35 TB/s); "
                     f"{f['flops_per_token'] / 1e9:.1f} GFLOP/token -> {f['flop_floor_ms']:.3f} ms; TTFT floor "
                     f"{f['ttft_floor_ms']:.2f} ms. Beside it: {beside or 'no row'}.")
    return lines


def torch_profile_lines(profiles: dict[str, Any]) -> list[str]:
    lines = ["", "Where the time goes (torch.profiler, 16 eager decode steps each: the kernels a captured "
                 "step replays; ms per step):", ""]
    for name, prof in profiles.items():
        lines.append(f"- {name}: eager step wall {prof['eager_step_wall_ms']:.2f} ms, kernels "
                     f"{prof['kernel_ms_per_step']:.2f} ms; top: "
                     + "; ".join(f"`{k}` {v:.3f}" for k, v in list(prof["top_kernels_ms"].items())[:8]))
    return lines


def markdown(result: dict[str, Any], command: str, heading: str = SECTION) -> str:
    cfg, dev = result["config"], result["device"]
    v = result["versions"]
    where = (f"on **{dev['gpu']}** ({dev['gpu_memory_gib']} GiB, CUDA {dev['cuda']}), host {dev['cpu']}"
             if "gpu" in dev else f"on the dev box's CPU: **{dev['cpu']}**, {dev['logical_cpus']} logical CPUs, "
             f"{dev['threads']} threads per system (torch.set_num_threads / ORT intra-op threads)")
    lines = [heading, "",
             f"Measured {result['date']} {where}, 1-minute load average {dev['load_average_1m_at_start']} at the start.",
             "",
             (f"Model: Phi3ForCausalLM with random weights ({cfg['size']}: hidden {cfg['hidden_size']}, MLP "
              f"{cfg['intermediate_size']}, {cfg['num_attention_heads']} heads, vocab {cfg['vocab_size']}), "
              f"{cfg['layers']} layers; prompt {cfg['prompt_tokens']} random ids, {cfg['new_tokens']} new tokens "
              f"(greedy, forced to the full count), {cfg['repeats']} timed repeats after one warm-up, interleaved "
              "(order reversed every other repeat). TTFT: prompt ids to the first new id; decode: mean interval "
              "between the later ids; first request: the untimed warm-up request of the same shape (compilation, "
              "graph capture, allocation) beside the median timed request. Ratios are against the fastest peer "
              "(what a user would run instead); a row marked (reference) is shown but never compared against."),
             "",
             "```", command, "```", "",
             table(result["systems"]), "", *ratio_lines(result), *floor_lines(result), "",
             *(note_lines(result) + [""] if result.get("notes") else [])]
    if result["export_check"]:
        lines += ["Export check of the blip3v graphs against float32 PyTorch (prefill + 4 cached steps): "
                  + ", ".join(f"{k} max abs diff {x:.1e}" for k, x in result["export_check"].items()) + ".", ""]
    if "memory" in result:
        lines += [f"Memory: {memory_lines(result['memory'])[0]}.", ""]
    lines.append("Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".")
    if result.get("profile") and "floors" in result:
        lines += torch_profile_lines(result["profile"])
    elif result.get("profile"):
        profiles = result["profile"]
        names = list(profiles)
        lines += ["", ("Where the time goes (ORT profiler, one more request each; kernel time by op type, ms; "
                       "op types under 1% of decode left out; `model_run` = the whole session call):"), "",
                  "| op type | " + " | ".join(f"{n} prefill | {n} decode/token" for n in names) + " |",
                  "|---|" + "---|---|" * len(names)]
        shown: dict[str, None] = {}
        for prof in profiles.values():
            total = prof["run_ms"]["decode_per_token"] or 1.0
            shown.update({op: None for op, p in prof["ops"].items() if p["decode_ms_per_token"] >= 0.01 * total})
        for op in ["model_run", *shown]:
            cells = []
            for prof in profiles.values():
                if op == "model_run":
                    cells += [f"{prof['run_ms']['prefill']:.1f}", f"{prof['run_ms']['decode_per_token']:.2f}"]
                else:
                    p = prof["ops"].get(op)
                    cells += [f"{p['prefill_ms']:.1f}", f"{p['decode_ms_per_token']:.2f}"] if p else ["-", "-"]
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def read_lm_config(directory: Path) -> dict[str, Any]:
    """An HF Phi-3 directory's config.json; one-line errors for what it is not."""
    from blip3v.errors import InputError

    if not (directory / "config.json").is_file():
        raise InputError(f"{directory}: not a Hugging Face model directory (no config.json)")
    try:
        conf = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{directory / 'config.json'}: not valid JSON ({exc})") from None
    if conf.get("model_type") != "phi3":
        raise InputError(f"{directory}: model_type {conf.get('model_type')!r}, this benchmark runs Phi-3 ('phi3')")
    return conf


def load_lm(directory: Path, log: Log):
    """An HF Phi-3 directory -> Phi3ForCausalLM, float32, eval mode; one-line errors for what it is not."""
    from blip3v.errors import InputError
    from transformers import Phi3ForCausalLM

    directory = Path(directory)
    read_lm_config(directory)
    t0 = time.perf_counter()
    try:
        model = Phi3ForCausalLM.from_pretrained(str(directory), dtype="float32").eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{directory}: cannot load the Phi-3 weights ({str(exc).splitlines()[0]})") from None
    log(f"Phi-3 from {directory} ({model.config.num_hidden_layers} layers) loaded in {time.perf_counter() - t0:.0f} s")
    return model


def torch_system(model, precision: str, weights: str = "dense"):
    """This project's PyTorch decoder (blip3v.model.fast_decode.FastDecoder: static KV buffers written
    in place, CUDA-graph step on a GPU) around the same Phi-3, driven by the shipped decode loop
    -> (System, the FastDecoder)."""
    from blip3v.model.fast_decode import FastDecoder, StaticBackend

    fast = FastDecoder(_engine_shim(model), max_batch=1, weights=weights)
    graph = "CUDA graph step" if fast.graph_mode == "cuda_graph" else "eager step"
    system = blip3v_system(StaticBackend(fast), f"torch static KV, {graph}", precision)
    return system, fast


def _ort_providers(device_name: str) -> list[str]:
    import onnxruntime as ort

    if device_name == "cpu":
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else []


# ----------------------------------------------------------------------------- memory and progress

GIB = 2**30
# Measured on the dev box (4 layers of Phi-3-mini, W = 2.6 GB of float32 weights): the interpreter
# with torch, transformers and ONNX Runtime loaded holds ~0.9 GB before any model; torch.onnx's
# export holds ~0.8 W beside the model; the INT4 quantizer (blip3v.calibration) ~1.0 W at its
# peak, the session that collects the MatMul inputs (measured 2026-12-05: 3.6 GiB of process RSS
# with the interpreter and the embedding table; it was 4.2 W while the fp32 graph was copied in
# memory, before it read its weights from disk one at a time); an ORT session holds about its
# file's size.
BASE_BYTES = 0.9 * GIB
EXPORT_FACTOR = 0.8
QUANTIZE_FACTOR = 1.0
INT4_FRACTION = 0.23  # INT4 graph / fp32 graph (block 32: 4-bit weights + a scale per 32)


def parameter_count(sizes: dict[str, Any]) -> int:
    """Phi-3's parameters from its config: embeddings, lm_head, the layers (fused qkv and gate/up)."""
    d, v, i = int(sizes["hidden_size"]), int(sizes["vocab_size"]), int(sizes["intermediate_size"])
    h = int(sizes["num_attention_heads"])
    kv = int(sizes.get("num_key_value_heads") or h)
    hd = int(sizes.get("head_dim") or d // h)
    layer = d * (h + 2 * kv) * hd + h * hd * d + d * 2 * i + i * d + 2 * d
    return 2 * v * d + int(sizes["num_hidden_layers"]) * layer + d


def onnx_row(row: Planned) -> bool:
    """A row holding an ONNX model of its own (opened only for its own timing phase)."""
    return row.kind in ("blip3v-ort", "ort-cuda", "genai")


def expected_memory(sizes: dict[str, Any], plan: list[Planned], attentions: Sequence[str], context: int,
                    released: bool) -> dict[str, float]:
    """The run's expected peak resident memory (GiB), per stage, from the parameter count (see the
    factors above): -> {stage: GiB, ..., "peak": the largest}. A rough bound, stated before the
    heavy work so a small machine can stop early; the measured peak comes at the end."""
    w32 = 4 * parameter_count(sizes)
    table = 4 * int(sizes["vocab_size"]) * int(sizes["hidden_size"])  # the embedding rows, one copy
    width = {"fp32": 4, "fp16": 2}
    kinds = {(r.kind, r.precision) for r in plan}
    dense = sorted({r.precision for r in plan if r.precision != "int4"}, key=lambda p: -width[p])
    torch_rows = [p for p in dense if any(k in kinds for k in (("transformers-eager", p), ("blip3v-torch", p)))]
    ort = [r.precision for r in plan if r.kind in ("blip3v-ort", "ort-cuda") and r.precision != "int4"]
    out: dict[str, float] = {}
    if ort:
        biggest = max(width[p] for p in ort) / 4 * w32
        out["export"] = BASE_BYTES + w32 + table + (0 if biggest == w32 else biggest) + EXPORT_FACTOR * biggest
    if any(r.precision == "int4" and r.kind in ("blip3v-ort", "ort-cuda") for r in plan):
        out["int4 quantization"] = BASE_BYTES + table + QUANTIZE_FACTOR * w32 + (0 if released else w32)
    kv_heads = int(sizes.get("num_key_value_heads") or sizes["num_attention_heads"])
    kv = 2 * int(sizes["num_hidden_layers"]) * kv_heads * context * (
        int(sizes["hidden_size"]) // int(sizes["num_attention_heads"])) * 4  # one request's K/V, float32
    held = sum(width[p] / 4 * w32 for p in torch_rows) + (w32 if "fp32" not in torch_rows and torch_rows else 0)
    sizes_onnx = [INT4_FRACTION * w32 if r.precision == "int4" else width[r.precision] / 4 * w32
                  for r in plan if onnx_row(r)]
    held += max(sizes_onnx, default=0)  # one ONNX model open at a time
    out["timing"] = BASE_BYTES + held + table * (1 + len(set(ort))) + kv * len(plan)
    out = {k: v / GIB for k, v in out.items()}
    out["peak"] = max(out.values())
    return out


def memory_line(memory: dict[str, float]) -> str:
    stages = ", ".join(f"{k} {v:.1f}" for k, v in memory.items() if k != "peak")
    return (f"expected peak memory {memory['peak']:.1f} GiB (estimated from the parameter count: {stages} GiB); "
            "the measured peak is reported at the end")


def setup_steps(sizes: dict[str, Any], args: argparse.Namespace, plan: list[Planned], ort_dense: list[str],
                int4: bool, genai_precisions: list[str], release: bool) -> dict[str, float]:
    """The run's steps and their expected seconds on the dev box (scaled by the parameter count and
    the request shape) for the progress bar: only their ratios matter to its ETA."""
    b = parameter_count(sizes) / 1e9  # billions of parameters: every step's time grows with it
    steps = {"model": 1 + 25 * b}
    for p in ort_dense:
        steps[f"export {p}"] = (8 + 60 * b) * len(args.attention)  # tracing costs seconds at any size
    if int4 and "fp32" not in ort_dense:
        steps["export gqa fp32"] = 8 + 60 * b
    if int4:
        steps["quantize int4"] = 2 + 500 * b
    for p in genai_precisions:
        steps[f"build genai {p}"] = 10 + 60 * b
    if release:
        steps["reload"] = 1 + 10 * b
    steps["systems"] = 0.5 + 5 * b
    switched = sum(onnx_row(r) for r in plan)
    kept = len(plan) - switched
    requests = len(plan) + args.repeats * (switched * (kept + 1) if switched else len(plan))
    steps["timing"] = max(requests, 1) * (0.05 + b * (0.012 * args.prompt_tokens + 0.14 * args.new_tokens))
    return {k: max(v, 1e-3) for k, v in steps.items()}


def run_benchmark(args: argparse.Namespace, log: Log = log_stderr, progress: bool = False) -> dict[str, Any]:
    """Times every system on the Phi-3 in `args.lm` (an HF directory), or on a random one of
    `args.size` / `args.layers` written to a temporary folder when `args.lm` is None. Which
    systems: `select_rows` (what is left out and why goes to `notes`). The expected peak memory is
    logged before the heavy work (`expected_memory`) and the measured one is in `memory`;
    `progress`: one bar with an ETA over the steps on stderr, `log`'s lines above it."""
    bar = StepBar({"start-up": 10.0}, desc="bench decode", enabled=progress)  # seconds, as setup_steps
    try:
        return _run_benchmark(args, bar.write if progress else log, bar)
    finally:
        bar.close()


def _run_benchmark(args: argparse.Namespace, log: Log, bar: StepBar) -> dict[str, Any]:
    """run_benchmark's body, each step on `bar` (its first step, torch's imports, already there)."""
    import copy

    with bar.step("start-up"):  # torch's, transformers' and the exporter's imports: up to tens of seconds
        import torch
        from blip3v.export.engine import decoder_golden

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: this PyTorch build sees no CUDA GPU")
    caches = None
    if cuda:  # compiled kernels and graphs kept on disk between runs (the first request reports the rest)
        from blip3v.runtime.warmup import configure_compile_caches

        caches = configure_compile_caches()
    backends = list(args.backend)
    ort_cuda = cuda and bool(_ort_providers("cuda"))
    have_genai = False
    if not args.skip_genai:
        try:
            import onnxruntime_genai  # noqa: F401
            have_genai = True
        except ImportError:
            pass
    plan, notes = select_rows(args.device, backends, args.precision, args.attention, ort_cuda=ort_cuda,
                              genai=have_genai)
    for note in notes:
        log(f"note: {note}")
    kinds = {(r.kind, r.precision) for r in plan}

    def wanted(kind: str, precision: str | None = None) -> bool:
        return any(k == kind and (precision is None or p == precision) for k, p in kinds)

    ort_kind = "ort-cuda" if cuda else "blip3v-ort"
    uses_ort = wanted(ort_kind)
    on_disk = uses_ort or wanted("genai")  # the exporter and the builder read an HF directory
    dense = [p for p in args.precision if p != "int4"]
    ort_dense = [p for p in dense if wanted(ort_kind, p)]
    int4 = wanted(ort_kind, "int4")
    genai_precisions = [p for p in ("fp32", "int4") if wanted("genai", p)]  # the builder: fp32 / int8 / int4
    # The PyTorch model is put away while onnxruntime-genai's builder runs (it reads the HF files and
    # holds the whole model itself), and read back from the HF directory after, so the peaks do not
    # add. Not for INT4 quantization any more: it reads the weights from disk one at a time (about
    # one ORT session of the fp32 graph at its peak), and a model read back lands beside the freed
    # one's pages, which malloc_trim could not hand back (the timing phases sat 1.5 GiB higher).
    release = bool(genai_precisions)
    sizes = phi3_sizes(args.size, args.layers) if args.lm is None else read_lm_config(Path(args.lm))
    memory = expected_memory(sizes, plan, args.attention, args.prompt_tokens + args.new_tokens, release)
    log(memory_line(memory))
    warning = over_memory(memory["peak"])  # a small machine can stop here
    if warning:
        log(warning)
    bar.add(setup_steps(sizes, args, plan, ort_dense, int4, genai_precisions, release))
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        with bar.step("model"):
            if args.lm is None:
                described = f"Phi3ForCausalLM, random weights ({args.size}), {args.layers} layers"
                lm_dir = work / "phi3"
                if on_disk:
                    log(f"Phi-3 ({args.size}, {args.layers} layers, random weights) -> {lm_dir}")
                    model = make_phi3_dir(lm_dir, args.size, args.layers, args.seed)
                else:  # only PyTorch systems: built where they run, nothing written
                    log(f"Phi-3 ({args.size}, {args.layers} layers, random weights) on {args.device}")
                    model = make_phi3(args.size, args.layers, args.seed, args.device)
                log(f"  built in {time.perf_counter() - t0:.0f} s")
            else:
                lm_dir = Path(args.lm)
                model = load_lm(lm_dir, log)
                described = f"{lm_dir} ({model.config.num_hidden_layers} layers)"
        conf = model.config
        if args.prompt_tokens + args.new_tokens > conf.max_position_embeddings:
            raise ValueError("--prompt-tokens + --new-tokens exceeds the model's positions")
        golden = embeddings = None
        if uses_ort:
            golden = decoder_golden(_engine_shim(model))  # float32 reference outputs for the export checks
            embeddings = model.model.embed_tokens.weight.detach().float().cpu().numpy().copy()  # (V, D) rows by id
        providers = _ort_providers(args.device) if uses_ort else []

        def ort_system(path: Path, table_p: np.ndarray, attention: str, precision: str) -> System:
            """A system whose session opens only for its own timing phase (`phases`)."""
            def make(backend) -> System:
                if cuda:  # the exported graphs on ONNX Runtime's CUDA provider: a peer on a GPU
                    return blip3v_system(backend, f"CUDA EP, blip3v's exported graph ({attention}), IO binding",
                                         precision, name="onnxruntime", role="peer",
                                         label=f"onnxruntime CUDA EP {attention}")
                return blip3v_system(backend, ORT_VARIANT.format(attention), precision)

            def opener() -> System:
                return make(blip3v_backend(path, table_p, conf, args.threads, providers, attention=attention))

            shell = make(None)
            shell.run, shell.opener = None, opener
            return shell

        systems, exports, int4_path = [], {}, None
        int4_options = {"block_size": args.int4_block_size, "accuracy_level": args.int4_accuracy_level}
        fast: dict[str, Any] = {}  # precision -> the torch system's FastDecoder, for the floors
        half = None  # the float16 model on the device, shared by the fp16 and int4 torch systems
        by_plan: dict[tuple[str, str, str], System] = {}
        tables = {p: embeddings.astype(DTYPES[p], copy=False) for p in ort_dense}  # fp32: the table itself
        for precision in ort_dense:  # the graphs first, written to disk; their sessions open later
            with bar.step(f"export {precision}"):
                pmodel = model if precision == "fp32" else copy.deepcopy(model).to(getattr(torch, DTYPES[precision]))
                cpu_model = pmodel if not next(pmodel.parameters()).is_cuda else copy.deepcopy(pmodel).cpu()
                exported = export_blip3v(cpu_model, work, args.attention, precision, golden, log)
                exports.update({f"{a} {precision}": e for a, e in exported.items()})
                del pmodel, cpu_model
        if int4:
            fp32_gqa = exports.get("gqa fp32")
            if fp32_gqa is None:
                with bar.step("export gqa fp32"):
                    fp32_gqa = export_blip3v(model if not cuda else copy.deepcopy(model).cpu(), work, ["gqa"], "fp32",
                                             golden, log)["gqa"]
        golden = None
        if release:
            del model
        release_memory()
        if int4:
            with bar.step("quantize int4"):
                int4_path = quantize_blip3v_int4(fp32_gqa["path"], embeddings, conf, args.int4_block_size,
                                                 args.int4_accuracy_level, log, args.seed)
            release_memory()
        for precision in genai_precisions:
            with bar.step(f"build genai {precision}"):
                built = build_genai(lm_dir, work / f"genai-{precision}", args.threads, log, precision, int4_options)
            by_plan[("genai", precision, "")] = genai_system(built, precision, lazy=True)
        if release:
            with bar.step("reload"):
                model = load_lm(lm_dir, log)
        with bar.step("systems"):
            for precision in ort_dense:
                for a in args.attention:
                    e = exports[f"{a} {precision}"]
                    by_plan[(ort_kind, precision, a)] = ort_system(e["path"], tables[precision], a, precision)
            if int4:
                by_plan[(ort_kind, "int4", "gqa")] = ort_system(int4_path, embeddings, "gqa", "int4")
            for precision in dense:
                # a copy per precision for transformers; the reference stays float32.
                pmodel = model if precision == "fp32" else copy.deepcopy(model).to(getattr(torch, DTYPES[precision]))
                on_device = not cuda or next(pmodel.parameters()).is_cuda  # built there, or the CPU run
                dmodel = pmodel if on_device else copy.deepcopy(pmodel).to(args.device)
                half = dmodel if cuda and precision == "fp16" else half
                role = "reference" if cuda else "peer"
                by_plan[("transformers-eager", precision, "")] = transformers_system(dmodel, args.hf_attention,
                                                                                     precision, role=role)
                if wanted("transformers-static", precision):  # the same weights: generate keeps its own cache
                    by_plan[("transformers-static", precision, "")] = transformers_system(
                        dmodel, args.hf_attention, precision, cache="static")
                if wanted("blip3v-torch", precision):
                    by_plan[("blip3v-torch", precision, "")], fast[precision] = torch_system(dmodel, precision)
            if wanted("blip3v-torch", "int4"):  # INT4 Triton kernel; no CPU fast path
                if half is None:
                    half = copy.deepcopy(model).to(args.device, torch.float16)
                # the FastDecoder swaps Int4Linear into its own layer list; `half` keeps its fp16 weights
                by_plan[("blip3v-torch", "int4", "")], fast["int4"] = torch_system(half, "int4", weights="int4")
        systems = [by_plan[(r.kind, r.precision, r.attention)] for r in plan]
        rng = np.random.default_rng(args.seed)
        prompt = rng.integers(3, min(32000, conf.vocab_size - 64), size=args.prompt_tokens)  # ordinary word ids
        n_phases = len(phases(systems))
        log(f"timing: prompt {args.prompt_tokens}, {args.new_tokens} new tokens, {args.repeats} repeats, "
            f"{args.threads} threads" + (f", {n_phases} phases (one ONNX model open at a time)"
                                         if n_phases > 1 else ""))
        with bar.step("timing", total=planned_requests(systems, args.repeats)) as advance:
            notes += measure(systems, prompt, args.new_tokens, args.repeats, log, advance)
        if n_phases > 1:
            notes.append(f"timed in {n_phases} phases, one per ONNX model, so that one ONNX model is open at a time "
                         "beside the PyTorch model (memory); the PyTorch rows ran in every phase: their figures are "
                         f"over {n_phases} x {args.repeats} requests, each phase interleaved on its own")
        rows = summarize(systems)
        for row in rows:
            if row.get("compiled") is False:
                notes.append(f"{row['label']} ({row['precision']}): generate did not compile the step here "
                             "(its auto-compile criteria were not met); timed as it ran")
        result: dict[str, Any] = {
            "systems": rows,
            "ratios": ratios(rows),
            "notes": notes,
            "device": device(args.threads, cuda),
            "versions": versions(),
            "config": {"model": described, "device": args.device, "size": args.size if args.lm is None else None,
                       "layers": int(conf.num_hidden_layers), "prompt_tokens": args.prompt_tokens,
                       "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads,
                       "hf_attention": args.hf_attention, "attention": list(args.attention),
                       "backend": backends, "precision": list(args.precision), "int4": int4_options,
                       **{k: getattr(conf, k, None) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                              "num_key_value_heads", "vocab_size", "sliding_window")}},
            "export_check": {a: e["max_abs_diff"] for a, e in exports.items()},
            "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
        }
        if caches is not None:
            result["compile_caches"] = caches
        if args.profile:
            result["profile"] = {}
            if "gqa fp32" in exports and not cuda:
                log("profiling one blip3v (gqa) request")
                result["profile"]["blip3v gqa"] = profile_blip3v(exports["gqa fp32"]["path"], embeddings, conf,
                                                                 args.threads, prompt, args.new_tokens, work)
            if wanted("genai", "fp32"):
                log("profiling one onnxruntime-genai request")
                result["profile"]["onnxruntime-genai"] = profile_genai(work / "genai-fp32", prompt, args.new_tokens, work)
            if int4_path is not None and not cuda:
                log("profiling one blip3v (gqa, int4) request")
                result["profile"]["blip3v gqa int4"] = profile_blip3v(int4_path, embeddings, conf, args.threads,
                                                                      prompt, args.new_tokens, work)
            if wanted("genai", "int4"):
                log("profiling one onnxruntime-genai int4 request")
                result["profile"]["onnxruntime-genai int4"] = profile_genai(work / "genai-int4", prompt,
                                                                            args.new_tokens, work)
        if cuda and fast:
            result["floors"] = decode_floors(fast, args.prompt_tokens, args.new_tokens, log)
            if args.profile:
                result.setdefault("profile", {}).update(
                    {f"blip3v torch {p}": profile_torch_step(f, args.prompt_tokens, log) for p, f in fast.items()})
        log(f"done in {time.perf_counter() - t0:.0f} s")
    result["memory"] = {"expected_gib": memory, **peak_memory(children=bool(genai_precisions))}
    return result


def decode_bytes_per_token(fast, context: int) -> int:
    """The fewest bytes one decode step of a FastDecoder reads: every layer weight (dense, or INT4
    packed + scales), the final norm and lm_head, plus the K/V of `context` cached tokens of one row."""
    weights = sum(t.numel() * t.element_size() for module in (fast.norm, fast.lm_head, fast.layers)
                  for t in (*module.parameters(), *module.buffers()))
    return weights + 2 * len(fast.layers) * fast.kv_heads * context * fast.head_dim * fast.dtype.itemsize


def matmul_weights(fast) -> int:
    """Multiply-adds per token of a FastDecoder's weights: every layer Linear (dense or INT4, counted
    at its logical shape) and lm_head."""
    total = 0
    for module in (*fast.layers.modules(), fast.lm_head):
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            total += int(module.in_features) * int(module.out_features)
    return total


def decode_floors(fast: dict[str, Any], prompt_tokens: int, new_tokens: int, log: Log) -> dict[str, Any]:
    """The floors of a request per precision, from the ceilings measured on this GPU
    (common.gpu_ceilings: copy bandwidth, fp16 matmul rate):
    decode: one step's bytes (weights + the K/V of the mean context P + N/2) over the bandwidth,
    and its FLOPs (2 per weight + attention) over the matmul rate: the larger is the floor;
    prefill (TTFT): the weights read once vs 2 FLOPs per weight per prompt token + causal attention."""
    from blip3v.benchmarks.common import gpu_ceilings

    ceilings = gpu_ceilings()
    bandwidth = ceilings["copy_gb_per_s"] * 1e9  # bytes/s
    rate = ceilings["matmul_fp16_tflop_per_s"] * 1e12  # FLOP/s
    log(f"GPU ceilings: copy {ceilings['copy_gb_per_s']:.0f} GB/s, fp16 matmul "
        f"{ceilings['matmul_fp16_tflop_per_s']:.0f} TFLOP/s")
    context = prompt_tokens + new_tokens // 2
    out: dict[str, Any] = {"ceilings": ceilings, "context": context, "prompt_tokens": prompt_tokens,
                           "per_precision": {}}
    for precision, f in fast.items():
        n = decode_bytes_per_token(f, context)
        weights = decode_bytes_per_token(f, 0)
        macs = matmul_weights(f)
        attn_width = len(f.layers) * f.layers[0].h_q * f.head_dim  # per query-key pair, all layers and heads
        step_flops = 2 * macs + 4 * attn_width * context
        prefill_flops = 2 * macs * prompt_tokens + 4 * attn_width * prompt_tokens * (prompt_tokens + 1) // 2
        out["per_precision"][precision] = {
            "bytes_per_token": n, "floor_ms": n / bandwidth * 1e3,
            "floor_ms_at_3350_gb_per_s": n / 3350e9 * 1e3,
            "flops_per_token": step_flops, "flop_floor_ms": step_flops / rate * 1e3,
            "prefill_flops": prefill_flops,
            "ttft_floor_ms": max(weights / bandwidth, prefill_flops / rate) * 1e3}
    return out


def profile_torch_step(fast, position: int, log: Log, steps: int = 16) -> dict[str, Any]:
    """CUDA kernel time of the decode step run eagerly (the kernels a captured graph replays), per
    step and by kernel name, from torch.profiler; the step's own wall time beside it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from blip3v.model.fast_decode import StaticBackend

    log(f"profiling {steps} eager decode steps ({fast.dtype}, "
        f"{'int4' if any('Int4' in type(m).__name__ for m in fast.modules()) else 'dense'})")
    tokens = torch.full((1,), 5, dtype=torch.long, device=fast.device)
    positions = torch.full((1,), position, dtype=torch.long, device=fast.device)
    cache = StaticBackend(fast).new_cache(1, position + 1)  # the step's buffers, as the runtime allocates them
    kv = cache.storage  # (held through `cache`: a dropped cache's storage goes back to the decoder)
    with torch.inference_mode():
        for _ in range(3):
            fast.step(kv.k, kv.v, tokens, positions)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fast.step(kv.k, kv.v, tokens, positions)
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    kernels = {}
    for e in prof.key_averages():
        ms = getattr(e, "self_device_time_total", 0) / 1e3 / steps
        if ms > 0:
            kernels[e.key[:90]] = kernels.get(e.key[:90], 0.0) + ms
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:15])
    return {"eager_step_wall_ms": wall, "kernel_ms_per_step": sum(kernels.values()), "top_kernels_ms": top}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm", type=Path, default=None, metavar="HF_PHI3_DIR",
                   help="time this Hugging Face Phi-3 directory (default: a random one of --size / --layers)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the random Phi-3 (default 2)")
    p.add_argument("--backend", nargs="+", choices=("onnxruntime", "torch"), default=["onnxruntime", "torch"],
                   help="this project's runtimes to time (default both)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every system runs (default cpu)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length P (default 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens N per request (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats R after one warm-up (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="intra-op threads for every system (default: all logical CPUs)")
    p.add_argument("--size", choices=sorted(SIZES), default="phi3-mini",
                   help="phi3-mini: Phi-3-mini widths (default); tiny: test sizes")
    p.add_argument("--attention", nargs="+", choices=("gqa", "standard"), default=["gqa", "standard"],
                   help="blip3v decoder variants to export and time (default both)")
    p.add_argument("--int4-block-size", type=int, default=32, help="INT4 block size for blip3v and the builder (default 32)")
    p.add_argument("--int4-accuracy-level", type=int, default=4,
                   help="MatMulNBits accuracy level for both INT4 models (default 4, the builder's CPU default)")
    p.add_argument("--precision", nargs="+", choices=[*sorted(DTYPES), "int4"], default=["fp32"],
                   help="precisions to compare (default fp32; fp16 times blip3v and transformers only: the "
                        "onnxruntime-genai builder makes no fp16 CPU model)")
    p.add_argument("--hf-attention", choices=("sdpa", "eager"), default="sdpa",
                   help="transformers attention implementation (default sdpa, its own default)")
    p.add_argument("--skip-genai", action="store_true", help="leave onnxruntime-genai out")
    p.add_argument("--profile", action="store_true", help="add ORT op-type profiles of one blip3v (gqa) and one onnxruntime-genai request; "
                        "with --device cuda, torch.profiler kernel times of the torch backend's decode step")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--out-md", type=Path, metavar="PATH",
                   help="write the result as the 'Decode speed' section of this Markdown file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if min(args.layers, args.prompt_tokens, args.repeats, args.threads) < 1 or args.new_tokens < 2:
        print("error: sizes must be positive and --new-tokens at least 2", file=sys.stderr)
        return 2
    try:
        result = run_benchmark(args, progress=not args.json)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
    for r in result["systems"]:
        for key in ("ttft_ms", "decode_ms_per_token"):
            if not (math.isfinite(r[key]) and r[key] > 0):
                print(f"error: {r['name']} {key} is {r[key]}", file=sys.stderr)
                return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result["systems"]))
        print("\n".join([*ratio_lines(result), *floor_lines(result), *note_lines(result),
                         *memory_lines(result["memory"])]))
    if args.out_md:
        niceness = os.nice(0)
        command = (f"nice -n {niceness} " if niceness else "") + "python benchmarks/bench_decode.py " + \
            shlex.join(argv if argv is not None else sys.argv[1:])
        heading = SECTION_GPU if args.device == "cuda" else SECTION
        write_section(args.out_md, heading, markdown(result, command, heading))
        log_stderr(f"wrote {args.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
