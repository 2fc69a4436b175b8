"""Tests for the fast paths of blip3v.runtime.video: seeking in every container, non-reference
frame skipping, decoder threads, stage timings, prefetching, the decoder/aspect/scaler options.

Each fast path is checked against a plain reference: every frame decoded start to end with PyAV
and the old preprocessing written out here (full-size RGB, Pillow bicubic, (x/255 - mean)/std).

    python -m pytest tests/test_video_speed_paths.py -q          # -m slow adds a long mkv
"""

from __future__ import annotations

import os
import threading
import time

import av
import numpy as np
import pytest
from PIL import Image

from blip3v.data.synth import example_at, write_mp4
from blip3v.errors import InputError
from blip3v.runtime import video
from blip3v.runtime.video import frame_indices, load_clip, prefetch_clips, preprocess, read_frames
from test_video import decode_all, forbid, grey_clip, need_encoder, write_video

T = 8


def bar_frames(count: int, width: int = 64, height: int = 48) -> list[np.ndarray]:
    """Frame i: background 20 + 4 (i % 50), a white bar at x = 5 (i // 50): each frame is unique."""
    frames = []
    for i in range(count):
        frame = np.full((height, width, 3), 20 + 4 * (i % 50), np.uint8)
        frame[:, 5 * (i // 50) : 5 * (i // 50) + 3] = 255
        frames.append(frame)
    return frames


def reference_pixels(path, num_frames: int, size: int, mean=(0.5,) * 3, std=(0.5,) * 3) -> np.ndarray:
    """The pipeline as it was before the fast paths: decode everything, pick, squash, normalise."""
    decoded = decode_all(path)
    picks = [decoded[i] for i in frame_indices(len(decoded), num_frames)]
    resized = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in picks])
    x = resized.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def counting_decoded_frames(monkeypatch) -> list[int]:
    """Counts the frames the seek path's decoders hand over (skipped frames never appear)."""
    count = [0]
    decode_until = video._decode_until

    def counted(frames, target, known=None):
        def each():
            for frame in frames:
                count[0] += 1
                yield frame

        return decode_until(each(), target, known)

    monkeypatch.setattr(video, "_decode_until", counted)
    return count


def counting_opened_containers(monkeypatch) -> list[int]:
    count = [0]
    open_plain = video._open_plain

    def counted(path):
        count[0] += 1
        return open_plain(path)

    monkeypatch.setattr(video, "_open_plain", counted)
    return count


