"""What the kernel files share: whether Triton is importable, the kernel-or-reference choice, and
the GPU timing helper for their `bench()`.

Every kernel file defines its `@triton.jit` functions inside `if HAS_TRITON:` so the package
imports (and its PyTorch references run) where Triton is absent. `TRITON_INTERPRET=1` must be set
before a kernel file is imported for its kernels to run on CPU tensors (Triton reads it when the
`@triton.jit` decorator runs), and before Triton itself is first imported (transformers imports
it): `interpreter_ready()` says whether both held. tests/test_kernels.py sets it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels extra is not installed: references only
    triton = None
    tl = None

HAS_TRITON = triton is not None
BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_ready(*modules) -> bool:
    """True when kernels can run on CPU tensors in this process: TRITON_INTERPRET=1 was set before
    Triton itself was first imported (its own `@jit` helpers such as `tl.sum`, `tl.max`, `tl.cdiv`
    are decorated then) and before each of `modules` (kernel files) was imported."""
    if not HAS_TRITON or not interpreting():
        return False
    from triton.runtime.interpreter import InterpretedFunction

    kernels = [tl.sum, tl.cdiv] + [v for m in modules for k, v in vars(m).items()
                                   if k.startswith("_") and k.endswith("_kernel")]
    return all(isinstance(k, InterpretedFunction) for k in kernels)


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """`auto` picks the kernel when Triton imports and every tensor is on CUDA; `triton` forces it
    (CPU tensors then need the interpreter); `torch` forces the PyTorch reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package (pip install 'blip3v[kernels]')")
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def check_targets() -> tuple[str, tuple[torch.dtype, ...]]:
    """Where each kernel's `check()` runs: every dtype on CUDA, fp32 under the CPU interpreter
    (it has no bfloat16: triton-lang/triton#11584)."""
    if torch.cuda.is_available():
        return "cuda", (torch.float32, torch.float16, torch.bfloat16)
    if not interpreting():
        raise RuntimeError("no GPU: set TRITON_INTERPRET=1 before importing this module to check on CPU")
    return "cpu", (torch.float32,)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_SM_COUNT: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill (looked up once per GPU); a fixed guess off-GPU."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def gpu_or_say_why(name: str) -> bool:
    """For `python -m blip3v.kernels.<name>`: the benchmark needs a CUDA GPU and Triton."""
    if not torch.cuda.is_available():
        print(f"{name}: no CUDA GPU here, nothing to benchmark. "
              f"Correctness on CPU: TRITON_INTERPRET=1 python -c 'import blip3v.kernels.{name} as k; k.check()'")
        return False
    if not HAS_TRITON:
        print(f"{name}: triton is not installed (pip install 'blip3v[kernels]')")
        return False
    return True


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds per call on the GPU (Triton's do_bench: warm-up, L2 flush, repeats)."""
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
