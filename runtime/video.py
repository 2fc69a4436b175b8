"""Video input shared by every backend: PyAV decoding, frame choice, preprocessing.

Numpy, Pillow and PyAV only: the ONNX Runtime and TensorRT backends run without torch.

    frames = read_frames("clip.mp4", 8)        # (T, H, W, 3) uint8 RGB, upright
    pixels = preprocess(frames, 384)           # (T, 3, S, S) float32, normalised
    pixels = load_clip("clip.mp4", 8, 384)     # both in one call

Which frames: `frame_indices(N, T)` over the N frames the decoder yields for the first video
stream. How they are found, cheapest first:

1. Pillow images (PNG/JPEG/GIF/WebP/BMP/TIFF): Pillow knows the frame count (1 for a still,
   repeated T times) and seeks to each wanted frame; EXIF orientation is applied.
2. Seek path: when the header gives a frame count and the demuxer holds an index entry for
   every frame (mp4, mov, avi), N comes from the header and the presentation timestamp of
   frame i comes from the index: an evenly spaced index is a constant-rate grid anchored at the
   first decoded frame; an irregular one (variable frame rate) is resolved by one demux-only
   pass reading packet pts, which decodes nothing. Each wanted frame is reached by a seek to
   the keyframe before it and a decode forward to that exact pts (or by decoding on from the
   previous wanted frame when no keyframe lies between). A seek that lands late is retried
   further back; any other surprise (a pts that never shows up, a corrupt frame) drops to
   path 3, so this path is an optimisation, never a different answer.
3. Decode path: everything else (mkv, webm, ts usually report no count; raw streams; broken
   indexes). One pass decodes every frame without converting it to RGB, recording its pts and
   holding the frames themselves while they fit in `HOLD_BUDGET_BYTES`. N is then known; the
   wanted frames come from what was held, or else from a second pass that seeks to their
   recorded pts (and, failing that, decodes sequentially up to the last wanted frame).

Broken input raises `InputError` with one line naming the file; PyAV errors never escape, and
every decode loop is bounded by `MAX_PACKETS`. A stream that is only partly corrupt yields the
frames that do decode.
"""

from __future__ import annotations

import bisect
import os
import stat
from collections.abc import Iterator, Sequence
from itertools import chain

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from blip3v.errors import InputError

# Official xGen-MM-Vid inference script: frames at linspace(4, N - 4, T) over the decoded frames.
EDGE_SKIP = 4

# Formats handed to Pillow. A video container never matches these signatures; JPEG includes
# MPO (camera JPEGs with extra pictures), which Pillow opens through its JPEG plugin.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
# Of those, the ones whose extra frames are animation; MPO's second frame is a stereo pair
# and a TIFF's pages are not a clip, so those are read as stills.
ANIMATED_FORMATS = ("GIF", "PNG", "WEBP")

# Upper bound on packets read in any one decode loop (~90 hours at 30 fps): a finite file always
# ends first; this only guards against a demuxer that keeps producing packets.
MAX_PACKETS = 10_000_000
# Consecutive packets the decoder rejects before the rest of the stream is given up as garbage.
MAX_BAD_PACKETS = 1_000
# Decoded (YUV) frame bytes the decode path may hold to avoid a second pass; 256 MiB holds
# about 85 1080p yuv420 frames or 10 minutes of 320x240.
HOLD_BUDGET_BYTES = 256 << 20
# How far back (in known seek points) to retry when a seek lands after the wanted frame.
SEEK_BACKOFF = (1, 4, 16, 64, 256)

_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.5, 0.5, 0.5)


