"""The GPU fast paths of the visual side and the warm-up, held to the PyTorch reference.

- The gTTM's fast path (blip3v.model.temporal: q/k/v fused into one matmul, attention through
  scaled_dot_product_attention, the TokenLearner tail through blip3v.kernels.token_learner)
  against the reference math, float32, |fast - ref| <= 1e-5 + 1e-4 |ref| (the token-learner
  kernel's fp32 tolerance): on the CPU with the PyTorch tail and with the Triton kernel in its
  interpreter, and on CUDA when there is one. In float16 (CUDA) both paths are held to the float32
  reference: the fast path's max error at most twice the reference math's own fp16 error + 1e-3
  (rounding differs between kernels, so neither is exact; neither may drift further).
- The visual call captured as a CUDA graph (blip3v.model.visual_graph): the eager call itself on
  the CPU; on CUDA against the eager reference, for fresh inputs and a second batch size.
- Greedy answers of the shipped demo model through the fast paths equal the reference path's.
- The warm-up: compile caches under the blip3v cache folder unless the user chose their own, and
  `warm_up` through the question path without touching the engine's clip cache.

    python -m pytest -q tests/test_gpu_paths.py
"""

from __future__ import annotations

import copy
import importlib.util
import os

import numpy as np
import pytest
import torch

from conftest import run_cli

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
TOLERANCE = {torch.float32: (1e-5, 1e-4)}
QUESTIONS = ["what colour does the triangle turn?", "which way does the circle move?", "how many shapes are there?"]


def _encoder(kind: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A temporal encoder at odd sizes (D 48 = 4 heads x 12, memory 3, 2 blocks, 10 slots), its
    matrices at unit gain so every part of the step moves the output."""
    from blip3v.model.config import TemporalConfig
    from blip3v.model.temporal import TemporalEncoder

    torch.manual_seed(seed)
    cfg = TemporalConfig(type=kind, num_tokens=6, memory_size=3, process_layers=2, heads=4, dim_head=12, ff_mult=2)
    enc = TemporalEncoder(48, 10, cfg)
    with torch.no_grad():
        for p in enc.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return enc.to(device, dtype).eval()


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    err = (out.float() - ref.float()).abs()
    assert bool((err <= atol + rtol * ref.float().abs()).all()), f"max |diff| {err.max().item():.3g}"


def _as_close_as_reference(out: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> None:
    """Low precision: `out` (fast path) no further from the float32 `exact` than twice the
    reference math's own error at that precision, + 1e-3."""
    own = (ref.float() - exact.float()).abs().max().item()
    got = (out.float() - exact.float()).abs().max().item()
    assert got <= 2 * own + 1e-3, f"fast path max error {got:.3g}, reference math's {own:.3g}"


def _triton_ready(device: str) -> bool:
    from blip3v.kernels import _triton
    from blip3v.kernels import token_learner as tlk

    return device == "cuda" or _triton.interpreter_ready(tlk)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["gttm", "gttm_tl"])
def test_fast_gttm_matches_reference(kind, kernels, device):
    if kernels == "triton" and not _triton_ready(device):
        pytest.skip("Triton's interpreter was not set up before triton was imported (see tests/test_kernels.py)")
    x32 = torch.randn(2, 5, 10, 48, device=device)  # (B, T, N, D)
    exact = None
    for dtype in [torch.float32] + ([torch.float16] if device == "cuda" else []):
        enc = _encoder(kind, device, dtype)
        keys = set(enc.state_dict())
        x = x32.to(dtype)
        with torch.inference_mode():
            enc.path = "reference"
            ref = enc(x)
            enc.path, enc.kernels = "fast", kernels
            out = enc(x)
        assert out.shape == ref.shape == ((2, 10, 48) if kind == "gttm" else (2, 6, 48))
        if dtype == torch.float32:
            _close(out, ref, dtype)
            exact = ref
        else:
            _as_close_as_reference(out, ref, exact)
        assert set(enc.state_dict()) == keys  # the fast path registers nothing: checkpoint keys unchanged


def test_auto_path_takes_the_reference_where_it_must():
    enc = _encoder("gttm")
    x = torch.randn(1, 2, 10, 48)
    assert not enc.uses_fast_path(x)  # CPU: the reference (exports and CPU runs are unchanged)
    enc.path = "bogus"
    with pytest.raises(ValueError, match="path"):
        enc(x)
    if CUDA:  # training on CUDA keeps the reference: the fused kernel has no backward
        enc.path = "auto"
        xc = x.cuda()
        assert not enc.to("cuda").uses_fast_path(xc)
        with torch.inference_mode():
            assert enc.uses_fast_path(xc)


