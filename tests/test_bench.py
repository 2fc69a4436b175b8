"""`blip3v bench budget` and `blip3v bench decode` run end to end in subprocesses on the small
models: the JSON has the documented structure, every figure is positive and finite, the budgets
carry the token counts they claim, and bad input is one line with exit code 2."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess

import pytest

from conftest import CliJob, assert_one_line_error, head_start, in_background, run_cli, run_clis


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


@head_start("budget_onnxruntime")
def _budget_onnxruntime_job(request) -> CliJob:
    """The onnxruntime budget bench exports an engine first (most of its time): it starts with the session."""
    return in_background(CliJob("bench", "budget", "--backend", "onnxruntime", "--budgets", "32,raw", "--repeats",
                                "2", "--warmup", "0", "--new-tokens", "3", "--threads", "1", "--json", "--quiet"))


@pytest.fixture(scope="module")
def budget_onnxruntime(request) -> subprocess.CompletedProcess:
    pytest.importorskip("onnxscript")
    return _budget_onnxruntime_job(request).result()


def test_bench_budget_onnxruntime(budget_onnxruntime):
    proc = budget_onnxruntime
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


@head_start("decode_tiny")
def _decode_tiny_job(request) -> CliJob:
    """bench decode exports two ONNX decoders and runs four systems: it starts with the session too."""
    return in_background(CliJob("bench", "decode", "--size", "tiny", "--layers", "1", "--prompt-tokens", "8",
                                "--new-tokens", "4", "--repeats", "1", "--precision", "fp32", "--threads", "1",
                                "--json", "--quiet"))


@pytest.fixture(scope="module")
def decode_tiny(request) -> subprocess.CompletedProcess:
    return _decode_tiny_job(request).result()


def test_bench_decode_json_and_ratios(decode_tiny):
    proc = decode_tiny
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    names = {(s["name"], s["variant"]) for s in result["systems"]}
    genai = importlib.util.find_spec("onnxruntime_genai") is not None
    peers = {"transformers eager"} | ({"onnxruntime-genai"} if genai else set())
    assert {s["label"] for s in result["systems"] if s["role"] == "peer"} == peers  # on cpu eager is a peer
    assert sum(n == "blip3v" for n, _ in names) == 3  # ORT gqa, ORT standard, torch static KV
    for s in result["systems"]:
        assert {"name", "precision", "ttft_ms", "decode_ms_per_token", "first_request_ms", "request_ms"} <= set(s)
        assert _positive(s["ttft_ms"]) and _positive(s["decode_ms_per_token"]) and _positive(s["first_request_ms"])
        assert s["greedy_prefix_agreeing_with_transformers"] >= 1, s
    for entry in result["ratios"]:
        assert set(entry["vs"]) == peers
        assert all(_positive(x) for v in entry["vs"].values() for x in v.values())
        assert entry["fastest_peer"]["same_precision"] and entry["fastest_peer"]["decode"]["label"] in peers
    # the GPU-only peer is left out on the CPU, with a note saying so
    assert any("GPU-only" in n and "static" in n for n in result["notes"]), result["notes"]
    assert not any("static" in s["label"] for s in result["systems"])


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
    llama, missing, tvm = run_clis(("bench", "decode", "--lm", tmp_path, "--quiet"),
                                   ("bench", "decode", "--lm", tmp_path / "none", "--quiet"),
                                   ("bench", "decode", "--backend", "tvm"))
    assert_one_line_error(llama, "phi3")
    assert_one_line_error(missing, "config.json")
    assert_one_line_error(tvm, "tvm")


@pytest.mark.parametrize("script", ["ablation.py", "token_probe.py", "awq_first_tokens.py", "eval_parts.py"])
def test_study_scripts_explain_themselves(script):
    """The scripts behind RESULTS.md's study figures import and document their command line."""
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / script
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "RESULTS.md" in proc.stdout


# ----------------------------------------------------------------------------- bench decode's row choice and ratios


