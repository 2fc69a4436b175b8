"""Training and evaluation on the synthetic task: a short run whose loss falls, resume, eval."""

from __future__ import annotations

import json

import pytest

from blip3v.errors import InputError
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


def test_layout_targets_mark_the_cells_a_shape_covers():
    """The layout loss's target is read off the pixels: a square covering exactly cells (row 1, col 2)
    and (row 1, col 3) of an 8 x 8 grid gives 1 there and 0 elsewhere."""
    import numpy as np

    from blip3v.data import synth
    from blip3v.model.train import layout_targets

    frames = np.empty((2, 64, 64, 3), np.uint8)
    frames[:] = synth.BACKGROUND
    frames[0, 8:16, 16:32] = synth.RGB["red"]  # frame 0: two cells
    target = layout_targets(frames, 8)
    assert target.shape == (2, 64) and target.dtype == np.float32
    assert set(np.flatnonzero(target[0])) == {1 * 8 + 2, 1 * 8 + 3} and np.allclose(target[0][[10, 11]], 1.0)
    assert not target[1].any()  # frame 1: background only


def test_layout_loss_run_keeps_the_released_layout_and_resumes(tmp_path):
    """--layout-loss trains a head that lives in trainer_state.pt only; the checkpoint's keys are those
    of a run without it, its loss is logged and falls, a resume reloads the head, and a resume that
    leaves out --layout-loss is refused in one line (it would drop the head)."""
    import torch
    from safetensors import safe_open

    def keys(directory):
        with safe_open(str(next(directory.glob("model-*.safetensors"))), "pt") as f:
            return set(f.keys())

    plain, layout = tmp_path / "plain", tmp_path / "layout"
    train("demo", plain, TrainConfig(steps=2, batch_size=4, warmup=1), progress=False, log=lambda m: None)
    tc = TrainConfig(steps=30, batch_size=4, warmup=2, lr=2e-3, layout_loss=1.0)
    summary = train("demo", layout, tc, progress=False, log=lambda m: None, workers=2)
    assert keys(layout) == keys(plain)
    aux = [h["layout_ema_loss"] for h in summary["history"]]
    assert aux[-1] < aux[0], aux
    state = torch.load(layout / STATE_NAME, weights_only=False)
    assert set(state["layout_head"]) == {"proj.weight", "proj.bias"}
    more = train("demo", layout, TrainConfig(steps=32, batch_size=4, warmup=2, lr=2e-3, layout_loss=1.0),
                 progress=False, log=lambda m: None)
    assert more["steps"] == 32 and "layout_ema_loss" in more["history"][-1]
    with pytest.raises(InputError, match="--layout-loss 1"):  # resuming without it would drop the head
        train("demo", layout, TrainConfig(steps=34, batch_size=4), progress=False, log=lambda m: None)


def test_loader_workers_share_the_stream_without_repeats():
    """k loader workers render disjoint clips that together are the stream's first k * n clips."""
    from torch.utils.data import DataLoader

    from blip3v.data import synth
    from blip3v.model.train import SynthStream

    seed = 77
    stream = SynthStream(seed, 8, 64, noise=0.0, questions=1)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    seen = [tuple(qa[0]) for (_, qa, _), _ in zip(loader, range(8))]  # the loader makes tuples lists
    want = [(e.question, e.answer, e.category) for e, _ in zip(synth.example_stream(seed, model_frames=8), range(8))]
    assert sorted(seen) == sorted(want)


def test_train_cli_rejects_unknown_categories(tmp_path):
    proc = run_cli("train", "--out", str(tmp_path / "x"), "--categories", "colour,flavour")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --categories: flavour; choose from colour, shape, count, direction, change, order"]
