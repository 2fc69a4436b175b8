"""Weight-only INT4 matmul for decode: y (M, N) = x (M, K) @ dequant(W)^T with M small (<= 16).

The format (symmetric, round-to-nearest, one scale per group of G weights along K; G = 32/64/128/256):

    scale[n, g] = max |W[n, gG : (g+1)G]| / 7              scales (N, K_pad / G), stored in the weight dtype
    q[n, k]     = clamp(round(W[n, k] / scale[n, k // G]), -8, 7)      (in practice -7..7)
    packed[n, j] = (q[n, 2j] + 8) | (q[n, 2j + 1] + 8) << 4            packed (N, K_pad / 2) uint8

K is zero-padded to K_pad, a multiple of G, so any K quantizes; padded columns hold q = 0. Rounding
uses the stored (rounded) scale, so |W - dequant(W)| <= scale / 2 holds exactly (the RTN bound the
tests check). Decode is memory-bound: reading 4-bit weights instead of 16-bit ones is the whole win.

The kernel: one program per (BLOCK_N outputs, BLOCK_M rows, K split); each K tile lies inside one
group (BLOCK_K divides G), so a tile is two `tl.dot`s on the unpacked even/odd nibbles (exact small
integers in the activation dtype) and one multiply by the group's scale. When N alone gives too few
programs to fill the GPU, K is split and the fp32 partials summed (deterministic, no atomics).

    python -m blip3v.kernels.int4_matmul      # check + benchmark (needs a CUDA GPU)
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from blip3v.kernels._triton import HAS_TRITON, check_targets, gpu_or_say_why, num_sms, time_ms, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

GROUP_SIZES = (32, 64, 128, 256)  # what the kernel takes (tl.dot needs >= 16 per nibble half)
MAX_KERNEL_ROWS = 16  # above this (prefill) dequantize + cuBLAS wins; the kernel is for decode
# Kernel vs the reference (dequantize in fp32, fp32 matmul), |y - y_ref| <= atol + rtol * |y_ref|.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 2e-2)}


class Int4Weight(NamedTuple):
    packed: torch.Tensor  # (N, K_pad // 2) uint8, two weights per byte along K
    scales: torch.Tensor  # (N, K_pad // G)
    group_size: int
    in_features: int  # K before padding


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------

def quantize_int4(weight: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype | None = None) -> Int4Weight:
    """Round-to-nearest symmetric INT4 of a Linear weight (N, K)."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be even and >= 2, got {group_size}")
    n, k = weight.shape
    k_pad = -(-k // group_size) * group_size
    w = F.pad(weight.detach().float(), (0, k_pad - k))  # (N, K_pad)
    groups = w.view(n, k_pad // group_size, group_size)  # (N, K_pad/G, G)
    absmax = groups.abs().amax(dim=-1)  # (N, K_pad/G)
    scales = torch.where(absmax > 0, absmax / 7, torch.ones_like(absmax)).to(scale_dtype or weight.dtype)
    q = torch.round(groups / scales.float()[..., None]).clamp(-8, 7).to(torch.int16).view(n, k_pad) + 8
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)  # (N, K_pad/2)
    return Int4Weight(packed, scales, group_size, k)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K_pad / 2) uint8 -> (N, K_pad) int16 in [-8, 7], even k from the low nibble."""
    lo = (packed & 15).to(torch.int16) - 8
    hi = (packed >> 4).to(torch.int16) - 8
    return torch.stack([lo, hi], dim=-1).flatten(1)  # (N, K_pad/2, 2) -> (N, K_pad)


def dequantize_int4(w: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """-> (N, K) weight in `dtype`; the products q * scale are taken in fp32."""
    q = unpack_int4(w.packed).float()  # (N, K_pad)
    n, k_pad = q.shape
    deq = q.view(n, k_pad // w.group_size, w.group_size) * w.scales.float()[..., None]
    return deq.view(n, k_pad)[:, : w.in_features].to(dtype)


def int4_linear_reference(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x (..., K) -> (..., N): dequantize, then an fp32 matmul, cast back to x's dtype."""
    return F.linear(x.float(), dequantize_int4(w, torch.float32)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _int4_matmul_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr,
        M, N, K, K_TILES, TILES_PER_SPLIT,
        stride_xm, stride_wn, stride_sn, stride_ys, stride_ym,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rb = tl.arange(0, BLOCK_K // 2)  # byte index inside a K tile
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        t_lo = pid_k * TILES_PER_SPLIT
        t_hi = tl.minimum(t_lo + TILES_PER_SPLIT, K_TILES)
        for t in range(t_lo, t_hi):
            k0 = t * BLOCK_K
            packed = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 // 2 + rb)[None, :],
                             mask=n_ok[:, None], other=0)  # (BLOCK_N, BLOCK_K/2) uint8
            w_even = ((packed & 15).to(tl.int32) - 8).to(x_ptr.dtype.element_ty)  # exact small ints
            w_odd = ((packed >> 4).to(tl.int32) - 8).to(x_ptr.dtype.element_ty)
            ke = k0 + 2 * rb  # (BLOCK_K/2,) the even columns of this tile
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + ke[None, :],
                             mask=m_ok[:, None] & (ke < K)[None, :], other=0.0)  # (BLOCK_M, BLOCK_K/2)
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + (ke + 1)[None, :],
                            mask=m_ok[:, None] & (ke + 1 < K)[None, :], other=0.0)
            part = tl.dot(x_even, tl.trans(w_even), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
            part = tl.dot(x_odd, tl.trans(w_odd), acc=part, input_precision=PRECISION)
            scale = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
            acc += part * scale[None, :]  # the whole tile shares one group: scale once per tile
        tl.store(y_ptr + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int4_linear_triton(x: torch.Tensor, w: Int4Weight, *, block_n: int = 64,
                       split_k: int | None = None) -> torch.Tensor:
    """The kernel. x (..., K) fp32/fp16/bf16 on the weight's device -> (..., N) in x's dtype."""
    if w.group_size not in GROUP_SIZES:
        raise ValueError(f"the INT4 kernel takes group sizes {GROUP_SIZES}, got {w.group_size}")
    k, n = w.in_features, w.packed.shape[0]
    k_pad = w.packed.shape[1] * 2
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    m = x2.shape[0]
    block_m, block_k = 16, min(w.group_size, 128)
    k_tiles = k_pad // block_k
    grid_nm = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    if split_k is None:  # enough programs for two waves, but keep >= 4 tiles of K per split
        split_k = max(1, min(-(-2 * num_sms(x.device) // grid_nm), k_tiles // 4))
    tiles_per_split = triton.cdiv(k_tiles, max(1, min(split_k, k_tiles)))
    split_k = triton.cdiv(k_tiles, tiles_per_split)
    out_dtype = x.dtype if split_k == 1 else torch.float32
    y = torch.empty((split_k, m, n), device=x.device, dtype=out_dtype)  # (splits, M, N)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    _int4_matmul_kernel[grid](
        x2, w.packed, w.scales, y, m, n, k, k_tiles, tiles_per_split,
        x2.stride(0), w.packed.stride(0), w.scales.stride(0), y.stride(0), y.stride(1),
        GROUP=w.group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    y = y[0] if split_k == 1 else y.sum(dim=0).to(x.dtype)  # (M, N)
    return y.view(*lead, n)


def int4_linear(x: torch.Tensor, w: Int4Weight, backend: str = "auto") -> torch.Tensor:
    """Dispatcher: the kernel for decode-sized inputs (<= 16 rows) on CUDA with Triton, else the
    reference (prefill: dequantize + one dense matmul is faster than re-unpacking per row tile)."""
    if use_triton(backend, x, w.packed):
        rows = x.numel() // max(1, x.shape[-1])
        if backend == "triton" or rows <= MAX_KERNEL_ROWS:
            return int4_linear_triton(x, w)
        return F.linear(x, dequantize_int4(w, x.dtype))  # prefill on the GPU: one cuBLAS matmul
    return int4_linear_reference(x, w)


# ---------------------------------------------------------------------------------------------
# Check and benchmark
# ---------------------------------------------------------------------------------------------

# (M, K, N, G, split_k): ragged M/N, K not a multiple of G or of two, forced K splits.
CHECK_CASES = [
    (1, 64, 48, 32, 1), (3, 200, 70, 64, None), (16, 128, 33, 128, 1), (5, 96, 40, 32, 3),
    (2, 257, 17, 32, 2), (1, 512, 80, 256, None),
]


def check_case(m: int, k: int, n: int, group: int, split_k: int | None = None,
               dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> float:
    """Kernel vs reference on one shape; raises AssertionError with the max difference."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.05
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = quantize_int4(weight.to(device, dtype), group)
    ref = int4_linear_reference(x, w).float()
    out = int4_linear_triton(x, w, split_k=split_k).float()
    atol, rtol = TOLERANCE[dtype]
    err = (out - ref).abs()
    bad = err > atol + rtol * ref.abs()
    if bool(bad.any()):
        raise AssertionError(f"int4 matmul M={m} K={k} N={n} G={group} {dtype}: max |diff| {err.max().item():.3g} "
                             f"exceeds atol {atol} + rtol {rtol}")
    return err.max().item()


def check() -> None:
    device, dtypes = check_targets()
    for dtype in dtypes:
        for case in CHECK_CASES:
            print(f"int4_matmul {case} {dtype}: max |diff| {check_case(*case, dtype=dtype, device=device):.3g}")


def bench() -> None:
    """Phi-3-mini decode shapes: INT4 kernel vs the dense fp16 matmul it replaces."""
    if not gpu_or_say_why("int4_matmul"):
        return
    print(f"{'M':>3} {'K':>5} {'N':>6} {'G':>4} | {'fp16 dense ms':>13} {'int4 kernel ms':>14} "
          f"{'int4 GB/s':>9} {'dequant+mm ms':>13}")
    for m in (1, 4, 16):
        for k, n in ((3072, 9216), (3072, 3072), (3072, 16384), (8192, 3072)):
            g = 128
            weight = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            w = quantize_int4(weight, g)
            dense = time_ms(lambda: F.linear(x, weight))
            kern = time_ms(lambda: int4_linear_triton(x, w))
            ref = time_ms(lambda: int4_linear_reference(x, w))
            gbs = (w.packed.numel() + w.scales.numel() * 2) / kern / 1e6
            print(f"{m:>3} {k:>5} {n:>6} {g:>4} | {dense:>13.4f} {kern:>14.4f} {gbs:>9.0f} {ref:>13.4f}")


if __name__ == "__main__":
    if gpu_or_say_why("int4_matmul"):
        check()
        bench()
