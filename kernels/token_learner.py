"""TokenLearner TL(M) of the temporal encoder with the softmax + weighted sum fused.

    a = mlp(norm(x))                        (..., n, M)   in PyTorch (LayerNorm, Linear, GELU, Linear)
    out[m] = sum_n softmax_n(a)[n, m] x[n]  (..., M, D)   one Triton kernel, on the un-normalised x

This is `blip3v.model.temporal.TokenLearner.forward` (docs/MODEL.md, "Temporal encoders"). Why only the
second half is a kernel: the MLP is two matmuls over every token (n x D x 2M multiply-adds), which
cuBLAS already runs near peak, and LayerNorm/GELU are single fused eager kernels; fusing them into
one Triton program would trade a tuned GEMM for a hand-written one. The second half in eager is a
softmax kernel writing (.., n, M) back to memory, a transposed copy, and a batched matmul; the
kernel reads `a` and `x` once and keeps the softmax in registers (online over n, as flash
attention does over keys). It matters most for the gTTM write layer, TL(4) over 9 tokens run for
B*128 groups x T frames: tiny per-group matmuls where launch count and round trips dominate.

Program (group, M block, D block) walks n in tiles: running max and sum per m, acc (M, D).

    python -m blip3v.kernels.token_learner     # check + benchmark (needs a CUDA GPU)
"""

import torch

from blip3v.kernels._triton import HAS_TRITON, check_targets, gpu_or_say_why, next_pow2, time_ms, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

# Kernel path vs TokenLearner.forward, |out - ref| <= atol + rtol * |ref| (x ~ N(0, 1)).
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (4e-3, 1e-2), torch.bfloat16: (3e-2, 2e-2)}


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------