def frame_indices(num_frames: int, num_samples: int) -> list[int]:
    """Indices of the `num_samples` frames the model sees out of `num_frames` decoded ones.

    `linspace(4, N - 4, T)` cast to int, as in the official inference script. Clips too short for
    that window (N - 4 <= 4) fall back to `linspace(0, N - 1, T)`, repeating frames when N < T;
    a still image (N = 1) is repeated T times.
    """
    if num_frames < 1:
        raise ValueError("a clip needs at least one frame")
    if num_frames - EDGE_SKIP > EDGE_SKIP:
        points = np.linspace(EDGE_SKIP, num_frames - EDGE_SKIP, num_samples)
    else:
        points = np.linspace(0, num_frames - 1, num_samples)
    return [min(int(p), num_frames - 1) for p in points]


# ---------------------------------------------------------------------------------------------
# Public API


def read_frames(path: str | os.PathLike[str], num_frames: int) -> np.ndarray:
    """The `num_frames` frames `frame_indices` picks from a video or image: (T, H, W, 3) uint8 RGB.

    Frames are rotated upright (display matrix for video, EXIF orientation for images). Raises
    `InputError` for anything that is not a readable video or image.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    name = os.fspath(path)
    _check_file(name)
    image = _open_image(name)
    if image is not None:
        with image:
            frames = _image_frames(image, name, num_frames)
    else:
        frames = _video_frames(name, num_frames)
    return _stack(frames)


def preprocess(
    frames: np.ndarray,
    image_size: int,
    mean: Sequence[float] = _DEFAULT_MEAN,
    std: Sequence[float] = _DEFAULT_STD,
) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames → (T, 3, S, S) float32 model input.

    Each frame is squashed to S×S (aspect ratio ignored) with Pillow bicubic, which antialiases
    when shrinking, then scaled to [0, 1] and normalised per channel as (x - mean) / std.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    size = (image_size, image_size)
    resized = np.stack(
        [np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC)) for f in frames]
    )  # (T, S, S, 3) uint8
    x = resized.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # (T, S, S, 3)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (T, 3, S, S)


def load_clip(
    path: str | os.PathLike[str],
    num_frames: int,
    image_size: int,
    mean: Sequence[float] = _DEFAULT_MEAN,
    std: Sequence[float] = _DEFAULT_STD,
) -> np.ndarray:
    """`preprocess(read_frames(path, num_frames), image_size, mean, std)`: (T, 3, S, S) float32."""
    return preprocess(read_frames(path, num_frames), image_size, mean, std)


# ---------------------------------------------------------------------------------------------
# Errors and files


def _input_error(path: str, problem: str) -> InputError:
    # The CLI prints the message as one line, and ffmpeg/Pillow messages sometimes carry newlines
    # (the path is safe: repr escapes them).
    return InputError(f"cannot read video {path!r}: {' '.join(problem.split())}")


def _av_problem(error: BaseException) -> str:
    # FFmpegError's str() repeats the errno and the file name; strerror is just the reason.
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _check_file(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise _input_error(path, "no such file") from None
    except OSError as e:
        raise _input_error(path, e.strerror or str(e)) from None
    if stat.S_ISDIR(info.st_mode):
        raise _input_error(path, "is a directory, not a video file")
    if not stat.S_ISREG(info.st_mode):
        # A FIFO or device would block ffmpeg forever waiting for data.
        raise _input_error(path, "not a regular file")
    if info.st_size == 0:
        raise _input_error(path, "the file is empty")


# ---------------------------------------------------------------------------------------------
# Images (Pillow)


def _open_image(path: str) -> Image.Image | None:
    """The file as a Pillow image if it has an image signature, else None (try it as a video)."""
    try:
        return Image.open(path, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        return None
    except Exception as e:  # noqa: BLE001 - see _image_frames
        raise _input_error(path, f"cannot open image ({type(e).__name__}: {e})") from None


def _image_frames(image: Image.Image, path: str, num_frames: int) -> list[np.ndarray]:
    picked: dict[int, np.ndarray] = {}
    try:
        count = getattr(image, "n_frames", 1) if image.format in ANIMATED_FORMATS else 1
        wanted = frame_indices(count, num_frames)
        # Ascending order: GIF frames are deltas, seeking backwards re-decodes from the start.
        for index in sorted(set(wanted)):
            image.seek(index)
            upright = ImageOps.exif_transpose(image)
            picked[index] = np.asarray(upright.convert("RGB"))  # (H, W, 3)
    except Exception as e:  # noqa: BLE001
        # Pillow's parsers surface a corrupt file as whatever they trip on (OSError, struct.error,
        # IndexError, SyntaxError...); every one of them means the same thing here.
        raise _input_error(path, f"cannot decode image ({type(e).__name__}: {e})") from None
    return [picked[i] for i in wanted]


# ---------------------------------------------------------------------------------------------
# Videos (PyAV)


def _open_container(path: str) -> av.container.InputContainer:
    try:
        # Undecodable metadata bytes are not a reason to refuse a playable file.
        return av.open(path, metadata_errors="replace")
    except av.error.FFmpegError as e:
        problem = f"not a readable video or image: {_av_problem(e)}"
        raise _input_error(path, f"{problem} (truncated, corrupt or not a video)") from None
    except OSError as e:
        raise _input_error(path, e.strerror or str(e)) from None


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    # Cover art in an audio file is a one-picture "video" stream, not a clip.
    streams = [
        s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic
    ]
    if not streams:
        kinds = sorted({s.type for s in container.streams})
        found = f" (only {', '.join(kinds)})" if kinds else ""
        raise _input_error(path, f"no video stream{found}")
    stream = streams[0]
    # Slice+frame threads: decoding is the cost on every path.
    stream.thread_type = "AUTO"
    return stream


def _video_frames(path: str, num_frames: int) -> list[np.ndarray]:
    container = _open_container(path)
    with container:
        stream = _video_stream(container, path)
        try:
            frames = _read_by_seeking(container, stream, num_frames)
        except av.error.FFmpegError:
            frames = None  # a seek the demuxer refused: the decode path still works
    if frames is None:
        try:
            frames = _read_by_decoding(path, num_frames)
        except av.error.FFmpegError as e:  # e.g. a pixel format swscale cannot convert
            raise _input_error(path, f"decoding failed: {_av_problem(e)}") from None
    return frames


def _decode(container: av.container.InputContainer, stream) -> Iterator[av.VideoFrame]:
    """Frames of `stream` from the container's current position, in presentation order.

    Never raises an ffmpeg error: a packet the decoder rejects is skipped (up to
    `MAX_BAD_PACKETS` in a row), and a demuxer error ends the stream after flushing the decoder.
    """
    bad = 0
    flushed = False
    try:
        for count, packet in enumerate(container.demux(stream)):
            if count >= MAX_PACKETS:
                break
            flushed = packet.size == 0  # demux ends with empty packets that drain the decoder
            try:
                frames = stream.decode(packet)
            except av.error.FFmpegError:
                bad += 1
                if bad > MAX_BAD_PACKETS:
                    break
                continue
            bad = 0
            yield from frames
    except av.error.FFmpegError:
        pass  # unreadable container data from here on: keep what decoded
    if not flushed:
        try:
            yield from stream.decode(None)
        except av.error.FFmpegError:
            pass


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as (H, W, 3) uint8 RGB, turned upright by its display matrix."""
    rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3)
    # `rotation` is the display matrix's counterclockwise angle (av_display_rotation_get), the
    # way np.rot90 turns for k > 0; ffmpeg's autorotate turns the same way (fftools get_rotation
    # and ffmpeg_filter.c: -90, a phone held upright, becomes transpose=clock). Flips in the
    # matrix are ignored: cameras write rotations only.
    turns = round((frame.rotation or 0) / 90) % 4
    return np.rot90(rgb, turns) if turns else rgb


