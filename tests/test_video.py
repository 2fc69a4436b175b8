"""Tests for blip3v.runtime.video: frame choice, decoding paths, preprocessing, broken input.

Every clip is written here with PyAV into tmp_path. Frame i of a clip is flat grey at level
10 + 6 i (with an 8x8 white marker top-left for rotation checks), so the mean of a chosen frame
says which frame it was: neighbours differ by 6 levels, codecs stay within 2.5.

    python -m pytest tests/test_video.py -q
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import warnings
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from blip3v.errors import InputError
from blip3v.runtime import video
from blip3v.runtime.video import frame_indices, load_clip, preprocess, read_frames

T = 8
TOLERANCE = 2.5  # grey levels; half the 6-level step between neighbouring frames, less margin


def grey_frame(i: int, width: int = 64, height: int = 48) -> np.ndarray:
    frame = np.full((height, width, 3), 10 + 6 * i, np.uint8)  # (H, W, 3)
    frame[:8, :8] = 255  # marker: shows where the top-left corner ended up
    return frame


def need_encoder(codec: str) -> None:
    try:
        av.codec.Codec(codec, "w")
    except av.codec.codec.UnknownCodecError:
        pytest.skip(f"this PyAV's ffmpeg has no {codec} encoder")


def write_video(
    path,
    frames,
    codec: str = "libx264",
    rate: int = 25,
    pix_fmt: str = "yuv420p",
    pts: list[int] | None = None,
    rotation: int | None = None,
    options: dict[str, str] | None = None,
    bit_rate: int | None = None,
    title: str | None = None,
) -> str:
    """Encode (H, W, 3) uint8 frames; `pts` in milliseconds makes a variable-rate clip."""
    need_encoder(codec)
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        if title is not None:
            container.metadata["title"] = title
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if options:
            stream.options = options
        if bit_rate:
            stream.bit_rate = bit_rate
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None and hasattr(stream, "set_display_rotation"):  # PyAV >= 15
            stream.set_display_rotation(rotation)
            rotation = None
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    if rotation is not None:
        set_mp4_rotation(path, rotation)
    return str(path)


def set_mp4_rotation(path, degrees: int) -> None:
    """Writes a counterclockwise rotation into an mp4's track matrix (tkhd), the bytes
    av_display_rotation_set(-degrees) gives, for PyAV versions that cannot set it."""
    c, s = round(np.cos(np.radians(degrees))), round(np.sin(np.radians(degrees)))
    identity = struct.pack(">9i", 1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)
    rotated = struct.pack(">9i", c << 16, -s << 16, 0, s << 16, c << 16, 0, 0, 0, 1 << 30)
    data = open(path, "rb").read()
    tkhd = data.index(b"tkhd")
    at = data.index(identity, tkhd)
    open(path, "wb").write(data[:at] + rotated + data[at + len(identity) :])


def grey_clip(path, count: int = 40, **kwargs) -> str:
    width, height = kwargs.pop("size", (64, 48))
    return write_video(path, [grey_frame(i, width, height) for i in range(count)], **kwargs)


def assert_grey_frames(frames: np.ndarray, count: int) -> None:
    """`frames` are the clip frames frame_indices(count, T) picks, judged by grey level."""
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[0] == T
    levels = frames[:, 16:, 16:].reshape(T, -1).mean(axis=1)  # away from the marker
    expected = [10 + 6 * i for i in frame_indices(count, T)]
    np.testing.assert_allclose(levels, expected, atol=TOLERANCE)


def decode_all(path) -> list[np.ndarray]:
    """Reference: every frame of the first video stream, decoded start to end."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def header_frame_count(path) -> int:
    with av.open(str(path)) as container:
        return container.streams.video[0].frames


def forbid(monkeypatch, name: str) -> None:
    """Make video.<name> fail the test if called: proves which path served a read."""

    def fail(*args, **kwargs):
        raise AssertionError(f"video.{name} should not be used here")

    monkeypatch.setattr(video, name, fail)


# ---------------------------------------------------------------------------------------------
# frame_indices


