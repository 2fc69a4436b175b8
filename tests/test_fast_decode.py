"""Tests for blip3v.model.fast_decode: the static-KV decoder against the reference decoder, both
driven by the runtime's one decode loop (blip3v.runtime.decoding).

A tiny random model (`tiny-gttm` preset) stands in for the checkpoint. Greedy tokens must equal the
reference decoder's (TorchBackend, decoder="reference": transformers' DynamicCache) token for token,
in fp32, with the PyTorch references and with the Triton kernels (CPU interpreter without a GPU:
this file sets TRITON_INTERPRET=1 before anything imports the kernels). `stop_ids=()` makes every
row run the full `max_new_tokens`, so no test passes on an early stop.

    python -m pytest tests/test_fast_decode.py -q
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from torch import nn  # noqa: E402

from blip3v.errors import InputError  # noqa: E402
from blip3v.kernels import decode_attention, int4_matmul, rmsnorm  # noqa: E402
from blip3v.kernels._triton import HAS_TRITON, interpreter_ready  # noqa: E402
from blip3v.model.config import PHI3_SPECIAL_TOKENS, preset  # noqa: E402
from blip3v.model.fast_decode import FastDecoder, Int4Linear, StaticBackend  # noqa: E402
from blip3v.model.generate import TorchBackend, left_pad  # noqa: E402
from blip3v.model.tokenizer import BASE_SPECIALS, build_word_tokenizer  # noqa: E402
from blip3v.model.xgenmm import XGenMMVideoModel  # noqa: E402
from blip3v.runtime.decoding import decode, generate, prefill  # noqa: E402
from blip3v.runtime.generation import SamplingConfig  # noqa: E402

LOGIT_ATOL = 1e-4  # fp32 static-cache logits vs transformers' full forward (observed ~1e-6)
NEW_TOKENS = 12
GREEDY = SamplingConfig(max_new_tokens=NEW_TOKENS)
# Where backend="triton" runs: the GPU when there is one (Triton launches only on CUDA tensors
# there), else the CPU interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# The Triton-backend tests need kernels that can run: on a GPU, or in the interpreter when this
# process imported Triton after setting TRITON_INTERPRET (see test_kernels.py). Otherwise they are
# skipped here and test_triton_tests_in_fresh_process runs them.
READY = torch.cuda.is_available() or interpreter_ready(decode_attention, int4_matmul, rmsnorm)
needs_triton = pytest.mark.skipif(
    not READY, reason="triton is not installed (pip install 'blip3v[kernels]')" if not HAS_TRITON else
    "triton was imported before TRITON_INTERPRET=1 was set: run by test_triton_tests_in_fresh_process")


@pytest.mark.skipif(READY or not HAS_TRITON, reason="the Triton tests run in this process"
                    if HAS_TRITON else "triton is not installed")
def test_triton_tests_in_fresh_process():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "triton"],
        cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def tiny_model(seed: int = 0, kv_heads: int | None = None, fan_in_init: bool = True) -> XGenMMVideoModel:
    """`tiny-gttm` with, by default, its decoder Linears drawn at std 1/sqrt(K): every layer then
    moves the residual stream (at the preset's std 0.02 the embedding dominates and greedy output
    tends to repeat one token), so the comparison exercises every layer."""
    torch.manual_seed(seed)
    cfg = preset("tiny-gttm")
    if kv_heads is not None:
        cfg.text_config["num_key_value_heads"] = kv_heads  # GQA
    model = XGenMMVideoModel(cfg).eval()
    if fan_in_init:
        with torch.no_grad():
            for mod in model.vlm.lang_model.modules():
                if isinstance(mod, nn.Linear):
                    nn.init.normal_(mod.weight, std=1 / math.sqrt(mod.in_features))
    return model


def reference_backend(model: XGenMMVideoModel, device: str = "cpu") -> TorchBackend:
    """The reference decoder (DynamicCache) as the runtime drives it. TorchBackend checks its
    tokenizer's special ids against the config: a word tokenizer laid out as the preset expects."""
    words = model.config.additional_vocab_start - len(PHI3_SPECIAL_TOKENS) - len(BASE_SPECIALS)
    tokenizer = build_word_tokenizer(f"w{i:05d}" for i in range(words))
    return TorchBackend(model, tokenizer, device, decoder="reference")


def static(model: XGenMMVideoModel, **options) -> StaticBackend:
    return StaticBackend(FastDecoder(model, **{"max_batch": 2, "backend": "torch", **options}))


