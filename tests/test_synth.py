"""Tests for the synthetic video-QA generator (data/synth.py) and `blip3v data synth`.

Answers are re-derived from pixels, not from the generator's own bookkeeping: the frames the model
samples are segmented into flat-coloured blobs, each blob's shape is told by how much of its bounding
box it fills (square ~1, circle ~pi/4, triangle ~1/2). Run: `python -m pytest tests/test_synth.py -q`.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from blip3v.data import synth
from blip3v.errors import InputError
from blip3v.runtime.video import frame_indices

SAMPLED = frame_indices(24, 8)
PALETTE = np.array([synth.RGB[c] for c in synth.COLOURS], dtype=np.int32)  # (6, 3)


# ---------------------------------------------------------------- pixel analysis


def blobs(frame: np.ndarray, tol: float = 70.0) -> list[dict]:
    """Connected same-colour regions of a frame: colour, shape, area, centroid (x, y)."""
    # squared distances in integers (the same nearest colour and threshold as the Euclidean ones, cheaper)
    diff = frame[:, :, None, :].astype(np.int32) - PALETTE  # (H, W, 6, 3)
    dist2 = np.einsum("hwck,hwck->hwc", diff, diff)  # (H, W, 6)
    label = np.where(dist2.min(-1) < tol * tol, dist2.argmin(-1), -1)  # (H, W), -1 background
    found = []
    for ci, colour in enumerate(synth.COLOURS):
        mask = label == ci
        if mask.sum() < 20:  # a few stray codec pixels at edges are not an object
            continue
        # run-length union-find, 4-connected: runs in adjacent rows that overlap are one blob
        runs, parent = [], []
        prev: list[int] = []
        edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)  # (H, W + 1): +1 run start, -1 end
        for y in np.nonzero(mask.any(1))[0]:
            cur = []
            for x0, x1 in zip(np.nonzero(edges[y] == 1)[0], np.nonzero(edges[y] == -1)[0]):
                i = len(runs)
                runs.append((y, x0, x1))
                parent.append(i)
                for j in prev:
                    py, px0, px1 = runs[j]
                    if py == y - 1 and x0 < px1 and px0 < x1:
                        a, b = _root(parent, i), _root(parent, j)
                        parent[a] = b
                cur.append(i)
            prev = cur
        groups: dict[int, list[tuple[int, int, int]]] = {}
        for i, run in enumerate(runs):
            groups.setdefault(_root(parent, i), []).append(run)
        for group in groups.values():
            area = sum(x1 - x0 for _, x0, x1 in group)
            if area < 20:
                continue
            ys = [y for y, _, _ in group]
            xs0, xs1 = [x0 for _, x0, _ in group], [x1 for _, _, x1 in group]
            cx = sum((x0 + x1 - 1) / 2 * (x1 - x0) for _, x0, x1 in group) / area
            cy = sum(y * (x1 - x0) for y, x0, x1 in group) / area
            fill = area / ((max(ys) - min(ys) + 1) * (max(xs1) - min(xs0)))
            shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
            found.append({"colour": colour, "shape": shape, "area": area, "x": cx, "y": cy})
    return found


def _root(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def only(items: list[dict], **match) -> dict:
    hits = [b for b in items if all(b[k] == v for k, v in match.items())]
    assert len(hits) == 1, f"expected one blob with {match}, got {items}"
    return hits[0]


def pixel_answer(frames: np.ndarray, question: str, category: str) -> str:
    """The answer read off the sampled frames (T, H, W, 3) alone, with temporal sanity checks."""
    seen = [blobs(f) for f in frames]
    first, last = seen[0], seen[-1]
    word = re.search(r"the (\w+)", question)
    if category == "colour":
        return only(first, shape=word.group(1))["colour"]
    if category == "shape":
        return only(first, colour=word.group(1))["shape"]
    if category == "count":
        counts = {len(s) for s in seen}
        assert len(counts) == 1, "membership changed in a count clip"
        return synth.NUMBERS[counts.pop() - 1]
    if category == "direction":
        a, b = only(first, shape=word.group(1)), only(last, shape=word.group(1))
        dx, dy = b["x"] - a["x"], b["y"] - a["y"]
        assert max(abs(dx), abs(dy)) > 30, "moved too little to see"
        if abs(dx) > abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    if category == "change":
        before, after = only(first, shape=word.group(1))["colour"], only(last, shape=word.group(1))["colour"]
        assert before != after, "no colour change between first and last sampled frame"
        return after
    if category == "order":
        shapes = sorted({b["shape"] for s in seen for b in s})
        assert len(shapes) == 2
        present = {sh: [t for t, s in enumerate(seen) if any(b["shape"] == sh for b in s)] for sh in shapes}
        key = (lambda sh: present[sh][0]) if "appears" in question else (lambda sh: present[sh][-1])
        a, b = sorted(shapes, key=key)
        assert key(b) - key(a) >= 2, "events closer than two sampled frames"
        return a
    raise AssertionError(category)


# ---------------------------------------------------------------- in-memory examples


@pytest.fixture(scope="module")
def examples() -> list[synth.Example]:
    stream = synth.example_stream(seed=11)
    return [next(stream) for _ in range(300)]


def test_vocabulary_and_normalise():
    vocab = synth.answer_vocabulary()
    assert len(vocab) == len(set(vocab)) == 17
    words = set(synth.question_words())
    assert set(vocab) <= words
    assert synth.normalise_answer("  Red. ") == "red"
    assert synth.normalise_answer("Left!\n") == "left"
    assert synth.normalise_answer("TWO") == "two"


def test_examples_well_formed(examples):
    assert set(synth.CATEGORIES) == {e.category for e in examples}
    words = set(synth.question_words())
    for e in examples:
        assert e.frames.shape == (24, 128, 128, 3) and e.frames.dtype == np.uint8
        assert e.answer in synth.answer_vocabulary()
        assert e.question.endswith("?") and set(e.question[:-1].split()) <= words
        assert synth.normalise_answer(e.answer) == e.answer
        json.dumps(e.scene)  # serialisable
        assert len(e.scene["objects"]) <= 4
        assert (e.frames[:, 0, 0] == synth.BACKGROUND).all()  # corner always background


@pytest.mark.parametrize("category", synth.CATEGORIES)
def test_answer_from_pixels(category):
    rng = np.random.default_rng(1234)
    for _ in range(30):
        e = synth.sample_example(rng, categories=[category])
        assert pixel_answer(e.frames[SAMPLED], e.question, category) == e.answer, (e.question, e.scene)


def test_static_questions_are_answered_by_the_pixels(examples):
    """The extra training questions of every category's clips: each answer is the only one the
    sampled frames show (colour/shape of a blob over all frames where it is visible; count)."""
    asked = Counter()
    for e in examples:
        seen = [blobs(f) for f in e.frames[SAMPLED]]
        questions = synth.static_questions(e.scene)
        assert len({q for q, _, _ in questions}) == len(questions)
        for question, answer, category in questions:
            asked[(e.category, category)] += 1
            word = re.search(r"the (\w+)", question)
            if category == "colour":
                shown = {b["colour"] for s in seen for b in s if b["shape"] == word.group(1)}
            elif category == "shape":
                shown = {b["shape"] for s in seen for b in s if b["colour"] == word.group(1)}
            else:
                shown = {synth.NUMBERS[len(s) - 1] for s in seen}
            assert shown == {answer}, (question, answer, shown, e.scene)
        if e.category in ("colour", "shape", "count"):
            assert (e.question, e.answer, e.category) in questions
    # temporal clips contribute too: colour/shape of their steady objects, count where nobody comes or goes
    assert asked[("direction", "count")] and asked[("change", "shape")] and asked[("order", "colour")]
    assert not asked[("order", "count")]


def test_temporal_answers_need_time(examples):
    """No single sampled frame answers a temporal question, and the frame counts are time-symmetric."""
    change_counts, order_counts = Counter(), Counter()
    for e in examples:
        view = e.frames[SAMPLED]
        if e.category == "direction":
            # the mover sits at different places in the first and last frame; either alone is a still shape
            shape = re.search(r"the (\w+)", e.question).group(1)
            a, b = only(blobs(view[0]), shape=shape), only(blobs(view[-1]), shape=shape)
            assert np.hypot(b["x"] - a["x"], b["y"] - a["y"]) > 30
        elif e.category == "change":
            obj = e.scene["objects"][0]
            seen = [obj["colour"][f] for f in SAMPLED]
            assert seen[0] != seen[-1] == e.answer
            change_counts[seen.count(seen[0])] += 1
        elif e.category == "order":
            shown = [[o["colour"][f] is not None for o in e.scene["objects"]] for f in SAMPLED]
            # one end of the sampled window is empty, and each shape is alone on screen at some point
            assert not any(shown[0]) or not any(shown[-1])
            alone = [sum(s[k] and not s[1 - k] for s in shown) for k in (0, 1)]
            assert min(alone) >= 2
            order_counts[tuple(alone)] += 1
    # frames in the old colour vs the new one: same support, so the time-mean cannot tell them apart
    assert set(change_counts) == {8 - k for k in change_counts}
    # (first shape alone, second alone) is as likely either way round
    assert set(order_counts) == {(b, a) for a, b in order_counts}


def test_events_between_sampled_frames():
    rng = np.random.default_rng(7)
    for _ in range(60):
        e = synth.sample_example(rng, categories=["change", "order"])
        for obj in e.scene["objects"]:
            states = obj["colour"]
            for f in range(1, 24):
                if states[f] != states[f - 1]:
                    before = sum(s < f for s in SAMPLED)
                    assert f not in SAMPLED and 2 <= before <= len(SAMPLED) - 2, (f, e.scene["variant"])


def test_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(InputError):
        synth.sample_example(rng, categories=["colour", "smell"])
    with pytest.raises(InputError):
        synth.sample_example(rng, size=127)
    with pytest.raises(InputError):
        synth.sample_example(rng, num_frames=7)  # fewer frames than the 8 sampled


# ---------------------------------------------------------------- files


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_dataset_deterministic(tmp_path):
    a = synth.write_dataset(tmp_path / "a", 8, seed=5, progress=False)
    b = synth.write_dataset(tmp_path / "b", 8, seed=5, progress=False)
    c = synth.write_dataset(tmp_path / "c", 8, seed=6, progress=False)
    assert (a / "qa.jsonl").read_bytes() == (b / "qa.jsonl").read_bytes()
    assert _hashes(a) == _hashes(b)
    assert (a / "qa.jsonl").read_bytes() != (c / "qa.jsonl").read_bytes()
    assert _hashes(a)["clips/00000.mp4"] != _hashes(c)["clips/00000.mp4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary folders left
    # the dataset is the stream with the same seed
    stream = synth.example_stream(5)
    assert [(r["question"], r["answer"]) for r in synth.read_dataset(a)] == \
        [(e.question, e.answer) for e in (next(stream) for _ in range(8))]
    meta = json.loads((a / "meta.json").read_text())
    assert meta["n"] == 8 and meta["seed"] == 5 and meta["num_frames"] == 24 and meta["fps"] == 12


def test_mp4_decodes_and_answers_survive_codec(tmp_path):
    import av

    out = synth.write_dataset(tmp_path / "d", 12, seed=21, progress=False)
    rows = synth.read_dataset(out)
    assert len(rows) == 12 and all(not Path(r["video"]).is_absolute() for r in rows)
    for row in rows:
        with av.open(row["path"]) as container:
            assert container.streams.video[0].codec_context.name == "h264"
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        assert frames.shape == (24, 128, 128, 3)
        assert pixel_answer(frames[SAMPLED], row["question"], row["category"]) == row["answer"]


def test_write_dataset_refuses_non_empty(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("hi")
    with pytest.raises(InputError):
        synth.write_dataset(out, 2, seed=0, progress=False)
    assert (out / "keep.txt").exists()
    synth.write_dataset(out, 2, seed=0, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and len(synth.read_dataset(out)) == 2
    with pytest.raises(InputError):
        synth.write_dataset(tmp_path / "y", 0, seed=0, progress=False)
    assert not (tmp_path / "y").exists()


def test_read_dataset_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        synth.read_dataset(tmp_path / "nope")
    with pytest.raises(InputError, match="qa.jsonl"):
        synth.read_dataset(tmp_path)
    (tmp_path / "qa.jsonl").write_text('{"video": "clips/0.mp4"\n')
    with pytest.raises(InputError, match="not valid JSON"):
        synth.read_dataset(tmp_path)


# ---------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip3v.cli", "data", "synth", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_synth(tmp_path):
    out = tmp_path / "ds"
    res = _cli("--out", str(out), "--n", "6", "--seed", "3", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["n"] == 6 and sum(summary["counts"].values()) == 6 and Path(summary["out"]) == out
    assert (out / "qa.jsonl").is_file() and (out / "meta.json").is_file()
    assert len(list((out / "clips").glob("*.mp4"))) == 6
    # existing output: refused without --force
    res = _cli("--out", str(out), "--n", "2", "--seed", "3")
    assert res.returncode == 2 and "--force" in res.stderr


@pytest.mark.parametrize("args", [
    ["--n", "0", "--seed", "1"],
    ["--n", "2", "--seed", "1", "--categories", "colour,smell"],
    ["--n", "2", "--seed", "1", "--size", "99"],
])
def test_cli_bad_args(tmp_path, args):
    res = _cli("--out", str(tmp_path / "ds"), *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.stderr
    assert not (tmp_path / "ds").exists()


def test_cli_help():
    res = _cli("--help")
    assert res.returncode == 0
    for option in ("--out", "--n", "--seed", "--size", "--frames", "--categories", "--json", "--force"):
        assert option in res.stdout
