"""Smoke test of benchmarks/bench_decode.py on a tiny Phi-3: the JSON it prints has every system,
every figure positive and finite, and every system's first greedy id agrees with transformers'
(the benchmark times the same model in each, not a mis-built one). onnxruntime-genai's row is
expected only where that package is installed. Plus the RESULTS.md section writer.

    python -m pytest tests/test_bench_decode.py -q
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_decode.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _have_genai() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def test_tiny_run_prints_complete_json():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--layers", "1", "--prompt-tokens", "8",
         "--new-tokens", "4", "--repeats", "1", "--json"],
        capture_output=True, text=True, check=False, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert {"systems", "ratios", "device", "versions", "config", "export_check"} <= set(result)

    names = [(s["name"], s["variant"]) for s in result["systems"]]
    expected = {"transformers", "blip3v"} | ({"onnxruntime-genai"} if _have_genai() else set())
    assert {n for n, _ in names} == expected
    assert sum(n == "blip3v" for n, _ in names) == 2  # gqa and standard
    for s in result["systems"]:
        assert s["precision"] == "fp32"
        for key in ("ttft_ms", "ttft_ms_min", "ttft_ms_max", "decode_ms_per_token", "decode_ms_per_token_min",
                    "decode_ms_per_token_max"):
            assert math.isfinite(s[key]) and s[key] > 0, (s["name"], key, s[key])
        assert s["ttft_ms_min"] <= s["ttft_ms"] <= s["ttft_ms_max"]
        assert s["greedy_prefix_agreeing_with_transformers"] >= 1, s

    assert len(result["ratios"]) == 2
    for entry in result["ratios"]:
        assert set(entry["vs"]) == expected - {"blip3v"}
        for figures in entry["vs"].values():
            assert all(math.isfinite(x) and x > 0 for x in figures.values())
        assert set(entry["target_met"]) == {"ttft", "decode"}
    assert all(0 <= d < 1e-4 for d in result["export_check"].values())
    assert result["device"]["threads"] >= 1 and result["device"]["cpu"]
    assert result["versions"]["onnxruntime"] != "not installed"


def test_write_section_replaces_only_its_own_section(tmp_path):
    bench = _bench_module()
    path = tmp_path / "RESULTS.md"
    bench.write_section(path, f"{bench.SECTION}\n\nfirst\n")
    path.write_text(path.read_text() + "\n## Other benchmark\n\nkept\n")
    bench.write_section(path, f"{bench.SECTION}\n\nsecond\n")
    text = path.read_text()
    assert text.count(bench.SECTION) == 1
    assert "second" in text and "first" not in text
    assert text.index(bench.SECTION) < text.index("## Other benchmark") and text.endswith("kept\n")