def prompts(model: XGenMMVideoModel, rows: list[list[int]], seed: int = 1) -> tuple[torch.Tensor, np.ndarray]:
    """Token rows with one <image> each -> left-padded spliced embeddings (B, S, D) and mask (B, S)
    numpy, exactly as TorchBackend.splice builds them (random video tokens)."""
    cfg = model.config
    image = cfg.special_token_ids["image"]
    rows = [[image if t == "img" else t for t in r] for r in rows]
    ids, mask = left_pad(rows, cfg.special_token_ids["pad"])
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(len(rows), cfg.num_video_tokens, cfg.text_config["hidden_size"], generator=gen)
    with torch.no_grad():
        return model.splice(ids, video), model.widen_mask(ids, mask).numpy()


ONE = [[1, 5, 7, "img", 9, 10, 11, 12]]
TWO = [[1, 5, 7, "img", 9, 10, 11, 12, 13, 14], [1, "img", 3, 4]]  # row 1 is left-padded by 6


def reference(model, embeds, mask, new_tokens=NEW_TOKENS, stop_ids=(), on_token=None):
    return generate(reference_backend(model, str(embeds.device)), embeds, mask,
                    SamplingConfig(max_new_tokens=new_tokens), stop_ids, on_token)


def assert_strong(tokens: list[list[int]], n: int = NEW_TOKENS) -> None:
    assert all(len(r) == n for r in tokens)
    assert len({t for r in tokens for t in r}) > 3, f"degenerate reference output {tokens}: the test would be weak"


@pytest.mark.parametrize("rows,kv_heads", [(ONE, None), (TWO, None), (TWO, 2)],
                         ids=["batch1", "batch2-padded", "batch2-gqa"])
def test_greedy_tokens_equal_reference(rows, kv_heads):
    model = tiny_model(kv_heads=kv_heads)
    embeds, mask = prompts(model, rows)
    want = reference(model, embeds, mask)
    assert_strong(want)
    dec = static(model)
    assert generate(dec, embeds, mask, GREEDY, ()) == want
    assert generate(dec, embeds, mask, GREEDY, ()) == want  # a second request, on a new cache


def test_padded_row_decodes_as_alone():
    model = tiny_model()
    embeds, mask = prompts(model, TWO)
    dec = static(model)
    both = generate(dec, embeds, mask, GREEDY, ())
    keep = mask[1].astype(bool)
    alone = generate(dec, embeds[1:, keep], mask[1:, keep], GREEDY, ())
    assert both[1] == alone[0]


def test_stops_like_reference():
    """With real stop ids each row ends where the reference's does, and on_token sees the same stream."""
    model = tiny_model()
    embeds, mask = prompts(model, TWO)
    free = reference(model, embeds, mask)
    stop = (free[0][4],)  # row 0 stops at its 5th token; row 1 wherever (or never)
    seen_ref, seen_fast = [], []
    want = reference(model, embeds, mask, stop_ids=stop, on_token=lambda r, t: seen_ref.append((r, t)))
    got = generate(static(model), embeds, mask, GREEDY, stop, lambda r, t: seen_fast.append((r, t)))
    assert got == want and seen_fast == seen_ref
    assert len(got[0]) == free[0].index(stop[0])


class Recorded(StaticBackend):
    """The static decoder, keeping a copy of the logits of every one-token step it runs."""

    def __init__(self, fast: FastDecoder):
        super().__init__(fast)
        self.steps: list[np.ndarray] = []

    def step(self, cache, tokens, positions):
        logits = super().step(cache, tokens, positions)
        self.steps.append(logits.copy())
        return logits


