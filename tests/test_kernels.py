"""Tests for blip3v.kernels: each Triton kernel against its PyTorch reference, each reference against
the model code it stands for, and the INT4 format's round-to-nearest bounds.

Without a GPU the kernels run in Triton's CPU interpreter: this file sets TRITON_INTERPRET=1 before
the kernel modules are imported (Triton reads it when `@triton.jit` runs), so plain `pytest` works.
With a GPU the same cases run compiled on CUDA. The interpreter has no bfloat16 (it multiplies the
bit patterns: triton-lang/triton#11584), so CPU runs cover float32 and float16; `check()` adds
bfloat16 on a GPU. Tolerances are each kernel file's TOLERANCE table.

    python -m pytest tests/test_kernels.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from blip3v.kernels import (
    _triton,  # noqa: E402
    rmsnorm,  # noqa: E402
)
from blip3v.kernels import decode_attention as attn  # noqa: E402
from blip3v.kernels import int4_matmul as int4  # noqa: E402
from blip3v.kernels import token_learner as tlk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]


# Kernels run here on a GPU, or in the interpreter when this process imported Triton after setting
# TRITON_INTERPRET (a test module collected earlier may have imported transformers, hence Triton,
# first). Otherwise the kernel tests are skipped here and test_kernels_in_fresh_process runs them.
READY = DEVICE == "cuda" or _triton.interpreter_ready(attn, int4, rmsnorm, tlk)
needs_triton = pytest.mark.skipif(
    not READY, reason="triton is not installed (pip install 'blip3v[kernels]')" if not _triton.HAS_TRITON else
    "triton was imported before TRITON_INTERPRET=1 was set: run by test_kernels_in_fresh_process")


@pytest.mark.skipif(READY or not _triton.HAS_TRITON, reason="the kernel tests run in this process"
                    if _triton.HAS_TRITON else "triton is not installed")
def test_kernels_in_fresh_process():
    """This file's kernel tests in a new interpreter-mode process (Triton imported after the flag)."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
        cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# INT4: the format (no Triton needed)
# ---------------------------------------------------------------------------------------------

def test_int4_packing_layout():
    """Even k in the low nibble, odd k in the high one, stored as q + 8; scale = absmax / 7."""
    w = torch.tensor([[7.0, -7.0, 0.0, 3.5], [1.0, 2.0, -1.0, -2.0]])
    q = int4.quantize_int4(w, group_size=4)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (2, 2) and q.scales.shape == (2, 1)
    assert q.scales[:, 0].tolist() == pytest.approx([1.0, 2.0 / 7])
    assert q.packed[0].tolist() == [(7 + 8) | ((-7 + 8) << 4), (0 + 8) | ((4 + 8) << 4)]  # 3.5 rounds to even 4
    assert int4.unpack_int4(q.packed)[0].tolist() == [7, -7, 0, 4]


@pytest.mark.parametrize("k,group", [(128, 32), (200, 64), (257, 32), (96, 128)])
def test_int4_round_to_nearest_bound(k, group):
    """|W - dequant(W)| <= scale / 2 elementwise (RTN), for K not a multiple of G (zero-padded)."""
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(40, k, generator=gen) * 0.05
    w[3, :group] = 0.0  # an all-zero group quantizes to exact zeros
    q = int4.quantize_int4(w, group)
    deq = int4.dequantize_int4(q)
    assert deq.shape == w.shape
    scale = q.scales.repeat_interleave(group, dim=1)[:, :k]  # (N, K)
    assert bool(((w - deq).abs() <= scale / 2 + 1e-7).all())
    assert bool((deq[3, :group] == 0).all())
    assert int(int4.unpack_int4(q.packed).abs().max()) <= 7  # symmetric: -8 is never used


def test_int4_reference_matmul_within_rtn_bound():
    """The dequantized weights reproduce the fp32 matmul within sum_k |x_k| * scale_k / 2 per output."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 160, generator=gen) * 0.05
    x = torch.randn(3, 160, generator=gen)
    q = int4.quantize_int4(w, 32)
    exact = x @ w.T
    got = int4.int4_linear_reference(x, q)
    bound = x.abs() @ (q.scales.repeat_interleave(32, dim=1)[:, :160] / 2).T  # (M, N)
    assert bool(((got - exact).abs() <= bound + 1e-5).all())
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < 0.15, f"relative error {rel:.3f}: RTN INT4 with G=32 should be near 0.08 on Gaussian weights"


def test_int4_dispatch_uses_reference_off_gpu():
    q = int4.quantize_int4(torch.randn(8, 64), 32)
    x = torch.randn(2, 64)
    assert torch.equal(int4.int4_linear(x, q), int4.int4_linear_reference(x, q))
    with pytest.raises(ValueError, match="backend"):
        int4.int4_linear(x, q, backend="cuda")


# ---------------------------------------------------------------------------------------------
# References against the model code they stand for
# ---------------------------------------------------------------------------------------------

def test_rmsnorm_reference_is_phi3_rmsnorm():
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    norm = Phi3RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    h, y = rmsnorm.add_rmsnorm_reference(x, r, norm.weight, 1e-5)
    assert torch.equal(h, r + x)
    assert torch.equal(y, norm(r + x))


def test_decode_attention_reference_is_masked_sdpa():
    """Same as SDPA of one query over the cache with the padding masked (GQA by repeat_kv)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, generator=gen)
    k, v = torch.randn(2, 2, 9, 16, generator=gen), torch.randn(2, 2, 9, 16, generator=gen)
    lengths = torch.tensor([9, 4])
    mask = attn.key_mask(lengths, 9)[:, None, None, :]  # (B, 1, 1, S)
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=mask)[:, :, 0]
    torch.testing.assert_close(attn.decode_attention_reference(q, k, v, lengths), want, atol=1e-6, rtol=1e-5)


