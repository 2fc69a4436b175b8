"""Live video (blip3v.runtime.live over export/split.py's frame.onnx + temporal.onnx).

- The split graphs' video tokens equal the fused visual graph's on the same T frames (max abs diff
  <= 1e-4, fp32), on ONNX Runtime and on the PyTorch backend's split.
- A LiveSession fed a clip's T frames answers as the full-clip path (`Engine.clip` + ask) does,
  greedy, token for token: 10 held-out clips by default, 200 under `-m slow`.
- Sampler, queue (drops the oldest, counted), ring buffer and stream clock on their own.
- Sources: a file played in real time and a stream served by ffmpeg on loopback (UDP MPEG-TS),
  answered by `blip3v live` in a subprocess; a dropped stream is reconnected; missing files,
  cameras, unknown schemes and unreachable streams are one-line errors; an engine exported before
  the split graphs says it needs re-exporting.
- Memory: `-m slow` pushes 10,000 frames and checks resident memory grows by less than 5 %.

The stream tests need the ffmpeg binary (apt-get install -y ffmpeg) and are skipped without it.

    python -m pytest tests/test_live.py -q
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from blip3v.assets import SAMPLE_CLIP
from blip3v.errors import EngineError, InputError
from blip3v.runtime.generation import SamplingConfig
from blip3v.runtime.live import (FrameQueue, FrameSampler, LatentRing, LiveSession, Source, SourceOptions,
                                 StreamClock)
from blip3v.runtime.session import Engine
from conftest import assert_one_line_error, held_out, run_cli

SAMPLING = SamplingConfig(max_new_tokens=8)
QUESTION = "what colour does the square turn?"
FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg binary to serve a stream "
                                                         "(apt-get install -y ffmpeg)")


@pytest.fixture(scope="module")
def clips10(tmp_path_factory) -> list[dict]:
    return held_out(tmp_path_factory, 10)


# ----------------------------------------------------------------------------------- split graphs


def test_split_graphs_video_tokens_match_the_fused_graph(ort_engine, clips10):
    host = ort_engine.host
    worst = 0.0
    for row in clips10[:3]:  # all 10 (and 200 under -m slow) in live_answers_equal_full_clip
        pixels = host.load_video(row["path"])  # (T, 3, S, S)
        fused = host.encode_video(pixels[None])  # (1, M, D)
        for latents in (host.encode_frames(pixels), np.concatenate([host.encode_frames(f[None]) for f in pixels])):
            assert latents.shape[0] == host.num_frames  # (T, N, D_vis): all T in one call, or one by one
            split = host.encode_temporal(latents[None])
            assert split.shape == fused.shape
            worst = max(worst, float(np.abs(split - fused).max()))
    assert worst <= 1e-4, worst
    # The manifest names them, and export recorded its own check against PyTorch.
    validation = host.manifest["export"]["validation"]
    assert validation["chain_max_abs_diff"] <= 1e-4 and validation["frame_max_abs_diff"] <= 1e-4
    assert host.manifest["frame"]["file"] == "frame.onnx" and host.manifest["temporal"]["num_frames"] == host.num_frames


def test_torch_backend_has_the_same_split(clips10):
    import torch

    from blip3v.assets import DEMO_MODEL

    host = Engine.open(model=DEMO_MODEL).host  # the shipped demo model on the PyTorch backend
    pixels = host.load_video(clips10[0]["path"])
    with torch.inference_mode():
        fused = host.encode_video(pixels[None]).numpy()
    latents = host.encode_frames(pixels)
    assert isinstance(latents, np.ndarray) and latents.shape[0] == host.num_frames
    split = host.encode_temporal(latents[None]).numpy()
    assert float(np.abs(split - fused).max()) <= 1e-5


def live_answers_equal_full_clip(engine: Engine, rows: list[dict]) -> tuple[list[str], float]:
    """Each row's T frames through a LiveSession (sampler, queue, background encoder, ring, temporal
    graph) against `Engine.clip(path).ask`: -> (the rows whose greedy answers differ, the largest
    video-token difference between the split graphs and the fused one on those frames)."""
    from blip3v.runtime.video import read_frames

    host = engine.host
    differences, worst = [], 0.0
    for row in rows:
        pixels = host.load_video(row["path"])  # (T, 3, S, S)
        latents = np.concatenate([host.encode_frames(frame[None]) for frame in pixels])  # one at a time, as they arrive
        split = host.encode_temporal(latents[None])
        worst = max(worst, float(np.abs(split - host.encode_video(pixels[None])).max()))
        want = Engine(host).clip(row["path"]).ask(row["question"], SAMPLING)
        frames = read_frames(row["path"], engine.host.num_frames)  # the frames the clip path picks
        with LiveSession(engine, fps=None) as live:
            for i, frame in enumerate(frames):
                live.push(frame, t=i / 4, block=True)
            live.end()
            got = live.ask(row["question"], SAMPLING)
        assert got.window == (0.0, (len(frames) - 1) / 4) and got.frames == len(frames)
        if got.token_ids != want.token_ids:
            differences.append(f"{row['video']}: live {got.text!r}, full clip {want.text!r}")
    return differences, worst


def test_live_answers_equal_the_full_clip_path(ort_engine, clips10):
    differences, worst = live_answers_equal_full_clip(ort_engine, clips10)
    assert not differences and worst <= 1e-4, (differences, worst)


@pytest.mark.slow
def test_live_answers_equal_the_full_clip_path_on_200_held_out_clips(ort_engine, tmp_path_factory):
    differences, worst = live_answers_equal_full_clip(ort_engine, held_out(tmp_path_factory, 200))
    print(f"200 held-out clips: {len(differences)} different answers, video tokens max abs diff {worst:.2e}")
    assert not differences and worst <= 1e-4, (differences, worst)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["none", "mean", "tl", "gttm", "gttm_tl"])
def test_split_graphs_export_for_every_temporal_encoder(kind, tmp_path):
    import torch

    from blip3v.export import engine, split
    from blip3v.model.config import preset
    from blip3v.model.xgenmm import XGenMMVideoModel

    torch.manual_seed(0)
    model = XGenMMVideoModel(preset(f"tiny-{kind.replace('_', '-')}")).eval()
    frames = model.config.num_frames
    golden, visual = split.split_golden(model, frames), engine.visual_golden(model, frames)
    split.export_split(model, tmp_path, frames, engine.DEFAULT_OPSET)
    diffs = split.check_split(tmp_path, golden, visual, "fp32", np.dtype("float32"))  # raises out of tolerance
    assert max(diffs.values()) <= 1e-4


def test_an_engine_without_split_graphs_says_to_re_export(demo_engine, tmp_path):
    from blip3v.runtime.manifest import load_manifest, write_manifest

    old = tmp_path / "old-engine"
    shutil.copytree(demo_engine, old)
    raw = dict(load_manifest(old).raw)
    for name in ("frame", "temporal"):
        raw.pop(name)
        (old / f"{name}.onnx").unlink()
    raw["files"] = {k: v for k, v in raw["files"].items() if k not in ("frame.onnx", "temporal.onnx")}
    raw.pop("manifest_sha256", None)
    write_manifest(old, raw)
    engine = Engine.open(engine=old)  # still loads, and answers clips
    assert engine.ask(SAMPLE_CLIP, QUESTION, SAMPLING).text
    with pytest.raises(EngineError, match="re-export"):
        LiveSession(engine)
    proc = run_cli("live", SAMPLE_CLIP, "--engine", old, "-q", QUESTION)
    assert_one_line_error(proc, "re-export")


# ----------------------------------------------------------------------------------- the parts


def test_sampler_keeps_one_frame_per_period():
    sampler = FrameSampler(4.0)
    times = [i / 12 for i in range(24)]  # a 2 s clip at 12 fps
    kept = [t for t in times if sampler.take(t)]
    assert np.allclose(kept, [i / 4 for i in range(8)])
    late = FrameSampler(4.0)
    assert [t for t in (0, 1, 5, 5.1, 5.2, 5.26) if late.take(t)] == [0, 1, 5, 5.26]  # a gap restarts the grid
    every = FrameSampler(None)
    assert all(every.take(t) for t in (0, 0, 0.001))
    with pytest.raises(InputError):
        FrameSampler(0.0)


def test_queue_drops_the_oldest_and_counts_it():
    queue = FrameQueue(3, threading.Condition())
    for i in range(7):
        queue.put(i)
    assert list(queue.items) == [4, 5, 6] and queue.dropped == 4
    assert queue.take(2, timeout=0) == [4, 5] and queue.in_flight == 2 and not queue.drained
    queue.done(2)
    assert queue.take(5, timeout=0) == [6]
    queue.done(1)
    assert queue.drained


def test_ring_keeps_the_last_t_frames_in_order():
    ring = LatentRing(3)
    ring.add(np.arange(2, dtype=np.float32)[:, None, None] * np.ones((1, 2, 4), np.float32), [0.0, 1.0])
    latents, times = ring.snapshot()
    assert latents.shape == (2, 2, 4) and list(times) == [0.0, 1.0]
    size = ring.nbytes()
    for k in range(2, 9):
        ring.add(np.full((1, 2, 4), k, np.float32), [float(k)])
    latents, times = ring.snapshot()
    assert list(times) == [6.0, 7.0, 8.0] and list(latents[:, 0, 0]) == [6.0, 7.0, 8.0]
    assert ring.nbytes() == size  # allocated once


def test_stream_clock_is_continuous_across_reconnects_and_jumps():
    clock = StreamClock()
    assert [round(clock.time(p), 3) for p in (1.4, 1.5, 1.6)] == [0.0, 0.1, 0.2]  # from the first frame
    clock.reconnected()
    t = clock.time(500.0)  # a new connection's timestamps start anywhere
    assert 0.2 < t < 1.0
    assert round(clock.time(500.5) - t, 3) == 0.5
    before = clock.time(501.0)
    after = clock.time(10.0)  # a jump backwards: continues from where it was
    assert before < after < before + 1.0


def test_encoder_falling_behind_drops_the_oldest_frames(ort_engine):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (40, 48, 64, 3), dtype=np.uint8)
    with LiveSession(ort_engine, fps=None, queue=2) as live:
        with live.compute:  # the encoder is busy (as with a slow model): frames pile up
            for i, frame in enumerate(frames):
                live.push(frame, t=float(i))
        live.end()  # no more frames: answer over what was kept
        answer = live.ask(QUESTION, SAMPLING)
        counts = live.counts()
    assert counts["frames_seen"] == counts["frames_sampled"] == 40
    assert counts["frames_encoded"] + counts["frames_dropped"] == 40
    assert counts["frames_dropped"] >= 40 - 2 - live.batch  # all but the queue and one batch taken before
    assert answer.window[1] == 39.0  # the newest frames were kept
    assert answer.frames == counts["frames_encoded"] and answer.text


# ----------------------------------------------------------------------------------- sources and CLI


def test_source_errors_are_one_line(demo_engine, tmp_path):
    sample = SAMPLE_CLIP
    cases = [
        ((tmp_path / "missing.mp4",), "no such file"),
        (("/dev/video97",), "no such camera"),
        ((SAMPLE_CLIP, "--format", "v4l2"), "not a camera"),
        (("gopher://127.0.0.1/x",), "unknown stream scheme"),
        ((f"http://127.0.0.1:{free_port(socket.SOCK_STREAM)}/live.ts", "--timeout", "3"), "cannot open live source"),
        ((sample, "--fps", "2", "--window", "2"), "not both"),
        ((sample, "--reconnect", "-1"), "reconnect"),
    ]
    for args, fragment in cases:
        assert_one_line_error(run_cli("live", *args, "--engine", demo_engine, "-q", QUESTION), fragment)
    for bad in ("/dev/video97", "gopher://x"):
        with pytest.raises(InputError):
            Source(bad)


def test_cli_file_source_in_real_time_and_from_stdin(demo_engine):
    sample = SAMPLE_CLIP  # 2 s, 24 frames at 12 fps
    proc = run_cli("live", sample, "--engine", demo_engine, "--window", "2", "-q", QUESTION, "--every", "0.5",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert answers, proc.stdout
    last = answers[-1]  # the file's last window: T frames sampled at T / 2 s
    assert last["frames"] == 8 and last["window"] == [0.0, 1.75] and last["answer"]
    assert last["frames_seen"] >= 22 and last["frames_encoded"] + last["frames_dropped"] == last["frames_sampled"] == 8
    assert {"temporal", "prefill", "generate", "ttft"} <= set(last["timings_ms"])

    stdin = subprocess.run([sys.executable, "-m", "blip3v.cli", "live", str(sample), "--engine", str(demo_engine),
                            "--window", "2", "--no-realtime"], input=f"{QUESTION}\n\nhow many shapes are there?\n",
                           capture_output=True, text=True, timeout=300)
    assert stdin.returncode == 0, stdin.stderr
    lines = stdin.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("[0.0s-1.8s] ") for line in lines), lines


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_udp(clip: Path, port: int) -> subprocess.Popen:
    """ffmpeg playing `clip` in a loop at its own rate as MPEG-TS to 127.0.0.1:port."""
    return subprocess.Popen([FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip),
                             "-c", "copy", "-f", "mpegts", f"udp://127.0.0.1:{port}?pkt_size=1316"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@needs_ffmpeg
def test_cli_answers_a_udp_stream_served_by_ffmpeg(demo_engine):
    sample = SAMPLE_CLIP
    port = free_port()
    server = serve_udp(sample, port)
    try:
        proc = run_cli("live", f"udp://127.0.0.1:{port}", "--engine", demo_engine, "--window", "2", "-q", QUESTION,
                       "--every", "1", "--count", "2", "--json", "--timeout", "20", timeout=240)
    finally:
        stop(server)
    assert proc.returncode == 0, proc.stderr
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(answers) == 2, proc.stdout
    for a in answers:
        assert a["answer"] and a["frames"] == 8
        t0, t1 = a["window"]
        assert 0 <= t0 < t1 and 1.0 <= t1 - t0 <= 4.0  # T frames at 4 a second (wider if some dropped)
    # The stream went on between the questions; the window moves on with it unless the encoder fell
    # behind for that second (a loaded machine), when the next question answers the same frames.
    assert answers[1]["frames_seen"] > answers[0]["frames_seen"]
    assert answers[1]["window"][1] >= answers[0]["window"][1]


@needs_ffmpeg
def test_a_dropped_stream_is_reconnected_then_given_up(ort_engine):
    port = free_port()
    server = serve_udp(SAMPLE_CLIP, port)
    source = Source(f"udp://127.0.0.1:{port}", SourceOptions(timeout=1.0, reconnect=2))
    try:
        with LiveSession(ort_engine, window=2.0) as live:
            live.play(source)
            first = live.ask(QUESTION, SAMPLING, timeout=60)
            stop(server)  # the stream drops: a read times out after 1 s, then reconnect attempts begin
            time.sleep(1.5)
            server = serve_udp(SAMPLE_CLIP, port)
            deadline = time.monotonic() + 60
            while source.reconnects < 1 and time.monotonic() < deadline and live.error is None:
                time.sleep(0.1)
            assert source.reconnects == 1, live.error
            encoded = live.counts()["frames_encoded"]
            while live.counts()["frames_encoded"] < encoded + 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            second = live.ask(QUESTION, SAMPLING, timeout=60)
            assert second.window[1] > first.window[1] + 1.5  # frames after the gap, on one stream clock
            stop(server)  # gone for good: 2 attempts (0.5 s, then 1 s of backoff) and one error line
            with pytest.raises(InputError, match="2 reconnect attempts failed"):
                while time.monotonic() < deadline:
                    live.wait_ready(timeout=1.0)  # raises what stopped the source
                    time.sleep(0.1)
    finally:
        stop(server)


@needs_ffmpeg
@pytest.mark.slow
def test_cli_answers_hls_over_http(demo_engine, tmp_path):
    """An HLS recording (ffmpeg writes the playlist and segments) served over HTTP on loopback,
    paced by its timestamps (--realtime), through PyAV's hls demuxer."""
    import functools
    import http.server

    folder = tmp_path / "hls"
    folder.mkdir()
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-stream_loop", "2", "-i", str(SAMPLE_CLIP), "-c",
                    "copy", "-f", "hls", "-hls_time", "1", "-hls_list_size", "0", str(folder / "live.m3u8")],
                   check=True, timeout=60)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/live.m3u8"
        proc = run_cli("live", url, "--engine", demo_engine, "--window", "2", "--realtime", "--reconnect", "0",
                       "-q", QUESTION, "--every", "1.5", "--count", "2", "--json", timeout=240)
    finally:
        server.shutdown()
        thread.join(10)
    assert proc.returncode == 0, proc.stderr
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(answers) == 2 and all(a["answer"] and a["frames"] == 8 for a in answers), answers
    assert answers[1]["window"][1] > answers[0]["window"][1]


