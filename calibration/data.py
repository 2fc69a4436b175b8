"""Calibration data: video frames through the runtime's own video path, and prompts that carry
real video tokens.

    clips = CalibrationSet.from_folder("videos/", num_frames=8, image_size=64, samples=32)
    for feed in clips.visual_feeds("pixel_values", np.float32): ...      # {input name: (1, T, 3, S, S)}
    quantize_static(..., calibration_data_reader=FrameReader(clips, "pixel_values", per_frame=True))

Videos are read by `blip3v.runtime.video.load_clip`, the function the runtime uses at inference,
so the calibration sees exactly the pixels a deployed engine sees (decoder, sampling, resize and
normalisation included). `FrameReader` hands the same clips to ONNX Runtime's static quantizer,
whole (the fused visual graph) or as a batch of T frames (the per-frame graph). Questions come
from the folder's `qa.jsonl` when it has one (a folder written by `blip3v data synth`), otherwise
from the synthetic task's question forms.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from onnxruntime.quantization import CalibrationDataReader

from blip3v.errors import InputError

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".gif", ".m4v")


def video_files(folder: str | Path) -> list[Path]:
    """Every video under `folder` (recursively, sorted); an error when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: calibration video folder not found")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"{folder}: no videos to calibrate on (looked for {', '.join(VIDEO_SUFFIXES)})")
    return files


def _questions(folder: Path, files: list[Path]) -> list[str]:
    qa = folder / "qa.jsonl"
    by_path: dict[str, str] = {}
    if qa.is_file():
        for lineno, line in enumerate(qa.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    by_path[Path(row["video"]).name] = str(row["question"])
                except (ValueError, KeyError, TypeError):  # not JSON, not an object, keys missing
                    raise InputError(f"{qa}:{lineno}: expected a JSON object with \"video\" and \"question\"") from None
    from blip3v.data.synth import QUESTIONS, SHAPES

    generic = [q.format(shape=SHAPES[i % len(SHAPES)], colour="red") for i, q in enumerate(QUESTIONS.values())]
    return [by_path.get(f.name, generic[i % len(generic)]) for i, f in enumerate(files)]


@dataclass
class CalibrationSet:
    """Decoded, preprocessed clips (N, T, 3, S, S) float32, a question per clip, and what they came from."""

    clips: np.ndarray
    questions: list[str]
    files: list[Path]

    @classmethod
    def from_folder(cls, folder: str | Path, num_frames: int, image_size: int,
                    mean: tuple[float, float, float] = (0.5, 0.5, 0.5), std: tuple[float, float, float] = (0.5, 0.5, 0.5),
                    samples: int = 32, seed: int = 0) -> CalibrationSet:
        """`samples` videos drawn without replacement (seeded) from the folder. An unreadable video is
        an error naming it: a calibration set silently smaller than asked for is worse."""
        from blip3v.runtime.video import load_clip

        folder = Path(folder)
        files = video_files(folder)
        if samples < 1:
            raise InputError("--samples must be at least 1")
        pick = np.random.default_rng(seed).permutation(len(files))[: min(samples, len(files))]
        chosen = [files[i] for i in sorted(pick)]
        clips = []
        for path in chosen:
            try:
                clips.append(load_clip(path, num_frames, image_size, mean, std))
            except InputError as exc:
                raise InputError(f"calibration video unreadable: {exc}") from None
        return cls(np.stack(clips).astype(np.float32), _questions(folder, chosen), chosen)

    def __len__(self) -> int:
        return len(self.clips)

    def digest(self) -> str:
        """sha256 over the chosen files' bytes, in order: the manifest's record of the calibration set."""
        h = hashlib.sha256()
        for path in self.files:
            h.update(path.name.encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
        return h.hexdigest()

    def visual_feeds(self, input_name: str, dtype: npt.DTypeLike = np.float32,
                     per_frame: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """A feed per clip: (1, T, 3, S, S) for the fused visual graph, or its T frames as one batch
        (T, 3, S, S) for the per-frame graph."""
        for clip in self.clips:
            yield {input_name: (clip if per_frame else clip[None]).astype(dtype)}


class FrameReader(CalibrationDataReader):
    """ONNX Runtime's calibration data reader over a CalibrationSet, one clip a feed.

    `set_range` lets `quantize_static` (extra option CalibStridedMinMax) collect statistics a few
    clips at a time: its histogram calibrators otherwise keep every intermediate tensor of every
    clip in memory at once, which for a real-sized vision tower is gigabytes per clip."""

    def __init__(self, clips: CalibrationSet, input_name: str, per_frame: bool = False):
        self.clips, self.input_name, self.per_frame = clips, input_name, per_frame
        self.set_range(0, len(clips))

    def __len__(self) -> int:
        return len(self.clips)

    def set_range(self, start_index: int, end_index: int) -> None:
        subset = CalibrationSet(self.clips.clips[start_index:end_index], [], [])
        self._feeds = subset.visual_feeds(self.input_name, np.float32, self.per_frame)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)