def test_frame_indices_window_and_short_clips():
    assert frame_indices(40, 8) == [4, 8, 13, 17, 22, 26, 31, 36]
    # linspace(4, N - 4, T): the last index is N - 4, never past the end.
    assert frame_indices(600, 8)[0] == 4 and frame_indices(600, 8)[-1] == 596
    # N - 4 <= 4: whole clip, frames repeat when N < T.
    assert frame_indices(8, 4) == [0, 2, 4, 7]
    assert frame_indices(3, 5) == [0, 0, 1, 2, 2]
    assert frame_indices(1, 4) == [0, 0, 0, 0]
    for n in range(1, 50):
        picks = frame_indices(n, T)
        assert len(picks) == T and picks == sorted(picks) and 0 <= picks[0] and picks[-1] < n
    with pytest.raises(ValueError):
        frame_indices(0, 8)


def test_frame_indices_short_clips_do_not_repeat_a_frame():
    # linspace(4, 5, 8) gave frame 4 seven times; the whole clip gives 8 distinct frames.
    assert frame_indices(9, 8) == [0, 1, 2, 3, 4, 5, 6, 8]
    assert frame_indices(12, 8) == [0, 1, 3, 4, 6, 7, 9, 11]
    for t in (4, 8, 16, 32):
        for n in range(t, 400):
            assert len(set(frame_indices(n, t))) == t, (n, t)
        for n in range(1, t):  # fewer frames than wanted: each repeated about t / n times
            picks = frame_indices(n, t)
            assert set(picks) == set(range(n)) and max(picks.count(i) for i in range(n)) <= -(-t // n)
    assert frame_indices(2, 8) == [0, 0, 0, 0, 1, 1, 1, 1]  # was seven 0s and one 1


def test_frame_indices_unchanged_where_the_window_has_distinct_frames():
    # The official window, exactly, wherever it picks T distinct frames: answers on normal clips
    # do not move.
    for t in (1, 2, 8, 16, 32):
        for n in range(9, 2000, 7):
            window = [min(int(p), n - 1) for p in np.linspace(4, n - 4, t)]
            if len(set(window)) == t:
                assert frame_indices(n, t) == window
    assert frame_indices(15, 8) == [4, 5, 6, 7, 8, 9, 10, 11]


def test_short_clip_reads_distinct_frames(tmp_path):
    path = grey_clip(tmp_path / "short.mp4", count=9)
    levels = read_frames(path, T)[:, 16:, 16:].reshape(T, -1).mean(axis=1)
    assert len(set(np.round((levels - 10) / 6).astype(int))) == T
    assert_grey_frames(read_frames(path, T), 9)


# ---------------------------------------------------------------------------------------------
# Codecs and containers

CODECS = [
    ("mp4", "libx264", {}),
    ("mov", "libx264", {}),
    ("mkv", "libx264", {}),
    ("ts", "libx264", {}),
    ("mp4", "libx265", {"options": {"x265-params": "log-level=none"}}),
    ("mkv", "libx265", {"options": {"x265-params": "log-level=none"}}),
    ("webm", "libvpx-vp9", {}),
    ("mp4", "libsvtav1", {}),
    ("webm", "libsvtav1", {}),
    ("avi", "mpeg4", {"bit_rate": 4_000_000}),
    ("mp4", "mpeg4", {"bit_rate": 4_000_000}),
]


@pytest.mark.parametrize(("ext", "codec", "kwargs"), CODECS, ids=[f"{e}-{c}" for e, c, _ in CODECS])
def test_codecs_and_containers(tmp_path, ext, codec, kwargs, monkeypatch):
    path = grey_clip(tmp_path / f"clip.{ext}", codec=codec, **kwargs)
    if ext in ("mp4", "mov", "avi"):
        # Frame count and per-frame index in the header: served by seeking alone.
        forbid(monkeypatch, "_read_by_decoding")
    assert_grey_frames(read_frames(path, T), 40)


def test_mp4_uses_seek_path_and_matches_full_decode(tmp_path, monkeypatch):
    # 600 frames, keyframe every 30, B-frames on (x264 default): long enough that the seek path
    # skips most of the file, and B-frame reordering makes decode time differ from display time.
    frames = []
    for i in range(600):
        frame = np.full((48, 64, 3), 20 + 4 * (i % 50), np.uint8)
        frame[:, 5 * (i // 50) : 5 * (i // 50) + 3] = 255  # bar position: which block of 50
        frames.append(frame)
    path = write_video(tmp_path / "long.mp4", frames, options={"g": "30"})
    reference = decode_all(path)
    assert len(reference) == 600 == header_frame_count(path)

    forbid(monkeypatch, "_read_by_decoding")
    got = read_frames(path, T)
    want = np.stack([reference[i] for i in frame_indices(600, T)])
    np.testing.assert_array_equal(got, want)
    # And the reference frames are the right ones, not merely the same wrong ones.
    for frame, i in zip(got, frame_indices(600, T)):
        bar = 5 * (i // 50)
        background = np.delete(frame, np.s_[bar : bar + 3], axis=1)  # (H, W - 3, 3)
        assert abs(background.mean() - (20 + 4 * (i % 50))) < TOLERANCE
        assert frame[:, bar + 1].mean() > 240


def test_seek_path_with_many_frames_wanted(tmp_path, monkeypatch):
    # T close to N: consecutive wanted frames are decoded on without seeking back.
    path = grey_clip(tmp_path / "clip.mp4", count=40, options={"g": "7"})
    forbid(monkeypatch, "_read_by_decoding")
    got = read_frames(path, 32)
    reference = decode_all(path)
    want = np.stack([reference[i] for i in frame_indices(40, 32)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ext", ["mkv", "webm", "ts"])
def test_container_without_frame_count(tmp_path, ext, monkeypatch):
    # No frame count in the header: a demux-only pass lists the frames, then the seek path.
    codec = "libvpx-vp9" if ext == "webm" else "libx264"
    path = grey_clip(tmp_path / f"clip.{ext}", codec=codec)
    assert header_frame_count(path) == 0
    forbid(monkeypatch, "_read_by_decoding")
    assert_grey_frames(read_frames(path, T), 40)


def test_decode_path_for_a_stream_without_timestamps(tmp_path, monkeypatch):
    # Raw h264 (Annex B) has no container timestamps: frames can only be counted.
    need_encoder("libx264")
    path = tmp_path / "clip.h264"
    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(grey_frame(i), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    used = []
    decode = video._read_by_decoding
    monkeypatch.setattr(video, "_read_by_decoding", lambda *a: used.append(1) or decode(*a))
    assert_grey_frames(read_frames(path, T), 40)
    assert used == [1]


@pytest.mark.parametrize("ext", ["mkv", "ts"])
def test_decode_path_second_pass(tmp_path, ext, monkeypatch):
    # With nothing held, the wanted frames come from a second pass: by pts seek, or in order.
    path = grey_clip(tmp_path / f"clip.{ext}", count=40, options={"g": "12"})
    want = np.stack([decode_all(path)[i] for i in frame_indices(40, T)])
    monkeypatch.setattr(video, "_read_by_seeking", lambda *a: None)  # as for a stream it cannot serve
    monkeypatch.setattr(video, "HOLD_BUDGET_BYTES", 0)
    np.testing.assert_array_equal(read_frames(path, T), want)
    monkeypatch.setattr(video, "_pick_by_pts", lambda *a: None)
    np.testing.assert_array_equal(read_frames(path, T), want)


def test_seek_path_falls_back_when_it_cannot_find_a_frame(tmp_path, monkeypatch):
    path = grey_clip(tmp_path / "clip.mp4")
    monkeypatch.setattr(video, "_decode_until", lambda frames, target, known=None: None)
    # _decode_until also serves the pts-seek second pass; held frames make that moot.
    assert_grey_frames(read_frames(path, T), 40)


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_variable_frame_rate(tmp_path, ext, monkeypatch):
    rng = random.Random(0)
    pts = [0]
    for _ in range(39):
        pts.append(pts[-1] + rng.choice([20, 40, 40, 100]))  # ms: 10 to 50 fps
    path = grey_clip(tmp_path / f"vfr.{ext}", pts=pts)
    if ext == "mp4":
        # The index is irregular, so frame times come from a demux-only pass, not a grid.
        forbid(monkeypatch, "_read_by_decoding")
    assert_grey_frames(read_frames(path, T), 40)


# ---------------------------------------------------------------------------------------------
# Images, sizes, rotation


def test_animated_gif(tmp_path):
    # GIF's 8-bit palette cannot hold smooth greys: mark frame i with a bar at x = 2 i instead.
    frames = []
    for i in range(30):
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:, 2 * i : 2 * i + 2] = 255
        frames.append(frame)
    path = write_video(tmp_path / "clip.gif", frames, codec="gif", pix_fmt="rgb8")
    got = read_frames(path, T)
    assert got.shape == (T, 48, 64, 3)
    bars = got.mean(axis=(1, 3)).argmax(axis=1)  # (T,) column of the bar
    assert [b // 2 for b in bars] == frame_indices(30, T)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_still_image_repeated(tmp_path, ext):
    path = tmp_path / f"still.{ext}"
    Image.fromarray(np.full((30, 50, 3), (200, 100, 50), np.uint8)).save(path)
    got = read_frames(path, T)
    assert got.shape == (T, 30, 50, 3) and got.dtype == np.uint8
    assert (got == got[0]).all()
    np.testing.assert_allclose(got[0].reshape(-1, 3).mean(axis=0), (200, 100, 50), atol=3)


def test_jpeg_exif_orientation(tmp_path):
    path = tmp_path / "phone.jpg"
    image = Image.fromarray(np.full((30, 50, 3), 128, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    image.save(path, exif=exif)
    assert read_frames(path, 2).shape == (2, 50, 30, 3)


# x264 needs even sizes in 4:2:0, so odd sizes go through 4:4:4 there; VP9 takes them in 4:2:0.
@pytest.mark.parametrize(
    ("ext", "codec", "pix_fmt"), [("webm", "libvpx-vp9", "yuv420p"), ("mp4", "libx264", "yuv444p")]
)
def test_odd_frame_size(tmp_path, ext, codec, pix_fmt):
    path = grey_clip(tmp_path / f"odd.{ext}", codec=codec, pix_fmt=pix_fmt, size=(97, 61))
    got = read_frames(path, T)
    assert got.shape == (T, 61, 97, 3)
    assert_grey_frames(got, 40)


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_metadata_applied(tmp_path, rotation):
    plain = read_frames(grey_clip(tmp_path / "plain.mp4"), T)
    rotated = read_frames(grey_clip(tmp_path / "rotated.mp4", rotation=rotation), T)
    # The display matrix angle is counterclockwise, like np.rot90.
    expected = np.stack([np.rot90(f, rotation // 90) for f in plain])
    assert rotated.shape == expected.shape
    if rotation % 180:
        assert rotated.shape == (T, 64, 48, 3)
    np.testing.assert_allclose(rotated.astype(int), expected.astype(int), atol=2)
    # The marker, top-left in the source, moves: 90° CCW puts it bottom-left, -90° top-right.
    corner = {90: (-4, 4), -90: (4, -4), 180: (-4, -4)}[rotation]
    assert (rotated[:, corner[0], corner[1]] > 240).all()
    assert (rotated[:, 4, 4] < 240).all()


def test_frames_of_changing_size_are_stacked(tmp_path):
    frames = [np.zeros((10, 20, 3), np.uint8), np.full((6, 8, 3), 90, np.uint8)]
    stacked = video._stack(frames)
    assert stacked.shape == (2, 10, 20, 3)
    assert np.abs(stacked[1].astype(int) - 90).max() <= 1


# ---------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocess_constant_colour_exact():
    frames = np.empty((3, 30, 20, 3), np.uint8)
    frames[:] = (51, 102, 204)
    out = preprocess(frames, 16)
    assert out.shape == (3, 3, 16, 16) and out.dtype == np.float32
    for channel, level in enumerate((51, 102, 204)):
        np.testing.assert_allclose(out[:, channel], (level / 255 - 0.5) / 0.5, rtol=0, atol=1e-6)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    out = preprocess(frames, 7, mean, std)
    assert out.shape == (3, 3, 7, 7)
    for channel, level in enumerate((51, 102, 204)):
        value = (level / 255 - mean[channel]) / std[channel]
        np.testing.assert_allclose(out[:, channel], value, rtol=0, atol=1e-5)


def test_preprocess_squashes_with_antialiased_bicubic():
    # 1-pixel checkerboard shrunk 4x: an antialiasing filter gives mid grey, point sampling 0/255.
    board = (np.indices((64, 96)).sum(axis=0) % 2 * 255).astype(np.uint8)
    frames = np.repeat(board[None, :, :, None], 3, axis=3)  # (1, 64, 96, 3), aspect ratio 3:2
    out = preprocess(frames, 16)
    assert out.shape == (1, 3, 16, 16)
    assert np.abs(out).max() < 0.05
    # Same numbers as Pillow's bicubic resize followed by the normalisation.
    ref = np.asarray(Image.fromarray(frames[0]).resize((16, 16), Image.BICUBIC), np.float32)
    np.testing.assert_allclose(out[0], ((ref / 255 - 0.5) / 0.5).transpose(2, 0, 1), atol=1e-6)


def test_load_clip_is_read_then_preprocess(tmp_path):
    path = grey_clip(tmp_path / "clip.mp4")
    got = load_clip(path, T, 32)
    assert got.shape == (T, 3, 32, 32) and got.dtype == np.float32
    np.testing.assert_array_equal(got, preprocess(read_frames(path, T), 32))


# ---------------------------------------------------------------------------------------------
# Broken input


def assert_input_error(path, *words: str) -> str:
    with pytest.raises(InputError) as caught:
        read_frames(path, T)
    message = str(caught.value)
    assert "\n" not in message and os.fspath(path) in message
    for word in words:
        assert word in message
    return message


def mp4_with_garbage_payload(source: str, target, start: float = 0.0, stop: float = 1.0) -> None:
    """Copy of `source` with the [start, stop) fraction of its mdat box (the coded frames)
    overwritten with random bytes; the index (moov) stays intact."""
    data = bytearray(open(source, "rb").read())
    rng = random.Random(0)
    offset = 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        if data[offset + 4 : offset + 8] == b"mdat":
            first, last = offset + 8 + int(start * (size - 8)), offset + 8 + int(stop * (size - 8))
            data[first:last] = rng.randbytes(last - first)
        offset += size
    open(target, "wb").write(bytes(data))


def test_missing_file(tmp_path):
    assert_input_error(tmp_path / "nope.mp4", "no such file")


def test_directory(tmp_path):
    assert_input_error(tmp_path, "directory")


def test_empty_file(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert_input_error(tmp_path / "empty.mp4", "empty")


def test_text_file_named_mp4(tmp_path):
    (tmp_path / "notes.mp4").write_text("these are not the frames you are looking for\n" * 50)
    assert_input_error(tmp_path / "notes.mp4", "not a readable video")


def test_truncated_mp4(tmp_path):
    data = open(grey_clip(tmp_path / "clip.mp4"), "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end
    assert_input_error(tmp_path / "cut.mp4", "truncated")


def test_truncated_mkv_decodes_what_it_can(tmp_path):
    data = open(grey_clip(tmp_path / "clip.mkv", count=40), "rb").read()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) * 2 // 3])
    got = read_frames(tmp_path / "cut.mkv", T)
    assert got.shape == (T, 48, 64, 3)


def test_corrupt_stream(tmp_path):
    mp4_with_garbage_payload(grey_clip(tmp_path / "clip.mp4"), tmp_path / "bad.mp4")
    assert_input_error(tmp_path / "bad.mp4", "no video frame could be decoded")


def test_partly_corrupt_stream_decodes_what_it_can(tmp_path):
    # A keyframe every 5 frames, so frames after the damaged stretch decode again. The first
    # keyframe fills about half of this flat clip's payload: damage after it.
    clip = grey_clip(tmp_path / "clip.mp4", options={"g": "5"})
    mp4_with_garbage_payload(clip, tmp_path / "bad.mp4", 0.7, 0.8)
    got = read_frames(tmp_path / "bad.mp4", T)
    assert got.shape == (T, 48, 64, 3)
    # The first wanted frame lies before the damage and comes out as encoded.
    assert abs(got[0, 16:, 16:].mean() - (10 + 6 * frame_indices(40, T)[0])) < TOLERANCE


def test_audio_only(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        silence = np.zeros((1, 800), np.int16)  # (channels, samples)
        frame = av.AudioFrame.from_ndarray(silence, format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    assert_input_error(path, "no video stream")


def test_truncated_png(tmp_path):
    path = tmp_path / "still.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_input_error(path, "image")


def test_metadata_that_is_not_utf8(tmp_path):
    # PyAV <= 18 refuses such a file unless told to replace bad bytes; PyAV 19 no longer takes
    # that argument (TypeError). Either way the clip reads.
    clip = tmp_path / "tagged.mp4"
    grey_clip(clip, title="title XQXQXQ")
    data = clip.read_bytes()
    assert data.count(b"XQXQXQ") == 1
    clip.write_bytes(data.replace(b"XQXQXQ", b"\xffQ\xfeQ\xc3("))  # not UTF-8
    assert_grey_frames(read_frames(clip, T), 40)


def damaged_ts(tmp_path):
    """A copy of a real MPEG-TS clip, seeded byte mutations until PyAV itself fails on it with
    something other than an FFmpeg error (PyAV's demuxer raises IndexError when a stream shows up
    after the header); None if no such mutation turns up (a PyAV that no longer does this)."""
    data = open(grey_clip(tmp_path / "clip.ts"), "rb").read()
    rng = random.Random(3)
    path = tmp_path / "damaged.ts"
    for _ in range(400):
        damaged = bytearray(data)
        for _ in range(64):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        try:
            with av.open(str(path)) as container:
                for _ in container.decode(video=0):
                    pass
        except av.error.FFmpegError:
            continue
        except Exception:  # noqa: BLE001 - what this helper looks for
            return path
    return None


def test_damaged_ts_where_pyav_raises_a_non_ffmpeg_error(tmp_path):
    path = damaged_ts(tmp_path)
    if path is None:
        pytest.skip("no mutation made this PyAV raise anything but FFmpeg errors")
    try:
        frames = read_frames(path, T)
    except InputError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        assert frames.shape[0] == T and frames.dtype == np.uint8


def png_claiming(width: int, height: int, rows: int = 4) -> bytes:
    """A PNG whose header says width x height RGB but whose data holds only `rows` rows."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" + bytes(3 * width) * rows)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_png_claiming_a_huge_size_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(12000, 12000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = assert_input_error(path, "12000x12000", "limit")
    assert not caught, [str(w.message) for w in caught]  # no DecompressionBombWarning
    assert message.count("\n") == 0


def test_huge_png_prints_nothing_on_stderr(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(12000, 12000))
    code = (
        "import sys\nfrom blip3v.errors import InputError\nfrom blip3v.runtime.video import load_clip\n"
        "try:\n    load_clip(sys.argv[1], 8, 32)\nexcept InputError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "12000x12000" in result.stdout


def test_image_pixel_limit(tmp_path, monkeypatch):
    path = tmp_path / "still.png"
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(path)
    assert read_frames(path, 2).shape == (2, 30, 50, 3)
    monkeypatch.setattr(video, "MAX_IMAGE_PIXELS", 30 * 50 - 1)
    assert_input_error(path, "50x30", "limit")
    # Video frames have the same bound, from the stream's declared size.
    assert_input_error(grey_clip(tmp_path / "clip.mkv"), "frames are 64x48", "limit")


def test_jpeg_over_the_limit_is_decoded_at_a_smaller_scale(tmp_path, monkeypatch):
    # JPEG's DCT scaling: a quarter of the pixels at 1/2 scale, without decoding the full size.
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.full((64, 96, 3), (200, 100, 50), np.uint8)).save(path, quality=95)
    monkeypatch.setattr(video, "MAX_IMAGE_PIXELS", 64 * 96 // 3)
    got = read_frames(path, 2)
    assert got.shape == (2, 32, 48, 3)
    np.testing.assert_allclose(got[0].reshape(-1, 3).mean(axis=0), (200, 100, 50), atol=3)
    monkeypatch.setattr(video, "MAX_IMAGE_PIXELS", 2)  # too big even at 1/8
    assert_input_error(path, "limit")


def test_animation_pixel_budget(tmp_path, monkeypatch):
    frames = [np.full((48, 64, 3), 40 * (i % 6), np.uint8) for i in range(30)]
    path = write_video(tmp_path / "clip.gif", frames, codec="gif", pix_fmt="rgb8")
    assert read_frames(path, T).shape == (T, 48, 64, 3)
    monkeypatch.setattr(video, "MAX_ANIMATION_PIXELS", 48 * 64 * 10)
    assert_input_error(path, "animation too large")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_fifo_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "pipe.mp4")
    assert_input_error(tmp_path / "pipe.mp4", "not a regular file")


# ---------------------------------------------------------------------------------------------
# Dependencies


def test_module_does_not_import_torch():
    code = "import sys, blip3v.runtime.video; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