def _read_by_seeking(container, stream, num_frames: int) -> list[np.ndarray] | None:
    """Path 2 of the module docstring; None when it does not apply or meets a surprise."""
    header_count = stream.frames
    entries = stream.index_entries
    if header_count <= 0 or len(entries) != header_count:
        return None
    kept = [e for e in entries if not e.is_discard]  # edit-list trims never reach the output
    if not kept:
        return None
    dts = sorted(e.timestamp for e in kept)
    count = len(dts)

    frames: Iterator[av.VideoFrame] | None = None
    last_pts: int | None = None
    picked: dict[int, np.ndarray] = {}
    wanted = frame_indices(count, num_frames)
    steps = {b - a for a, b in zip(dts, dts[1:])}
    if len(steps) <= 1:
        # Constant rate: frame i is shown at first_pts + i * step (B-frames reorder decoding,
        # not the grid). Decoding frame 0 gives first_pts and leaves the decoder running.
        frames = _decode(container, stream)
        first = next(frames, None)
        if first is None or first.pts is None:
            return None
        step = steps.pop() if steps else 0
        pts = [first.pts + i * step for i in range(count)]
        last_pts = first.pts
        if 0 in wanted:
            picked[0] = _to_rgb(first)
    else:
        # Irregular sample times (variable frame rate): read the packets' pts, decoding nothing.
        pts = _packet_pts(container, stream)
        if pts is None or len(pts) != count:
            return None

    # Index timestamps are decode times; a keyframe is shown `delay` ticks later (B-frames).
    delay = max(0, pts[0] - dts[0])
    keyframes = sorted(e.timestamp + delay for e in kept if e.is_keyframe)  # presentation times
    for index in sorted(set(wanted) - picked.keys()):
        target = pts[index]
        # Decoding on is cheaper than a seek unless a seek would land past where we are.
        keyframe = _keyframe_before(keyframes, target)
        if frames is None or last_pts >= target or (keyframe is not None and keyframe > last_pts):
            frames = _seek(container, stream, target, keyframes)
            if frames is None:
                return None
        frame = _decode_until(frames, target)
        if frame is None:
            return None
        picked[index] = _to_rgb(frame)
        last_pts = frame.pts
    return [picked[i] for i in wanted]


