"""`blip3v bench budget` and `blip3v bench decode` run end to end in subprocesses on the small
models: the JSON has the documented structure, every figure is positive and finite, the budgets
carry the token counts they claim, and bad input is one line with exit code 2."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from conftest import assert_one_line_error, run_cli


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_budget_json(result: dict, budgets: list[str], stages: set[str]) -> None:
    assert [r["budget"] for r in result["budgets"]] == budgets
    for row in result["budgets"]:
        assert {"budget", "tokens", "ttft_ms", "decode_ms_per_token", "stages_ms", "stages_share", "e2e_ms",
                "peak_rss_mib"} <= set(row)
        assert all(_positive(row[k]) for k in ("tokens", "ttft_ms", "decode_ms_per_token", "e2e_ms", "peak_rss_mib"))
        assert set(row["stages_ms"]) <= stages and {"video", "prefill", "decode"} <= set(row["stages_ms"])
        assert all(_positive(v) for v in row["stages_ms"].values()), row["stages_ms"]
        assert row["ttft_ms"] == row["stages_ms"]["prefill"]
        assert row["e2e_ms"] == pytest.approx(sum(row["stages_ms"].values()), rel=0.25)  # medians of sums
        assert sum(row["stages_share"].values()) == pytest.approx(1.0, rel=0.25)
    for key in ("device", "versions", "config"):
        assert result[key]
    assert result["device"]["cpu"] and result["versions"]["torch"] != "not installed"
    assert {"backend", "precision", "model", "device"} <= set(result["config"])


def test_bench_budget_torch_every_budget(tmp_path):
    plot = tmp_path / "budget.png"
    proc = run_cli("bench", "budget", "--repeats", "1", "--warmup", "1", "--new-tokens", "3", "--threads", "1",
                   "--plot", str(plot), "--json", "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    budgets = ["16", "32", "64", "128", "none", "raw"]
    _check_budget_json(result, budgets, {"video", "vision_tower", "resampler", "temporal_encoder", "projection",
                                         "prefill", "decode"})
    by = {r["budget"]: r for r in result["budgets"]}
    # the demo model: 8 frames x 16 latents (none), 8 x 64 SigLIP patches (raw)
    assert [by[b]["tokens"] for b in budgets] == [16, 32, 64, 128, 128, 512]
    assert "resampler" not in by["raw"]["stages_ms"] and "temporal_encoder" not in by["raw"]["stages_ms"]
    assert set(result["ttft_vs_raw"]) == set(budgets) - {"raw"}
    assert result["shared_stages"] == ["video", "vision_tower", "resampler"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_budget_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    proc = run_cli("bench", "budget", "--backend", "onnxruntime", "--budgets", "32,raw", "--repeats", "2",
                   "--warmup", "0", "--new-tokens", "3", "--threads", "1", "--json", "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    _check_budget_json(result, ["32", "raw"], {"video", "visual", "prefill", "decode"})
    assert "visual" in result["budgets"][0]["stages_ms"] and result["notes"]


@pytest.mark.parametrize("args, fragment", [
    (("--budgets", "16,7"), "7"),
    (("--video", "no-such.mp4"), "not found"),
    (("--model", "no-such-dir"), "no-such-dir"),
    (("--plot", "x.jpg"), "PNG"),
])
def test_bench_budget_bad_input(args, fragment):
    assert_one_line_error(run_cli("bench", "budget", "--quiet", *args), fragment)


def test_bench_decode_json_and_ratios():
    proc = run_cli("bench", "decode", "--size", "tiny", "--layers", "1", "--prompt-tokens", "8", "--new-tokens", "4",
                   "--repeats", "1", "--precision", "fp32", "--threads", "1", "--json", "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    names = {(s["name"], s["variant"]) for s in result["systems"]}
    peers = {"transformers"} | ({"onnxruntime-genai"} if importlib.util.find_spec("onnxruntime_genai") else set())
    assert {n for n, _ in names} == {"blip3v"} | peers
    assert sum(n == "blip3v" for n, _ in names) == 3  # ORT gqa, ORT standard, torch static KV
    for s in result["systems"]:
        assert {"name", "precision", "ttft_ms", "decode_ms_per_token"} <= set(s)
        assert _positive(s["ttft_ms"]) and _positive(s["decode_ms_per_token"])
        assert s["greedy_prefix_agreeing_with_transformers"] >= 1, s
    for entry in result["ratios"]:
        assert set(entry["vs"]) == peers
        assert all(_positive(x) for v in entry["vs"].values() for x in v.values())


def test_bench_decode_on_a_written_lm(tmp_path):
    lm = tmp_path / "lm"
    proc = run_cli("bench", "make-lm", "--out", str(lm), "--size", "tiny", "--layers", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (lm / "config.json").is_file() and not list(tmp_path.glob(".lm.*"))
    proc = run_cli("bench", "decode", "--lm", str(lm), "--backend", "torch", "--prompt-tokens", "8",
                   "--new-tokens", "3", "--repeats", "1", "--precision", "fp32", "--skip-genai", "--threads", "1",
                   "--json", "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    systems = json.loads(proc.stdout)["systems"]
    assert [s["name"] for s in systems] == ["transformers", "blip3v"]
    assert systems[1]["greedy_prefix_agreeing_with_transformers"] == 3  # same weights, same greedy ids


def test_bench_decode_bad_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_one_line_error(run_cli("bench", "decode", "--lm", str(tmp_path), "--quiet"), "phi3")
    assert_one_line_error(run_cli("bench", "decode", "--lm", str(tmp_path / "none"), "--quiet"), "config.json")
    assert_one_line_error(run_cli("bench", "decode", "--backend", "tvm"), "tvm")


@pytest.mark.parametrize("script", ["ablation.py", "token_probe.py", "awq_first_tokens.py"])
def test_study_scripts_explain_themselves(script):
    """The scripts behind RESULTS.md's study figures import and document their command line."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / script
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "RESULTS.md" in proc.stdout
