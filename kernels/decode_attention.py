"""Decode attention: one query token per sequence over a static KV cache, flash-decoding style.

    q (B, H_q, dh), k_cache / v_cache (B, H_kv, S_max, dh), lengths (B,) -> out (B, H_q, dh)

Row b attends to cache slots [start_b, lengths[b]) with start_b = max(0, lengths[b] - window) when
a sliding window is given (Phi-3's `kv > q - window`, in position space), else 0. H_q is a multiple
of H_kv (GQA); query head h reads KV head h // (H_q / H_kv), as transformers' `repeat_kv`.

Two kernels:
1. split: program (b, kv head, split) takes the split's slice of the row's filled keys, the whole
   query group at once (one K/V read serves every query head of the group), and keeps an online
   softmax: running max m, sum l, unnormalised output acc, in log2 units (exp2).
2. reduce: program (b, q head) rescales the splits' partials to the global max and divides.
The split size is computed on the GPU from each row's own length, so a short row does not pay for
S_max and the launch (grid, arguments) never changes between decode steps: CUDA-graph safe.

    python -m blip3v.kernels.decode_attention     # check + benchmark (needs a CUDA GPU)
"""

import torch
import torch.nn.functional as F

from blip3v.kernels._triton import HAS_TRITON, check_targets, gpu_or_say_why, next_pow2, num_sms, time_ms, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

# Kernel vs reference (fp32 softmax over the masked row), |out - ref| <= atol + rtol * |ref|.
TOLERANCE = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.5e-2, 2e-2)}
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------

