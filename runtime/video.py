"""Video input shared by every backend: PyAV decoding, frame choice, preprocessing.

Numpy, Pillow and PyAV (12 to 19) only: the ONNX Runtime and TensorRT backends run without torch.

    frames = read_frames("clip.mp4", 8)        # (T, H, W, 3) uint8 RGB, upright
    pixels = preprocess(frames, 384)           # (T, 3, S, S) float32, normalised
    pixels = load_clip("clip.mp4", 8, 384)     # both in one call, each distinct frame converted once
    for path, pixels in prefetch_clips(paths, 8, 384):   # the next clips decode while this one runs
        ...                                    # pixels is the InputError of a clip that cannot be read

Which frames: `frame_indices(N, T)` over the N frames the decoder yields for the first video
stream (the official window, or the whole clip for clips too short to give T distinct frames from
it). How they are found, cheapest first:

1. Pillow images (PNG/JPEG/GIF/WebP/BMP/TIFF): Pillow knows the frame count (1 for a still,
   repeated T times) and seeks to each wanted frame; EXIF orientation is applied. The declared size
   is checked before anything is decoded (`MAX_IMAGE_PIXELS`; a JPEG over it is decoded at 1/2,
   1/4 or 1/8 scale by its own DCT scaling instead), and Pillow's warnings never reach stderr.
2. Seek path: a table of every frame's presentation time (pts) and of the keyframes, from
   - the demuxer's index when it holds an entry for every frame at a constant rate (mp4, mov,
     avi): a grid anchored at the first decoded frame, nothing else read; or else
   - one demux-only pass reading each packet's pts, keyframe flag and byte position, decoding
     nothing (mkv, webm, MPEG-TS, variable-rate mp4, and every container on PyAV < 14, which has
     no index access). For Matroska/WebM with large frames, the frames are first read from a
     constant-rate table guessed from the Cues (keyframes only) while this pass runs alongside on
     its own container; they are kept only if the pass lists exactly the guessed frames, else
     read again from its table (`_read_from_cues`).
   Each wanted frame is reached by a seek to the keyframe before it. The landing is checked: the
   packets before that keyframe are skipped (MPEG-TS seeks by timestamp and may land early), and a
   landing after it is retried from further back, last from the start. The decoder then runs to
   that exact pts and stops (or decodes on from the previous wanted frame when no keyframe lies
   between); h264 frames that nothing references and that are not wanted are not decoded at all
   (`skip_frame` NONREF per packet). Wanted frames after different keyframes need none of each
   other's decoding: with frames of at least `GOP_PARALLEL_MIN_PIXELS` and more than one core,
   one decoder per core (each with its own container, decoder and converter) takes these groups,
   largest first, and each frame is converted and resized on the thread that decoded it. Any
   surprise (a pts missing or not in the table, a corrupt frame, interlaced frames in a
   packet-counted table, any error, in any decoder) drops to path 3, so this path is an
   optimisation, never a different answer.
3. Decode path: everything else (raw streams, broken indexes). One pass decodes every frame
   without converting it, recording its pts and holding the frames while they fit in
   `HOLD_BUDGET_BYTES`. N is then known; the wanted frames come from what was held, or else from
   a second pass that seeks to their recorded pts (and, failing that, decodes sequentially up to
   the last wanted frame).

Frames of at least `THREAD_MIN_PIXELS` decode with the codec's own threads (frame and slice);
smaller ones decode faster on the calling thread than the threads can be started and fed. Video
frames, like images, are refused over `MAX_IMAGE_PIXELS` (from the stream's declared size).

Options (keyword arguments of `load_clip`; `read_frames` takes `decoder`, `timings`, `notes`):
- `decoder`: "cpu" (default), "cuda" (NVDEC through FFmpeg's CUDA hwaccel, PyAV >= 14; a one-line
  InputError where there is none) or "auto" (CUDA where it opens, else the CPU, with a line in
  `notes` saying why). Decoded frames are copied back to the host for conversion. On Jetson the
  hardware decoder is reached through NVIDIA's V4L2/multimedia API, which PyPI's PyAV wheels do not
  include: there `cuda` fails with that one line and `auto` decodes on the CPU (not tested on a
  Jetson; an FFmpeg built with Jetson's nvv4l2 decoders would need its own codec names).
- `aspect`: "squash" (default, as the released image processor: resize to S x S ignoring aspect)
  or "pad": centre the frame on a square of the mean colour, int(255 * mean) per channel (127 for
  0.5, as LLaVA-style `expand2square(img, tuple(int(x * 255) for x in image_mean))`), then resize.
- `scaler`: "pillow" (default: full-resolution RGB, then Pillow's antialiased bicubic, bit for bit
  what this module has always given) or "ffmpeg": the decoder's converter (swscale bicubic) turns
  each decoded frame straight into S x S RGB, skipping the full-size RGB array. Not bit-exact; see
  benchmarks/RESULTS.md ("Video input") for the measured difference. Images always use Pillow.

Timings: pass a dict as `timings` and the video stage adds its parts in milliseconds:
`video_open` (opening the file, reading headers), `video_index` (the frame table: the index, or
the demux-only pass), `video_seek` (seeks and the packets skipped to reach a keyframe),
`video_decode` (demuxing and decoding what is fed to the decoder), `video_convert` (pixel format,
rotation, resizing, normalising). Every key is present, 0.0 when a part did not run. While several
threads work at once (decoders side by side, the demux pass alongside), each part gets its share
of the wall time they took (its time summed over the threads, times wall / all threads' time), so
the parts still add up to at most the stage's wall time.

Broken input raises `InputError` with one line naming the file: whatever PyAV or Pillow raise
(FFmpeg errors, but also IndexError from a demuxer meeting a stream that appeared mid-file) is
turned into that line, and every decode loop is bounded by `MAX_PACKETS`. A stream that is only
partly corrupt yields the frames that do decode.
"""

from __future__ import annotations

import bisect
import importlib
import math
import os
import stat
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain
from typing import Any

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from blip3v.cpus import usable_cores
from blip3v.errors import InputError

# Official xGen-MM-Vid inference script: frames at linspace(4, N - 4, T) over the decoded frames.
EDGE_SKIP = 4

# Formats handed to Pillow, each with its plugin and leading bytes (as the plugins' own _accept
# checks). A video container never matches these signatures; JPEG includes MPO (camera JPEGs with
# extra pictures), which Pillow opens through its JPEG plugin. Sniffing first spares every video
# Pillow's plugin registry: `Image.open(formats=...)` with WEBP or TIFF in the list imports all
# ~40 plugins, 70-140 ms on the dev box.
_SIGNATURES = (
    ("PNG", "PngImagePlugin", (b"\x89PNG\r\n\x1a\n",)),
    ("JPEG", "JpegImagePlugin", (b"\xff\xd8\xff",)),
    ("GIF", "GifImagePlugin", (b"GIF87a", b"GIF89a")),
    ("WEBP", "WebPImagePlugin", (b"RIFF",)),  # and b"WEBP" at offset 8
    ("BMP", "BmpImagePlugin", (b"BM",)),
    ("TIFF", "TiffImagePlugin", (b"MM\x00\x2a", b"II\x2a\x00", b"MM\x00\x2b", b"II\x2b\x00")),
)
IMAGE_FORMATS = tuple(name for name, _, _ in _SIGNATURES)
# Of those, the ones whose extra frames are animation; MPO's second frame is a stereo pair
# and a TIFF's pages are not a clip, so those are read as stills.
ANIMATED_FORMATS = ("GIF", "PNG", "WEBP")
# Largest picture decoded (8192 x 8192, 67 MP): above 8K video (33 MP) and 50 MP phone photos, and
# under Pillow's own bomb warning (89 MP). A PNG claiming 12000 x 12000 is refused from its header.
MAX_IMAGE_PIXELS = 8192 * 8192
# Pixels an animated image may decode in all: GIF/APNG/WebP frames are deltas, so reaching frame
# k decodes the k frames before it.
MAX_ANIMATION_PIXELS = 1 << 30