def count_calls(monkeypatch, name: str) -> list[int]:
    """Counts the calls of runtime.video's function `name` (still calling it): [count]."""
    calls, original = [0], getattr(video, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(video, name, counted)
    return calls


def side_by_side(monkeypatch, workers: int) -> None:
    """Up to `workers` decoders read GOPs side by side, whatever the frame size."""
    monkeypatch.setattr(video, "GOP_PARALLEL_MIN_PIXELS", 0)
    monkeypatch.setattr(video, "GOP_WORKERS", workers)


# ---------------------------------------------------------------------------------------------
# Seeking in every container

CONTAINERS = [
    ("mp4", "libx264", {"options": {"g": "30"}}),
    ("mov", "libx264", {"options": {"g": "30"}}),
    ("mkv", "libx264", {"options": {"g": "30"}}),
    ("ts", "libx264", {"options": {"g": "30"}}),
    ("webm", "libvpx-vp9", {"options": {"g": "30"}}),
    ("avi", "mpeg4", {"bit_rate": 4_000_000, "options": {"g": "30"}}),
    ("mkv", "libx265", {"options": {"x265-params": "log-level=none:keyint=30"}}),
]


@pytest.mark.parametrize(("ext", "codec", "kwargs"), CONTAINERS, ids=[f"{e}-{c}" for e, c, _ in CONTAINERS])
def test_seek_path_in_every_container_matches_full_decode(tmp_path, ext, codec, kwargs, monkeypatch):
    # 150 frames, a keyframe every 30, B-frames where the codec uses them: frames are reached by
    # seeking (decode path forbidden) and must be the very frames a full decode gives.
    # Read by one decoder, then by three side by side (each GOP from its own keyframe).
    path = write_video(tmp_path / f"clip.{ext}", bar_frames(150), codec=codec, **kwargs)
    reference = decode_all(path)
    assert len(reference) == 150
    forbid(monkeypatch, "_read_by_decoding")
    opened = counting_opened_containers(monkeypatch)
    for workers in (1, 3):
        side_by_side(monkeypatch, workers)
        opened[0] = 0
        for t in (T, 32):
            want = np.stack([reference[i] for i in frame_indices(150, t)])
            np.testing.assert_array_equal(read_frames(path, t), want)
        # Each read: the first container (index), then one per decoder side by side, and for
        # Matroska the demux pass's own (it runs alongside: see the cue test below).
        assert opened[0] == 2 * (1 if workers == 1 else 1 + workers + (ext in ("mkv", "webm")))


def test_nonreference_frames_are_skipped_exactly(tmp_path, monkeypatch):
    # x264's default B-frames: the middle B of each group is a reference, the others are not.
    path = write_video(tmp_path / "clip.mkv", bar_frames(150), options={"g": "60"})
    reference = decode_all(path)
    count = counting_decoded_frames(monkeypatch)
    for threads in (False, True):
        monkeypatch.setattr(video, "THREAD_MIN_PIXELS", 0 if threads else 1 << 40)
        decoded = {}
        for skip in (True, False):
            monkeypatch.setattr(video, "SKIP_NONREF", skip)
            count[0] = 0
            for t in (T, 32):
                want = np.stack([reference[i] for i in frame_indices(150, t)])
                np.testing.assert_array_equal(read_frames(path, t), want)
            decoded[skip] = count[0]
        assert decoded[True] < 0.8 * decoded[False], decoded


def test_seek_that_lands_late_backs_off_and_skips_to_the_keyframe(tmp_path):
    # A key whose seek time points past it (the next keyframe's): the first two seeks land after
    # it, the back-off lands before it, and the packets up to it are skipped, not decoded.
    path = write_video(tmp_path / "clip.mkv", bar_frames(120), options={"g": "20", "bf": "0"})
    with av.open(path) as container:
        stream = container.streams.video[0]
        table = video._packet_table(container, stream)
        assert len(table.keys) >= 6  # every 20 frames, and where x264 sees a scene cut
        real = table.keys[3]
        bogus = video._Key(table.keys[4].pts, table.keys[4].dts, real.pos)
        keys = table.keys[:3] + [bogus] + table.keys[4:]
        packets = video._seek(container, stream, keys, 3, video._Clock(None))
        first = next(packets)
        assert first.pos == real.pos and first.is_keyframe and first.pts == real.pts


def test_concatenated_ts_with_restarting_timestamps_and_a_new_size(tmp_path, monkeypatch):
    # Two MPEG-TS files back to back (a valid TS): timestamps start over and the frame size
    # changes midway. Timestamps cannot identify frames, so they are counted (decode path).
    first = write_video(tmp_path / "a.ts", bar_frames(40), options={"g": "10"})
    second = write_video(tmp_path / "b.ts", bar_frames(40, 96, 64), options={"g": "10"})
    joined = tmp_path / "joined.ts"
    joined.write_bytes(open(first, "rb").read() + open(second, "rb").read())
    reference = decode_all(joined)
    assert len(reference) == 80 and reference[0].shape != reference[-1].shape
    used = []
    decode = video._read_by_decoding
    monkeypatch.setattr(video, "_read_by_decoding", lambda *a: used.append(1) or decode(*a))
    want = video._stack([reference[i] for i in frame_indices(80, T)])
    np.testing.assert_array_equal(read_frames(joined, T), want)
    assert used == [1]
    # load_clip resizes each distinct frame once, through the same intermediate size.
    np.testing.assert_array_equal(load_clip(joined, T, 16), preprocess(read_frames(joined, T), 16))


# ---------------------------------------------------------------------------------------------
# Same pixels as before, timings


@pytest.fixture(scope="module")
def synthetic_clips(tmp_path_factory) -> list[str]:
    """The demo model's synthetic clips (data/synth.py), 24 frames of 128 px at 12 fps."""
    directory = tmp_path_factory.mktemp("synth")
    paths = []
    for i in range(4):
        path = os.path.join(directory, f"synth-{i}.mp4")
        write_mp4(path, example_at(7, i).frames)
        paths.append(path)
    return paths


def test_default_load_clip_is_bit_exact_with_the_old_pipeline(tmp_path, synthetic_clips):
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for path in synthetic_clips:
        np.testing.assert_array_equal(load_clip(path, T, 64), reference_pixels(path, T, 64))
        np.testing.assert_array_equal(load_clip(path, T, 48, mean, std), reference_pixels(path, T, 48, mean, std))
    big = write_video(tmp_path / "big.mkv", bar_frames(30, 640, 368), options={"g": "10"})  # threaded size
    np.testing.assert_array_equal(load_clip(big, T, 96), reference_pixels(big, T, 96))


def test_load_clip_converts_each_distinct_frame_once(tmp_path):
    still = tmp_path / "still.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)).save(still)
    gif = write_video(tmp_path / "clip.gif", [np.full((24, 32, 3), 40 * (i % 6), np.uint8) for i in range(5)],
                      codec="gif", pix_fmt="rgb8")
    for path in (still, gif, grey_clip(tmp_path / "short.mkv", count=5)):
        np.testing.assert_array_equal(load_clip(path, T, 16), preprocess(read_frames(path, T), 16))


def test_side_by_side_decoders_fall_back_to_the_decode_path(tmp_path, monkeypatch):
    # A surprise in one of the other decoders (here: every frame it looks for) drops the whole
    # read to the decode path, which gives the same frames; without it, the pixels are those of
    # the old pipeline, each frame resized on the thread that decoded it.
    path = write_video(tmp_path / "clip.mp4", bar_frames(150, 96, 64), options={"g": "20"})
    side_by_side(monkeypatch, 2)
    np.testing.assert_array_equal(load_clip(path, T, 32), reference_pixels(path, T, 32))
    frame = video._Reader.frame

    def fails_off_the_calling_thread(self, target, clock):
        if threading.current_thread().name.startswith("blip3v-gop"):
            return None
        return frame(self, target, clock)

    monkeypatch.setattr(video._Reader, "frame", fails_off_the_calling_thread)
    decoded = count_calls(monkeypatch, "_read_by_decoding")
    np.testing.assert_array_equal(load_clip(path, T, 32), reference_pixels(path, T, 32))
    assert decoded[0] == 1


def test_matroska_cue_guess_is_kept_only_when_the_demux_pass_agrees(tmp_path, monkeypatch):
    # The Cues list keyframes only: frames are read from a constant-rate guess while the demux
    # pass runs, and read again from the pass's table when it lists other frames. A dropped frame
    # at 100 (a gap of 80 ms) makes the guess one frame too many, which no decoded frame shows.
    side_by_side(monkeypatch, 2)
    forbid(monkeypatch, "_read_by_decoding")
    reads = count_calls(monkeypatch, "_read_with_table")
    steady = write_video(tmp_path / "steady.mkv", bar_frames(150), options={"g": "30"})
    gap = write_video(tmp_path / "gap.mkv", bar_frames(150), pts=[40 * i + 40 * (i >= 100) for i in range(150)],
                      options={"g": "30"})
    for path, per_read in ((steady, 1), (gap, 2)):
        reference = decode_all(path)
        assert len(reference) == 150
        reads[0] = 0
        for t in (T, 32):
            want = np.stack([reference[i] for i in frame_indices(150, t)])
            np.testing.assert_array_equal(read_frames(path, t), want)
        assert reads[0] == 2 * per_read, path


def test_side_by_side_timings_cover_the_stage_once(tmp_path, monkeypatch):
    # Each decoder times its own parts; they are scaled to the wall time they took together, so
    # the parts never add up to more than the call (a structural property, not a speed check).
    path = write_video(tmp_path / "clip.mp4", bar_frames(150, 96, 64), options={"g": "20"})
    side_by_side(monkeypatch, 3)
    timings = {}
    start = time.perf_counter()
    load_clip(path, T, 32, timings=timings)
    elapsed = (time.perf_counter() - start) * 1e3
    assert set(timings) == set(video.TIMING_KEYS)
    assert all(timings[k] > 0 for k in ("video_open", "video_seek", "video_decode", "video_convert"))
    assert sum(timings.values()) <= elapsed


def test_timings_report_every_part(tmp_path):
    path = write_video(tmp_path / "clip.mkv", bar_frames(60), options={"g": "10"})
    timings = {"decode_video": 1.0}  # the caller's own keys stay
    load_clip(path, T, 32, timings=timings)
    assert set(timings) == {"decode_video", *video.TIMING_KEYS}
    assert all(isinstance(v, float) and v >= 0 for v in timings.values())
    # mkv has no per-frame index: the demux-only pass ran; the clip was opened and decoded.
    assert timings["video_index"] > 0 and timings["video_open"] > 0 and timings["video_decode"] > 0
    image = tmp_path / "still.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    timings = {}
    read_frames(image, 2, timings=timings)
    assert set(timings) == set(video.TIMING_KEYS) and timings["video_decode"] > 0


@pytest.mark.parametrize("height,width", [(128, 128), (48, 64), (1, 1), (65, 63), (360, 640), (300, 40), (7, 500)])
@pytest.mark.parametrize("aspect", ["squash", "pad"])
def test_frames_resized_together_equal_frame_by_frame(height, width, aspect):
    """`_resize_all` (two Pillow calls for all frames) gives `_resize`'s pixels for every frame, bit
    for bit, downscaling and upscaling, including shapes where Pillow 13 runs its vertical pass
    first (300 x 40; resized one by one there)."""
    rng = np.random.default_rng(height * 1000 + width)
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(3)]
    for size in (16, 64, 96):
        together = video._resize_all(frames, size, aspect, (127, 127, 127))
        assert len(together) == 3
        for frame, got in zip(frames, together):
            assert got.shape == (size, size, 3) and got.dtype == np.uint8
            np.testing.assert_array_equal(got, video._resize(frame, size, aspect, (127, 127, 127)))