def softmax_weighted_sum_reference(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a (..., n, M), x (..., n, D) -> (..., M, D): softmax over n, then a^T x (as TokenLearner)."""
    return torch.einsum("...nm,...nd->...md", a.softmax(dim=-2), x)


def token_learner_reference(module, x: torch.Tensor) -> torch.Tensor:
    """The module's own forward: the golden output."""
    return module(x)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _softmax_weighted_sum_kernel(
        a_ptr, x_ptr, out_ptr, N, M, D,
        stride_ag, stride_an, stride_xg, stride_xn, stride_og, stride_om,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        g = tl.program_id(0)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        rn = tl.arange(0, BLOCK_N)
        m_ok = rm < M
        d_ok = rd < D
        run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs = n0 + rn
            n_ok = offs < N
            a = tl.load(a_ptr + g * stride_ag + offs[:, None] * stride_an + rm[None, :],
                        mask=n_ok[:, None] & m_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_M)
            a = a * 1.4426950408889634  # log2(e): exp2 below
            a = tl.where(n_ok[:, None], a, float("-inf"))  # padded m columns stay finite: no NaN anywhere
            new_max = tl.maximum(run_max, tl.max(a, axis=0))
            alpha = tl.exp2(run_max - new_max)
            p = tl.exp2(a - new_max[None, :])  # (BLOCK_N, BLOCK_M)
            run_sum = run_sum * alpha + tl.sum(p, axis=0)
            x = tl.load(x_ptr + g * stride_xg + offs[:, None] * stride_xn + rd[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            acc = acc * alpha[:, None] + tl.dot(tl.trans(p).to(x.dtype), x, input_precision=PRECISION)
            run_max = new_max
        out = acc / run_sum[:, None]  # (BLOCK_M, BLOCK_D)
        tl.store(out_ptr + g * stride_og + rm[:, None] * stride_om + rd[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def softmax_weighted_sum_triton(a: torch.Tensor, x: torch.Tensor, *, block_d: int = 128) -> torch.Tensor:
    """The kernel. a (..., n, M), x (..., n, D) -> (..., M, D) in x's dtype."""
    n, m = a.shape[-2:]
    d = x.shape[-1]
    lead = x.shape[:-2]
    a3 = a.reshape(-1, n, m)  # (G, n, M)
    x3 = x.reshape(-1, n, d)  # (G, n, D)
    if a3.stride(-1) != 1 or x3.stride(-1) != 1:
        a3, x3 = a3.contiguous(), x3.contiguous()
    out = torch.empty((x3.shape[0], m, d), device=x.device, dtype=x.dtype)  # (G, M, D)
    block_m = max(16, min(64, next_pow2(m)))
    block_n = max(16, min(64, next_pow2(n)))
    block_d = max(16, min(block_d, next_pow2(d)))
    grid = (x3.shape[0], triton.cdiv(m, block_m), triton.cdiv(d, block_d))
    _softmax_weighted_sum_kernel[grid](
        a3, x3, out, n, m, d, a3.stride(0), a3.stride(1), x3.stride(0), x3.stride(1), out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    return out.view(*lead, m, d)


def softmax_weighted_sum(a: torch.Tensor, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Dispatcher: the kernel on CUDA with Triton, else the reference."""
    if use_triton(backend, a, x):
        return softmax_weighted_sum_triton(a, x)
    return softmax_weighted_sum_reference(a, x)


def token_learner(module, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """TokenLearner forward with the fused tail: x (..., n, D) -> (..., M, D)."""
    a = module.mlp(module.norm(x))  # (..., n, M): cuBLAS matmuls, see the module docstring
    return softmax_weighted_sum(a, x, backend)


# ---------------------------------------------------------------------------------------------
# Check and benchmark
# ---------------------------------------------------------------------------------------------

# (leading dims, n, D, M): the gTTM write layer (9 tokens -> 4), the `tl` pooling shape scaled
# down, n/D/M not multiples of the tiles, n longer than one tile (the online softmax across tiles).
CHECK_CASES = [((6,), 9, 64, 4), ((2,), 130, 48, 8), ((2, 3), 5, 40, 3), ((1,), 70, 96, 20)]


def check_case(lead: tuple[int, ...], n: int, d: int, m: int, dtype: torch.dtype = torch.float32,
               device: str = "cpu", seed: int = 0) -> float:
    from blip3v.model.temporal import TokenLearner

    torch.manual_seed(seed)
    module = TokenLearner(d, m).to(device, dtype).eval()
    x = torch.randn(*lead, n, d).to(device, dtype)
    with torch.no_grad():
        ref = token_learner_reference(module, x).float()
        out = token_learner(module, x, backend="triton").float()
    atol, rtol = TOLERANCE[dtype]
    err = (out - ref).abs()
    if bool((err > atol + rtol * ref.abs()).any()):
        raise AssertionError(f"token learner lead={lead} n={n} D={d} M={m} {dtype}: max |diff| "
                             f"{err.max().item():.3g} exceeds atol {atol} + rtol {rtol}")
    return err.max().item()


def check() -> None:
    device, dtypes = check_targets()
    for dtype in dtypes:
        for case in CHECK_CASES:
            print(f"token_learner {case} {dtype}: max |diff| {check_case(*case, dtype=dtype, device=device):.3g}")


def bench() -> None:
    """Released shapes (D 1152): gTTM write layer TL(4) over 9 tokens for 128 groups per clip, and
    `tl` pooling TL(32) over 8 x 128 tokens. Full TokenLearner: eager vs fused tail."""
    if not gpu_or_say_why("token_learner"):
        return
    from blip3v.model.temporal import TokenLearner

    print(f"{'shape':>28} | {'eager ms':>9} {'fused ms':>9} | {'tail eager':>10} {'tail fused':>10}")
    for b in (1, 8):
        for lead, n, m in (((b * 128,), 9, 4), ((b,), 1024, 32)):
            module = TokenLearner(1152, m).to("cuda", torch.float16).eval()
            x = torch.randn(*lead, n, 1152, device="cuda", dtype=torch.float16)
            with torch.no_grad():
                a = module.mlp(module.norm(x))
                eager = time_ms(lambda: module(x))
                fused = time_ms(lambda: token_learner(module, x, backend="triton"))
                tail_e = time_ms(lambda: softmax_weighted_sum_reference(a, x))
                tail_f = time_ms(lambda: softmax_weighted_sum_triton(a, x))
            shape = f"{tuple(lead)} n={n} M={m}"
            print(f"{shape:>28} | {eager:>9.4f} {fused:>9.4f} | {tail_e:>10.4f} {tail_f:>10.4f}")


if __name__ == "__main__":
    if gpu_or_say_why("token_learner"):
        check()
        bench()