# Upper bound on packets read in any one decode loop (~90 hours at 30 fps): a finite file always
# ends first; this only guards against a demuxer that keeps producing packets.
MAX_PACKETS = 10_000_000
# Consecutive packets the decoder rejects before the rest of the stream is given up as garbage.
MAX_BAD_PACKETS = 1_000
# Decoded (YUV) frame bytes the decode path may hold to avoid a second pass; 256 MiB holds
# about 85 1080p yuv420 frames or 10 minutes of 320x240.
HOLD_BUDGET_BYTES = 256 << 20
# How far back (in keyframes) to seek again when a seek lands after the keyframe it aimed at.
SEEK_BACKOFF = (1, 4, 16, 64, 256)
# Frames at least this large decode with the codec's threads; below it thread start-up and
# hand-over cost more than they save (measured on 128 x 128: 2 ms single-threaded, 5 ms threaded).
THREAD_MIN_PIXELS = 640 * 360
# Skip decoding h264 frames that no other frame references and that are not wanted (exact: such
# a frame cannot change any other). Off only to measure what it saves.
SKIP_NONREF = True
# Decoders run side by side on the sampled frames' GOPs (each from its own keyframe, so none needs
# another's frames) when the frames are at least this large: below it, opening another container
# costs about what the second core saves. GOP_WORKERS: None for one per usable core, or a count
# (1: one decoder, the frames in order).
GOP_PARALLEL_MIN_PIXELS = THREAD_MIN_PIXELS
GOP_WORKERS: int | None = None
# Codec threads of the side-by-side decoders (PyAV thread_type). None: "NONE" (one thread each,
# ~20 % less CPU than frame threads: measured in benchmarks/RESULTS.md) when there are at least two
# groups per decoder to even out the load, else "AUTO" (frame threads keep every core busy while
# the largest group finishes).
GOP_THREAD_TYPE: str | None = None
# Matroska/WebM: decode from a table guessed from the Cues while the exact demux-only pass runs
# alongside (`_read_from_cues`). Off only to measure what it saves.
SPECULATE_FROM_CUES = True

DECODERS = ("cpu", "cuda", "auto")
ASPECTS = ("squash", "pad")
SCALERS = ("pillow", "ffmpeg")
TIMING_KEYS = ("video_open", "video_index", "video_seek", "video_decode", "video_convert")

_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.5, 0.5, 0.5)

# PyAV <= 18 decodes metadata strictly unless told otherwise, so one stray byte in a title refuses
# a playable file; PyAV 19 decodes it with surrogateescape and no longer takes the argument.
_OPEN_KWARGS = {"metadata_errors": "replace"} if int(av.__version__.split(".")[0]) < 19 else {}
# warnings.catch_warnings swaps process-wide state: one image at a time changes it.
_IMAGE_LOCK = threading.Lock()
# Result of the one attempt per process to open each hardware device: None (works) or the reason.
_HW_STATE: dict[str, str | None] = {}


