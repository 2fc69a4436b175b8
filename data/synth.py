"""Synthetic video question answering: coloured shapes on a dark canvas, for training a tiny model.

A clip is `num_frames` frames (24 at 12 fps, 128x128 by default) of 1-4 flat shapes on a constant
near-black background; each clip comes with one question and a one-word answer. Six categories:
three can be read off any single frame (`colour`, `shape`, `count`) and three need the order of
the frames (`direction`, `change`, `order`). Everything is pure numpy and deterministic by seed.

The model sees `frame_indices(num_frames, model_frames)` (runtime/video.py), so every event is
placed in a gap between two sampled frames, with at least two sampled frames on each side. The
temporal categories are built so that the sampled frames taken as an unordered set (hence also
their time-mean) do not give the answer: a clip and its time reversal are equally likely (see
`_change` and `_order`; for `_direction` up to the uneven spacing of the sampled frames). Knowing
where a frame sits in time does help, as it should: the last frame of a `change` clip shows the new
colour, and where a shape starts hints at which way it has room to go.

    from blip3v.data.synth import example_stream, write_dataset
    ex = next(example_stream(seed=0))              # in memory, for on-the-fly training
    write_dataset("runs/synth-val", n=200, seed=1)  # clips/*.mp4 + qa.jsonl + meta.json

or from the shell: `blip3v data synth --out runs/synth-val --n 200 --seed 1`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from blip3v.errors import InputError
from blip3v.runtime.video import frame_indices

# Bump when the same seed would render different clips or questions.
GENERATOR_VERSION = 2  # 2: shapes 34-42 px on the 128 canvas (were 22-30)

CATEGORIES = ("colour", "shape", "count", "direction", "change", "order")
TEMPORAL_CATEGORIES = ("direction", "change", "order")
SHAPES = ("circle", "square", "triangle")
# Saturated and far apart in RGB (and in YUV after 4:2:0 subsampling) so a colour is never confused.
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
RGB = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 50, 210),
    "white": (235, 235, 235),
}
BACKGROUND = (10, 10, 14)
NUMBERS = ("one", "two", "three", "four")
DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

QUESTIONS = {
    "colour": "what colour is the {shape}?",
    "shape": "what shape is the {colour} object?",
    "count": "how many shapes are there?",
    "direction": "which way does the {shape} move?",
    "change": "what colour does the {shape} turn?",
    "order_appear": "which shape appears first?",
    "order_disappear": "which shape disappears first?",
}

# Geometry in pixels of a 128 canvas, scaled with `size`.
_REF_SIZE = 128
_SHAPE_SIZE = (34.0, 42.0)  # bounding-box side of a shape: at the demo's 64 px input, 17-21 px (2-3 patches)
_TRAVEL = (40.0, 60.0)  # distance a moving shape covers between the first and last sampled frame
_MARGIN = 2.0  # free pixels between a shape and the canvas edge
_GAP = 4.0  # free pixels between two shapes, so blobs never touch
_MIN_EVENT_SIDE = 2  # sampled frames required before and after every event


@dataclass
class Example:
    """One clip and its question. `scene` is JSON-serialisable and re-derives the answer.

    scene = {"size", "num_frames", "sampled_frames", "variant",
             "objects": [{"shape", "size", "colour": [name or None per frame],
                          "position": [[x, y] centre per frame]}]}
    A `None` colour means the object is not visible in that frame.
    """

    frames: np.ndarray  # (N, H, W, 3) uint8
    question: str
    answer: str
    category: str
    scene: dict[str, Any] = field(repr=False)


class _Retry(Exception):
    """Placement failed; the caller draws the whole scene again from the same generator."""


class _Object:
    """A shape with a per-frame colour (None: hidden) and per-frame centre (N, 2)."""

    def __init__(self, shape: str, size: float, colours: list[str | None], positions: np.ndarray):
        self.shape, self.size, self.colours, self.positions = shape, size, colours, positions

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "size": round(float(self.size), 3),
            "colour": list(self.colours),
            "position": [[round(float(x), 3), round(float(y), 3)] for x, y in self.positions],
        }


class _Scene:
    """What the category builders share: canvas geometry, sampled frames, placement bookkeeping."""

    def __init__(self, rng: np.random.Generator, size: int, num_frames: int, model_frames: int):
        self.rng, self.size, self.num_frames = rng, size, num_frames
        self.sampled = _check_sampling(num_frames, model_frames)
        self.scale = size / _REF_SIZE
        self.taken: list[tuple[float, float, float, float]] = []  # (x0, y0, x1, y1) footprints

    def shape_size(self) -> float:
        return float(self.rng.uniform(*_SHAPE_SIZE)) * self.scale

    def place(self, w: float, h: float) -> tuple[float, float]:
        """Top-left corner of a free w x h footprint fully inside the canvas (reject sampling)."""
        margin, gap = _MARGIN * self.scale, _GAP * self.scale
        for _ in range(200):
            x = float(self.rng.uniform(margin, self.size - margin - w))
            y = float(self.rng.uniform(margin, self.size - margin - h))
            if all(x + w + gap <= a or a1 + gap <= x or y + h + gap <= b or b1 + gap <= y
                   for a, b, a1, b1 in self.taken):
                self.taken.append((x, y, x + w, y + h))
                return x, y
        raise _Retry

    def static(self, shape: str, colour: str | None, visible: Sequence[bool] | None = None) -> _Object:
        """A shape that does not move; `visible` (per frame) defaults to always."""
        s = self.shape_size()
        x, y = self.place(s, s)
        n = self.num_frames
        colours = [colour if (visible is None or visible[f]) else None for f in range(n)]
        return _Object(shape, s, colours, np.tile([x + s / 2, y + s / 2], (n, 1)))

    def event_frame(self, boundary: int) -> int:
        """First frame of a new state that the model sees from sampled frame `boundary` on.

        Drawn strictly inside the gap (sampled[boundary-1], sampled[boundary]) when the gap allows,
        so one frame more or less from a decoder cannot move the event across a sampled frame.
        """
        lo, hi = self.sampled[boundary - 1] + 1, self.sampled[boundary] - 1
        return int(self.rng.integers(lo, max(lo, hi) + 1))

    def pick(self, options: Sequence[str], k: int = 1, distinct: bool = True) -> list[str]:
        idx = self.rng.choice(len(options), size=k, replace=not distinct)
        return [options[int(i)] for i in idx]


def _check_sampling(num_frames: int, model_frames: int) -> list[int]:
    if model_frames < 3 * _MIN_EVENT_SIDE:
        raise InputError(f"model_frames must be at least {3 * _MIN_EVENT_SIDE}, got {model_frames}")
    sampled = frame_indices(num_frames, model_frames) if num_frames >= 1 else []
    if len(set(sampled)) != model_frames or sampled != sorted(sampled):
        raise InputError(
            f"{num_frames} frames are too few for {model_frames} distinct sampled frames; use more frames"
        )
    return sampled


# ---------------------------------------------------------------- categories (static)


def _colour(sc: _Scene) -> tuple[list[_Object], str, str, str]:
    k = int(sc.rng.integers(1, 4))
    shapes = sc.pick(SHAPES, k)  # distinct, so "the {shape}" names one object
    colours = sc.pick(COLOURS, k, distinct=False)
    objs = [sc.static(s, c) for s, c in zip(shapes, colours)]
    t = int(sc.rng.integers(k))
    return objs, QUESTIONS["colour"].format(shape=shapes[t]), colours[t], "static"


def _shape(sc: _Scene) -> tuple[list[_Object], str, str, str]:
    k = int(sc.rng.integers(1, 4))
    colours = sc.pick(COLOURS, k)  # distinct, so "the {colour} object" names one object
    shapes = sc.pick(SHAPES, k, distinct=False)
    objs = [sc.static(s, c) for s, c in zip(shapes, colours)]
    t = int(sc.rng.integers(k))
    return objs, QUESTIONS["shape"].format(colour=colours[t]), shapes[t], "static"


def _count(sc: _Scene) -> tuple[list[_Object], str, str, str]:
    k = int(sc.rng.integers(1, len(NUMBERS) + 1))
    objs = [sc.static(s, c) for s, c in zip(sc.pick(SHAPES, k, False), sc.pick(COLOURS, k, False))]
    return objs, QUESTIONS["count"], NUMBERS[k - 1], "static"


# ---------------------------------------------------------------- categories (temporal)


def _direction(sc: _Scene) -> tuple[list[_Object], str, str, str]:
    """One shape moves at constant speed between the first and last sampled frame.

    It rests before and after that window (frames the model never sees), so the whole canvas is
    available for the 40-60 px of travel the model does see. The time-mean of the sampled frames
    is a smear that looks the same for a motion and its reverse.
    """
    shape, distractor_shape = sc.pick(SHAPES, 2)
    colour = sc.pick(COLOURS)[0]
    direction = DIRECTIONS[int(sc.rng.integers(len(DIRECTIONS)))]
    travel = float(sc.rng.uniform(*_TRAVEL)) * sc.scale
    s = sc.shape_size()
    dx, dy = _STEP[direction]
    w, h = s + abs(dx) * travel, s + abs(dy) * travel
    x, y = sc.place(w, h)  # the footprint of the whole trajectory
    start = np.array([x + s / 2 + (travel if dx < 0 else 0.0), y + s / 2 + (travel if dy < 0 else 0.0)])
    first, last = sc.sampled[0], sc.sampled[-1]
    progress = np.clip((np.arange(sc.num_frames) - first) / (last - first), 0.0, 1.0)
    positions = start + travel * progress[:, None] * np.array([dx, dy])  # (N, 2)
    objs = [_Object(shape, s, [colour] * sc.num_frames, positions)]
    if sc.rng.random() < 0.5:
        objs.append(sc.static(distractor_shape, sc.pick(COLOURS)[0]))
    return objs, QUESTIONS["direction"].format(shape=shape), direction, direction


def _change(sc: _Scene) -> tuple[list[_Object], str, str, str]:
    """One shape changes colour once.

    The change boundary b is uniform over [2, T-2] sampled frames, so the number of sampled frames
    in the old colour (b) and in the new colour (T-b) have the same distribution: the time-mean
    colour cannot tell old from new.
    """
    shape, distractor_shape = sc.pick(SHAPES, 2)
    old, new = sc.pick(COLOURS, 2)
    t = len(sc.sampled)
    boundary = int(sc.rng.integers(_MIN_EVENT_SIDE, t - _MIN_EVENT_SIDE + 1))
    at = sc.event_frame(boundary)
    obj = sc.static(shape, old)
    obj.colours = [old if f < at else new for f in range(sc.num_frames)]
    objs = [obj]
    if sc.rng.random() < 0.5:
        objs.append(sc.static(distractor_shape, sc.pick(COLOURS)[0]))
    return objs, QUESTIONS["change"].format(shape=shape), new, f"change@{at}"


def _order_layouts(t: int) -> list[tuple[int, int, int, int, int]]:
    """Sampled-frame segments (none_before, first_only, both, second_only, none_after) summing to t.

    Both objects are seen alone for at least two sampled frames (first one, then the other), and the
    set is closed under swapping first_only and second_only: the multiset of frames ("A alone" x
    times, "B alone" y times, ...) is equally likely with A or B first, so only the order of the
    frames answers the question. `none_after` (appear) is 0 or at least 2, so every event has two
    sampled frames after it.
    """
    m = _MIN_EVENT_SIDE
    out = []
    for nb, x, z, y in itertools.product(range(m, t + 1), range(m, t + 1), range(t + 1), range(m, t + 1)):
        na = t - nb - x - z - y
        if na == 0 or na >= m:
            out.append((nb, x, z, y, na))
    return out


def _order(sc: _Scene) -> tuple[list[_Object], str, str, str]:
    """Two shapes appear (or disappear) at different times; ask which one did it first.

    'appear' layouts start with at least two empty sampled frames; 'disappear' layouts are their
    time reversal and end with two empty sampled frames. In both, the first object is alone on screen
    before the second is alone, so the same object appears and disappears first.
    """
    t = len(sc.sampled)
    layouts = _order_layouts(t)
    nb, x, z, y, na = layouts[int(sc.rng.integers(len(layouts)))]
    variant = "appear" if sc.rng.random() < 0.5 else "disappear"
    if variant == "disappear":
        nb, na = na, nb
    # visible sampled-frame intervals [start, end) of the first and second object
    spans = [(nb, nb + x + z), (nb + x, t - na)]
    shapes = sc.pick(SHAPES, 2)
    colours = sc.pick(COLOURS, 2)  # distinct, so each shape is also told apart by colour
    objs = []
    for shape, colour, (a, b) in zip(shapes, colours, spans):
        start = 0 if a == 0 else sc.event_frame(a)
        end = sc.num_frames if b == t else sc.event_frame(b)
        visible = [start <= f < end for f in range(sc.num_frames)]
        objs.append(sc.static(shape, colour, visible))
    return objs, QUESTIONS[f"order_{variant}"], shapes[0], f"{variant}:{nb}-{x}-{z}-{y}-{na}"


_BUILDERS = {
    "colour": _colour,
    "shape": _shape,
    "count": _count,
    "direction": _direction,
    "change": _change,
    "order": _order,
}


# ---------------------------------------------------------------- rendering


def _mask(shape: str, cx: float, cy: float, s: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pixels (centres xs, ys) covered by a shape of bounding-box side s centred at (cx, cy)."""
    r = s / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    # triangle pointing up: apex at the top centre, base along the bottom edge
    top = cy - r
    return (ys <= cy + r) & (np.abs(xs - cx) <= (ys - top) / 2)


