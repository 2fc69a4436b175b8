"""Sessions (blip3v.runtime.session over blip3v.runtime.decoding): a clip encoded once answers many
questions, each prefilling only its own tokens on the clip's cached prefix, and the answers equal
the fresh path's (each question alone, from an empty cache) token for token.

The default run checks a dozen held-out clips with 4 questions each on ONNX Runtime (fp32) and a few
on the PyTorch backend; `-m slow` runs the issue's 200 clips x 4 questions on both. A difference is
reported with the top-two logit gap of the fresh path at the token where it starts (only near-ties
may differ: a chunked prefill rounds differently from one whole prefill).

    python -m pytest tests/test_session.py -q
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest

from blip3v.errors import InputError
from blip3v.runtime.decoding import generate, prefill
from blip3v.runtime.generation import SamplingConfig
from blip3v.runtime.session import Engine
from conftest import held_out, run_cli

QUESTIONS = ("what colour is the circle?", "how many shapes are there?", "which way does the square move?")
SAMPLING = SamplingConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def clips12(tmp_path_factory) -> list[dict]:
    return held_out(tmp_path_factory, 12)


@pytest.fixture(scope="module")
def torch_engine() -> Engine:
    from blip3v.assets import DEMO_MODEL

    return Engine.open(model=DEMO_MODEL)  # the shipped demo model on the PyTorch backend


def fresh(engine: Engine, path: str, question: str) -> tuple[list[int], np.ndarray]:
    """The fresh path: decode and encode the clip, prefill the whole prompt into a new cache.
    -> (ids, the logits that chose each id) for the gap report."""
    host = engine.host
    video = host.encode_video(host.load_video(path)[None])
    embeds, mask = host.splice([host.encode_prompt(question)], video)
    seen: list[np.ndarray] = []

    class Watch:  # the same backend, recording each step's logits
        def __getattr__(self, name):
            return getattr(host, name)

        def forward(self, cache, e, p):
            out = host.forward(cache, e, p)
            seen.append(np.array(out))
            return out

    watched = Watch()
    ids = generate(watched, embeds, mask, SAMPLING, host.stop_ids)[0]  # type: ignore[arg-type]
    return ids, np.stack(seen)[:, 0] if seen else np.zeros((0, 0))


def compare(engine: Engine, rows: list[dict]) -> tuple[int, list[str]]:
    """Asks every row's clip 4 questions through one Clip; -> (answers compared, differences)."""
    compared, differences = 0, []
    for row in rows:
        clip = engine.clip(row["path"])
        for question in (row["question"], *QUESTIONS):
            got = clip.ask(question, SAMPLING).token_ids
            want, logits = fresh(engine, row["path"], question)
            compared += 1
            if got != want:
                at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                top = np.sort(logits[min(at, len(logits) - 1)])[-2:]
                differences.append(f"{row['video']} {question!r}: token {at}, fresh top-two gap {top[1] - top[0]:.2e}")
    return compared, differences


def test_followups_equal_the_fresh_path_on_onnxruntime(ort_engine, clips12):
    compared, differences = compare(ort_engine, clips12)
    assert compared == 48
    assert not differences, differences


def test_followups_equal_the_fresh_path_on_torch(torch_engine, clips12):
    compared, differences = compare(torch_engine, clips12[:4])
    assert compared == 16
    assert not differences, differences


@pytest.mark.slow
@pytest.mark.parametrize("which", ["ort", "torch"])
def test_200_held_out_clips_4_questions_each(which, request, tmp_path_factory):
    engine = request.getfixturevalue("ort_engine" if which == "ort" else "torch_engine")
    compared, differences = compare(engine, held_out(tmp_path_factory, 200))
    assert compared == 800
    # Only near-ties may differ: each difference's fresh top-two gap is reported by the assertion.
    assert not differences, differences


def test_follow_up_reuses_the_prefix_and_the_clip(ort_engine, clips12):
    clip = ort_engine.clip(clips12[0]["path"])
    first = clip.ask(QUESTIONS[0], SAMPLING)
    second = clip.ask(QUESTIONS[1], SAMPLING)
    assert second.reused_tokens >= ort_engine.num_video_tokens  # the system text, header and video
    assert second.prompt_tokens - second.reused_tokens < 20  # only the question's own tokens
    assert second.timings_ms["decode_video"] == 0 and second.timings_ms["visual"] == 0
    assert clip.ask(QUESTIONS[0], SAMPLING).token_ids == first.token_ids  # rewound, not appended
    hits = ort_engine.stats["clip_hits"]
    assert ort_engine.clip(clips12[0]["path"]) is clip
    assert ort_engine.stats["clip_hits"] == hits + 1


def test_a_clip_from_bytes_a_file_object_and_frames_answers_as_its_path(demo_engine, clips12):
    path = clips12[1]["path"]
    question = clips12[1]["question"]
    want = Engine.open(engine=demo_engine).ask(path, question, SAMPLING).token_ids
    data = Path(path).read_bytes()
    with av.open(path) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])  # (N, H, W, 3)
    for source in (data, io.BytesIO(data), frames):
        engine = Engine.open(engine=demo_engine)  # a fresh clip cache each time
        assert engine.ask(source, question, SAMPLING).token_ids == want, type(source).__name__