def frame_indices(num_frames: int, num_samples: int) -> list[int]:
    """Indices of the `num_samples` frames the model sees out of `num_frames` decoded ones.

    `linspace(4, N - 4, T)` cast to int, as in the official inference script, wherever that window
    picks T distinct frames (N >= 15 for T = 8): answers on such clips never move. Shorter clips
    would see one frame many times (a 9-frame clip gave frame 4 seven times out of 8), so they
    use the whole clip: `linspace(0, N - 1, T)` when N >= T (distinct frames, first and last
    included), else the frame under the middle of each of T equal slices of the clip, which shows
    every frame T / N times rounded up or down; a still image (N = 1) is repeated T times.
    """
    if num_frames < 1:
        raise ValueError("a clip needs at least one frame")
    if num_frames - EDGE_SKIP > EDGE_SKIP:
        points = np.linspace(EDGE_SKIP, num_frames - EDGE_SKIP, num_samples)
        picks = [min(int(p), num_frames - 1) for p in points]
        if len(set(picks)) == len(picks):
            return picks
    if num_frames >= num_samples:
        return [min(int(p), num_frames - 1) for p in np.linspace(0, num_frames - 1, num_samples)]
    return [(2 * k + 1) * num_frames // (2 * num_samples) for k in range(num_samples)]


# ---------------------------------------------------------------------------------------------
# Public API


def read_frames(
    path: str | os.PathLike[str],
    num_frames: int,
    *,
    decoder: str = "cpu",
    timings: dict[str, float] | None = None,
    notes: list[str] | None = None,
) -> np.ndarray:
    """The `num_frames` frames `frame_indices` picks from a video or image: (T, H, W, 3) uint8 RGB.

    Frames are rotated upright (display matrix for video, EXIF orientation for images). Raises
    `InputError` for anything that is not a readable video or image. `decoder`, `timings` and
    `notes`: see the module docstring.
    """
    _check_options(decoder=decoder)
    clock = _Clock(timings)
    clip = _read(os.fspath(path), num_frames, decoder, None, clock, notes)
    return _stack([clip.images[i] for i in clip.order])


def preprocess(
    frames: np.ndarray,
    image_size: int,
    mean: Sequence[float] = _DEFAULT_MEAN,
    std: Sequence[float] = _DEFAULT_STD,
    *,
    aspect: str = "squash",
) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames → (T, 3, S, S) float32 model input.

    Each frame is squashed to S×S (aspect ratio ignored) with Pillow bicubic, which antialiases
    when shrinking, then scaled to [0, 1] and normalised per channel as (x - mean) / std. With
    `aspect="pad"` it is first centred on a square of the mean colour (module docstring).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    _check_options(aspect=aspect)
    fill = _pad_colour(mean)
    resized = np.stack([_resize(f, image_size, aspect, fill) for f in frames])  # (T, S, S, 3)
    return _normalise(resized, mean, std)


def load_clip(
    path: str | os.PathLike[str],
    num_frames: int,
    image_size: int,
    mean: Sequence[float] = _DEFAULT_MEAN,
    std: Sequence[float] = _DEFAULT_STD,
    *,
    aspect: str = "squash",
    decoder: str = "cpu",
    scaler: str = "pillow",
    timings: dict[str, float] | None = None,
    notes: list[str] | None = None,
) -> np.ndarray:
    """`preprocess(read_frames(path, num_frames), image_size, mean, std)`: (T, 3, S, S) float32.

    The same numbers with the default options, but each distinct frame is resized once (a still
    is not copied T times at full size). Options, `timings` and `notes`: module docstring.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    _check_options(decoder=decoder, aspect=aspect, scaler=scaler)
    clock = _Clock(timings)
    fill = _pad_colour(mean)
    convert = _ScaleInDecoder(image_size, aspect, fill) if scaler == "ffmpeg" else None
    # Frames read by decoders side by side are resized as soon as they are converted, on the thread
    # that decoded them (while other decoders still run); kept by id with the image, so only images
    # that reach the clip unchanged use it. The rest are resized together at the end.
    early: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def finish(image: np.ndarray) -> None:
        early[id(image)] = (image, _resize(image, image_size, aspect, fill))

    clip = _read(os.fspath(path), num_frames, decoder, convert, clock, notes, finish)
    start = time.perf_counter()
    images = _same_size(clip.images, *clip.images[clip.order[0]].shape[:2])  # as read_frames stacks them
    resized = [early[id(f)][1] if id(f) in early and early[id(f)][0] is f else None for f in images]
    late = [i for i, r in enumerate(resized) if r is None]
    for i, r in zip(late, _resize_all([images[i] for i in late], image_size, aspect, fill)):
        resized[i] = r  # each (S, S, 3)
    pixels = _normalise(np.stack([resized[i] for i in clip.order]), mean, std)
    clock.add("video_convert", start)
    return pixels


def prefetch_clips(
    paths: Iterable[str | os.PathLike[str]],
    num_frames: int,
    image_size: int,
    mean: Sequence[float] = _DEFAULT_MEAN,
    std: Sequence[float] = _DEFAULT_STD,
    *,
    depth: int = 2,
    workers: int = 1,
    then: Callable[[np.ndarray], Any] | None = None,
    **options,
) -> Iterator[tuple[str | os.PathLike[str], Any]]:
    """`(path, load_clip(path, ...))` for each path in order, decoding ahead in background threads.

    Up to `depth` clips beyond the one handed out are read by `workers` threads while the caller
    computes (PyAV and Pillow release the GIL while they work), so at most `depth + 1` clips of
    pixels are held. A clip that cannot be read yields its `InputError` in place of the pixels;
    anything else raised (a bad option) is raised here. `options` are `load_clip`'s keywords.
    `then`, if given, runs on each clip's pixels in the worker that read them, and what it returns
    is yielded instead (eval's workers run the visual graph there); what it raises is raised here.
    Leaving the loop early cancels the clips not yet started and waits for those running.
    """
    if depth < 1 or workers < 1:
        raise ValueError(f"depth and workers must be at least 1, got {depth} and {workers}")
    # A bad option is the caller's error, not one clip's: raise it here, not in place of pixels.
    _check_options(**{k: options[k] for k in ("decoder", "aspect", "scaler") if k in options})
    options.pop("timings", None)  # one dict cannot take the parts of clips decoding at once

    def one(path):
        try:
            pixels = load_clip(path, num_frames, image_size, mean, std, **options)
        except InputError as e:
            return e
        return pixels if then is None else then(pixels)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blip3v-video")
    pending: deque = deque()
    todo = iter(paths)
    try:
        for path in todo:  # the first clip and `depth` after it
            pending.append((path, pool.submit(one, path)))
            if len(pending) > depth:
                break
        while pending:
            path, future = pending.popleft()
            yield path, future.result()
            # The caller is done with that clip: start the next, keeping `depth` ahead.
            for following in todo:
                pending.append((following, pool.submit(one, following)))
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Options, timings, errors, files


def _check_options(**given: str) -> None:
    allowed = {"decoder": DECODERS, "aspect": ASPECTS, "scaler": SCALERS}
    for name, value in given.items():
        if value not in allowed[name]:
            raise InputError(f"unknown video {name} {value!r}: expected one of {', '.join(allowed[name])}")


class _Clock:
    """Milliseconds per part of the video stage, added into the caller's `timings` dict."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings = timings
        if timings is not None:
            for key in TIMING_KEYS:
                timings.setdefault(key, 0.0)

    def add(self, key: str, start: float) -> float:
        """Adds the time since `start` (a perf_counter value) to `key`; returns the time now."""
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[key] += (now - start) * 1e3
        return now


def _input_error(path: str, problem: str) -> InputError:
    # The CLI prints the message as one line, and ffmpeg/Pillow messages sometimes carry newlines
    # (the path is safe: repr escapes them).
    return InputError(f"cannot read video {path!r}: {' '.join(problem.split())}")


def _av_problem(error: BaseException) -> str:
    # FFmpegError's str() repeats the errno and the file name; strerror is just the reason.
    if isinstance(error, av.error.FFmpegError):
        return getattr(error, "strerror", None) or str(error) or type(error).__name__
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


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


@dataclass
class _Clip:
    """What a read gives: the distinct frames picked and, per model frame, which one it is."""

    images: list[np.ndarray]  # each (H, W, 3) uint8 RGB upright, or (S, S, 3) from _ScaleInDecoder
    order: list[int]  # T positions into images


def _read(path: str, num_frames: int, decoder: str, convert, clock: _Clock, notes, finish=None) -> _Clip:
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    _check_file(path)
    image = _open_image(path, clock)
    if image is not None:
        with image:
            return _image_frames(image, path, num_frames, clock)
    return _video_frames(path, num_frames, decoder, convert or _to_rgb, clock, notes, finish)


def _picked(picked: dict[int, np.ndarray], wanted: list[int]) -> _Clip:
    keys = sorted(picked)
    slot = {index: at for at, index in enumerate(keys)}
    return _Clip([picked[i] for i in keys], [slot[i] for i in wanted])


# ---------------------------------------------------------------------------------------------
# Images (Pillow)


class _QuietPillow:
    """Pillow's warnings (decompression bomb, odd EXIF, palette transparency) off stderr while
    one image is opened or decoded; the lock keeps threads from interleaving the filter swap."""

    def __enter__(self):
        _IMAGE_LOCK.acquire()
        self.catcher = warnings.catch_warnings()
        self.catcher.__enter__()
        warnings.filterwarnings("ignore", module=r"PIL\.")
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    def __exit__(self, *exc):
        try:
            self.catcher.__exit__(*exc)
        finally:
            _IMAGE_LOCK.release()


def _image_format(path: str) -> tuple[str, str] | None:
    """(Pillow format, plugin module) for a file that starts like an image, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise _input_error(path, e.strerror or str(e)) from None
    for name, plugin, prefixes in _SIGNATURES:
        if head.startswith(prefixes) and (name != "WEBP" or head[8:12] == b"WEBP"):
            return name, plugin
    return None


def _open_image(path: str, clock: _Clock) -> Image.Image | None:
    """The file as a Pillow image if it has an image signature, else None (try it as a video)."""
    start = time.perf_counter()
    found = _image_format(path)
    if found is None:
        clock.add("video_open", start)
        return None
    try:
        with _QuietPillow():
            importlib.import_module(f"PIL.{found[1]}")  # registers the one plugin needed
            image = Image.open(path, formats=[found[0]])
    except UnidentifiedImageError:
        return None
    except Image.DecompressionBombError as e:
        raise _input_error(path, f"image too large to decode ({e})") from None
    except Exception as e:  # noqa: BLE001 - see _image_frames
        raise _input_error(path, f"cannot open image ({type(e).__name__}: {e})") from None
    finally:
        clock.add("video_open", start)
    try:
        _limit_image_size(image, path)
    except BaseException as e:
        image.close()
        if isinstance(e, Exception) and not isinstance(e, InputError):
            raise _input_error(path, f"cannot open image ({type(e).__name__}: {e})") from None
        raise
    return image


def _limit_frame_size(width: int, height: int, path: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        size = f"{width}x{height} ({width * height / 1e6:.0f} megapixels)"
        raise _input_error(path, f"frames are {size}, over the {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels limit")


def _limit_image_size(image: Image.Image, path: str) -> None:
    """Refuses a declared size over `MAX_IMAGE_PIXELS` before any pixel is decoded; a JPEG over it
    is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that brings it under instead."""
    width, height = image.size
    if width * height <= MAX_IMAGE_PIXELS:
        return
    if image.format in ("JPEG", "MPO"):
        for scale in (2, 4, 8):
            if math.ceil(width / scale) * math.ceil(height / scale) <= MAX_IMAGE_PIXELS:
                # draft keeps the image at least the asked size, so this is exactly 1/scale.
                with _QuietPillow():
                    image.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
                return
    limit = f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels"
    size = f"{width}x{height} ({width * height / 1e6:.0f} megapixels)"
    raise _input_error(path, f"image is {size}, over the {limit} limit")


def _image_frames(image: Image.Image, path: str, num_frames: int, clock: _Clock) -> _Clip:
    start = time.perf_counter()
    picked: dict[int, np.ndarray] = {}
    try:
        with _QuietPillow():
            count = getattr(image, "n_frames", 1) if image.format in ANIMATED_FORMATS else 1
            wanted = frame_indices(count, num_frames)
            width, height = image.size
            if count > 1 and width * height * (max(wanted) + 1) > MAX_ANIMATION_PIXELS:
                frames = f"{max(wanted) + 1} frames of {width}x{height}"
                raise _input_error(path, f"animation too large to decode ({frames})")
            # Ascending order: GIF frames are deltas, seeking backwards re-decodes from the start.
            for index in sorted(set(wanted)):
                image.seek(index)
                upright = ImageOps.exif_transpose(image)
                picked[index] = np.asarray(upright.convert("RGB"))  # (H, W, 3)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        # Pillow's parsers surface a corrupt file as whatever they trip on (OSError, struct.error,
        # IndexError, SyntaxError...); every one of them means the same thing here.
        raise _input_error(path, f"cannot decode image ({type(e).__name__}: {e})") from None
    finally:
        clock.add("video_decode", start)
    return _picked(picked, wanted)


# ---------------------------------------------------------------------------------------------
# Videos (PyAV): opening, decoding, converting


def hardware_decoder_problem(device: str = "cuda") -> str | None:
    """None where `decoder="cuda"` can open its device here, else why not (one line): what
    `decoder="auto"` falls back to the CPU for. Checked once per process."""
    hw = _hwaccel(device, software_fallback=False)
    return hw if isinstance(hw, str) else None


def _hwaccel(device: str, software_fallback: bool):
    """A PyAV HWAccel for `device`, or the reason there is none (str)."""
    hwaccel = getattr(getattr(av, "codec", None), "hwaccel", None)
    if hwaccel is None or not hasattr(hwaccel, "HWAccel"):
        return f"PyAV {av.__version__} has no hardware decoding (PyAV 14 or later has)"
    if device not in hwaccel.hwdevices_available():
        return f"this PyAV's FFmpeg has no {device} support"
    if device not in _HW_STATE:
        # One try per process: creating the device context is what fails without a GPU/driver.
        try:
            hwaccel.HWAccel(device_type=device, allow_software_fallback=False).create(av.codec.Codec("h264", "r"))
            _HW_STATE[device] = None
        except Exception as e:  # noqa: BLE001 - any failure means no usable device
            _HW_STATE[device] = f"cannot open a {device} device ({_av_problem(e)})"
    if _HW_STATE[device] is not None:
        return _HW_STATE[device]
    return hwaccel.HWAccel(device_type=device, allow_software_fallback=software_fallback)


def _open_plain(path: str) -> av.container.InputContainer:
    try:
        return av.open(path, **_OPEN_KWARGS)
    except av.error.FFmpegError as e:
        problem = f"not a readable video or image: {_av_problem(e)}"
        raise _input_error(path, f"{problem} (truncated, corrupt or not a video)") from None
    except OSError as e:
        raise _input_error(path, e.strerror or str(e)) from None
    except Exception as e:  # noqa: BLE001 - PyAV's demuxers raise more than FFmpegError
        raise _input_error(path, f"not a readable video or image: {_av_problem(e)}") from None


def _open_container(path: str, decoder: str, clock: _Clock, notes: list[str] | None):
    """(container, decoder used): "cuda" or "cpu"."""
    start = time.perf_counter()
    try:
        if decoder == "cpu":
            return _open_plain(path), "cpu"
        hw = _hwaccel("cuda", software_fallback=decoder == "auto")
        if not isinstance(hw, str):
            try:
                return av.open(path, hwaccel=hw, **_OPEN_KWARGS), "cuda"
            except Exception as e:  # noqa: BLE001
                hw = f"the cuda decoder refused it ({_av_problem(e)})"
        container = _open_plain(path)  # a file that does not open at all is reported as such
        if decoder == "cuda":
            container.close()
            raise _input_error(path, f"no hardware decoder available: {hw}")
        if notes is not None:
            notes.append(f"video decoder auto: decoded on the CPU, {hw}")
        return container, "cpu"
    finally:
        clock.add("video_open", start)


def _video_stream(container, path: str):
    # Cover art in an audio file is a one-picture "video" stream, not a clip (PyAV < 13 cannot tell).
    attached = getattr(getattr(av.stream, "Disposition", None), "attached_pic", 0)
    streams = [s for s in container.streams.video if not (attached and s.disposition & attached)]
    if not streams:
        kinds = sorted({s.type for s in container.streams})
        found = f" (only {', '.join(kinds)})" if kinds else ""
        raise _input_error(path, f"no video stream{found}")
    stream = streams[0]
    ctx = stream.codec_context
    _limit_frame_size(ctx.width or 0, ctx.height or 0, path)
    if (ctx.width or 0) * (ctx.height or 0) >= THREAD_MIN_PIXELS:
        stream.thread_type = "AUTO"
    return stream


def _set_threads(stream, thread_type: str) -> None:
    """The decoder's threading, where the frames are large enough for threads (`_video_stream`);
    a decoder already opened keeps what it has."""
    ctx = stream.codec_context
    if (ctx.width or 0) * (ctx.height or 0) < THREAD_MIN_PIXELS or getattr(ctx, "is_open", True):
        return
    stream.thread_type = thread_type
    if thread_type == "NONE":
        ctx.thread_count = 1


def _demux(container, stream) -> Iterator:
    """Packets of `stream` from the current position, ending quietly at an unreadable stretch.

    Any exception counts: PyAV's demuxer raises IndexError at the end of an MPEG-TS where a
    stream appeared midway, for one.
    """
    try:
        for count, packet in enumerate(container.demux(stream)):
            if count >= MAX_PACKETS:
                return
            yield packet
    except Exception:  # noqa: BLE001
        return


def _decode(stream, packets: Iterator, clock: _Clock, keep: set[int] | None = None) -> Iterator:
    """Frames decoded from `packets`, in presentation order, flushed at the end.

    Never raises: a packet the decoder rejects is skipped (up to `MAX_BAD_PACKETS` in a row).
    With `keep` (a set of pts) an h264 packet whose pts is not in it is decoded only if another
    frame references it (skip_frame NONREF): a frame nothing references cannot change any other.
    """
    ctx = stream.codec_context
    skipping = SKIP_NONREF and keep is not None and ctx.name == "h264"
    mode = None  # unknown: the first packet sets it
    bad = 0
    flushed = False
    packets = iter(packets)
    try:
        while True:
            start = time.perf_counter()
            packet = next(packets, None)
            if packet is None:
                break
            flushed = packet.size == 0  # demux ends with empty packets that drain the decoder
            if skipping:
                wanted = flushed or packet.pts is None or packet.pts in keep
                if mode != ("DEFAULT" if wanted else "NONREF"):
                    mode = ctx.skip_frame = "DEFAULT" if wanted else "NONREF"
            try:
                frames = stream.decode(packet)
            except Exception:  # noqa: BLE001
                frames = None
            clock.add("video_decode", start)
            if frames is None:
                bad += 1
                if bad > MAX_BAD_PACKETS:
                    break
                continue
            bad = 0
            yield from frames
        if not flushed:
            start = time.perf_counter()
            if skipping and mode != "DEFAULT":
                mode = ctx.skip_frame = "DEFAULT"
            try:
                frames = stream.decode(None)
            except Exception:  # noqa: BLE001
                frames = []
            clock.add("video_decode", start)
            yield from frames
    finally:
        if skipping and mode != "DEFAULT":
            ctx.skip_frame = "DEFAULT"  # the next read of this decoder starts from the default


def _rotation(frame) -> int:
    """The display matrix's counterclockwise angle in degrees (0 without one)."""
    angle = getattr(frame, "rotation", None)
    if angle is not None:
        return angle
    # PyAV < 13: the matrix as side data, read as av_display_rotation_get does (16.16 fixed point).
    for data in frame.side_data:
        if getattr(data.type, "name", str(data.type)) == "DISPLAYMATRIX":
            m = np.frombuffer(bytes(data), "<i4")[:9] / 65536.0
            scale = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
            if scale[0] and scale[1]:
                return int(-math.degrees(math.atan2(m[1] / scale[1], m[0] / scale[0])))
    return 0


def _to_rgb(frame, reformatter) -> np.ndarray:
    """A decoded frame as (H, W, 3) uint8 RGB, turned upright by its display matrix.

    The same conversion as `frame.to_ndarray(format="rgb24")`, through one reformatter per read:
    PyAV builds a new swscale context per frame otherwise, 2-4 ms each even for small frames.
    """
    rgb = reformatter.reformat(frame, format="rgb24").to_ndarray()  # (H, W, 3)
    # `rotation` is the display matrix's counterclockwise angle (av_display_rotation_get), the
    # way np.rot90 turns for k > 0; ffmpeg's autorotate turns the same way (fftools get_rotation
    # and ffmpeg_filter.c: -90, a phone held upright, becomes transpose=clock). Flips in the
    # matrix are ignored: cameras write rotations only.
    turns = round(_rotation(frame) / 90) % 4
    return np.rot90(rgb, turns) if turns else rgb


class _ScaleInDecoder:
    """scaler="ffmpeg": each decoded frame straight to (S, S, 3) uint8 RGB by swscale bicubic,
    upright, padded per `aspect` (the content scaled to fit, centred on the fill colour)."""

    def __init__(self, size: int, aspect: str, fill: tuple[int, int, int]):
        self.size, self.aspect, self.fill = size, aspect, fill

    def __call__(self, frame, reformatter) -> np.ndarray:
        s = self.size
        turns = round(_rotation(frame) / 90) % 4
        if self.aspect == "squash":
            width = height = s
        else:
            side = max(frame.width, frame.height)
            width, height = max(1, round(frame.width * s / side)), max(1, round(frame.height * s / side))
        rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24",
                                   interpolation="BICUBIC").to_ndarray()  # (h, w, 3)
        if turns:
            rgb = np.rot90(rgb, turns)
        return _pad_square(rgb, self.fill)  # the longer side is already S


class _Converter:
    """Applies the read's frame conversion with one reformatter, timing it as video_convert.

    `finish`, if given, is called with each converted image on the same thread (load_clip's
    resize, done while other decoders still run)."""

    def __init__(self, convert, clock: _Clock, path: str, finish=None):
        self.convert, self.clock, self.path, self.finish = convert, clock, path, finish
        self.parallel_finish = None  # what decoders side by side pass as their `finish`
        self.reformatter = av.video.reformatter.VideoReformatter()

    def __call__(self, frame) -> np.ndarray:
        _limit_frame_size(frame.width, frame.height, self.path)  # a stream may change size midway
        start = time.perf_counter()
        try:
            image = self.convert(frame, self.reformatter)
            if self.finish is not None:
                self.finish(image)
            return image
        finally:
            self.clock.add("video_convert", start)


def _video_frames(path: str, num_frames: int, decoder: str, convert, clock: _Clock, notes, finish) -> _Clip:
    container, used = _open_container(path, decoder, clock, notes)
    converter = _Converter(convert, clock, path)
    converter.parallel_finish = finish  # for decoders side by side only (load_clip resizes the rest at once)
    try:
        with container:
            stream = _video_stream(container, path)
            try:
                # Hardware decoding stays on one decoder: the GPU has its own parallelism.
                clip = _read_by_seeking(path, container, stream, num_frames, converter, clock, used == "cpu")
            except InputError:
                raise
            except Exception:  # noqa: BLE001 - a seek or demux surprise: the decode path still works
                clip = None
        if clip is None:
            clip = _read_by_decoding(path, num_frames, used, converter, clock)
        return clip
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside PyAV is a file it cannot read
        raise _input_error(path, f"decoding failed: {_av_problem(e)}") from None


# ---------------------------------------------------------------------------------------------
# Seek path


@dataclass(frozen=True)
class _Key:
    """A keyframe packet: presentation and decode time, byte position (-1 when unknown)."""

    pts: int
    dts: int | None
    pos: int


@dataclass
class _Table:
    """What the seek path knows before it decodes a wanted frame."""

    pts: list[int]  # presentation time of frame i, ascending: N = len(pts)
    keys: list[_Key]  # ascending pts
    exact: bool  # pts read from every packet (else a constant-rate grid)
    frames: Iterator | None = None  # a decoder already running (the grid's anchor frame)
    first: object = None  # that anchor: frame 0


class _Surprise(Exception):
    """The seek path met something it does not handle: the decode path takes over."""


def _index_table(container, stream, clock: _Clock) -> _Table | None:
    """The table from an index with one entry per frame at a constant rate; None (having read
    nothing) when there is no such index."""
    start = time.perf_counter()
    entries = getattr(stream, "index_entries", None)  # PyAV >= 14
    header_count = stream.frames
    if entries is None or header_count <= 0 or len(entries) != header_count:
        return None
    kept = [e for e in entries if not e.is_discard]  # edit-list trims never reach the output
    if not kept:
        return None
    dts = sorted(e.timestamp for e in kept)
    steps = {b - a for a, b in zip(dts, dts[1:])}
    if len(steps) > 1:
        return None  # variable frame rate: the demux pass reads the real pts
    clock.add("video_index", start)
    # Constant rate: frame i is shown at first_pts + i * step (B-frames reorder decoding, not the
    # grid). Decoding frame 0 gives first_pts and leaves the decoder running.
    frames = _decode(stream, _demux(container, stream), clock)
    first = next(frames, None)
    if first is None or first.pts is None:
        raise _Surprise("no timestamp on the first frame")
    step = steps.pop() if steps else 0
    pts = [first.pts + i * step for i in range(len(dts))]
    # Index timestamps are decode times; a keyframe is shown `delay` ticks later (B-frames).
    delay = max(0, pts[0] - dts[0])
    # Index positions need not be packet positions (avi's point at the chunk header): match by dts.
    keys = sorted((_Key(e.timestamp + delay, e.timestamp, -1) for e in kept if e.is_keyframe), key=lambda k: k.pts)
    return _Table(pts, keys, exact=False, frames=frames, first=first)


def _packet_table(container, stream) -> _Table | None:
    """The table from one demux-only pass: every packet's pts, keyframes with their position.

    None when a packet has no pts (nothing to identify frames by). Call it on a freshly opened
    container to see every frame.
    """
    pts: list[int] = []
    keys: list[_Key] = []
    for packet in _demux(container, stream):
        if packet.size == 0 or packet.is_discard:
            continue
        if packet.pts is None:
            return None
        pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(_Key(packet.pts, packet.dts, packet.pos if packet.pos is not None else -1))
    if not pts:
        return None
    pts.sort()
    if any(b <= a for a, b in zip(pts, pts[1:])):
        return None  # two packets shown at once: pts cannot tell frames apart
    return _Table(pts, sorted(keys, key=lambda k: k.pts), exact=True)


def _read_by_seeking(path: str, container, stream, num_frames: int, convert: _Converter, clock: _Clock,
                     parallel: bool) -> _Clip | None:
    """Path 2 of the module docstring; None when it does not apply or meets a surprise."""
    table = _index_table(container, stream, clock)
    # Two threads at least: the guess is read while the exact table is made.
    if table is None and parallel and SPECULATE_FROM_CUES and _gop_workers(stream) > 1:
        clip = _read_from_cues(path, container, stream, num_frames, convert, clock)
        if clip is not _NO_CUES:
            return clip
    if table is None:
        start = time.perf_counter()
        table = _packet_table(container, stream)
        clock.add("video_index", start)
    if table is None:
        return None
    return _read_with_table(path, container, stream, table, num_frames, convert, clock, parallel)


def _read_with_table(path: str, container, stream, table: _Table, num_frames: int, convert: _Converter,
                     clock: _Clock, parallel: bool) -> _Clip | None:
    """The frames `frame_indices` picks from the frames `table` lists; None on a surprise."""
    wanted = frame_indices(len(table.pts), num_frames)
    picked: dict[int, np.ndarray] = {}
    if table.first is not None and 0 in wanted:
        picked[0] = convert(table.first)
    groups = _gop_groups(table, sorted(set(wanted) - picked.keys()))
    if groups is None:
        return None
    workers = min(len(groups), _gop_workers(stream)) if parallel else 1
    if workers > 1:
        if table.frames is not None:
            table.frames.close()  # the anchor's decoder: each worker has its own
        got = _read_groups_in_parallel(path, table, groups, workers, convert, clock)
    else:
        reader = _Reader(container, stream, table, anchored=True)
        got = _read_groups(reader, table, groups, convert)
        reader.close()
    if got is None:
        return None
    picked.update(got)
    return _picked(picked, wanted)


_NO_CUES = object()  # _read_from_cues: no guess to make, nothing read


def _read_from_cues(path: str, container, stream, num_frames: int, convert: _Converter, clock: _Clock):
    """Matroska/WebM: the frames read from a guessed table while the exact one is made.

    The Cues (read by libavformat into the stream's index at the first seek) list keyframes only,
    not every frame, so they cannot say which frame is frame i. They do give a guess: frames at
    the stream's constant rate from the first keyframe for the segment's duration, every listed
    keyframe on that grid. The wanted frames of the guess are decoded (their pts checked against
    it as they come) while the demux-only pass runs on its own container in another thread; the
    result is kept only if that pass lists exactly the guessed pts, so it is the same as reading
    with the pass's table. Otherwise the frames are read again with the pass's table.
    `_NO_CUES` (nothing read) when the container is not Matroska or PyAV has no index access.
    """
    if "matroska" not in container.format.name or getattr(stream, "index_entries", None) is None:
        return _NO_CUES
    index_timings: dict[str, float] = {}

    def exact_table() -> _Table | None:
        index_clock = _Clock(index_timings)
        start = time.perf_counter()
        with _open_plain(path) as own:
            start = index_clock.add("video_open", start)
            try:
                return _packet_table(own, own.streams[stream.index])
            finally:
                index_clock.add("video_index", start)

    before = dict(clock.timings) if clock.timings is not None else {}
    phase = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blip3v-index")
    try:
        pending = pool.submit(exact_table)
        clip = None
        try:
            start = time.perf_counter()
            try:
                guess = _cue_table(container, stream)
            except Exception:  # noqa: BLE001 - no guess: wait for the pass (on its own, fresh container)
                guess = None
            clock.add("video_index", start)
            if guess is not None:
                clip = _read_with_table(path, container, stream, guess, num_frames, convert, clock, True)
        finally:
            try:
                exact = pending.result()
            except Exception:  # noqa: BLE001 - the pass fails as it would have on the first container
                exact = None
            _share_wall(clock, before, [index_timings], phase)
    finally:
        pool.shutdown(wait=True)
    if exact is None:
        return None
    if clip is not None and exact.pts == guess.pts:
        return clip
    return _read_with_table(path, container, stream, exact, num_frames, convert, clock, True)


def _cue_table(container, stream) -> _Table | None:
    """The constant-rate table guessed from a Matroska stream's Cues (see `_read_from_cues`);
    None when there is none to guess. Moves the container to the start."""
    rate, duration = stream.average_rate, container.duration
    if not rate or not duration or duration <= 0 or stream.time_base is None:
        return None
    container.seek(0, stream=stream, backward=True)  # reads the Cues into the index
    cues = [e for e in stream.index_entries if e.is_keyframe]
    if not cues:
        return None
    first = min(e.timestamp for e in cues)
    step = 1 / (Fraction(rate) * Fraction(stream.time_base))  # ticks per frame
    count = round((Fraction(duration, 1_000_000) - first * Fraction(stream.time_base)) * Fraction(rate))
    if not 0 < count <= MAX_PACKETS:
        return None
    # first + i * step to the nearest tick, in integers: (2 i num + den) // (2 den).
    num, den = step.numerator, step.denominator
    pts = [first + (2 * i * num + den) // (2 * den) for i in range(count)]
    on_grid = set(pts)
    if any(e.timestamp not in on_grid for e in cues):
        return None
    # A cue's position is its cluster's, not the block's: the landing is checked by pts instead.
    keys = [_Key(t, None, -1) for t in sorted({e.timestamp for e in cues})]
    return _Table(pts, keys, exact=True)


def _share_wall(clock: _Clock, before: dict[str, float], others: list[dict[str, float]], start: float) -> None:
    """Parts timed on several threads at once, made to cover the wall time since `start` once.

    `clock` has gained parts since `before` (the calling thread's, and anything already added);
    `others` hold other threads' parts over the same time. Each part gets its share of the wall
    time: its summed thread time times wall / all threads' time.
    """
    if clock.timings is None:
        return
    wall = (time.perf_counter() - start) * 1e3
    parts = [{key: clock.timings[key] - before[key] for key in TIMING_KEYS}, *others]
    busy = sum(sum(t.values()) for t in parts)
    for key in TIMING_KEYS:
        clock.timings[key] = before[key] + sum(t.get(key, 0.0) for t in parts) * wall / max(busy, 1e-9)


def _gop_groups(table: _Table, indices: list[int]) -> list[list[int]] | None:
    """The frames to read (ascending) grouped by the keyframe they are decoded from: one group
    per keyframe that has frames wanted after it. None when a frame lies before every keyframe
    and no decoder runs from the start (only decoding from the start finds it)."""
    key_pts = [k.pts for k in table.keys]
    groups: list[list[int]] = []
    last_key = None
    for index in indices:
        at = bisect.bisect_right(key_pts, table.pts[index]) - 1
        if at < 0 and table.frames is None:
            return None
        if groups and at == last_key:
            groups[-1].append(index)
        else:
            groups.append([index])
        last_key = at
    return groups


def _gop_workers(stream) -> int:
    """How many decoders may run side by side: one per usable core, for frames large enough that
    a decoder is worth its own open container (`GOP_PARALLEL_MIN_PIXELS`)."""
    ctx = stream.codec_context
    if (ctx.width or 0) * (ctx.height or 0) < GOP_PARALLEL_MIN_PIXELS:
        return 1
    if GOP_WORKERS is not None:
        return GOP_WORKERS
    return usable_cores()


class _Reader:
    """One container's decoder reaching wanted frames in ascending pts order: it decodes on from
    the last frame it gave while no keyframe lies between, and seeks to the keyframe before the
    target otherwise."""

    def __init__(self, container, stream, table: _Table, *, anchored: bool = False):
        self.container, self.stream, self.table = container, stream, table
        self.keep: set[int] = set()  # set by the caller: the pts of every wanted frame
        self.known = set(table.pts) if table.exact else None
        self.key_pts = [k.pts for k in table.keys]
        # The grid's anchor (frame 0) leaves the first container's decoder running: decode on from it.
        self.frames = table.frames if anchored else None
        self.last_pts = table.first.pts if self.frames is not None else None

    def frame(self, target: int, clock: _Clock):
        """The decoded frame shown at pts `target`, or None (a surprise: see _decode_until)."""
        at = bisect.bisect_right(self.key_pts, target) - 1
        frames, last_pts = self.frames, self.last_pts
        if frames is None or last_pts >= target or (at >= 0 and self.key_pts[at] > last_pts):
            if at < 0:
                return None  # no keyframe shown before the target: only decoding from the start finds it
            if frames is not None:
                frames.close()  # puts the decoder's skip_frame back before the seek
                self.frames = None
            packets = _seek(self.container, self.stream, self.table.keys, at, clock)
            if packets is None:
                return None
            self.frames = frames = _decode(self.stream, packets, clock, self.keep)
        frame = _decode_until(frames, target, self.known)
        if frame is None or (self.table.exact and frame.interlaced_frame):
            return None  # interlaced: field pictures may come two packets to a frame, count frames instead
        self.last_pts = frame.pts
        return frame

    def close(self) -> None:
        if self.frames is not None:
            self.frames.close()
            self.frames = None


def _read_groups(reader: _Reader, table: _Table, groups: list[list[int]], convert) -> dict | None:
    """The groups' frames read one after another by one decoder."""
    reader.keep = {table.pts[i] for group in groups for i in group}
    picked = {}
    for group in groups:
        for index in group:
            frame = reader.frame(table.pts[index], convert.clock)
            if frame is None:
                return None
            picked[index] = convert(frame)
    return picked


def _read_groups_in_parallel(path: str, table: _Table, groups: list[list[int]], workers: int,
                             convert: _Converter, clock: _Clock) -> dict | None:
    """The groups' frames read by `workers` decoders side by side, each with its own container,
    decoder (threads per `GOP_THREAD_TYPE`) and converter: groups start at different keyframes,
    so no decoder needs another's frames. The calling thread is one of them; the largest groups
    go first so the last to finish is a short one. PyAV releases the GIL while it demuxes,
    decodes and converts, so the threads use separate cores.

    Timings: each worker times its own parts; they are added into `clock` scaled so that together
    they cover the wall time the workers took (each part's share of the work done)."""
    keep = {table.pts[i] for group in groups for i in group}
    # Frames from the keyframe to the last wanted one: what a group costs to decode.
    thread_type = GOP_THREAD_TYPE or ("NONE" if len(groups) >= 2 * workers else "AUTO")
    key_pts = [k.pts for k in table.keys]
    key_index = {}
    for group in groups:
        at = bisect.bisect_right(key_pts, table.pts[group[0]]) - 1
        key_index[id(group)] = bisect.bisect_left(table.pts, table.keys[at].pts) if at >= 0 else 0
    todo = deque(sorted(groups, key=lambda g: g[-1] - key_index[id(g)], reverse=True))
    lock = threading.Lock()
    picked: dict[int, np.ndarray] = {}
    failed = threading.Event()
    parts: list[dict[str, float]] = []

    def work() -> None:
        timings: dict[str, float] = {}
        with lock:
            parts.append(timings)
        wclock = _Clock(timings)
        wconvert = _Converter(convert.convert, wclock, path, convert.parallel_finish)
        container = own = None
        try:
            start = time.perf_counter()
            container = _open_plain(path)
            stream = _video_stream(container, path)
            wclock.add("video_open", start)
            _set_threads(stream, thread_type)
            own = _Reader(container, stream, table)
            own.keep = keep
            while not failed.is_set():
                with lock:
                    if not todo:
                        return
                    group = todo.popleft()
                for index in group:
                    frame = own.frame(table.pts[index], wclock)
                    if frame is None:
                        failed.set()
                        return
                    picked[index] = wconvert(frame)
        except Exception:  # noqa: BLE001 - any surprise: the decode path takes over
            failed.set()
        finally:
            if own is not None:
                own.close()
            if container is not None:
                container.close()

    before = dict(clock.timings) if clock.timings is not None else {}
    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="blip3v-gop")
    try:
        helpers = [pool.submit(work) for _ in range(workers - 1)]
        work()
        for helper in helpers:
            helper.result()
    finally:
        pool.shutdown(wait=True)
        _share_wall(clock, before, parts, start)
    return None if failed.is_set() else picked


def _seek(container, stream, keys: list[_Key], at: int, clock: _Clock) -> Iterator | None:
    """Packets from keyframe `keys[at]` on, or None when no seek reaches it.

    Demuxers differ on what a seek timestamp means (mov and mkv seek by presentation time, avi by
    decode time, MPEG-TS by a timestamp search that can land a few packets before the keyframe), so
    the landing is checked: packets before the keyframe are skipped, unread; a landing past it is
    retried from its decode time, then from `SEEK_BACKOFF` keyframes earlier, last from the start.
    """
    start = time.perf_counter()
    key = keys[at]
    tries = [key.pts] + ([key.dts] if key.dts is not None else [])
    tries += [keys[at - back].pts for back in SEEK_BACKOFF if at - back >= 0] + [None]
    try:
        for seek_to in dict.fromkeys(tries):  # in order, without repeats
            try:
                if seek_to is None:
                    container.seek(0)  # AV_TIME_BASE units and no stream: the demuxer's start
                else:
                    container.seek(int(seek_to), stream=stream, backward=True)
            except Exception:  # noqa: BLE001 - e.g. no keyframe before this timestamp: try the next
                continue
            packets = _demux(container, stream)
            for packet in packets:
                if _is_key(packet, key):
                    return chain([packet], packets)
                if _is_past(packet, key):
                    break  # landed late
        return None
    finally:
        clock.add("video_seek", start)


def _is_key(packet, key: _Key) -> bool:
    if key.pos >= 0 and packet.pos is not None and packet.pos >= 0:
        return packet.pos == key.pos
    if key.dts is not None:
        return packet.is_keyframe and packet.dts == key.dts
    return packet.is_keyframe and packet.pts == key.pts


def _is_past(packet, key: _Key) -> bool:
    if packet.size == 0:
        return True  # the end: the keyframe was not after the landing
    if key.pos >= 0 and packet.pos is not None and packet.pos >= 0:
        return packet.pos > key.pos
    if key.dts is None:  # known by pts alone (Matroska cues): a later keyframe is past it
        return packet.is_keyframe and packet.pts is not None and packet.pts > key.pts
    return packet.dts is not None and packet.dts > key.dts


def _decode_until(frames: Iterator, target: int, known: set[int] | None = None):
    """The frame with pts exactly `target`, or None if the stream passes or ends before it.

    A frame flagged corrupt (decoded from missing references), or one whose pts the table does not
    hold (`known`), also gives None: the caller then decodes from the start, which is never wrong.
    """
    for frame in frames:
        if frame.pts is None or frame.pts > target or (known is not None and frame.pts not in known):
            return None
        if frame.pts == target:
            return None if frame.is_corrupt else frame
    return None


# ---------------------------------------------------------------------------------------------
# Decode path


def _frame_bytes(frame) -> int:
    return sum(plane.buffer_size for plane in frame.planes)


def _read_by_decoding(path: str, num_frames: int, decoder: str, convert: _Converter, clock: _Clock) -> _Clip:
    """Path 3 of the module docstring."""
    container, _ = _open_container(path, decoder, clock, None)
    with container:
        stream = _video_stream(container, path)
        pts: list[int | None] = []
        held: list | None = []
        held_bytes = 0
        for frame in _decode(stream, _demux(container, stream), clock):
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
            return _picked({i: convert(held[i]) for i in set(wanted)}, wanted)
        del held
        picked = _pick_by_pts(container, stream, pts, wanted, convert, clock)
    if picked is None:
        picked = _pick_in_order(path, wanted, decoder, convert, clock)
    return picked


def _pick_by_pts(container, stream, pts: list[int | None], wanted: list[int], convert, clock) -> _Clip | None:
    """Wanted frames found by seeking to their recorded pts; None when pts cannot identify them."""
    if any(p is None for p in pts) or any(b <= a for a, b in zip(pts, pts[1:])):
        return None
    picked: dict[int, np.ndarray] = {}
    for index in sorted(set(wanted)):
        frames = _seek_near(container, stream, pts[index], pts, clock)
        frame = _decode_until(frames, pts[index]) if frames is not None else None
        if frame is None:
            return None
        picked[index] = convert(frame)
    return _picked(picked, wanted)


def _seek_near(container, stream, target: int, points: list[int], clock: _Clock) -> Iterator | None:
    """Frames decoded from a keyframe at or before pts `target` (no keyframe table here: the
    first decoded frame must not be after the target), or None if no seek finds one."""
    at = bisect.bisect_right(points, target) - 1
    tries = [target] + [points[at - back] for back in SEEK_BACKOFF if at - back > 0] + [None]
    for seek_to in dict.fromkeys(tries):
        start = time.perf_counter()
        try:
            if seek_to is None:
                container.seek(0)
            else:
                container.seek(int(seek_to), stream=stream, backward=True)
        except Exception:  # noqa: BLE001
            continue
        finally:
            clock.add("video_seek", start)
        frames = _decode(stream, _demux(container, stream), clock)
        first = next(frames, None)
        if first is not None and first.pts is not None and first.pts <= target:
            return chain([first], frames)
    return None


def _pick_in_order(path: str, wanted: list[int], decoder: str, convert, clock: _Clock) -> _Clip:
    """Wanted frames by counting decoded frames from the start: slow, but needs no timestamps."""
    needed = set(wanted)
    picked: dict[int, np.ndarray] = {}
    container, _ = _open_container(path, decoder, clock, None)
    with container:
        stream = _video_stream(container, path)
        for index, frame in enumerate(_decode(stream, _demux(container, stream), clock)):
            if index in needed:
                picked[index] = convert(frame)
                if len(picked) == len(needed):
                    break
    if len(picked) != len(needed):
        raise _input_error(path, "the second decoding pass gave fewer frames than the first")
    return _picked(picked, wanted)


# ---------------------------------------------------------------------------------------------
# Resizing and normalising


def _pad_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    # int(255 * m): LLaVA-style expand2square(img, tuple(int(x * 255) for x in image_mean)).
    return tuple(min(255, max(0, int(255 * m))) for m in mean)  # type: ignore[return-value]


def _resize(frame: np.ndarray, size: int, aspect: str, fill: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8 → (S, S, 3) uint8 by Pillow bicubic (antialiased when shrinking)."""
    if aspect == "pad":
        frame = _pad_square(frame, fill)
    if frame.shape[:2] == (size, size):
        return np.ascontiguousarray(frame)
    return np.asarray(Image.fromarray(np.ascontiguousarray(frame)).resize((size, size), Image.Resampling.BICUBIC))


def _pad_square(x: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """(..., H, W, 3) uint8 centred on a square of `fill`: (..., side, side, 3), side = max(H, W)."""
    height, width = x.shape[-3:-1]
    if height == width:
        return x
    side = max(height, width)
    square = np.empty((*x.shape[:-3], side, side, 3), np.uint8)
    square[:] = fill
    top, left = (side - height) // 2, (side - width) // 2
    square[..., top : top + height, left : left + width, :] = x
    return square


def _resize_all(frames: list[np.ndarray], size: int, aspect: str, fill: tuple[int, int, int]) -> list[np.ndarray]:
    """`_resize` of each frame, bit for bit, in two Pillow calls for all frames of one size.

    Pillow resizes in two one-axis passes (horizontal, then vertical), each output row or column
    depending only on its own input row or column, rounded to uint8 between the passes. So the
    frames stacked one above the other take the horizontal pass together, and side by side the
    vertical one: the same coefficients on the same pixels as frame by frame. For a small clip
    that halves what the resize holds the GIL for (its coefficients and images are made once),
    which decoders running side by side wait on (tests/test_video_speed_paths.py checks equality).
    Pillow 13 runs the vertical pass first where the height shrinks by more than twice as many
    pixels as the width (older Pillow never does); those frames are resized one by one, so each
    Pillow keeps its own order."""
    if len(frames) < 2 or any(f.shape != frames[0].shape for f in frames):
        return [_resize(f, size, aspect, fill) for f in frames]
    height, width = frames[0].shape[:2]
    if aspect == "pad":
        height = width = max(height, width)
    if height - size > 0 and height - size > 2 * (width - size):
        return [_resize(f, size, aspect, fill) for f in frames]
    stack = np.stack(frames)  # (N, H, W, 3)
    n = len(frames)
    if aspect == "pad":
        stack = _pad_square(stack, fill)  # (N, side, side, 3)
    if width != size:  # rows: frames one above the other, (N * H, W, 3) -> (N * H, S, 3)
        tall = Image.fromarray(stack.reshape(n * height, width, 3))
        stack = np.asarray(tall.resize((size, n * height), Image.Resampling.BICUBIC)).reshape(n, height, size, 3)
    if height != size:  # columns: frames side by side, (H, N * S, 3) -> (S, N * S, 3)
        wide = Image.fromarray(np.ascontiguousarray(stack.transpose(1, 0, 2, 3)).reshape(height, n * size, 3))
        stack = np.asarray(wide.resize((n * size, size), Image.Resampling.BICUBIC))
        stack = stack.reshape(size, n, size, 3).transpose(1, 0, 2, 3)  # (N, S, S, 3)
    return list(stack)


def _normalise(resized: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(T, S, S, 3) uint8 → (T, 3, S, S) float32, (x / 255 - mean) / std in float32 per element."""
    x = np.ascontiguousarray(resized.transpose(0, 3, 1, 2)).astype(np.float32)  # (T, 3, S, S)
    x /= np.float32(255.0)
    x -= np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    x /= np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return x


def _same_size(frames: list[np.ndarray], height: int, width: int) -> list[np.ndarray]:
    """Frames of another size resized bicubic to (height, width): streams can change resolution
    midway. `preprocess` squashes every frame to S×S anyway, so this only decides the intermediate
    size (kept as it always was, for the same pixels)."""
    out = []
    for frame in frames:
        if frame.shape[:2] != (height, width):
            image = Image.fromarray(np.ascontiguousarray(frame))
            frame = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
        out.append(frame)
    return out


def _stack(frames: list[np.ndarray]) -> np.ndarray:
    """(T, H, W, 3) at the first frame's size (see `_same_size`)."""
    return np.ascontiguousarray(np.stack(_same_size(frames, *frames[0].shape[:2])))  # (T, H, W, 3)
