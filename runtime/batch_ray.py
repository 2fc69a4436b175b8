"""`blip3v batch --ray`: the same batch job as a Ray Data pipeline, for corpora beyond one machine.

    read list (driver) -> map(decode_clip)  [CPU tasks, num_cpus each]
                       -> map_batches(EngineStage)  [actor pool: one Engine per actor, GPUs if asked]
                       -> rows streamed back to the driver, which appends them to --out

The shape Ray's batch-inference guides use: a stateless CPU stage reads and samples frames
(blip3v.runtime.batch.decode_clip, the function the local workers run), and a fixed pool of
actors holds the model, each answering the clips of a batch through the session API
(blip3v.runtime.batch.answer_clip). Only the driver writes the output, so resuming and the
no-corrupt-file guarantee are those of blip3v.runtime.batch.Results.

Ray is imported inside the functions (it is the optional extra `blip3v[batch]`). Values cross the
pipeline as plain columns: pixels as raw float32 bytes (their shape is the model's, known to every
stage), each clip's rows as one JSON text, so Arrow never has to infer a type from a batch whose
answers happen to be all null.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np

from blip3v.errors import Blip3vError, CheckpointError, EngineError, InputError
from blip3v.runtime.batch import ClipTask, Decoded, Results, Summary, VideoSettings, answer_clip, decode_clip

# The input is cut into blocks of `batch_size` clips: a decode task takes one block and makes one
# batch of the engine stage. One clip per block spreads decoding finest but costs a task per clip;
# on the 2-core dev box 200 clips took 17-21 s that way against 9-11 s with 4-8 clips per block.
MAX_BLOCKS = 4096
# What an engine actor holds besides its model files (Python, ONNX Runtime or torch, arenas): the
# default memory it declares is the files plus this (Ray observed ~140 MiB with the demo engine).
RUNTIME_BYTES = 1 << 30
FATAL = {cls.__name__: cls for cls in (InputError, EngineError, CheckpointError)}


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 (needs ray[data]: pyarrow, pandas)
    except ImportError as exc:
        raise InputError(f"--ray needs Ray Data, which is not installed ({exc.name or exc}): "
                         "pip install 'blip3v[batch]'") from None
    return ray


def decode_row(row: dict[str, Any], settings: VideoSettings) -> dict[str, Any]:
    """The CPU stage: one clip's pixels (raw float32 bytes, empty on error) and decode time."""
    decoded = decode_clip(row["path"], settings)
    pixels = b"" if decoded.pixels is None else np.ascontiguousarray(decoded.pixels, np.float32).tobytes()
    return {"video": row["video"], "path": row["path"], "questions": row["questions"], "pixels": pixels,
            "error": decoded.error or "", "decode_ms": decoded.decode_ms}


class EngineStage:
    """The actor stage: opens the engine once per actor, answers every clip of a batch."""

    def __init__(self, open_options: dict[str, Any], settings: VideoSettings, sampling: Any):
        from blip3v.runtime.session import Engine

        s = self.settings = settings
        self.shape = (s.num_frames, 3, s.image_size, s.image_size)  # (T, 3, S, S)
        self.sampling = sampling
        # A user error here (a bad option, a tampered engine) is handed to the driver as data by the
        # first call: Ray passes an actor's or a call's exception on as text only (its remote
        # traceback), and the driver has to re-raise it as the one-line error it is.
        self.failure: Blip3vError | None = None
        try:
            self.engine = Engine.open(**open_options)
            self.engine.host.video_options = dict(s.options)  # as `blip3v ask --aspect ...` sets them
            if VideoSettings.of_host(self.engine.host) != s:
                raise EngineError(f"the model's frame sampling {VideoSettings.of_host(self.engine.host)} differs "
                                  f"from the driver's ({s}): every node must see the same model files")
        except Blip3vError as exc:
            self.failure = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        out = []
        try:
            if self.failure is not None:
                raise self.failure
            for i in range(len(batch["video"])):
                raw = batch["pixels"][i]
                pixels = np.frombuffer(raw, np.float32).reshape(self.shape) if len(raw) else None  # (T, 3, S, S)
                decoded = Decoded(pixels, str(batch["error"][i]) or None, float(batch["decode_ms"][i]))
                questions = tuple(json.loads(batch["questions"][i]))
                task = ClipTask(str(batch["video"][i]), str(batch["path"][i]), questions)
                out.append(json.dumps(answer_clip(self.engine, task, decoded, self.sampling), ensure_ascii=False))
        except Blip3vError as exc:  # not a clip's fault (those are error rows): the run stops
            out.append(json.dumps({"fatal": type(exc).__name__, "message": str(exc)}))
        return {"rows": out}