def test_fork_and_truncate(ort_engine, clips12):
    host = ort_engine.host
    video = host.encode_video(host.load_video(clips12[2]["path"])[None])
    ids = host.encode_prompt(QUESTIONS[1])
    embeds, _ = host.splice([ids], video)
    cache = host.new_cache(1, 128)
    logits = prefill(host, cache, embeds)
    used = cache.used
    branch = cache.fork(capacity=200)
    assert branch.capacity == 200 and branch.used == used
    np.testing.assert_array_equal(branch.lengths, cache.lengths)
    step = host.embed(np.asarray([[int(logits.argmax())]]))
    a = prefill(host, cache, step)
    b = prefill(host, branch, step)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # the fork holds the same keys and values
    cache.truncate(used)
    np.testing.assert_allclose(prefill(host, cache, step), a, rtol=0, atol=1e-5)  # rewound, then the same step
    with pytest.raises(InputError):
        cache.truncate(cache.used + 1)


def test_clip_cache_is_a_byte_bounded_lru(demo_engine, clips12):
    engine = Engine.open(engine=demo_engine)
    first = engine.clip(clips12[0]["path"])
    engine.cache_bytes = first.nbytes() + 1  # room for about one clip
    engine.clip(clips12[1]["path"])
    assert engine.stats["evictions"] == 1 and engine.cached_clips() == 1
    assert engine.clip(clips12[0]["path"]) is not first  # evicted: encoded again
    assert engine.stats["clip_misses"] == 3


def test_multi_turn_chat_keeps_earlier_turns(ort_engine, clips12):
    chat = ort_engine.clip(clips12[3]["path"]).chat()
    one = chat.ask(QUESTIONS[0], SAMPLING)
    two = chat.ask(QUESTIONS[1], SAMPLING)
    assert two.reused_tokens >= one.prompt_tokens  # the whole first turn came from the cache
    assert two.prompt_tokens > one.prompt_tokens + len(one.token_ids)


def test_stream_yields_the_answer_in_pieces(ort_engine, clips12):
    clip = ort_engine.clip(clips12[4]["path"])
    want = clip.ask(QUESTIONS[0], SAMPLING).text
    assert "".join(clip.stream(QUESTIONS[0], SAMPLING)).strip() == want


def test_cli_ask_many_questions_and_chat(demo_engine, clips12):
    path = clips12[5]["path"]
    proc = run_cli("ask", path, QUESTIONS[0], "-q", QUESTIONS[1], "--engine", demo_engine, "--json")
    assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.splitlines())
    assert first["reused_tokens"] == 0 and second["reused_tokens"] > 0
    assert second["timings_ms"]["decode_video"] == 0
    import subprocess
    import sys

    chat = subprocess.run([sys.executable, "-m", "blip3v.cli", "chat", str(path), "--engine", str(demo_engine), "--json"],
                          input=f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}\n", capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    turns = [json.loads(line) for line in chat.stdout.splitlines()]
    assert [t["question"] for t in turns] == list(QUESTIONS[:2])
    assert turns[1]["reused_tokens"] >= turns[0]["prompt_tokens"]


@pytest.mark.parametrize("args, fragment", [
    (("--temperature", "nan"), "nan"),
    (("--seed", "-1"), "seed"),
    (("-q", "<image> what is it?"), "<image>"),
])
def test_bad_options_and_questions_are_one_line_errors(args, fragment, clips12):
    from conftest import assert_one_line_error

    question = () if "-q" in args else ("what is it?",)
    assert_one_line_error(run_cli("ask", clips12[0]["path"], *question, *args), fragment)


def test_an_engine_of_nan_embeddings_resealed_to_match_is_a_one_line_error(demo_engine, clips12, tmp_path):
    """Hashes cannot stop an edit whose author rewrites them: the decode loop stops on non-finite logits."""
    import shutil

    from blip3v.runtime.manifest import file_entries, read_manifest_file, write_manifest
    from conftest import assert_one_line_error

    engine = tmp_path / "nan-engine"
    shutil.copytree(demo_engine, engine)
    raw = read_manifest_file(engine / "manifest.json")
    table = engine / raw["embeddings"]["file"]
    rows = np.load(table)
    np.save(table, np.full_like(rows, np.nan))
    raw["files"].update(file_entries(engine, [raw["embeddings"]["file"]]))
    write_manifest(engine, raw)  # sealed again: the engine verifies
    assert_one_line_error(run_cli("ask", clips12[0]["path"], "what colour is the circle?", "--engine", engine),
                          "non-finite")


def test_invalid_utf8_question_is_a_one_line_error(clips12):
    import os
    import subprocess
    import sys

    from conftest import assert_one_line_error

    proc = subprocess.run([sys.executable, "-m", "blip3v.cli", "ask", str(clips12[0]["path"]).encode(), b"what \xff?"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert_one_line_error(proc, "utf-8")


def test_the_shipped_demo_engine_answers_as_the_demo_model(clips12):
    """`blip3v ask` without --model/--engine runs blip3v/assets/demo-engine: it must stay the demo
    model's export (re-export it when the model or the exporter changes)."""
    from blip3v.assets import DEMO_ENGINE, DEMO_MODEL
    from blip3v.runtime.manifest import load_manifest

    manifest = load_manifest(DEMO_ENGINE)  # hashes verified
    assert manifest.raw["export"]["source"].endswith("demo-model")
    default, reference = Engine.open(), Engine.open(model=DEMO_MODEL)
    assert type(default.host).__name__ == "OrtBackend"
    for row in clips12:
        assert default.ask(row["path"], row["question"], SAMPLING).token_ids == \
            reference.ask(row["path"], row["question"], SAMPLING).token_ids, row["video"]