def test_bench_live_reports_both_paths(demo_engine):
    proc = run_cli("bench", "live", "--engine", demo_engine, "--repeats", "1", "--quiet", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["frame_encode_ms"] > 0 and result["frames_per_second"] > 0
    assert result["ttft_live_ms"] > 0 and result["ttft_full_clip_ms"] > 0
    assert result["same_answer"] is True  # the same T frames: the same greedy answer
    assert result["full_clip_ms"]["visual"] > 0 and result["live_ms"]["temporal"] > 0


# ----------------------------------------------------------------------------------- memory


def _rss_mib() -> float:
    from blip3v.benchmarks.bench_live import rss_mib

    return rss_mib()


def test_buffers_stay_bounded(ort_engine):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    with LiveSession(ort_engine, fps=None, queue=4) as live:
        sizes = set()
        for i in range(300):
            live.push(frames[i % 8], t=i / 30)
            assert len(live.queue.items) <= 4
            if i % 30 == 29:
                live.flush()
                sizes.add(live.ring.nbytes())
                assert live.ring.count == min(live.frames, live.counts()["frames_encoded"])
        c = live.counts()
        assert c["frames_encoded"] + c["frames_dropped"] == 300
        assert len(sizes) == 1  # the ring was allocated once


@pytest.mark.slow
def test_resident_memory_grows_less_than_5_percent_over_10000_frames(ort_engine):
    from blip3v.benchmarks.bench_live import memory_run

    result = memory_run(ort_engine, 10_000, 64, log=lambda m: None)
    assert result["frames_encoded"] + result["frames_dropped"] == 10_000
    assert result["growth_pct"] < 5.0, result