def _packet_pts(container, stream) -> list[int] | None:
    """Sorted pts of the packets of `stream` from the current position, reading without decoding.

    None if a packet has no pts. Call it on a freshly opened container to get every frame.
    """
    pts = []
    for count, packet in enumerate(container.demux(stream)):
        if count >= MAX_PACKETS:
            return None
        if packet.size == 0 or packet.is_discard:
            continue
        if packet.pts is None:
            return None
        pts.append(packet.pts)
    return sorted(pts)


def _keyframe_before(keyframes: list[int], timestamp: int) -> int | None:
    at = bisect.bisect_right(keyframes, timestamp) - 1
    return keyframes[at] if at >= 0 else None


def _seek(container, stream, target: int, points: list[int]):
    """Frames decoded from a keyframe at or before pts `target`, or None if none is found.

    Demuxers differ on whether a seek timestamp means decode or presentation time (mov seeks by
    presentation time, avi by decode time), an open GOP starts with frames shown before its
    keyframe, and mpegts seeks by byte estimate, often a GOP late; so when a seek lands after
    `target` (or at the end), seek again from `SEEK_BACKOFF` entries of `points` (ascending
    presentation times known to exist: keyframes, or every frame) before the target, and last
    from the start of the file. A failed try costs one seek and one GOP of decoding.
    """
    at = bisect.bisect_right(points, target) - 1
    tries = [target] + [points[at - back] for back in SEEK_BACKOFF if at - back > 0] + [None]
    for seek_to in dict.fromkeys(tries):  # in order, without repeats
        try:
            if seek_to is None:
                # AV_TIME_BASE units and no stream: the demuxer's own idea of the start.
                container.seek(0)
            else:
                container.seek(int(seek_to), stream=stream, backward=True)
        except av.error.FFmpegError:
            continue  # e.g. no keyframe before this timestamp: try the next
        frames = _decode(container, stream)
        first = next(frames, None)
        if first is not None and first.pts is not None and first.pts <= target:
            return chain([first], frames)
    return None