def _planned(device, backends=("onnxruntime", "torch"), precisions=("fp16", "int4"), **kw):
    from blip3v.benchmarks.bench_decode import select_rows

    rows, notes = select_rows(device, backends, precisions, ("gqa",), **{"ort_cuda": False, "genai": False, **kw})
    return {(r.kind, r.precision, r.role) for r in rows}, [r.precision for r in rows], notes


def test_select_rows_on_a_gpu():
    rows, order, notes = _planned("cuda")
    assert rows == {("transformers-eager", "fp16", "reference"), ("transformers-static", "fp16", "peer"),
                    ("blip3v-torch", "fp16", "blip3v"), ("blip3v-torch", "int4", "blip3v")}
    assert order == sorted(order, key=["fp16", "int4"].index)  # grouped by precision, in the order asked
    assert any("onnxruntime-gpu is not installed" in n for n in notes)  # ORT CUDA rows skipped, said so
    rows, _, notes = _planned("cuda", ort_cuda=True, genai=True)
    assert {("ort-cuda", "fp16", "peer"), ("ort-cuda", "int4", "peer")} <= rows  # MatMulNBits + GQA graphs
    assert not any(kind == "genai" for kind, _, _ in rows) and any("onnxruntime-genai" in n for n in notes)


def test_select_rows_on_the_cpu():
    rows, _, notes = _planned("cpu", precisions=("fp32", "fp16", "int4"), genai=True)
    assert ("transformers-eager", "fp32", "peer") in rows  # the CPU's default is the peer there
    assert not any(kind == "transformers-static" for kind, _, _ in rows)
    assert {("blip3v-ort", "int4", "blip3v"), ("genai", "fp32", "peer"), ("genai", "int4", "peer")} <= rows
    assert not any(kind == "blip3v-torch" and p == "int4" for kind, p, _ in rows)
    for fragment in ("GPU-only", "INT4", "fp16"):
        assert any(fragment in n for n in notes), (fragment, notes)


def _row(label, role, precision, ttft, decode, name=None, variant="v"):
    return {"name": name or ("blip3v" if role == "blip3v" else label), "label": label, "role": role,
            "variant": variant, "precision": precision, "ttft_ms": ttft, "decode_ms_per_token": decode}


def test_ratios_are_against_the_fastest_peer():
    from blip3v.benchmarks.bench_decode import ratios

    rows = [_row("transformers eager", "reference", "fp16", 37.0, 38.0),
            _row("transformers static+compile", "peer", "fp16", 42.0, 4.53),
            _row("onnxruntime CUDA EP gqa", "peer", "fp16", 30.0, 6.0),
            _row("blip3v", "blip3v", "fp16", 40.0, 4.26, variant="torch"),
            _row("blip3v", "blip3v", "int4", 89.0, 5.35, variant="torch")]
    fp16, int4 = ratios(rows)
    best = fp16["fastest_peer"]
    assert best["decode"]["label"] == "transformers static+compile"  # not eager's x9
    assert best["decode"]["speedup"] == pytest.approx(4.53 / 4.26)
    assert best["ttft"]["label"] == "onnxruntime CUDA EP gqa" and best["same_precision"]
    assert fp16["target_met"] == {"ttft": False, "decode": True}
    assert set(fp16["vs"]) == {"transformers eager", "transformers static+compile", "onnxruntime CUDA EP gqa"}
    # no peer runs int4: the fastest at any precision, marked; and the gain over its own fp16 weights
    assert not int4["fastest_peer"]["same_precision"]
    assert int4["fastest_peer"]["decode"]["speedup"] == pytest.approx(4.53 / 5.35)
    assert int4["decode_speedup_vs_own_dense"] == pytest.approx(4.26 / 5.35)
    only_reference = ratios([_row("transformers eager", "reference", "fp16", 37.0, 38.0), rows[3]])
    assert "fastest_peer" not in only_reference[0]  # a reference alone is never the comparison


