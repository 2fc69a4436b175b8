"""Fused residual add + RMSNorm: (x, residual) -> (h = x + residual, weight * rmsnorm(h)).

In a decoder layer the residual stream is added to and then normalised twice per layer; fused, the
row is read once and both results written once (three tensor passes instead of seven in eager).
The numerics follow transformers' Phi3RMSNorm exactly: the add in the tensor dtype, the statistics
in fp32, the normalised row cast back to the tensor dtype before the weight multiply:

    h = x + residual;  n = (h.float() * rsqrt(mean(h.float()^2) + eps)).to(h.dtype);  out = weight * n

`residual=None` is plain RMSNorm (the first norm of the first layer). One program per row; a row
(D <= 8192 for Phi-3's 3072) fits in one block.

    python -m blip3v.kernels.rmsnorm     # check + benchmark (needs a CUDA GPU)
"""

import torch

from blip3v.kernels._triton import HAS_TRITON, check_targets, gpu_or_say_why, next_pow2, time_ms, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

# Kernel vs reference; fp32 should agree to rounding, 16-bit to one unit in the last place.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------

def add_rmsnorm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (new residual h (..., D), normed (..., D)), both in x's dtype."""
    h = x if residual is None else x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return h, weight * normed.to(h.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, h_ptr, y_ptr, D, eps,
                            stride_x, stride_r, stride_h, stride_y,
                            HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        rd = tl.arange(0, BLOCK_D)
        ok = rd < D
        h = tl.load(x_ptr + row * stride_x + rd, mask=ok, other=0.0)  # (BLOCK_D,) in the tensor dtype
        if HAS_RESIDUAL:
            h = h + tl.load(r_ptr + row * stride_r + rd, mask=ok, other=0.0)  # rounded to the dtype, as eager
            tl.store(h_ptr + row * stride_h + rd, h, mask=ok)
        hf = h.to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / D + eps)
        normed = (hf * inv_rms).to(h_ptr.dtype.element_ty).to(tl.float32)  # the eager cast before the weight
        w = tl.load(w_ptr + rd, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + rd, (w * normed).to(y_ptr.dtype.element_ty), mask=ok)


def add_rmsnorm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel. Rows are every dim but the last; the last dim must be contiguous."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)  # (R, D)
    r2 = residual.reshape(-1, d) if residual is not None else x2
    if x2.stride(-1) != 1 or r2.stride(-1) != 1:
        raise ValueError("add_rmsnorm needs a contiguous last dim")
    h = torch.empty_like(x2) if residual is not None else x2
    y = torch.empty(x2.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    _add_rmsnorm_kernel[(x2.shape[0],)](
        x2, r2, weight, h, y, d, eps, x2.stride(0), r2.stride(0), h.stride(0), y.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK_D=next_pow2(d),
    )
    return h.view(x.shape), y.view(x.shape)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher: the kernel on CUDA with Triton, else the reference."""
    if use_triton(backend, x, weight):
        return add_rmsnorm_triton(x, residual, weight, eps)
    return add_rmsnorm_reference(x, residual, weight, eps)


# ---------------------------------------------------------------------------------------------
# Check and benchmark
# ---------------------------------------------------------------------------------------------

# (rows, D, with residual): D not a power of two, one row, no residual.
CHECK_CASES = [(1, 96, True), (5, 100, True), (3, 128, False), (7, 3072, True), (2, 33, False)]


def check_case(rows: int, d: int, with_residual: bool, dtype: torch.dtype = torch.float32,
               device: str = "cpu", seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, d, generator=gen) * 3).to(device, dtype)
    r = torch.randn(rows, d, generator=gen).to(device, dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(d, generator=gen)).to(device, dtype)
    h_ref, y_ref = add_rmsnorm_reference(x, r, w, 1e-5)
    h, y = add_rmsnorm_triton(x, r, w, 1e-5)
    atol, rtol = TOLERANCE[dtype]
    worst = 0.0
    for name, out, ref in (("residual", h, h_ref), ("normed", y, y_ref)):
        err = (out.float() - ref.float()).abs()
        worst = max(worst, err.max().item())
        if bool((err > atol + rtol * ref.float().abs()).any()):
            raise AssertionError(f"add_rmsnorm {name} rows={rows} D={d} {dtype}: max |diff| {err.max().item():.3g} "
                                 f"exceeds atol {atol} + rtol {rtol}")
    return worst


def check() -> None:
    device, dtypes = check_targets()
    for dtype in dtypes:
        for case in CHECK_CASES:
            print(f"add_rmsnorm {case} {dtype}: max |diff| {check_case(*case, dtype=dtype, device=device):.3g}")


def bench() -> None:
    """Phi-3 width 3072: fused kernel vs the eager add + norm, at decode and prefill row counts."""
    if not gpu_or_say_why("rmsnorm"):
        return
    d = 3072
    print(f"{'rows':>6} | {'eager ms':>9} {'kernel ms':>9}")
    for rows in (1, 16, 256, 4096):
        x = torch.randn(rows, d, device="cuda", dtype=torch.float16)
        r = torch.randn_like(x)
        w = torch.ones(d, device="cuda", dtype=torch.float16)
        eager = time_ms(lambda: add_rmsnorm_reference(x, r, w, 1e-5))
        kern = time_ms(lambda: add_rmsnorm_triton(x, r, w, 1e-5))
        print(f"{rows:>6} | {eager:>9.4f} {kern:>9.4f}")


if __name__ == "__main__":
    if gpu_or_say_why("rmsnorm"):
        check()
        bench()