def _decode_until(frames: Iterator[av.VideoFrame], target: int) -> av.VideoFrame | None:
    """The frame with pts exactly `target`, or None if the stream passes or ends before it.

    A frame flagged corrupt (decoded from missing references after a seek) also gives None:
    the caller then falls back to decoding from the start, which is never wrong.
    """
    for frame in frames:
        if frame.pts is None or frame.pts > target:
            return None
        if frame.pts == target:
            return None if frame.is_corrupt else frame
    return None


def _frame_bytes(frame: av.VideoFrame) -> int:
    return sum(plane.buffer_size for plane in frame.planes)


def _read_by_decoding(path: str, num_frames: int) -> list[np.ndarray]:
    """Path 3 of the module docstring."""
    with _open_container(path) as container:
        stream = _video_stream(container, path)
        pts: list[int | None] = []
        held: list[av.VideoFrame] | None = []
        held_bytes = 0
        for frame in _decode(container, stream):
            pts.append(frame.pts)
            if held is not None:
                held.append(frame)
                held_bytes += _frame_bytes(frame)
                if held_bytes > HOLD_BUDGET_BYTES:
                    held = None  # too long to keep: a second pass fetches the wanted frames
        if not pts:
            problem = "no video frame could be decoded (corrupt or truncated stream)"
            raise _input_error(path, problem)
        wanted = frame_indices(len(pts), num_frames)
        if held is not None:
            cache = {i: _to_rgb(held[i]) for i in set(wanted)}
            return [cache[i] for i in wanted]
        del held
        picked = _pick_by_pts(container, stream, pts, wanted)
    if picked is None:
        picked = _pick_in_order(path, wanted)
    return picked


def _pick_by_pts(container, stream, pts: list[int | None], wanted: list[int]):
    """Wanted frames found by seeking to their recorded pts; None when pts cannot identify them."""
    if any(p is None for p in pts) or any(b <= a for a, b in zip(pts, pts[1:])):
        return None
    picked: dict[int, np.ndarray] = {}
    try:
        for index in sorted(set(wanted)):
            frames = _seek(container, stream, pts[index], pts)
            frame = _decode_until(frames, pts[index]) if frames is not None else None
            if frame is None:
                return None
            picked[index] = _to_rgb(frame)
    except av.error.FFmpegError:
        return None
    return [picked[i] for i in wanted]


def _pick_in_order(path: str, wanted: list[int]) -> list[np.ndarray]:
    """Wanted frames by counting decoded frames from the start: slow, but needs no timestamps."""
    needed = set(wanted)
    picked: dict[int, np.ndarray] = {}
    with _open_container(path) as container:
        stream = _video_stream(container, path)
        for index, frame in enumerate(_decode(container, stream)):
            if index in needed:
                picked[index] = _to_rgb(frame)
                if len(picked) == len(needed):
                    break
    if len(picked) != len(needed):
        raise _input_error(path, "the second decoding pass gave fewer frames than the first")
    return [picked[i] for i in wanted]


def _stack(frames: list[np.ndarray]) -> np.ndarray:
    """(T, H, W, 3) from frames that may differ in size (streams can change resolution midway).

    Odd-sized frames are resized bicubic to the first frame's size; `preprocess` squashes every
    frame to S×S anyway, so this only decides the intermediate size.
    """
    height, width = frames[0].shape[:2]
    same = []
    for frame in frames:
        if frame.shape[:2] != (height, width):
            image = Image.fromarray(np.ascontiguousarray(frame))
            frame = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
        same.append(frame)
    return np.ascontiguousarray(np.stack(same))  # (T, H, W, 3)