def test_gpu_report_lines():
    from blip3v.benchmarks.bench_decode import floor_lines, note_lines, ratio_lines, ratios, table

    systems = [_row("transformers static+compile", "peer", "fp16", 42.0, 4.53),
               _row("blip3v", "blip3v", "fp16", 40.0, 4.26, variant="torch static KV, CUDA graph step")]
    for r in systems:
        r.update(ttft_ms_min=1.0, ttft_ms_max=2.0, decode_ms_per_token_min=1.0, decode_ms_per_token_max=2.0,
                 request_ms=600.0, first_request_ms=65000.0, greedy_prefix_agreeing_with_transformers=128)
    result = {"systems": systems, "ratios": ratios(systems), "notes": ["onnxruntime-gpu is not installed"],
              "floors": {"ceilings": {"copy_gb_per_s": 4200.0, "matmul_fp16_tflop_per_s": 700.0}, "context": 192,
                         "prompt_tokens": 128, "per_precision": {"fp16": {
                             "bytes_per_token": 7.6e9, "floor_ms": 1.81, "floor_ms_at_3350_gb_per_s": 2.27,
                             "flops_per_token": 7.6e9, "flop_floor_ms": 0.011, "ttft_floor_ms": 2.8}}}}
    text = "\n".join([table(systems), *ratio_lines(result), *floor_lines(result), *note_lines(result)])
    assert "65000.0 (600.0)" in text  # the first request apart from the steady one
    assert "decode x1.06 over transformers static+compile fp16 (4.53 ms/token)" in text and "ttft x1.05" in text
    assert "bandwidth floor 1.81 ms/token" in text and "42% of the floor's speed" in text
    assert "- note: onnxruntime-gpu is not installed" in text


def test_transformers_static_peer_runs_the_same_model():
    """The GPU peer's plumbing on the CPU: generate with cache_implementation="static" gives eager
    generate's greedy ids on the same weights (it compiles only on a GPU, and says it did not here)."""
    import numpy as np

    from blip3v.benchmarks.bench_decode import make_phi3, transformers_system

    model = make_phi3("tiny", 1, seed=1)
    prompt = np.arange(3, 11)
    eager = transformers_system(model, "sdpa", "fp32", role="reference").run(prompt, 4)
    static = transformers_system(model, "sdpa", "fp32", cache="static")
    request = static.run(prompt, 4)
    assert len(request.tokens) == 4 and request.tokens == eager.tokens
    assert static.facts == {"compiled": False} and static.label == "transformers static+compile"
    assert request.wall_ms >= request.ttft_ms > 0


def test_floor_counts_every_weight_once():
    """decode_floors' FLOP count: every Linear of the FastDecoder at its logical shape, dense or INT4."""
    from blip3v.benchmarks.bench_decode import _engine_shim, make_phi3, matmul_weights
    from blip3v.model.fast_decode import FastDecoder

    model = make_phi3("tiny", 2)
    c = model.config
    dh = c.hidden_size // c.num_attention_heads
    per_layer = (c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * dh  # qkv
                 + c.hidden_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)  # o, gate_up, down
    expected = 2 * per_layer + c.hidden_size * c.vocab_size
    assert matmul_weights(FastDecoder(_engine_shim(model), max_batch=1)) == expected
    int4 = FastDecoder(_engine_shim(model), max_batch=1, weights="int4", group_size=32)
    assert matmul_weights(int4) == expected


def test_a_failing_peer_is_left_out_with_a_note():
    """One peer's failure on the lent machine (a compiler error, say) costs its row, not the run;
    a failure of blip3v's own row ends it."""
    import numpy as np

    from blip3v.benchmarks.bench_decode import System, make_phi3, measure, transformers_system

    def broken(_ids, _n):
        raise RuntimeError("inductor: compilation failed\nlong trace")

    model = make_phi3("tiny", 1)
    eager = transformers_system(model, "sdpa", "fp32")
    systems = [System("transformers", "static", "fp32", broken, role="peer", label="transformers static+compile"),
               eager]
    notes = measure(systems, np.arange(3, 9), 3, 1, lambda _m: None)
    assert systems == [eager] and len(eager.requests) == 1 and eager.first is not None
    assert len(notes) == 1 and "transformers static+compile (fp32)" in notes[0] and "compilation failed" in notes[0]
    with pytest.raises(RuntimeError, match="compilation failed"):
        measure([System("blip3v", "torch", "fp32", broken)], np.arange(3, 9), 3, 1, lambda _m: None)
