"""Tests for blip3v.runtime.hugepages: what a CPU session allocates goes onto huge pages, weights intact.

The kernel decides: where it refuses MADV_COLLAPSE (not Linux, a kernel before 6.1, THP `never`),
the tests that need it skip and say so; the refusal itself must still leave everything working.

    python -m pytest tests/test_hugepages.py -q
"""

from __future__ import annotations

import mmap
import re
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from blip3v.runtime import hugepages

CHUNK = hugepages.huge_page_size()


def anon_huge_kib() -> int:
    with open("/proc/self/smaps") as f:
        return sum(int(x) for x in re.findall(r"AnonHugePages:\s+(\d+)", f.read()))


def private_anonymous(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


@pytest.fixture(scope="module")
def collapsing() -> None:
    """Skip unless this kernel collapses a filled private anonymous mapping on request."""
    if not sys.platform.startswith("linux"):
        pytest.skip("huge pages are Linux-only here")
    with hugepages.huge_pages(on=True) as backed:
        probe = private_anonymous(4 * CHUNK)
        probe.write(b"\1" * len(probe))
    probe.close()
    if backed.bytes == 0:
        pytest.skip(f"this kernel refuses MADV_COLLAPSE ({backed.refused} bytes refused)")


def matmul_model(path, k: int, n: int, seed: int = 0) -> np.ndarray:
    weight = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return weight


def test_session_weights_go_onto_huge_pages_and_still_compute(collapsing, tmp_path):
    """A 32 MiB weight: the session created as the runtime creates its CPU sessions has it on huge
    pages (counted both by the report and by the kernel's AnonHugePages), and its output is the
    numpy product."""
    from blip3v.runtime.ort_backend import create_session, session_options

    weight = matmul_model(tmp_path / "mm.onnx", 2048, 4096)
    x = np.random.default_rng(1).standard_normal((1, 2048)).astype(np.float32)
    before = anon_huge_kib()
    backed = hugepages.Backed()
    session = create_session(tmp_path / "mm.onnx", session_options(["CPUExecutionProvider"], 1),
                             ["CPUExecutionProvider"], backed=backed)
    assert backed.bytes >= 16 << 20, backed
    assert anon_huge_kib() - before >= 16 << 10
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight, rtol=1e-4, atol=1e-3)


def test_only_filled_memory_is_collapsed(collapsing):
    """Untouched memory (a thread stack, an arena's tail) is left alone, so nothing is added: of a
    9-chunk mapping with its first 4 chunks' worth written, only whole filled chunks are collapsed
    (3 or 4 of them, by where the mapping starts), and the contents stay."""
    import ctypes

    region = private_anonymous(9 * CHUNK)
    region[:4 * CHUNK] = b"\1" * (4 * CHUNK)
    start = ctypes.addressof(ctypes.c_char.from_buffer(region))
    backed = hugepages.collapse({(start, start + len(region))})
    assert backed.bytes in (3 * CHUNK, 4 * CHUNK), backed
    assert region[0] == 1 and region[4 * CHUNK - 1] == 1 and region[4 * CHUNK] == 0
    region.close()


def test_switched_off(monkeypatch):
    monkeypatch.setenv(hugepages.ENV, "0")
    with hugepages.huge_pages() as backed:
        region = private_anonymous(4 * CHUNK)
        region.write(b"\1" * len(region))
    assert backed.bytes == backed.refused == 0
    region.close()


def test_only_newly_mapped_ranges_are_candidates():
    """Memory mapped before the session (another model in the same process) is never collapsed:
    a grown mapping contributes its new part, a new one merged with an old neighbour its own part."""
    before = {(10, 20), (30, 40)}
    after = {(10, 25), (5, 20), (30, 40), (50, 60), (28, 45)}
    assert hugepages.new_spans(before, after) == [(5, 10), (20, 25), (28, 30), (40, 45), (50, 60)]
    assert hugepages.new_spans(before, before) == []