# ---------------------------------------------------------------------------------------------
# Options


def test_bad_option_values_are_one_line_input_errors(tmp_path):
    path = grey_clip(tmp_path / "clip.mp4")
    for kwargs in ({"decoder": "gpu"}, {"aspect": "crop"}, {"scaler": "opencv"}):
        with pytest.raises(InputError) as caught:
            load_clip(path, T, 16, **kwargs)
        assert "\n" not in str(caught.value) and next(iter(kwargs.values())) in str(caught.value)


def cuda_decoder_works() -> bool:
    return video.hardware_decoder_problem("cuda") is None


def test_cuda_decoder_without_a_gpu_is_one_line_error(tmp_path):
    path = grey_clip(tmp_path / "clip.mp4")
    if cuda_decoder_works():
        got = read_frames(path, T, decoder="cuda")
        np.testing.assert_allclose(got.astype(int), read_frames(path, T).astype(int), atol=2)
        return
    with pytest.raises(InputError) as caught:
        read_frames(path, T, decoder="cuda")
    message = str(caught.value)
    assert "\n" not in message and path in message and "no hardware decoder" in message


def test_auto_decoder_falls_back_with_a_note(tmp_path, capfd):
    path = grey_clip(tmp_path / "clip.mkv")
    notes: list[str] = []
    got = read_frames(path, T, decoder="auto", notes=notes)
    if cuda_decoder_works():
        assert not notes
        np.testing.assert_allclose(got.astype(int), read_frames(path, T).astype(int), atol=2)
    else:
        np.testing.assert_array_equal(got, read_frames(path, T))
        assert len(notes) == 1 and "CPU" in notes[0]
    assert capfd.readouterr().err == ""  # no FFmpeg or Python noise on stderr