def test_decode_attention_reference_window():
    """window w: the last w filled slots only (Phi-3's sliding window, in positions)."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 8, generator=gen)
    k, v = torch.randn(1, 2, 12, 8, generator=gen), torch.randn(1, 2, 12, 8, generator=gen)
    lengths = torch.tensor([10])
    got = attn.decode_attention_reference(q, k, v, lengths, window=4)
    want = attn.decode_attention_reference(q, k[:, :, 6:10], v[:, :, 6:10], torch.tensor([4]))
    torch.testing.assert_close(got, want)


def test_token_learner_reference_is_the_module():
    from blip3v.model.temporal import TokenLearner

    torch.manual_seed(0)
    module = TokenLearner(32, 4).eval()
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        a = module.mlp(module.norm(x))
        torch.testing.assert_close(tlk.softmax_weighted_sum_reference(a, x), module(x))
        torch.testing.assert_close(tlk.token_learner(module, x), module(x))  # the CPU dispatch


# ---------------------------------------------------------------------------------------------
# Kernels against references (interpreter on CPU, compiled on a GPU)
# ---------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", int4.CHECK_CASES, ids=lambda c: "M{}-K{}-N{}-G{}-split{}".format(*c))
def test_int4_kernel(case, dtype):
    int4.check_case(*case, dtype=dtype, device=DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", attn.CHECK_CASES, ids=lambda c: "B{}-H{}of{}-S{}-dh{}-len{}-win{}".format(*c[:7]))
def test_decode_attention_kernel(case, dtype):
    attn.check_case(*case, dtype=dtype, device=DEVICE)


@needs_triton
def test_decode_attention_kernel_many_splits_ragged():
    """More splits than a short row has tiles: empty splits must weigh nothing in the reduce."""
    attn.check_case(3, 4, 4, 300, 32, (3, 150, 299), None, 7, device=DEVICE)
    attn.check_case(2, 4, 1, 300, 32, (300, 20), 100, 5, device=DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", rmsnorm.CHECK_CASES, ids=lambda c: "rows{}-D{}-res{}".format(*c))
def test_rmsnorm_kernel(case, dtype):
    rmsnorm.check_case(*case, dtype=dtype, device=DEVICE)


@needs_triton
def test_rmsnorm_kernel_strided_rows():
    """Rows of a (B, S, D) view with padding between them: the kernel follows the row stride."""
    base = torch.randn(4, 3, 80, device=DEVICE)
    x, r = base[..., :64], torch.randn(4, 3, 64, device=DEVICE)
    w = torch.randn(64, device=DEVICE)
    pairs = zip(rmsnorm.add_rmsnorm_triton(x, r, w, 1e-5), rmsnorm.add_rmsnorm_reference(x, r, w, 1e-5), strict=True)
    for got, want in pairs:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", tlk.CHECK_CASES, ids=lambda c: "lead{}-n{}-D{}-M{}".format(*c))
def test_token_learner_kernel(case, dtype):
    tlk.check_case(*case, dtype=dtype, device=DEVICE)


@needs_triton
def test_token_learner_kernel_in_temporal_encoder():
    """The fused TL as the gTTM write layer of a tiny temporal encoder: same video tokens."""
    from blip3v.model.config import preset
    from blip3v.model.temporal import TemporalEncoder

    torch.manual_seed(0)
    cfg = preset("tiny-gttm-tl")
    dim = cfg.vision_tokenizer_config.vis_feature_dim
    latents = cfg.vision_tokenizer_config.num_vis_tokens
    enc = TemporalEncoder(dim, latents, cfg.temporal_encoder_config).to(DEVICE).eval()
    x = torch.randn(2, cfg.num_frames, latents, dim, device=DEVICE)
    with torch.no_grad():
        want = enc(x)
        for tl_module in (enc.ttm_unit.write_layer, enc.final_output):
            tl_module.forward = (lambda m: lambda inp: tlk.token_learner(m, inp, backend="triton"))(tl_module)
        got = enc(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bench_without_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmarks would run")
    for mod in (attn, int4, rmsnorm, tlk):
        mod.bench()
    out = capsys.readouterr().out
    assert out.count("no CUDA GPU here") == 4
