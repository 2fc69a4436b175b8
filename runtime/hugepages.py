"""Transparent huge pages for the weights a CPU session holds (Linux; a no-op elsewhere).

A CPU decode step streams every weight once: a 4-layer Phi-3-width INT4 decoder is ~350 MB a token,
about 85,000 pages of 4 KiB, far beyond what the TLB covers, so the step also walks page tables
throughout. 2 MiB pages cut that 512-fold. ONNX Runtime allocates the weights it prepacks with plain
malloc, and on kernels whose THP mode is `madvise` (the default on many distributions, and on the dev
box) those stay on 4 KiB pages. (A llama.cpp pull request, ggml-org/llama.cpp#22022, proposes the
same hint, MADV_HUGEPAGE, for its weight mapping.)

    with huge_pages() as backed:
        session = ort.InferenceSession(...)
    backed.bytes  # how much of what the session allocated now sits on huge pages

Around the session's creation this notes the process's anonymous mappings; afterwards it asks the
kernel (madvise MADV_COLLAPSE, Linux 6.1+) to back every 2 MiB-aligned chunk of the address ranges
mapped meanwhile (new mappings, the new part of grown ones such as the heap), if every page of the
chunk is resident. What the process had mapped before (another model in the same process) is left
alone. Only resident chunks: thread stacks and an arena's untouched tail are left as they are, so
this adds no memory; it does add load time (0.7-0.8 s for a session holding 560 MiB on the dev
box). It is advice: on another OS, an older kernel, THP `never`, or any refusal, nothing changes
and nothing fails. Set BLIP3V_HUGE_PAGES=0 to turn it off.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

MADV_COLLAPSE = 25  # <linux/mman.h>, Linux 6.1
ENV = "BLIP3V_HUGE_PAGES"


@dataclass
class Backed:
    bytes: int = 0  # collapsed onto huge pages
    refused: int = 0  # asked for, refused by the kernel


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get(ENV, "1") not in ("0", "off", "false", "no")


def huge_page_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


def anonymous_mappings() -> set[tuple[int, int]]:
    """(start, end) of this process's private anonymous read-write mappings, the brk heap included:
    glibc serves allocations under its mmap threshold (which rises to 32 MiB once a large block is
    freed, as after ONNX Runtime reads a model) from the heap, so most prepacked weights land there."""
    spans = set()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            anonymous = len(fields) == 5 or (len(fields) == 6 and fields[5] == "[heap]")
            if anonymous and fields[1].startswith("rw") and fields[1].endswith("p"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.add((start, end))
    return spans


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


def resident_chunks(libc, start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """The chunk-aligned runs inside [start, end) whose every page is resident, merged."""
    lo, hi = -(-start // chunk) * chunk, end // chunk * chunk
    if hi - lo < chunk:
        return []
    page = os.sysconf("SC_PAGE_SIZE")
    vec = (ctypes.c_ubyte * ((hi - lo) // page))()
    if libc.mincore(lo, hi - lo, vec) != 0:
        return []
    resident, per = bytes(vec), chunk // page  # bit 0 of each byte: that page is resident
    runs: list[tuple[int, int]] = []
    for i in range((hi - lo) // chunk):
        if all(b & 1 for b in resident[i * per:(i + 1) * per]):
            a = lo + i * chunk
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], a + chunk)
            else:
                runs.append((a, a + chunk))
    return runs


def collapse(spans: Iterable[tuple[int, int]]) -> Backed:
    """Ask for huge pages under the fully resident chunks of `spans`."""
    backed = Backed()
    libc, chunk = _libc(), huge_page_size()
    for start, end in sorted(spans):
        for a, b in resident_chunks(libc, start, end, chunk):
            if libc.madvise(a, b - a, MADV_COLLAPSE) == 0:
                backed.bytes += b - a
            else:
                backed.refused += b - a
    return backed


def new_spans(before: set[tuple[int, int]], after: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """The address ranges inside `after` that no range of `before` covered (a grown mapping gives
    its new part only; a new mapping merged with an old neighbour, its own part)."""
    old = sorted(before)
    out = []
    for start, end in sorted(after):
        cursor = start
        for a, b in old:
            if b <= cursor or a >= end:
                continue
            if a > cursor:
                out.append((cursor, a))
            cursor = max(cursor, b)
        if cursor < end:
            out.append((cursor, end))
    return out


@contextmanager
def huge_pages(on: bool | None = None) -> Iterator[Backed]:
    """Collapse onto huge pages what the `with` body mapped and filled (see the module doc).

    Only address ranges mapped during the body: memory the process had before (another model's
    weights, say, in the same process) is left as it is, even where the body's allocations reused
    free space inside it."""
    backed = Backed()
    if not (enabled() if on is None else on and sys.platform.startswith("linux")):
        yield backed
        return
    try:
        before = anonymous_mappings()
    except OSError:
        yield backed
        return
    yield backed
    try:
        result = collapse(new_spans(before, anonymous_mappings()))
    except (OSError, AttributeError):  # no /proc, or a libc without madvise/mincore
        return
    backed.bytes, backed.refused = result.bytes, result.refused
