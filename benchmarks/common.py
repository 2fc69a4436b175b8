"""What every benchmark records and how it reports: versions, the machine, spreads, peak memory,
and the RESULTS.md section writer. Shared by `bench_decode` and `bench_budget`."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Log = Callable[[str], None]


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def versions(packages: tuple[str, ...] = ("blip3v", "torch", "transformers", "onnx", "onnxscript", "onnxruntime",
                                           "onnxruntime-gpu", "onnxruntime-genai", "numpy")) -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def cpu_name() -> str:
    name = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), name)
    except OSError:
        pass
    return name


def device(threads: int, cuda: bool = False) -> dict[str, Any]:
    """The machine as every result records it; the GPU's name and memory when `cuda`."""
    out: dict[str, Any] = {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "threads": threads,
                           "system": platform.platform(), "load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    if cuda:
        import torch

        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda)
    return out


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every `interval` s by a
    thread (Linux /proc; elsewhere the process-lifetime peak from getrusage, marked as such)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self.lifetime = not os.path.exists("/proc/self/statm")
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        if not self.lifetime:
            self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.lifetime:
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def release_memory() -> None:
    """Collects garbage and hands glibc's freed heap back to the OS (malloc_trim): after a large
    model is dropped, its pages would otherwise stay resident under the next step's peak."""
    import ctypes
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def peak_memory(children: bool = False) -> dict[str, float]:
    """Measured peak resident memory (GiB) of this process and, with `children`, of its largest
    finished subprocess (a model builder), from getrusage's ru_maxrss: what `/usr/bin/time -v`
    reports as "Maximum resident set size", over the process's life so far. (Children are left out
    unless asked for: a forked helper such as `lscpu` is charged the parent's pages at the fork.)"""
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30, 2)}
    if children:
        out["peak_rss_children_gib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale / 2**30, 2)
    return out


def over_memory(expected_gib: float) -> str | None:
    """A warning line when the expected peak exceeds this machine's physical memory, else None."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):  # no sysconf names here: nothing to compare against
        return None
    if expected_gib <= total:
        return None
    return f"warning: the expected peak ({expected_gib:.1f} GiB) exceeds this machine's memory ({total:.1f} GiB)"


def memory_lines(memory: dict[str, Any]) -> list[str]:
    """The expected (stated up front) and the measured peak, for the text and Markdown reports."""
    expected = memory.get("expected_gib", {})
    line = f"peak memory: {memory['peak_rss_gib']:.2f} GiB measured (max RSS of this process"
    if memory.get("peak_rss_children_gib"):
        line += f"; its largest subprocess {memory['peak_rss_children_gib']:.2f} GiB"
    line += ")"
    if expected:
        line += f", {expected['peak']:.2f} GiB expected"
    return [line]


def write_section(path: Path, section: str, text: str) -> None:
    """Replaces the `section` heading's part of a Markdown file (or appends it), leaving the rest alone."""
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    start = old.find(section)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(section))  # the next section, kept as it is
        rest = "\n" + old[end + 1:] if end >= 0 else ""
        new = old[:start] + text + rest
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def cuda_times_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """`fn`'s GPU time per call, ms, timed with CUDA events, over `repeats` calls after `warmup`
    untimed ones (cuBLAS / cuDNN handle and algorithm choice)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def gpu_ceilings(copy_mib: int = 2048, matmul_n: int = 8192, repeats: int = 10) -> dict[str, float]:
    """The two ceilings of the CUDA GPU as measured here, for the floors beside a benchmark's times:
    a device-to-device copy (GB/s counting bytes read plus written) and a square float16 matmul
    (TFLOP/s), each the median of `repeats` runs on random data, timed with CUDA events."""
    import torch

    def median_ms(fn: Callable[[], object]) -> float:
        return statistics.median(cuda_times_ms(fn, repeats))

    src = torch.randn(copy_mib * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    a = torch.randn(matmul_n, matmul_n, device="cuda", dtype=torch.float16)
    b = torch.randn(matmul_n, matmul_n, device="cuda", dtype=torch.float16)
    mm_ms = median_ms(lambda: a @ b)
    return {"copy_gb_per_s": 2 * copy_mib * 2**20 / copy_ms / 1e6,
            "matmul_fp16_tflop_per_s": 2 * matmul_n**3 / mm_ms / 1e9}