def full_forward_logits(model, embeds: torch.Tensor, mask: np.ndarray, tokens: list[list[int]]) -> torch.Tensor:
    """Transformers' no-cache forward over prompt + the chosen tokens but the last -> the logits
    (B, N, V+3) at the last prompt column and every fed token."""
    steps = torch.tensor(tokens)  # (B, N)
    mask_t = torch.from_numpy(mask)
    with torch.inference_mode():
        full_embeds = torch.cat([embeds, model.embed_tokens(steps[:, :-1])], dim=1)
        full_mask = torch.cat([mask_t, torch.ones_like(steps[:, :-1])], dim=1)
        logits, _ = model.decoder(full_embeds, attention_mask=full_mask,
                                  position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
    return logits[:, embeds.shape[1] - 1:]


def test_step_logits_match_full_forward():
    """Prefill + the captured-shape step give transformers' no-cache logits at every position."""
    model = tiny_model(kv_heads=2)
    embeds, mask = prompts(model, TWO)
    dec = Recorded(FastDecoder(model, max_batch=2, backend="torch"))
    cache = dec.new_cache(2, mask.shape[1] + 6)
    first = prefill(dec, cache, embeds, mask)
    tokens = decode(dec, cache, first, SamplingConfig(max_new_tokens=6), ()).ids
    want = full_forward_logits(model, embeds, mask, tokens)  # (B, 6, V+3)
    got = torch.from_numpy(np.stack([first, *dec.steps], axis=1))
    assert got.shape == want.shape and len(dec.steps) == 5
    assert (got - want).abs().max().item() < LOGIT_ATOL


@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
def test_chunk_after_prefix_equals_full_prefill(kv_heads):
    """A left-padded prefix prefilled, then a multi-token chunk on the non-empty cache, then decode:
    the chunk's logits equal one fresh prefill of the whole prompt (fp32, LOGIT_ATOL), and so do
    the greedy tokens."""
    model = tiny_model(kv_heads=kv_heads)
    embeds, mask = prompts(model, TWO)
    cut = embeds.shape[1] - 3  # the last 3 columns (real in both rows) are the second chunk
    dec = static(model)
    fresh = dec.new_cache(2, mask.shape[1] + NEW_TOKENS)
    want_logits = prefill(dec, fresh, embeds, mask)
    want = decode(dec, fresh, want_logits, GREEDY, ()).ids
    assert_strong(want)
    cache = dec.new_cache(2, mask.shape[1] + NEW_TOKENS)
    prefill(dec, cache, embeds[:, :cut], mask[:, :cut])
    got_logits = prefill(dec, cache, embeds[:, cut:], mask[:, cut:])
    assert np.abs(got_logits - want_logits).max() < LOGIT_ATOL
    assert decode(dec, cache, got_logits, GREEDY, ()).ids == want
    assert want == reference(model, embeds, mask)


def test_fork_and_truncate():
    """Two questions branch off one cached prefix: on a fork (one copy) and by rewinding the cache;
    each answer equals a fresh prefill of prefix + question."""
    model = tiny_model(kv_heads=2)
    embeds, mask = prompts(model, ONE)
    dec = static(model)
    questions = [dec.embed(np.array([[20, 21, 22, 23]])), dec.embed(np.array([[30, 31]]))]
    full = [torch.cat([embeds, q], dim=1) for q in questions]
    want = [generate(dec, e, np.ones(e.shape[:2], np.int64), GREEDY, ()) for e in full]
    assert want[0] != want[1]
    capacity = full[0].shape[1] + NEW_TOKENS
    base = dec.new_cache(1, capacity)
    prefill(dec, base, embeds, mask)
    branch = base.fork()
    assert decode(dec, branch, prefill(dec, branch, questions[0]), GREEDY, ()).ids == want[0]
    # the branch's writes did not reach the prefix it was forked from
    assert decode(dec, base, prefill(dec, base, questions[1]), GREEDY, ()).ids == want[1]
    branch.truncate(embeds.shape[1])  # rewind the branch to the prefix, ask the other question
    assert decode(dec, branch, prefill(dec, branch, questions[1]), GREEDY, ()).ids == want[1]


@needs_triton
def test_triton_kernels_in_the_loop():
    """backend="triton": decode attention, residual+RMSNorm (and the chunk's norms) as kernels."""
    model = tiny_model(kv_heads=2)
    embeds, mask = prompts(model, TWO)
    model, embeds = model.to(TRITON_DEVICE), embeds.to(TRITON_DEVICE)
    want = reference(model, embeds, mask, new_tokens=6)
    dec = static(model, backend="triton")
    assert generate(dec, embeds, mask, SamplingConfig(max_new_tokens=6), ()) == want


def _prefill_logits(dec: StaticBackend, embeds: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(prefill(dec, dec.new_cache(len(mask), mask.shape[1]), embeds, mask))


def test_int4_logits_close_to_fp32():
    """INT4 (RTN, G=32) swaps every decoder Linear; logits keep cosine > 0.97 at the preset's own
    init (Phi-3's std 0.02 everywhere, embeddings included: observed 0.990-0.993) and > 0.90 at
    fan-in scale, where every layer's quantization noise (~8% relative per matmul at G=32) reaches
    the output (observed 0.947-0.957). A broken INT4 path gives a cosine near 0."""
    for fan_in, bound in ((False, 0.97), (True, 0.90)):
        model = tiny_model(fan_in_init=fan_in)
        embeds, mask = prompts(model, TWO)
        dense, quant = static(model), static(model, weights="int4", group_size=32)
        swapped = [m for m in quant.fast.layers.modules() if isinstance(m, Int4Linear)]
        assert len(swapped) == 4 * len(quant.fast.layers)
        a, b = _prefill_logits(dense, embeds, mask), _prefill_logits(quant, embeds, mask)
        cos = torch.cosine_similarity(a, b, dim=-1)
        assert not torch.equal(a, b)  # the INT4 weights are really in use
        assert bool((cos > bound).all()), f"cosine {cos.tolist()} (fan-in init {fan_in})"
    mlp = model.vlm.lang_model.model.layers[0].mlp
    assert type(mlp.gate_up_proj) is nn.Linear and type(mlp.down_proj) is nn.Linear  # the model is untouched


@needs_triton
def test_int4_triton_matches_int4_reference():
    model = tiny_model()
    embeds, mask = prompts(model, ONE)
    model, embeds = model.to(TRITON_DEVICE), embeds.to(TRITON_DEVICE)
    sampling = SamplingConfig(max_new_tokens=4)
    want = generate(static(model, weights="int4", group_size=32), embeds, mask, sampling, ())
    tri = static(model, weights="int4", group_size=32, backend="triton")
    assert generate(tri, embeds, mask, sampling, ()) == want


def test_int4_state_dict_round_trip():
    """The quantized state dict (the offline pass's output) loads into a fresh INT4 decoder."""
    model = tiny_model()
    embeds, mask = prompts(model, ONE)
    quant = static(model, weights="int4", group_size=64)
    state = quant.fast.state_dict()
    assert "layers.0.qkv.packed" in state and "layers.0.qkv.scales" in state
    assert not any(k.endswith((".k", ".v")) for k in state)  # the KV cache is the runtime's, not the module's
    other = static(tiny_model(seed=5), weights="int4", group_size=64)
    other.fast.load_state_dict(state)
    assert torch.equal(_prefill_logits(other, embeds, mask), _prefill_logits(quant, embeds, mask))


def test_half_precision_copy_leaves_model_fp32():
    model = tiny_model(fan_in_init=False)
    embeds, mask = prompts(model, ONE)
    dense, half = static(model), static(model, dtype=torch.float16)
    a, b = _prefill_logits(dense, embeds, mask), _prefill_logits(half, embeds, mask)
    assert half.new_cache(1, 4).storage.k[0].dtype == torch.float16
    assert next(model.parameters()).dtype == torch.float32
    assert dense.fast.layers[0].qkv is model.vlm.lang_model.model.layers[0].self_attn.qkv_proj  # fp32: shared
    assert torch.cosine_similarity(a, b, dim=-1).min().item() > 0.999


def test_errors():
    model = tiny_model()
    embeds, mask = prompts(model, TWO)
    dec = static(model, max_batch=1)
    with pytest.raises(InputError, match="max_batch"):
        generate(dec, embeds, mask, SamplingConfig(max_new_tokens=2), ())
    with pytest.raises(InputError, match="context"):
        dec.new_cache(1, dec.max_context + 1)
    with pytest.raises(InputError, match="weights"):
        FastDecoder(model, weights="int8")
    with pytest.raises(InputError, match="group size"):
        FastDecoder(model, weights="int4", group_size=48)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            FastDecoder(model, graph="cuda_graph")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("weights", ["dense", "int4"])
def test_cuda_graph_equals_eager_on_gpu(weights):
    model = tiny_model()
    embeds, mask = prompts(model, TWO)
    want_ref = reference(model, embeds, mask)
    model = model.to("cuda")
    embeds = embeds.cuda()
    eager = static(model, weights=weights, group_size=32, graph="none")
    graphed = static(model, weights=weights, group_size=32, graph="cuda_graph")
    want = generate(eager, embeds, mask, GREEDY, ())
    assert generate(graphed, embeds, mask, GREEDY, ()) == want
    assert len(graphed.fast._kept) == 1  # the dropped cache's storage (and its graph) is kept
    assert generate(graphed, embeds, mask, GREEDY, ()) == want  # replay of the kept storage's graph
    cache = graphed.new_cache(2, mask.shape[1] + NEW_TOKENS)  # a chunk after a prefix, graphed steps
    prefill(graphed, cache, embeds[:, :-3], mask[:, :-3])
    logits = prefill(graphed, cache, embeds[:, -3:], mask[:, -3:])
    assert decode(graphed, cache, logits, GREEDY, ()).ids == want
    if weights == "dense":
        assert want == want_ref