def _file_bytes(directory: str | os.PathLike) -> int:
    total = 0
    for root, _, files in os.walk(os.fspath(directory)):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def run_ray(tasks: list[ClipTask], settings: VideoSettings, open_options: dict[str, Any], sampling: Any,
            results: Results, *, address: str | None = None, actors: int = 1, batch_size: int = 8,
            decode_cpus: float = 1.0, actor_cpus: float = 1.0, actor_gpus: float | None = None,
            actor_memory: int | None = None, progress: bool = True) -> Summary:
    """Answers `tasks` on a Ray cluster (`address`; None starts a local one unless Ray is already
    initialised in this process). `open_options` go to `Engine.open` in every actor; paths in them
    must be valid on every node (absolute, on a shared file system). `actor_gpus` None: one GPU
    per actor for device cuda/tensorrt, and for device auto where the cluster has GPUs."""
    ray = _import_ray()
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    summary = Summary(out=str(results.path))
    t0 = time.perf_counter()
    if not tasks:
        return summary.close(time.perf_counter() - t0)
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING if progress else logging.ERROR,
                 log_to_driver=progress, configure_logging=True)
        started = True
    bar = tqdm(total=len(tasks), disable=not progress, desc="batch (ray)", unit="clip", dynamic_ncols=True)
    try:
        context = DataContext.get_current()
        context.enable_progress_bars = False  # ours counts clips written; Ray's would interleave with it
        if not progress:  # --quiet: Ray Data's own notes too (its warning that progress bars are off...)
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        items = [{"video": t.video, "path": t.path, "questions": json.dumps(list(t.questions), ensure_ascii=False)}
                 for t in tasks]
        blocks = min(MAX_BLOCKS, -(-len(items) // batch_size))  # ceil
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map(decode_row, fn_kwargs={"settings": settings}, num_cpus=decode_cpus)
        # `memory`: an actor holds its model's files and a runtime. Declaring it also keeps Ray from
        # fusing the decode tasks into the actors (it fuses only stages with equal resource
        # requests), which would serialise decoding behind the engine.
        device = open_options.get("device", "cpu")
        if actor_gpus is None:
            gpus_here = ray.cluster_resources().get("GPU", 0) > 0
            actor_gpus = 1.0 if device in ("cuda", "tensorrt") or (device == "auto" and gpus_here) else 0.0
        if device == "auto" and not actor_gpus:
            open_options = {**open_options, "device": "cpu"}  # no GPU reserved: none may be used
        if actor_memory is None:
            from blip3v.assets import DEMO_ENGINE

            files = open_options.get("engine") or open_options.get("model") or DEMO_ENGINE
            actor_memory = _file_bytes(files) + RUNTIME_BYTES
        remote: dict[str, Any] = {"num_cpus": actor_cpus, "memory": int(actor_memory)}
        if actor_gpus:
            remote["num_gpus"] = actor_gpus
        ds = ds.map_batches(EngineStage, fn_constructor_kwargs={"open_options": open_options,
                                                                "settings": settings, "sampling": sampling},
                            batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
                            **remote)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for text in batch["rows"]:
                rows = json.loads(str(text))
                if isinstance(rows, dict):  # {"fatal": class name, "message"} from an actor
                    error = FATAL.get(rows["fatal"], Blip3vError)
                    raise error(rows["message"])
                results.write(rows)
                summary.add(rows)
                bar.update(1)
                if summary.errors:
                    bar.set_postfix(errors=summary.errors, refresh=False)
    finally:
        bar.close()
        if started:
            ray.shutdown()
    return summary.close(time.perf_counter() - t0)
