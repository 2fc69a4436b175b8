"""The `blip3v` command line, run for real in subprocesses."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli, run_clis


def test_inspect_full_preset_json():
    proc = run_cli("inspect", "xgen-mm-vid-128", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["parameters"]["total"] == 4_418_604_195
    assert set(report["parameters"]) == {"vision_encoder", "vision_tokenizer", "temporal_encoder", "lang_model", "total"}
    assert report["config"]["model_type"] == "xgenmm"


def test_inspect_checkpoint_dir(tiny_ckpt):
    proc = run_cli("inspect", tiny_ckpt, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["source"] == "checkpoint"


@pytest.mark.parametrize("cmd", ["", "ask", "inspect", "data", "data synth", "train", "eval"])
def test_help_everywhere(cmd):
    proc = run_cli(*cmd.split(), "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout


def test_ask_json_on_a_real_clip(tiny_ckpt, synth_dir):
    clip = synth_dir / "clips" / "00000.mp4"
    proc = run_cli("ask", clip, "what colour is the square?", "--model", tiny_ckpt, "--json", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"question", "answer", "video_tokens", "finish_reason", "prompt_tokens", "reused_tokens",
                        "timings_ms"}
    assert out["video_tokens"] == 16
    assert {"decode_video", "video_open", "video_decode", "visual", "prefill", "generate"} <= set(out["timings_ms"])
    assert all(out["timings_ms"][k] > 0 for k in ("decode_video", "visual", "prefill", "generate"))


def test_ask_streams_text(tiny_ckpt, synth_dir):
    clip = synth_dir / "clips" / "00001.mp4"
    proc = run_cli("ask", clip, "what shape is the red object?", "--model", tiny_ckpt, "--max-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")


def test_bad_inputs_are_one_line_errors(tiny_ckpt, synth_dir, tmp_path):
    clip = synth_dir / "clips" / "00000.mp4"
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clip.read_bytes()[:200])
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n")
    cases = [
        (("ask", tmp_path / "missing.mp4", "q", "--model", tiny_ckpt), "missing.mp4"),
        (("ask", broken, "q", "--model", tiny_ckpt), "broken.mp4"),
        (("ask", text, "q", "--model", tiny_ckpt), "notes.mp4"),
        (("ask", clip, "q", "--model", tmp_path / "nockpt"), "not found"),
        (("ask", clip, "q", "--model", tiny_ckpt, "--bogus"), "no such option"),
        (("ask", clip, "   ", "--model", tiny_ckpt), "question is empty"),
        (("ask", clip, "word " * 600, "--model", tiny_ckpt), "exceeds the model's context"),
        (("ask", clip, "q", "--model", tiny_ckpt, "--top-p", "0"), "top-p"),
        (("inspect", "no-such-preset"), "unknown preset"),
        (("ask", clip, "q", "--backend", "onnxruntime"), "--engine"),
    ]
    for proc, (_, fragment) in zip(run_clis(*(args for args, _ in cases)), cases):
        assert_one_line_error(proc, fragment)


def test_corrupt_checkpoint_is_one_line_error(tiny_ckpt, synth_dir, tmp_path):
    import shutil

    ckpt = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ckpt)
    next(ckpt.glob("model-*.safetensors")).write_bytes(b"junk")
    assert_one_line_error(run_cli("ask", synth_dir / "clips" / "00000.mp4", "q", "--model", ckpt), "corrupt")