def key_mask(lengths: torch.Tensor, s_max: int, window: int | None = None) -> torch.Tensor:
    """(B,) filled lengths -> (B, S_max) bool: the cache slots each row's new token attends to."""
    idx = torch.arange(s_max, device=lengths.device)[None, :]  # (1, S_max)
    valid = idx < lengths[:, None]
    if window is not None:
        valid &= idx >= lengths[:, None] - window
    return valid


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               lengths: torch.Tensor, *, scale: float | None = None,
                               window: int | None = None) -> torch.Tensor:
    """fp32 softmax over the filled slots; a row with no keys gives zeros."""
    b, h_q, d = q.shape
    h_kv, s_max = k_cache.shape[1], k_cache.shape[2]
    group = h_q // h_kv
    scale = d ** -0.5 if scale is None else scale
    qf = q.float().view(b, h_kv, group, d)  # (B, H_kv, G, dh)
    scores = torch.einsum("bhgd,bhsd->bhgs", qf, k_cache.float()) * scale  # (B, H_kv, G, S_max)
    valid = key_mask(lengths, s_max, window)[:, None, None, :]  # (B, 1, 1, S_max)
    scores = scores.masked_fill(~valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty row: all -inf -> NaN -> 0
    out = torch.einsum("bhgs,bhsd->bhgd", probs, v_cache.float())  # (B, H_kv, G, dh)
    return out.reshape(b, h_q, d).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, len_ptr, m_ptr, l_ptr, o_ptr,
        H_KV, GROUP, D, NUM_SPLITS, WINDOW, qk_scale,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        HAS_WINDOW: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // H_KV
        hk = pid % H_KV
        rg = tl.arange(0, BLOCK_G)
        rs = tl.arange(0, BLOCK_S)
        rd = tl.arange(0, BLOCK_D)
        g_ok = rg < GROUP
        d_ok = rd < D
        hq = hk * GROUP + rg  # (BLOCK_G,) the query heads served by this KV head
        q = tl.load(q_ptr + b * stride_qb + hq[:, None] * stride_qh + rd[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)

        length = tl.load(len_ptr + b)
        start = 0
        if HAS_WINDOW:
            start = tl.maximum(length - WINDOW, 0)
        span = length - start
        chunk = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_S) * BLOCK_S  # this row's keys per split
        lo = start + split * chunk
        hi = tl.minimum(lo + chunk, length)

        m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        k_base = k_ptr + b * stride_kb + hk * stride_kh
        v_base = v_ptr + b * stride_vb + hk * stride_vh
        for s0 in range(lo, hi, BLOCK_S):  # every tile holds >= 1 valid key, so m_i turns finite
            offs = s0 + rs
            s_ok = offs < hi
            kv_mask = s_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs[:, None] * stride_ks + rd[None, :], mask=kv_mask, other=0.0)  # (BLOCK_S, BLOCK_D)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_G, BLOCK_S), log2 units
            scores = tl.where(s_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs[:, None] * stride_vs + rd[None, :], mask=kv_mask, other=0.0)  # (BLOCK_S, BLOCK_D)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        row = (b * H_KV * GROUP + hq) * NUM_SPLITS + split  # (BLOCK_G,) index into (B*H_q, splits)
        tl.store(m_ptr + row, m_i, mask=g_ok)
        tl.store(l_ptr + row, l_i, mask=g_ok)
        tl.store(o_ptr + row[:, None] * D + rd[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _reduce_kernel(m_ptr, l_ptr, o_ptr, out_ptr, D, NUM_SPLITS, stride_ob, stride_oh, H_Q,
                       BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)  # b * H_q + h
        rsp = tl.arange(0, BLOCK_SPLITS)
        rd = tl.arange(0, BLOCK_D)
        sp_ok = rsp < NUM_SPLITS
        d_ok = rd < D
        m = tl.load(m_ptr + pid * NUM_SPLITS + rsp, mask=sp_ok, other=float("-inf"))
        lsum = tl.load(l_ptr + pid * NUM_SPLITS + rsp, mask=sp_ok, other=0.0)
        m_max = tl.max(m, axis=0)
        m_max = tl.where(m_max > float("-inf"), m_max, 0.0)  # an empty row: keep exp2 away from -inf - -inf
        w = tl.exp2(m - m_max)  # (BLOCK_SPLITS,) empty splits (m = -inf) weigh 0
        total = tl.sum(lsum * w, axis=0)
        o = tl.load(o_ptr + (pid * NUM_SPLITS + rsp)[:, None] * D + rd[None, :],
                    mask=sp_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_SPLITS, BLOCK_D)
        out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        b = pid // H_Q
        h = pid % H_Q
        tl.store(out_ptr + b * stride_ob + h * stride_oh + rd, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def default_splits(batch: int, h_kv: int, s_max: int, block_s: int, device: torch.device) -> int:
    """Enough (batch, KV head, split) programs for two waves, no more splits than S_max has tiles."""
    return max(1, min(-(-2 * num_sms(device) // (batch * h_kv)), -(-s_max // block_s), 64))


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            lengths: torch.Tensor, *, scale: float | None = None, window: int | None = None,
                            num_splits: int | None = None, block_s: int = 64) -> torch.Tensor:
    """The kernels. The caches' last dim must be contiguous; q may be a strided view."""
    b, h_q, d = q.shape
    h_kv, s_max = k_cache.shape[1], k_cache.shape[2]
    if h_q % h_kv:
        raise ValueError(f"query heads {h_q} are not a multiple of KV heads {h_kv}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches need a contiguous last (head) dim")
    group = h_q // h_kv
    scale = d ** -0.5 if scale is None else scale
    splits = num_splits or default_splits(b, h_kv, s_max, block_s, q.device)
    lengths = lengths.to(device=q.device, dtype=torch.int32)
    m = torch.empty((b * h_q, splits), device=q.device, dtype=torch.float32)  # (B*H_q, splits)
    lsum = torch.empty_like(m)
    o = torch.empty((b * h_q, splits, d), device=q.device, dtype=torch.float32)  # (B*H_q, splits, dh)
    block_d = max(16, next_pow2(d))
    _split_kernel[(b * h_kv, splits)](
        q, k_cache, v_cache, lengths, m, lsum, o,
        h_kv, group, d, splits, window or 0, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HAS_WINDOW=window is not None, BLOCK_G=max(16, next_pow2(group)), BLOCK_S=block_s, BLOCK_D=block_d,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    out = torch.empty((b, h_q, d), device=q.device, dtype=q.dtype)
    _reduce_kernel[(b * h_q,)](m, lsum, o, out, d, splits, out.stride(0), out.stride(1), h_q,
                               BLOCK_SPLITS=next_pow2(splits), BLOCK_D=block_d)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, *,
                     scale: float | None = None, window: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Dispatcher: the kernels on CUDA with Triton, else the reference."""
    if use_triton(backend, q, k_cache, v_cache):
        return decode_attention_triton(q, k_cache, v_cache, lengths, scale=scale, window=window)
    return decode_attention_reference(q, k_cache, v_cache, lengths, scale=scale, window=window)


# ---------------------------------------------------------------------------------------------
# Check and benchmark
# ---------------------------------------------------------------------------------------------

# (B, H_q, H_kv, S_max, dh, lengths, window, num_splits): ragged lengths, lengths not multiples
# of the 64-key tile, a full row, a one-key row, an empty row, GQA, dh not a power of two.
CHECK_CASES = [
    (1, 4, 4, 50, 32, (37,), None, None),
    (3, 4, 2, 130, 24, (1, 64, 130), None, 3),
    (2, 8, 1, 200, 40, (199, 65), None, 4),
    (2, 6, 3, 100, 16, (100, 7), 33, 2),
    (3, 2, 2, 70, 96, (0, 70, 5), None, None),
]


def check_case(b: int, h_q: int, h_kv: int, s_max: int, d: int, lengths: tuple[int, ...], window: int | None,
               num_splits: int | None, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> float:
    """Kernel vs reference on one case; raises AssertionError with the max difference."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h_q, d, generator=gen).to(device, dtype)
    k = torch.randn(b, h_kv, s_max, d, generator=gen).to(device, dtype)
    v = torch.randn(b, h_kv, s_max, d, generator=gen).to(device, dtype)
    lens = torch.tensor(lengths, device=device)
    ref = decode_attention_reference(q, k, v, lens, window=window).float()
    out = decode_attention_triton(q, k, v, lens, window=window, num_splits=num_splits).float()
    atol, rtol = TOLERANCE[dtype]
    err = (out - ref).abs()
    if bool((err > atol + rtol * ref.abs()).any()):
        raise AssertionError(f"decode attention B={b} H={h_q}/{h_kv} S={s_max} dh={d} lengths={lengths} "
                             f"window={window} {dtype}: max |diff| {err.max().item():.3g} "
                             f"exceeds atol {atol} + rtol {rtol}")
    return err.max().item()


def check() -> None:
    device, dtypes = check_targets()
    for dtype in dtypes:
        for case in CHECK_CASES:
            print(f"decode_attention {case} {dtype}: max |diff| {check_case(*case, dtype=dtype, device=device):.3g}")


def bench() -> None:
    """Phi-3-mini (32 heads x 96, S_max 4096) decode step: kernels vs SDPA over the masked cache."""
    if not gpu_or_say_why("decode_attention"):
        return
    h, d, s_max = 32, 96, 4096
    print(f"{'B':>3} {'filled':>8} | {'sdpa+mask ms':>12} {'kernel ms':>9} {'reference ms':>12}")
    for b in (1, 4, 16):
        for filled in (256, 1024, 4096):
            q = torch.randn(b, h, d, device="cuda", dtype=torch.float16)
            k = torch.randn(b, h, s_max, d, device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            lens = torch.full((b,), filled, device="cuda")
            mask = key_mask(lens, s_max)[:, None, None, :]  # (B, 1, 1, S_max)
            sdpa = time_ms(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask))
            kern = time_ms(lambda: decode_attention_triton(q, k, v, lens))
            ref = time_ms(lambda: decode_attention_reference(q, k, v, lens))
            print(f"{b:>3} {filled:>8} | {sdpa:>12.4f} {kern:>9.4f} {ref:>12.4f}")
    print(f"(fp16 K+V read per key and head: {2 * d * 2} bytes; the kernel reads only the filled slots)")


if __name__ == "__main__":
    if gpu_or_say_why("decode_attention"):
        check()
        bench()
