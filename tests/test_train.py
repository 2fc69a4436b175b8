"""Training and evaluation on the synthetic task: a short run whose loss falls, resume, eval."""

from __future__ import annotations

import json

from blip3v.model.checkpoint import load_checkpoint
from blip3v.model.train import STATE_NAME, TrainConfig, train
from conftest import run_cli


def test_short_training_run_lowers_the_loss_and_resumes(tmp_path):
    out = tmp_path / "run"
    tc = TrainConfig(steps=40, batch_size=8, warmup=5, save_every=20, lr=2e-3)
    summary = train("demo", out, tc, progress=False, log=lambda m: None)
    history = summary["history"]
    assert summary["steps"] == 40
    first = history[0]["loss"]
    last = sum(h["loss"] for h in history[-3:]) / 3
    # Starts near log(vocab) on the answer tokens; the answer prior alone brings it far lower.
    assert first > 2.0 and last < 0.6 * first, history
    assert (out / STATE_NAME).is_file() and (out / "model.safetensors.index.json").is_file()
    model = load_checkpoint(out)
    assert model.config.num_video_tokens == 16

    # resuming continues from the saved step instead of starting over
    logs = []
    more = train("demo", out, TrainConfig(steps=45, batch_size=8, warmup=5, save_every=20, lr=2e-3),
                 progress=False, log=logs.append)
    assert logs == [f"resuming {out} at step 40"]
    assert more["steps"] == 45


def test_eval_cli_on_a_handful_of_clips(tiny_ckpt, synth_dir):
    proc = run_cli("eval", "--model", tiny_ckpt, "--data", synth_dir, "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["n"] == 6
    assert 0.0 <= result["accuracy"] <= 1.0
    assert set(result["per_category"]) <= {"colour", "shape", "count", "direction", "change", "order"}
    assert result["seconds"] > 0