def render(objects: Sequence[_Object], size: int, num_frames: int) -> np.ndarray:
    """Frames (N, H, W, 3) uint8: flat shapes, hard edges, constant background."""
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    for obj in objects:
        cache: dict[tuple[float, float], tuple[slice, slice, np.ndarray]] = {}
        for f in range(num_frames):
            colour = obj.colours[f]
            if colour is None:
                continue
            cx, cy = float(obj.positions[f, 0]), float(obj.positions[f, 1])
            if (cx, cy) not in cache:
                # only the bounding box is rasterised; shapes are placed fully inside the canvas
                x0, x1 = max(int(cx - obj.size / 2) - 1, 0), min(int(cx + obj.size / 2) + 2, size)
                y0, y1 = max(int(cy - obj.size / 2) - 1, 0), min(int(cy + obj.size / 2) + 2, size)
                ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5  # pixel centres
                cache[(cx, cy)] = (slice(y0, y1), slice(x0, x1), _mask(obj.shape, cx, cy, obj.size, xs, ys))
            sy, sx, m = cache[(cx, cy)]
            frames[f, sy, sx][m] = RGB[colour]
    return frames


# ---------------------------------------------------------------- more questions about one clip


def static_questions(scene: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Every `colour`, `shape` and `count` question the scene answers unambiguously, as
    (question, answer, category), derived from the scene alone.

    For training: a clip costs its vision pass once, and several questions about it share that
    pass (the video tokens are computed once and reused). An object qualifies when it shows one
    colour whenever it is visible (in at least one sampled frame); "the {shape}" needs that shape to
    be unique in the clip, "the {colour} object" that colour to be worn by no other object at any
    time; `count` needs every object visible in every frame."""
    objects = scene["objects"]
    sampled = scene["sampled_frames"]
    colour_sets = [{c for c in o["colour"] if c is not None} for o in objects]
    shapes = [o["shape"] for o in objects]
    out = []
    for obj, colours in zip(objects, colour_sets):
        if len(colours) != 1 or all(obj["colour"][f] is None for f in sampled):
            continue
        (colour,) = colours
        if shapes.count(obj["shape"]) == 1:
            out.append((QUESTIONS["colour"].format(shape=obj["shape"]), colour, "colour"))
        if sum(colour in s for s in colour_sets) == 1:
            out.append((QUESTIONS["shape"].format(colour=colour), obj["shape"], "shape"))
    if objects and all(c is not None for o in objects for c in o["colour"]):
        out.append((QUESTIONS["count"], NUMBERS[len(objects) - 1], "count"))
    return out


# ---------------------------------------------------------------- public API


def _check_categories(categories: Sequence[str] | None) -> tuple[str, ...]:
    if categories is None:
        return CATEGORIES
    cats = tuple(categories)
    bad = [c for c in cats if c not in CATEGORIES]
    if not cats or bad:
        what = f"unknown categories {', '.join(bad)}" if bad else "no categories given"
        raise InputError(f"{what}; choose from {', '.join(CATEGORIES)}")
    return tuple(dict.fromkeys(cats))  # drop repeats, keep order


def _check_size(size: int) -> None:
    # even: yuv420p halves the chroma planes; 32: smallest canvas where four shapes still fit
    if not (32 <= size <= 1024 and size % 2 == 0):
        raise InputError(f"size must be an even number of pixels in [32, 1024], got {size}")


def sample_example(
    rng: np.random.Generator,
    *,
    categories: Sequence[str] | None = None,
    size: int = 128,
    num_frames: int = 24,
    model_frames: int = 8,
) -> Example:
    """Draw one clip and question from `rng`; the category is uniform over `categories`."""
    cats = _check_categories(categories)
    _check_size(size)
    category = cats[int(rng.integers(len(cats)))]
    while True:  # placement almost never fails; when it does, draw again from the same rng
        sc = _Scene(rng, size, num_frames, model_frames)
        try:
            objs, question, answer, variant = _BUILDERS[category](sc)
            break
        except _Retry:
            continue
    scene = {
        "size": size,
        "num_frames": num_frames,
        "sampled_frames": sc.sampled,
        "variant": variant,
        "objects": [o.to_json() for o in objs],
    }
    return Example(render(objs, size, num_frames), question, answer, category, scene)


def _example_rng(seed: int, index: int) -> np.random.Generator:
    # One independent stream per example: example i does not depend on n or on earlier examples,
    # so a small dataset is a prefix of a larger one with the same seed.
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def example_at(seed: int, index: int, **kw: Any) -> Example:
    """The `index`-th example of `seed`'s stream, without drawing the ones before it."""
    return sample_example(_example_rng(seed, index), **kw)


def example_stream(seed: int, start: int = 0, **kw: Any) -> Iterator[Example]:
    """Endless examples, deterministic by seed; the i-th equals the i-th clip of `write_dataset`."""
    for i in itertools.count(start):
        yield example_at(seed, i, **kw)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 12, crf: int = 16) -> None:
    """H.264 (libx264, yuv420p) mp4 with byte-identical output for identical frames.

    One encoder thread: x264's output depends on its thread count, which defaults to the number of
    cores, so a fixed count gives the same bytes on every machine (with the same PyAV/x264 build).
    """
    import av  # heavy; only needed when writing files

    _, h, w, _ = frames.shape
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush


def write_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    *,
    categories: Sequence[str] | None = None,
    size: int = 128,
    num_frames: int = 24,
    model_frames: int = 8,
    fps: int = 12,
    crf: int = 16,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `n` clips to `out_dir`: clips/00000.mp4..., qa.jsonl, meta.json. Returns `out_dir`.

    Built in a hidden sibling folder and renamed into place, so `out_dir` is either absent or complete.
    """
    if n < 1:
        raise InputError(f"n must be at least 1, got {n}")
    if fps < 1:
        raise InputError(f"fps must be at least 1, got {fps}")
    cats = _check_categories(categories)
    _check_size(size)
    _check_sampling(num_frames, model_frames)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"{out} already exists and is not empty (overwrite it to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "clips").mkdir(parents=True)

    from tqdm import tqdm

    counts = dict.fromkeys(cats, 0)
    try:
        with open(tmp / "qa.jsonl", "w", encoding="utf-8") as qa:
            for i in tqdm(range(n), desc="synth", unit="clip", disable=not progress, file=sys.stderr):
                ex = sample_example(_example_rng(seed, i), categories=cats, size=size,
                                    num_frames=num_frames, model_frames=model_frames)
                video = f"clips/{i:05d}.mp4"
                write_mp4(tmp / video, ex.frames, fps=fps, crf=crf)
                row = {"video": video, "question": ex.question, "answer": ex.answer, "category": ex.category}
                qa.write(json.dumps(row) + "\n")
                counts[ex.category] += 1
        meta = {
            "generator": "blip3v.data.synth",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "n": n,
            "size": size,
            "fps": fps,
            "num_frames": num_frames,
            "model_frames": model_frames,
            "crf": crf,
            "categories": list(cats),
            "counts": counts,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when something failed
    return out


def read_dataset(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of `qa.jsonl` in a folder written by `write_dataset`.

    Each row keeps the file's keys ("video" relative to the folder) and adds "path", the clip's full path.
    """
    root = Path(path)
    qa = root / "qa.jsonl"
    if not root.is_dir():
        raise InputError(f"dataset folder {root} does not exist")
    if not qa.is_file():
        raise InputError(f"{root} is not a synth dataset: no qa.jsonl (write one with `blip3v data synth`)")
    rows = []
    with open(qa, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{qa}:{lineno}: not valid JSON ({exc.msg})") from None
            keys = row if isinstance(row, dict) else {}
            missing = [k for k in ("video", "question", "answer", "category") if k not in keys]
            if missing:
                raise InputError(f"{qa}:{lineno}: missing {', '.join(missing)}")
            clip = root / row["video"]
            if not clip.is_file():
                raise InputError(f"{qa}:{lineno}: clip {row['video']} is missing")
            row["path"] = str(clip)
            rows.append(row)
    if not rows:
        raise InputError(f"{qa} is empty")
    return rows


def answer_vocabulary() -> list[str]:
    """Every answer the generator can give (17 words), in a fixed order."""
    return [*COLOURS, *SHAPES, *NUMBERS, *DIRECTIONS]


def question_words() -> list[str]:
    """Every word of every question and answer, sorted. Questions are these words joined by
    single spaces, followed by "?" (the only punctuation)."""
    words = set(answer_vocabulary())
    fills = {"shape": SHAPES, "colour": COLOURS}
    for template in QUESTIONS.values():
        for word in template.rstrip("?").split():
            if word.startswith("{"):
                words.update(fills[word.strip("{}")])
            else:
                words.add(word)
    return sorted(words)


def normalise_answer(text: str) -> str:
    """Lowercase, trimmed, inner whitespace collapsed, trailing punctuation dropped: the exact-match form."""
    return " ".join(text.lower().split()).rstrip(string.punctuation).strip()
