"""Training and evaluation on the synthetic task: a short run whose loss falls, resume, eval."""

from __future__ import annotations

import json

import pytest

from blip3v.errors import Blip3vError, CheckpointError, InputError
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
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # the atomic saves left nothing
    assert not [p for p in out.iterdir() if p.name.startswith(".")] and (out / "training.json").is_file()
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
    from safetensors import safe_open

    from blip3v.model.trainer_state import load_trainer_state

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
    state = load_trainer_state(layout)
    assert set(state.layout_head) == {"proj.weight", "proj.bias"}
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


def _stepped_optimizer(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.05)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    return model, opt


def test_trainer_state_round_trips_without_pickle(tmp_path):
    """Optimizer state, layout head and RNG come back exactly from safetensors + JSON, and the
    restored optimizer takes the same next step as the original."""
    import torch

    from blip3v.model.trainer_state import (TrainerState, load_trainer_state, restore_optimizer, restore_rng,
                                            rng_states, save_trainer_state)

    model, opt = _stepped_optimizer()
    head = {"proj.weight": torch.randn(2, 3), "proj.bias": torch.randn(2)}
    history = [{"step": 1, "loss": 3.5}]
    rng = rng_states("cpu")
    save_trainer_state(tmp_path, TrainerState(step=7, elapsed=1.25, preset="demo", history=history,
                                              segments=[{"from_step": 0, "to_step": 7, "device": "cpu"}],
                                              train_config={"lr": 1e-3, "categories": ("colour", "shape")},
                                              optimizer=opt.state_dict(), layout_head=head, rng=rng))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.json", "trainer_state.safetensors"]
    state = load_trainer_state(tmp_path)
    assert (state.step, state.elapsed, state.preset, state.history) == (7, 1.25, "demo", history)
    assert state.train_config["categories"] == ["colour", "shape"]
    assert all(torch.equal(state.layout_head[k], v) for k, v in head.items())

    twin, fresh = _stepped_optimizer(seed=1)  # another model's weights, same shapes
    twin.load_state_dict(model.state_dict())
    fresh = torch.optim.AdamW(twin.parameters(), lr=5.0)
    restore_optimizer(fresh, state, tmp_path / "trainer_state.json")
    want, got = opt.state_dict(), fresh.state_dict()
    assert got["param_groups"] == want["param_groups"]  # lr, betas (a tuple again), ...
    for i, per_param in want["state"].items():
        for name, value in per_param.items():
            assert torch.equal(got["state"][i][name], value), (i, name)
    torch.manual_seed(123)  # RNG back to the saved point
    restore_rng(state, tmp_path / "trainer_state.json")
    assert torch.equal(torch.get_rng_state(), rng["rng.torch"])
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (twin, fresh)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_damaged_trainer_state_is_one_line(tmp_path):
    import torch

    from blip3v.model.trainer_state import (TrainerState, load_trainer_state, restore_optimizer,
                                            save_trainer_state)

    _, opt = _stepped_optimizer()
    save_trainer_state(tmp_path, TrainerState(step=2, elapsed=0.0, preset="demo", train_config={},
                                              optimizer=opt.state_dict()))
    good = (tmp_path / "trainer_state.json").read_text()

    def broken(change) -> str:
        meta = json.loads(good)
        change(meta)
        (tmp_path / "trainer_state.json").write_text(json.dumps(meta))
        with pytest.raises(CheckpointError) as err:
            load_trainer_state(tmp_path)
        assert len(str(err.value).splitlines()) == 1
        return str(err.value)

    assert "step: expected an integer >= 0" in broken(lambda m: m.update(step="2"))
    assert "elapsed" in broken(lambda m: m.update(elapsed=None))
    assert "history: expected a list" in broken(lambda m: m.update(history={"a": 1}))
    assert "optimizer" in broken(lambda m: m["optimizer"].update(param_groups=[3]))
    assert "version" in broken(lambda m: m.update(version=2))
    (tmp_path / "trainer_state.json").write_text(good)
    data = bytearray((tmp_path / "trainer_state.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "trainer_state.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load_trainer_state(tmp_path)
    data[-1] ^= 1
    (tmp_path / "trainer_state.safetensors").write_bytes(bytes(data))
    state = load_trainer_state(tmp_path)
    other = torch.optim.AdamW(torch.nn.Linear(5, 3).parameters())  # another model
    with pytest.raises(CheckpointError, match="optimizer"):
        restore_optimizer(other, state, tmp_path / "trainer_state.json")


def test_train_cli_refuses_an_old_pickled_state_in_one_line(tmp_path):
    """A run folder from before this format (trainer_state.pt) is not resumed and not unpickled;
    test_no_pickle.py plants a live payload there."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.pt").write_bytes(b"not read")
    proc = run_cli("train", "--out", str(run), "--steps", "1")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "old pickle format" in proc.stderr and "another --out" in proc.stderr
    with pytest.raises(Blip3vError, match="old pickle format"):
        train("demo", run, TrainConfig(steps=1), progress=False, log=lambda m: None)
