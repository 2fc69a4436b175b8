"""Seeded fuzz of what users hand the project: mutated videos and mutated checkpoint configs must
either load or raise the project's one-line error, never anything else (issue 18). The manifest
has its own fuzz in tests/test_manifest.py. `-m slow` runs ten times as many cases.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from blip3v.assets import DEMO_MODEL, SAMPLE_CLIP
from blip3v.errors import Blip3vError

BAD_VALUES = (None, [], {}, "x", -1, 0, 10**12, 1.5, True, "<image>", {"a": 1}, [1, 2])


def mutate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    """Flip, zero, cut or splice bytes of a real clip."""
    out = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:
        for i in rng.integers(0, len(out), size=int(rng.integers(1, 32))):
            out[i] = int(rng.integers(256))
    elif kind == 1:
        start = int(rng.integers(0, len(out)))
        out[start:start + int(rng.integers(1, 512))] = bytes(min(512, len(out) - start))
    elif kind == 2:
        out = out[:int(rng.integers(0, len(out)))]
    else:
        a, b = sorted(int(x) for x in rng.integers(0, len(out), size=2))
        out = out[:a] + out[b:] + out[a:b]
    return bytes(out)


def check_video_cases(n: int, tmp_path) -> dict[str, int]:
    from blip3v.runtime.video import load_clip

    rng = np.random.default_rng(18)
    data = SAMPLE_CLIP.read_bytes()
    outcomes = {"loaded": 0, "error": 0}
    for i in range(n):
        path = tmp_path / f"case{i % 4}.mp4"
        path.write_bytes(mutate_bytes(data, rng))
        try:
            pixels = load_clip(path, 8, 64)
        except Blip3vError as exc:
            message = str(exc)
            assert message and "\n" not in message, message
            outcomes["error"] += 1
            continue
        assert pixels.shape == (8, 3, 64, 64) and np.isfinite(pixels).all()
        outcomes["loaded"] += 1
    return outcomes


def mutate_config(raw: dict, rng: np.random.Generator) -> dict:
    """Set one key anywhere in the config to a bad value, or delete it."""
    out = copy.deepcopy(raw)
    paths = []

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append(prefix + (k,))
                walk(v, prefix + (k,))

    walk(out, ())
    where = paths[int(rng.integers(len(paths)))]
    parent = out
    for k in where[:-1]:
        parent = parent[k]
    if rng.integers(5) == 0:
        del parent[where[-1]]
    else:
        parent[where[-1]] = BAD_VALUES[int(rng.integers(len(BAD_VALUES)))]
    return out


def check_config_cases(n: int) -> dict[str, int]:
    from blip3v.model.config import XGenMMConfig

    raw = json.loads((DEMO_MODEL / "config.json").read_text())
    rng = np.random.default_rng(19)
    outcomes = {"loaded": 0, "error": 0}
    for _ in range(n):
        try:
            XGenMMConfig.from_dict(mutate_config(raw, rng), "config.json")
        except Blip3vError as exc:
            assert str(exc) and "\n" not in str(exc), str(exc)
            outcomes["error"] += 1
        else:
            outcomes["loaded"] += 1
    return outcomes


def test_mutated_videos_load_or_fail_in_one_line(tmp_path):
    outcomes = check_video_cases(150, tmp_path)
    assert outcomes["error"] > 30, outcomes  # most mutations break the clip; some only touch a frame


def test_mutated_configs_load_or_fail_in_one_line():
    outcomes = check_config_cases(200)
    assert outcomes["error"] > 100, outcomes  # a few mutations hit keys the loader does not need


@pytest.mark.slow
def test_many_more_mutations(tmp_path):
    check_video_cases(1500, tmp_path)
    check_config_cases(2000)
