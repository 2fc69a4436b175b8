"""eval over an ONNX Runtime CPU engine opened with `parallel_clips`: several threads each decode a
clip and run the visual graph on it (one intra-op thread per run), and the decoder answers the
encoded batch. The answers must be the batched path's, row for row and in order."""

from __future__ import annotations

import numpy as np
import pytest

from blip3v.errors import InputError
from blip3v.runtime.video import load_clip, prefetch_clips
from test_video_speed_paths import T, grey_clip


@pytest.fixture(scope="module")
def held_out_dir(tmp_path_factory):
    """24 clips of seed 1 (not the demo model's training seed), with their questions."""
    from blip3v.data.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("eval-parallel") / "val", n=24, seed=1, progress=False)


def _backend(parallel: bool):
    from blip3v.assets import DEMO_ENGINE
    from blip3v.runtime.ort_backend import OrtBackend

    return OrtBackend.load(DEMO_ENGINE, spinning=False, parallel_clips=parallel)


def test_parallel_clips_answer_as_the_batched_path(held_out_dir):
    """Same predictions, same order; the workers' video tokens (one thread per run) match the
    batched graph's (all cores) to float rounding, 1e-5 absolute."""
    from blip3v.data.evaluate import evaluate
    from blip3v.runtime.session import Engine

    serial, parallel = _backend(False), _backend(True)
    assert serial.encode_workers == 0 and parallel.encode_workers >= 2
    batched = evaluate(Engine(serial), held_out_dir, batch_size=8, progress=False)
    side_by_side = evaluate(Engine(parallel), held_out_dir, batch_size=8, progress=False)
    assert batched["n"] == side_by_side["n"] == 24
    assert [(p["video"], p["prediction"]) for p in side_by_side["predictions"]] == \
        [(p["video"], p["prediction"]) for p in batched["predictions"]]
    assert side_by_side["accuracy"] == batched["accuracy"]

    from blip3v.data.synth import read_dataset

    pixels = np.stack([serial.load_video(row["path"]) for row in read_dataset(held_out_dir)[:4]])
    alone = np.concatenate([parallel.encode_video(x[None]) for x in pixels])
    np.testing.assert_allclose(alone, serial.encode_video(pixels), rtol=0, atol=1e-5)


def test_a_gpu_or_default_engine_encodes_in_batches():
    """parallel_clips is a CPU setting: a backend opened without it keeps ONNX Runtime's threads."""
    from blip3v.assets import DEMO_ENGINE
    from blip3v.runtime.ort_backend import OrtBackend

    assert OrtBackend.load(DEMO_ENGINE).encode_workers == 0


def test_prefetch_then_runs_in_the_worker_and_errors_stay_in_place(tmp_path):
    """`then` maps each clip's pixels in the worker; a clip that cannot be read still yields its
    InputError (then is not called on it); what `then` raises is raised to the caller."""
    paths = [grey_clip(tmp_path / f"clip{i}.mp4", count=20 + 5 * i) for i in range(3)]
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video\n" * 20)
    paths.insert(1, str(broken))
    got = list(prefetch_clips(paths, T, 16, depth=2, workers=2, then=lambda x: x.sum(dtype=np.float64)))
    assert [p for p, _ in got] == paths
    for path, result in got:
        if path == str(broken):
            assert isinstance(result, InputError)
        else:
            assert result == load_clip(path, T, 16).sum(dtype=np.float64)

    def fails(_):
        raise RuntimeError("visual graph failed")

    with pytest.raises(RuntimeError, match="visual graph failed"):
        list(prefetch_clips(paths[:1], T, 16, then=fails))


def test_eval_takes_the_video_options(synth_dir, tmp_path):
    """`eval --video-decoder/--video-scaler/--aspect` reach the reader as `ask`'s do: cuda decoding
    where this machine has none fails in one line, and the ffmpeg scaler with padding scores every
    clip (its predictions are those of the same options in-process)."""
    import json

    from blip3v.assets import DEMO_ENGINE
    from blip3v.data.evaluate import evaluate
    from blip3v.runtime.session import Engine
    from conftest import assert_one_line_error, run_clis

    out = tmp_path / "predictions.jsonl"
    cuda, padded = run_clis(("eval", "--engine", DEMO_ENGINE, "--data", synth_dir, "--video-decoder", "cuda", "--quiet"),
                            ("eval", "--engine", DEMO_ENGINE, "--data", synth_dir, "--aspect", "pad",
                             "--video-scaler", "ffmpeg", "--json", "--quiet", "--predictions", out))
    assert_one_line_error(cuda, "cuda")
    assert padded.returncode == 0, padded.stderr
    assert json.loads(padded.stdout)["n"] == 6
    backend = _backend(True)
    backend.video_options = {"aspect": "pad", "scaler": "ffmpeg"}
    here = evaluate(Engine(backend), synth_dir, progress=False)["predictions"]
    assert [json.loads(line)["prediction"] for line in out.read_text().splitlines()] == [p["prediction"] for p in here]