# ---------------------------------------------------------------------------------------------
# The demo model: greedy answers through the fast paths
# ---------------------------------------------------------------------------------------------

def _clips(size: int, frames: int, mean, std) -> np.ndarray:
    """Two synthetic clips (2, T, 3, S, S), normalised as the model expects: a square that moves
    right and turns from red to blue, and a bar that moves down on grey. Made here with numpy so
    the test needs no video decoder (the GPU machine has no PyAV)."""
    clips = np.zeros((2, frames, size, size, 3), np.float32)
    clips[1] += 0.5
    s = size // 4
    for t in range(frames):
        x = t * (size - s) // max(1, frames - 1)
        colour = (1.0, 0.0, 0.0) if t < frames // 2 else (0.0, 0.0, 1.0)
        clips[0, t, size // 3:size // 3 + s, x:x + s] = colour
        clips[1, t, x:x + s // 2, size // 4:3 * size // 4] = (0.0, 1.0, 0.0)
    clips = (clips - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(clips.transpose(0, 1, 4, 2, 3))  # (2, T, 3, S, S)


def _pixels(host) -> np.ndarray:
    """The synthetic clips, and the sample clip where PyAV can decode it."""
    pixels = _clips(host.image_size, host.num_frames, host.image_mean, host.image_std)
    if importlib.util.find_spec("av") is not None:
        from blip3v.assets import SAMPLE_CLIP

        pixels = np.concatenate([pixels, host.load_video(SAMPLE_CLIP)[None]])
    return pixels


def _answers(host, video: torch.Tensor, sampling) -> list[list[int]]:
    """Greedy ids per clip and question from video tokens (B, M, D): the fresh path after the
    visual call (blip3v.runtime.session.answer_batch's splice + the one decode loop)."""
    from blip3v.runtime.decoding import generate

    out = []
    for question in QUESTIONS:
        rows = [host.encode_prompt(question)] * len(video)
        embeds, mask = host.splice(rows, video)
        out.append(generate(host, embeds, mask, sampling, host.stop_ids))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_demo_answers_unchanged_by_the_fast_paths(device):
    from blip3v.assets import DEMO_MODEL
    from blip3v.model.generate import TorchBackend
    from blip3v.model.visual_graph import GraphedVisual
    from blip3v.runtime.generation import SamplingConfig

    host = TorchBackend.load(DEMO_MODEL, device=device)  # fp32 on cpu, fp16 on cuda
    model, encoder = host.model, host.model.vlm.vision_tokenizer.temporal_encoder
    pixels32 = torch.from_numpy(_pixels(host)).to(device)
    pixels = pixels32.to(host.dtype)
    sampling = SamplingConfig(max_new_tokens=8)
    with torch.inference_mode():
        encoder.path = "reference"
        reference = model.encode_video(pixels)
        encoder.path = "fast"
        fast = model.encode_video(pixels)
        encoder.path = "auto"
        graphed = GraphedVisual(model)(pixels)  # a CUDA graph on cuda, the eager call on cpu
        if host.dtype == torch.float32:
            _close(fast, reference, host.dtype)
            _close(graphed, reference, host.dtype)
        else:
            exact_model = copy.deepcopy(model).float()
            exact_model.vlm.vision_tokenizer.temporal_encoder.path = "reference"
            exact = exact_model.encode_video(pixels32)
            _as_close_as_reference(fast, reference, exact)
            _as_close_as_reference(graphed, reference, exact)
    expected = _answers(host, reference, sampling)
    assert any(ids for per_question in expected for ids in per_question)  # the model answers at all
    assert _answers(host, fast, sampling) == expected
    assert _answers(host, graphed, sampling) == expected


# ---------------------------------------------------------------------------------------------
# The visual call as a CUDA graph
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_model():
    from blip3v.assets import DEMO_MODEL
    from blip3v.model.checkpoint import load_checkpoint

    return load_checkpoint(DEMO_MODEL, dtype=torch.float32).eval()


def test_graphed_visual_is_the_eager_call_on_cpu(demo_model):
    from blip3v.model.visual_graph import GraphedVisual

    cfg = demo_model.config
    pixels = torch.randn(1, cfg.num_frames, 3, cfg.image_size, cfg.image_size)
    visual = GraphedVisual(demo_model)
    with torch.inference_mode():
        assert torch.equal(visual(pixels), demo_model.encode_video(pixels))
    assert not visual.graphs  # nothing captured off CUDA


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
def test_graphed_visual_replays_fresh_inputs_on_cuda(demo_model):
    from blip3v.model.visual_graph import GraphedVisual

    exact_model = copy.deepcopy(demo_model).to("cuda")
    exact_model.vlm.vision_tokenizer.temporal_encoder.path = "reference"
    model = copy.deepcopy(demo_model).to("cuda", torch.float16)
    cfg = model.config
    visual = GraphedVisual(model)
    with torch.inference_mode():
        for batch in (1, 1, 2):  # the second call replays on new pixels; batch 2 captures a second graph
            pixels = torch.randn(batch, cfg.num_frames, 3, cfg.image_size, cfg.image_size, device="cuda")
            out = visual(pixels.half())
            model.vlm.vision_tokenizer.temporal_encoder.path = "reference"
            ref = model.encode_video(pixels.half())
            model.vlm.vision_tokenizer.temporal_encoder.path = "auto"
            _as_close_as_reference(out, ref, exact_model.encode_video(pixels))
    assert len(visual.graphs) == 2


# ---------------------------------------------------------------------------------------------
# Warm-up
# ---------------------------------------------------------------------------------------------

def test_compile_caches_go_under_the_blip3v_cache(tmp_path):
    from blip3v.runtime.warmup import configure_compile_caches

    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    got = configure_compile_caches(env)
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "xdg" / "blip3v" / "triton")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "blip3v" / "inductor")
    assert os.path.isdir(env["TRITON_CACHE_DIR"]) and os.path.isdir(env["TORCHINDUCTOR_CACHE_DIR"])
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
    assert {v["source"] for v in got.values()} == {"blip3v"}
    home = {"HOME": str(tmp_path / "home")}  # no XDG_CACHE_HOME: ~/.cache/blip3v
    configure_compile_caches(home)
    assert home["TRITON_CACHE_DIR"] == str(tmp_path / "home" / ".cache" / "blip3v" / "triton")


def test_compile_caches_respect_the_users_own(tmp_path):
    from blip3v.runtime.warmup import configure_compile_caches

    env = {"XDG_CACHE_HOME": str(tmp_path), "TRITON_CACHE_DIR": "/data/triton", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
    got = configure_compile_caches(env)
    assert env["TRITON_CACHE_DIR"] == "/data/triton" and got["TRITON_CACHE_DIR"]["source"] == "user"
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0" and got["TORCHINDUCTOR_FX_GRAPH_CACHE"]["source"] == "user"
    assert got["TORCHINDUCTOR_CACHE_DIR"]["source"] == "blip3v"  # only what the user left unset
    assert not (tmp_path / "blip3v" / "triton").exists()


def test_compile_caches_in_this_process(tmp_path, monkeypatch):
    """On os.environ: inductor's config, already imported by torch here, gets its graph cache on."""
    import torch._inductor.config as inductor_config

    from blip3v.runtime.warmup import configure_compile_caches

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    configure_compile_caches()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "blip3v" / "inductor")
    assert inductor_config.fx_graph_cache is True
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(tmp_path / "blip3v" / "inductor")  # where inductor will write


def test_warm_up_runs_the_question_path_apart():
    from blip3v.runtime.session import Engine
    from blip3v.runtime.warmup import describe, warm_up

    engine = Engine.open(device="cpu")
    warm = warm_up(engine)
    assert warm.first_s > 0 and warm.second_s > 0 and warm.one_off_s >= 0
    assert engine.cached_clips() == 0 and engine.stats["clip_misses"] == 0  # the blank clip is not kept
    line = describe(warm, {"TRITON_CACHE_DIR": {"path": "/c/triton", "source": "blip3v"}})
    assert line.startswith("warm-up: ") and "/c/triton" in line and "\n" not in line


@pytest.mark.skipif(not CUDA or importlib.util.find_spec("av") is None, reason="needs a CUDA GPU and PyAV")
def test_ask_on_cuda_says_how_long_warm_up_took(tmp_path):
    from blip3v.assets import SAMPLE_CLIP

    proc = run_cli("ask", str(SAMPLE_CLIP), QUESTIONS[0], "--device", "cuda", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(line.startswith("warm-up: ") for line in proc.stderr.splitlines()), proc.stderr
    assert proc.stdout.strip().startswith("{")  # stdout stays the answer
