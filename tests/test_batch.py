"""`blip3v batch` (blip3v.runtime.batch, blip3v.runtime.batch_ray): a corpus of real clips through
the real CLI, on one machine and on a real local Ray cluster (2 CPUs), against the answers of
`blip3v ask` (one Clip per video, questions through the session API) and of `blip3v eval` (the
batched fresh path, `Engine.answer_batch`), greedy, text for text.

The default run: 12 synthetic clips x 2 questions plus 2 broken files, with and without --ray; a run
killed with SIGKILL and restarted; a decoding worker killed mid-run; the output file's journal and
Parquet merge; the --videos forms. `-m slow`: the issue's 200 clips x 2 questions, both paths.

    python -m pytest tests/test_batch.py -q
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from blip3v.errors import InputError
from blip3v.runtime.batch import (COLUMNS, ClipTask, Results, VideoSettings, input_order, plan, read_videos,
                                  run_local)
from blip3v.runtime.generation import SamplingConfig
from conftest import assert_one_line_error, run_cli

QUESTIONS = ("how many shapes are there?", "what colour is the circle?")
# Parquet and Ray come with the `batch` extra (CI installs it through `dev`); without it those tests skip.
needs_pyarrow = pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None,
                                   reason="needs pyarrow: pip install 'blip3v[batch]'")
GREEDY = SamplingConfig()  # what `blip3v ask` and `blip3v batch` default to (32 new tokens)
BROKEN = {"zz_text.mp4": b"this is not a video\n", "zz_empty.mp4": b""}


def make_corpus(folder: Path, n: int, seed: int) -> Path:
    """n synthetic clips (qa.jsonl + clips/) and, in clips/, the files of BROKEN."""
    from blip3v.data.synth import write_dataset

    write_dataset(folder, n=n, seed=seed, progress=False)
    for name, data in BROKEN.items():
        (folder / "clips" / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("batch") / "corpus", 12, seed=3)


@pytest.fixture(scope="module")
def engine(demo_engine):
    from blip3v.runtime.session import Engine

    return Engine.open(engine=demo_engine)


def references(engine, clips: list[Path], questions: tuple[str, ...]) -> tuple[dict, dict]:
    """-> ({(clip, q): answer} as `blip3v ask` gives it, the same as `blip3v eval`'s path gives it)."""
    ask, fresh = {}, {}
    for path in clips:
        clip = engine.clip(path)
        for q in questions:
            ask[(str(path), q)] = clip.ask(q, GREEDY).text
    for start in range(0, len(clips), 16):
        chunk = clips[start:start + 16]
        pixels = np.stack([engine.load_video(p) for p in chunk])  # (B, T, 3, S, S)
        for q in questions:
            for path, ids in zip(chunk, engine.answer_batch(pixels, [q] * len(chunk), GREEDY)):
                fresh[(str(path), q)] = engine.decode(ids)
    return ask, fresh


@pytest.fixture(scope="module")
def expected(engine, corpus) -> dict:
    clips = sorted((corpus / "clips").glob("0*.mp4"))
    ask, fresh = references(engine, clips, QUESTIONS)
    assert ask == fresh  # ask (prefix reused) and eval (fresh, batched) agree on these clips
    assert len(set(ask.values())) >= 3, ask  # the answers depend on the clip: the comparison means something
    return ask


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_rows(rows: list[dict], expected: dict, corpus: Path, questions=QUESTIONS) -> None:
    """Every (clip, question) exactly once; answers as expected; the broken files as error rows."""
    keys = [(r["video"], r["question"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    broken = {str(corpus / "clips" / name) for name in BROKEN}
    assert {k for k in keys if k[0] in broken} == {(b, q) for b in broken for q in questions}
    for row in rows:
        assert list(row) == list(COLUMNS)
        if row["video"] in broken:
            assert row["answer"] is None and Path(row["video"]).name in row["error"], row
            continue
        assert row["error"] is None, row
        assert row["answer"] == expected[(row["video"], row["question"])], row
        assert row["generate_ms"] > 0 and row["prefill_ms"] > 0 and row["prompt_tokens"] > 0
    answered = {k for k in keys if k[0] not in broken}
    assert answered == set(expected)
    first = {}  # a clip's decode and visual cost is on its first row, 0 on the next
    for row in rows:
        if row["error"] is None:
            first.setdefault(row["video"], row)
    assert all(r["decode_video_ms"] > 0 and r["visual_ms"] > 0 for r in first.values())


def batch_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    args = ["batch", "--videos", str(corpus / "clips"), "--out", str(out), "--quiet", "--json"]
    for q in QUESTIONS:
        args += ["-q", q]
    return args + list(extra)


# --------------------------------------------------------------------------- end to end


def test_local_batch_answers_as_ask_and_eval(corpus, demo_engine, expected, tmp_path):
    out = tmp_path / "answers.jsonl"
    proc = run_cli(*batch_args(corpus, out, "--engine", str(demo_engine), "--workers", "1"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["rows"] == 14 * 2 and summary["errors"] == 2 * 2 and summary["clips"] == 14
    assert summary["skipped"] == 0 and summary["clips_per_s"] > 0
    check_rows(read_rows(out), expected, corpus)

    # `blip3v ask --json` itself on one clip, both questions: the same answers.
    clip = corpus / "clips" / "00003.mp4"
    proc = run_cli("ask", str(clip), *QUESTIONS, "--engine", str(demo_engine), "--json")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["answer"] for line in proc.stdout.splitlines()] == \
        [expected[(str(clip), q)] for q in QUESTIONS]

    # A rerun finds every row done and writes nothing.
    before = out.read_bytes()
    proc = run_cli(*batch_args(corpus, out, "--engine", str(demo_engine)))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows"] == 0 and json.loads(proc.stdout)["skipped"] == 28
    assert out.read_bytes() == before


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs, shut down after the module's tests."""
    ray = pytest.importorskip("ray", reason="needs Ray: pip install 'blip3v[batch]'")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_ray_batch_answers_as_ask_and_eval(corpus, demo_engine, expected, ray_cluster, tmp_path):
    out = tmp_path / "answers.parquet"
    proc = run_cli(*batch_args(corpus, out, "--engine", str(demo_engine), "--ray-address", ray_cluster,
                               "--ray-batch-size", "3"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["rows"] == 28 and summary["errors"] == 4 and summary["clips"] == 14
    rows = read_rows(out)
    check_rows(rows, expected, corpus)
    # Parquet rows come out in input order: clips sorted by path, questions as given.
    assert [(r["video"], r["question"]) for r in rows] == sorted(
        ((r["video"], r["question"]) for r in rows), key=lambda k: (k[0], QUESTIONS.index(k[1])))
    assert not out.with_name(out.name + ".journal.jsonl").exists()


def wait_for_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        time.sleep(0.02)
    raise AssertionError(f"no {n} rows in {path} after {timeout} s")


@pytest.mark.parametrize("suffix", [pytest.param(".parquet", marks=needs_pyarrow),
                                    pytest.param(".jsonl", marks=pytest.mark.slow)])
def test_killed_run_resumes_without_redoing_rows(corpus, demo_engine, expected, tmp_path, suffix):
    """SIGKILL mid-run (the whole process group: driver and decoding workers), then the same command:
    every (video, question) exactly once, the rows written before the kill kept as they were."""
    out = tmp_path / f"answers{suffix}"
    journal = out if suffix == ".jsonl" else out.with_name(out.name + ".journal.jsonl")
    # --in-flight 1: one clip decoded ahead, so the run is still going when the first rows land.
    args = batch_args(corpus, out, "--engine", str(demo_engine), "--workers", "1", "--in-flight", "1")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "blip3v.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        wait_for_rows(journal, 4, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    lines = journal.read_text().split("\n")[:-1]  # complete lines only: a cut-off last one is dropped on rerun
    before = [json.loads(line) for line in lines if line.strip()]
    assert 4 <= len(before) < 28, len(before)
    assert not out.exists() or suffix == ".jsonl"  # the Parquet is written at the end only

    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["skipped"] == len(before) and summary["rows"] == 28 - len(before)
    rows = read_rows(out)
    check_rows(rows, expected, corpus)
    by_key = {(r["video"], r["question"]): r for r in rows}
    for row in before:  # not redone: the same row, timings and all
        assert by_key[(row["video"], row["question"])] == row
    assert not journal.exists() or suffix == ".jsonl"


@pytest.mark.parametrize("parallel", [False, True], ids=["encode-here", "encode-side-by-side"])
def test_killed_decoding_worker_costs_only_a_retry(corpus, engine, demo_engine, expected, tmp_path, parallel):
    """A decoding process that dies (here: SIGKILL from outside) breaks the process pool; the clips
    in flight are decoded again, one at a time, and none is lost or turned into an error row. Also
    with the clips encoded in threads side by side (an engine opened with `parallel_clips`, as
    `blip3v batch` opens it on the CPU)."""
    import multiprocessing

    if parallel:
        from blip3v.runtime.ort_backend import OrtBackend
        from blip3v.runtime.session import Engine

        engine = Engine(OrtBackend.load(demo_engine, spinning=False, parallel_clips=True))
        assert engine.host.encode_workers >= 2
    videos = read_videos(str(corpus / "clips"), QUESTIONS)
    settings = VideoSettings.of_host(engine.host)
    out = tmp_path / "answers.jsonl"
    outcome: dict = {}
    with Results(out) as results:
        def work():
            try:
                outcome["summary"] = run_local(plan(videos, results.done), settings, lambda: engine, GREEDY, results,
                                               workers=1, in_flight=4, progress=False)
            except BaseException as exc:  # noqa: BLE001 (reported by the test thread)
                outcome["error"] = exc

        thread = threading.Thread(target=work)
        thread.start()
        end = time.monotonic() + 60
        while not (out.exists() and out.read_bytes().count(b"\n") >= 2) and time.monotonic() < end:
            time.sleep(0.01)
        workers = [p for p in multiprocessing.active_children() if p.is_alive()]
        assert workers, "no decoding process to kill"
        os.kill(workers[0].pid, signal.SIGKILL)
        thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary.decoder_restarts >= 1 and summary.rows == 28 and summary.errors == 4
    check_rows(read_rows(out), expected, corpus)


def test_video_options_reach_the_decoding_workers(engine, demo_engine, tmp_path):
    """A video option of every answering command (here --aspect pad) is how the workers read frames
    too: the pixels equal the engine's own load_video with that option (and differ from the
    default's on a wide clip), and the answer equals `blip3v ask --aspect pad`."""
    from dataclasses import replace

    from blip3v.data.synth import write_mp4
    from blip3v.runtime.batch import decode_clip

    frames = np.random.default_rng(0).integers(0, 255, (12, 48, 96, 3), dtype=np.uint8)  # (T, H, W, 3), wide
    clip = tmp_path / "clips" / "wide.mp4"
    clip.parent.mkdir()
    write_mp4(clip, frames)
    squash = VideoSettings.of_host(engine.host)
    pad = replace(squash, options=(("aspect", "pad"),))
    got = decode_clip(str(clip), pad).pixels
    saved = engine.host.video_options
    engine.host.video_options = {"aspect": "pad"}
    try:
        want = engine.host.load_video(clip)
    finally:
        engine.host.video_options = saved
    assert np.array_equal(got, want) and not np.array_equal(got, decode_clip(str(clip), squash).pixels)

    out = tmp_path / "answers.jsonl"
    proc = run_cli("batch", "--videos", str(clip.parent), "-q", QUESTIONS[0], "--out", str(out), "--engine",
                   str(demo_engine), "--aspect", "pad", "--workers", "1", "--quiet", "--json")
    assert proc.returncode == 0, proc.stderr  # an option the workers missed would be an EngineError here
    ask = run_cli("ask", str(clip), QUESTIONS[0], "--engine", str(demo_engine), "--aspect", "pad", "--json")
    assert ask.returncode == 0, ask.stderr
    assert read_rows(out)[0]["answer"] == json.loads(ask.stdout)["answer"]


def test_a_question_too_long_is_an_error_row(corpus, engine, expected, tmp_path):
    """A question the model cannot take fails its own rows only (decoding in this process: workers=0)."""
    long = "is it " + "very " * 2000 + "red?"
    clips = sorted((corpus / "clips").glob("0000[01].mp4"))
    videos = read_videos(str(clips[0].parent / "0000[01].mp4"), [long, QUESTIONS[0]])
    with Results(tmp_path / "answers.jsonl") as results:
        summary = run_local(plan(videos, results.done), VideoSettings.of_host(engine.host), lambda: engine, GREEDY,
                            results, workers=0, progress=False)
    rows = read_rows(tmp_path / "answers.jsonl")
    assert summary.rows == 4 and summary.errors == 2
    for r in rows:
        if r["question"] == long:
            assert r["answer"] is None and "exceeds the model's context" in r["error"], r
        else:
            assert r["answer"] == expected[(r["video"], r["question"])] and r["error"] is None


@pytest.mark.slow
@needs_pyarrow
@pytest.mark.parametrize("use_ray", [False, True], ids=["local", "ray"])
def test_200_clips_two_questions(demo_engine, engine, tmp_path_factory, use_ray, request):
    """The issue's acceptance run: 200 synthetic clips x 2 questions + 2 broken files."""
    corpus = make_corpus(tmp_path_factory.mktemp("batch200") / "corpus", 200, seed=1)
    clips = sorted((corpus / "clips").glob("0*.mp4"))
    ask, fresh = references(engine, clips, QUESTIONS)
    assert ask == fresh
    out = tmp_path_factory.mktemp("out") / "answers.parquet"
    extra = ["--engine", str(demo_engine)]
    if use_ray:
        extra += ["--ray-address", request.getfixturevalue("ray_cluster"), "--ray-batch-size", "8"]
    proc = run_cli(*batch_args(corpus, out, *extra), timeout=1800)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows"] == 202 * 2
    check_rows(read_rows(out), ask, corpus)


# --------------------------------------------------------------------------- pieces


@needs_pyarrow
def test_videos_argument_forms(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    clips = tmp_path / "data" / "clips"
    (clips / "sub").mkdir(parents=True)
    (clips / ".hidden").mkdir()
    for name in ("b.mp4", "a.MKV", "sub/c.webm", ".hidden/d.mp4", "notes.txt", "frame.png"):
        (clips / name).write_bytes(b"x")
    folder = read_videos(str(clips), ["q1"])
    assert list(folder) == [str(clips / n) for n in ("a.MKV", "b.mp4", "sub/c.webm")]
    assert read_videos(str(clips / "*.mp4"), ["q1"]) == {str(clips / "b.mp4"): ["q1"]}

    # A list: paths relative to its folder, a per-row question before the common ones, no duplicates.
    rows = [{"video": "clips/b.mp4", "question": "q2"}, {"video": "clips/b.mp4", "question": "q1"},
            {"path": str(clips / "a.MKV")}]
    (tmp_path / "data" / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    want = {os.path.join(str(tmp_path / "data"), "clips/b.mp4"): ["q2", "q1"], str(clips / "a.MKV"): ["q1"]}
    assert read_videos(str(tmp_path / "data" / "list.jsonl"), ["q1"]) == want
    (tmp_path / "data" / "list.csv").write_text("video,question\nclips/b.mp4,q2\nclips/b.mp4,q1\n"
                                                f"{clips / 'a.MKV'},\n")
    assert read_videos(str(tmp_path / "data" / "list.csv"), ["q1"]) == want
    pq.write_table(pa.Table.from_pylist([{"video": r.get("video") or r["path"], "question": r.get("question")}
                                         for r in rows]), tmp_path / "data" / "list.parquet")
    assert read_videos(str(tmp_path / "data" / "list.parquet"), ["q1"]) == want

    with pytest.raises(InputError, match="no question for"):
        read_videos(str(clips))
    with pytest.raises(InputError, match="matches no file"):
        read_videos(str(clips / "*.avi"), ["q"])
    (tmp_path / "bad.jsonl").write_text('{"video": "a.mp4"}\n{"clip": "b.mp4"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: no `video`"):
        read_videos(str(tmp_path / "bad.jsonl"), ["q"])
    with pytest.raises(InputError, match="no such file, folder or list"):
        read_videos(str(tmp_path / "missing"), ["q"])


def row(video: str, question: str, answer: str | None = "yes") -> dict:
    return {"video": video, "question": question, "answer": answer, "error": None if answer else "broken",
            "finish_reason": "stop", "decode_video_ms": 1.0, "visual_ms": 2.0, "prefill_ms": 3.0,
            "generate_ms": 4.0, "prompt_tokens": 10, "reused_tokens": 0}


def test_journal_drops_a_cut_off_line_and_refuses_other_files(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = json.dumps(row("a.mp4", "q")) + "\n"
    out.write_text(whole + json.dumps(row("b.mp4", "q"))[:40])  # killed in the middle of a write
    with Results(out) as results:
        assert set(results.done) == {("a.mp4", "q")}
        assert out.read_text() == whole  # cut back to the last complete line
        results.write([row("b.mp4", "q"), row("c.mp4", "q", None)])
    with Results(out) as results:
        assert set(results.done) == {("a.mp4", "q"), ("b.mp4", "q"), ("c.mp4", "q")}
    with Results(out, retry_errors=True) as results:  # error rows are redone, and leave the file
        assert set(results.done) == {("a.mp4", "q"), ("b.mp4", "q")}
    assert len(read_rows(out)) == 2

    qa = tmp_path / "qa.jsonl"  # someone else's JSONL is not taken as done rows, nor cut
    qa.write_text('{"video": "a.mp4", "question": "q", "answer": "x"}\n{"video": "b.mp4"')
    with pytest.raises(InputError, match="not a row of `blip3v batch` output"):
        Results(qa)
    text = tmp_path / "notes.jsonl"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a JSON row"):
        Results(text)
    assert text.read_text() == "hello"


@needs_pyarrow
def test_parquet_merges_its_journal_after_a_kill(tmp_path):
    out = tmp_path / "out.parquet"
    videos = {"a.mp4": ["q1", "q2"], "b.mp4": ["q1", "q2"]}
    with Results(out) as results:
        results.write([row("b.mp4", "q1"), row("a.mp4", "q1")])
        results.finish(input_order(videos))
    assert [(r["video"], r["question"]) for r in read_rows(out)] == [("a.mp4", "q1"), ("b.mp4", "q1")]
    # A later run killed after its journal got rows (one of them also in the Parquet: killed between
    # the rename and the journal's removal), with a half-written temporary file left behind.
    journal = out.with_name(out.name + ".journal.jsonl")
    journal.write_text(json.dumps(row("a.mp4", "q1")) + "\n" + json.dumps(row("a.mp4", "q2")) + "\n")
    stale = tmp_path / f".{out.name}.tmp-999"
    stale.write_bytes(b"PAR1 half")
    with Results(out) as results:
        assert not stale.exists()
        assert [t.questions for t in plan(videos, results.done)] == [("q2",)]
        results.write([row("b.mp4", "q2")])
        results.finish(input_order(videos))
    assert [(r["video"], r["question"]) for r in read_rows(out)] == [
        ("a.mp4", "q1"), ("a.mp4", "q2"), ("b.mp4", "q1"), ("b.mp4", "q2")]
    assert not journal.exists()


def test_one_writer_per_output(tmp_path):
    out = tmp_path / "out.jsonl"
    with Results(out):
        with pytest.raises(InputError, match="another `blip3v batch` is writing it"):
            Results(out)
    Results(out).close()  # free again


def test_plan_skips_done_rows():
    videos = {"a.mp4": ["q1", "q2"], "b.mp4": ["q1"]}
    tasks = plan(videos, {("a.mp4", "q1"), ("b.mp4", "q1")})
    assert tasks == [ClipTask("a.mp4", os.path.abspath("a.mp4"), ("q2",))]


def test_cli_errors_are_one_line(tmp_path, corpus):
    clips = str(corpus / "clips")
    assert_one_line_error(run_cli("batch", "--videos", clips, "-q", "q", "--out", str(tmp_path / "o.csv")),
                          ".jsonl or .parquet")
    assert_one_line_error(run_cli("batch", "--videos", clips, "--out", str(tmp_path / "o.jsonl")), "no question for")
    assert_one_line_error(run_cli("batch", "--videos", clips, "-q", " ", "--out", str(tmp_path / "o.jsonl")),
                          "question is empty")
    assert_one_line_error(run_cli("batch", "--videos", str(tmp_path / "nope"), "-q", "q", "--out",
                                  str(tmp_path / "o.jsonl")), "no such file")
    assert_one_line_error(run_cli("batch", "--videos", clips, "-q", "q", "--out", str(tmp_path / "none" / "o.jsonl")),
                          "does not exist")
    assert_one_line_error(run_cli("batch", "--videos", str(corpus / "qa.jsonl"), "--out", str(corpus / "qa.jsonl")),
                          "is the --videos list itself")
    assert_one_line_error(run_cli("batch", "--videos", clips, "-q", "q", "--out", str(tmp_path / "o.jsonl"),
                                  "--engine", str(tmp_path / "no-engine")), "no-engine")
    assert not list(tmp_path.iterdir())  # no output, journal or lock file left by a run that never started