def test_cli_says_when_auto_decodes_on_the_cpu(tmp_path):
    """`--video-decoder auto` where no hardware decoder opens: one note on stderr (said off a
    terminal too: the user asked by name), the answer and --json on stdout as without it."""
    import json

    from blip3v.assets import DEMO_ENGINE, SAMPLE_CLIP
    from conftest import run_cli

    proc = run_cli("ask", SAMPLE_CLIP, "what colour is the square?", "--engine", DEMO_ENGINE, "--video-decoder",
                   "auto", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["answer"]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: --video-decoder auto")]
    if cuda_decoder_works():
        assert not notes, proc.stderr
    else:
        assert len(notes) == 1 and "decoding on the CPU" in notes[0], proc.stderr


def pillow_pad_reference(frame: np.ndarray, size: int, colour: tuple[int, int, int]) -> np.ndarray:
    """LLaVA's expand2square, written out with Pillow, then the bicubic squash."""
    image = Image.fromarray(frame)
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return np.asarray(square.resize((size, size), Image.BICUBIC))


def test_aspect_pad_matches_expand2square(tmp_path):
    rng = np.random.default_rng(1)
    for shape in ((20, 40, 3), (41, 16, 3), (16, 16, 3)):
        frames = rng.integers(0, 256, (2, *shape), np.uint8)
        out = preprocess(frames, 24, aspect="pad")
        want = np.stack([pillow_pad_reference(f, 24, (127, 127, 127)) for f in frames])
        np.testing.assert_array_equal(out, ((want.astype(np.float32) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2))
    # Another mean, another grey; the squash default is untouched.
    mean = (0.48145466, 0.4578275, 0.40821073)
    frames = rng.integers(0, 256, (1, 20, 40, 3), np.uint8)
    out = preprocess(frames, 24, mean, (0.25,) * 3, aspect="pad")
    assert np.allclose(out[0, :, 0, 0], 0.0, atol=0.02)  # the band is the mean colour: about 0
    np.testing.assert_array_equal(preprocess(frames, 24), preprocess(frames, 24, aspect="squash"))
    # Through load_clip: the clip's 64x48 frames get bands of (127 - 127.5) / 127.5 at top and bottom.
    path = grey_clip(tmp_path / "clip.mp4")
    pixels = load_clip(path, T, 32, aspect="pad")
    np.testing.assert_array_equal(pixels, preprocess(read_frames(path, T), 32, aspect="pad"))
    assert np.abs(pixels[:, :, :2, :] - (127 / 255 - 0.5) / 0.5).max() < 1e-6


def test_ffmpeg_scaler_is_close_to_pillow(synthetic_clips):
    # The decoder's converter (swscale bicubic on 4:2:0 YUV) against full-size RGB + Pillow
    # bicubic. Measured on 50 synthetic clips: mean 1.2 grey levels, the largest 92 (sharp coloured
    # edges, where chroma is interpolated instead of repeated). Bounds here with some margin.
    diffs = []
    for path in synthetic_clips:
        fast = load_clip(path, T, 64, scaler="ffmpeg")
        exact = load_clip(path, T, 64)
        assert fast.shape == exact.shape and fast.dtype == np.float32
        diffs.append(np.abs(fast - exact) * 127.5)  # grey levels
    diff = np.concatenate([d.ravel() for d in diffs])
    assert diff.mean() < 2.5 and diff.max() <= 110, (diff.mean(), diff.max())


def test_ffmpeg_scaler_rotation_and_pad(tmp_path):
    path = grey_clip(tmp_path / "rotated.mp4", rotation=90)
    fast = load_clip(path, T, 32, scaler="ffmpeg")
    exact = load_clip(path, T, 32)
    assert np.abs(fast - exact).mean() * 127.5 < 3
    # The white marker (top-left of the source) is bottom-left after a 90° turn, in both.
    assert (fast[:, :, -2, 1] > 0.9).all() and (exact[:, :, -2, 1] > 0.9).all()
    padded = load_clip(path, T, 32, scaler="ffmpeg", aspect="pad")  # 48 wide, 64 high after turning
    band = (127 / 255 - 0.5) / 0.5
    assert np.abs(padded[:, :, :, :3] - band).max() < 1e-6 and np.abs(padded[:, :, :, -3:] - band).max() < 1e-6
    assert np.abs(padded - load_clip(path, T, 32, aspect="pad")).mean() * 127.5 < 3


# ---------------------------------------------------------------------------------------------
# Prefetching


def test_prefetch_yields_in_order_with_errors_in_place(tmp_path):
    paths = [grey_clip(tmp_path / f"clip{i}.mp4", count=20 + 5 * i) for i in range(4)]
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video\n" * 20)
    paths.insert(2, str(broken))
    for depth, workers in ((1, 1), (2, 1), (3, 2)):
        got = list(prefetch_clips(paths, T, 16, depth=depth, workers=workers))
        assert [p for p, _ in got] == paths
        for path, result in got:
            if path == str(broken):
                assert isinstance(result, InputError) and str(broken) in str(result)
            else:
                np.testing.assert_array_equal(result, load_clip(path, T, 16))


def test_prefetch_decodes_ahead_while_the_caller_works(tmp_path, monkeypatch):
    paths = [grey_clip(tmp_path / f"clip{i}.mkv") for i in range(4)]
    started: list[str] = []
    finished = threading.Semaphore(0)
    load = video.load_clip

    def recording(path, *args, **kwargs):
        started.append(path)
        try:
            return load(path, *args, **kwargs)
        finally:
            finished.release()

    monkeypatch.setattr(video, "load_clip", recording)
    clips = prefetch_clips(paths, T, 16, depth=2)
    first_path, _ = next(clips)
    # While the caller holds clip 0, clips 1 and 2 decode; clip 3 waits for the caller.
    for _ in range(3):
        assert finished.acquire(timeout=60)
    assert first_path == paths[0] and started == paths[:3]
    assert next(clips)[0] == paths[1]
    assert finished.acquire(timeout=60) and started == paths  # the caller came back: clip 3 started
    clips.close()  # leaving early: nothing left running, nothing raised


def test_prefetch_arguments(tmp_path):
    path = grey_clip(tmp_path / "clip.mp4")
    with pytest.raises(ValueError):
        next(prefetch_clips([path], T, 16, depth=0))
    with pytest.raises(InputError):  # a bad option is not a bad clip: it is raised
        list(prefetch_clips([path], T, 16, aspect="crop"))
    assert list(prefetch_clips([], T, 16)) == []


# ---------------------------------------------------------------------------------------------
# Long clips


@pytest.mark.slow
def test_long_mkv_and_ts_by_seeking(tmp_path, monkeypatch):
    # 3,000 frames (2 minutes at 25 fps) with a keyframe every 250: the seek path decodes a few
    # hundred frames and must agree with decoding all of them.
    need_encoder("libx264")
    frames = bar_frames(3000, 96, 64)
    for ext in ("mkv", "ts"):
        path = write_video(tmp_path / f"long.{ext}", frames, options={"g": "250"})
        reference = decode_all(path)
        count = counting_decoded_frames(monkeypatch)
        forbid(monkeypatch, "_read_by_decoding")
        for t in (T, 32):
            want = np.stack([reference[i] for i in frame_indices(len(reference), t)])
            np.testing.assert_array_equal(read_frames(path, t), want)
        assert count[0] < len(reference) // 2
        monkeypatch.undo()
