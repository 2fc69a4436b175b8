"""Which backend answers: a checkpoint (PyTorch) or an exported engine (ONNX Runtime, TensorRT).

torch is imported only for a checkpoint, so the engine path stays torch-free.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from blip3v.errors import InputError

BACKENDS = ("torch", "onnxruntime", "tensorrt")
TORCH_ONLY_OPTIONS = ("dtype", "decoder", "weights", "group_size")


def _say(note: str) -> None:
    """Which backend answers and why, for a person at a terminal (scripts and pipes see nothing)."""
    if sys.stderr.isatty():
        print(f"note: {note}", file=sys.stderr)


def open_host(model: str | os.PathLike | None = None, engine: str | os.PathLike | None = None,
              backend: str | None = None, device: str = "cpu", revision: str | None = None,
              spinning: bool = True, parallel_clips: bool = False, **options: Any) -> Any:
    """--model / --engine / --backend -> a backend object (a "host" of blip3v.runtime.session).
    No --model, --engine or --backend: the shipped demo engine on ONNX Runtime (torch-free; the
    demo model exported), or the demo model on PyTorch when a PyTorch-only option is set; the choice
    is said on stderr at a terminal. `model` may be a
    Hub id ORG/NAME (at `revision`), resolved by blip3v.model.hub; `device` "auto" picks cuda where
    the chosen backend can use it, else cpu. `spinning=False` keeps ONNX Runtime's idle threads from
    busy-waiting, for commands that decode video beside the engine (eval, batch, live);
    `parallel_clips=True` lets several threads encode clips side by side on an ONNX Runtime CPU
    engine (OrtBackend; other backends ignore it)."""
    if model is not None and not str(model).strip():
        raise InputError("--model is empty: give a checkpoint directory (or leave it out for the demo model)")
    if engine is not None and not str(engine).strip():
        raise InputError("--engine is empty: give an engine directory from `blip3v export`")
    if model and engine:
        raise InputError("give either --model (PyTorch checkpoint) or --engine (exported engine), not both")
    if backend is not None and backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    torch_asked = [k for k in TORCH_ONLY_OPTIONS if options.get(k) not in (None, "dense", "auto", "128", 128)]
    if backend is None and model is None and engine is None and not torch_asked:
        from blip3v.assets import DEMO_ENGINE

        engine, backend = DEMO_ENGINE, "onnxruntime"
        _say("the shipped demo engine answers (ONNX Runtime, no torch needed); --model DIR or --engine DIR "
             "for your own model")
    if backend is None:
        backend = "onnxruntime" if engine else "torch"
    if revision is not None and not model:
        raise InputError("--revision selects a version of a Hub model: give --model ORG/NAME")
    if backend == "torch":
        if engine:
            raise InputError("--backend torch runs a checkpoint: use --model DIR, not --engine")
        from blip3v.model.hub import resolve_checkpoint

        if model is None:
            from blip3v.assets import DEMO_MODEL

            model = DEMO_MODEL
            _say("the shipped demo model answers on the PyTorch backend (--dtype/--decoder/--weights or "
                 "--backend torch asked for it)")
        directory = resolve_checkpoint(model, revision)  # before torch loads: a missing Hub id fails fast
        device = _auto_device(backend) if device == "auto" else device
        from blip3v.model.generate import TorchBackend

        return TorchBackend.load(directory, device=device, **options)
    given = [k for k in TORCH_ONLY_OPTIONS if options.get(k) not in (None, "dense", "auto", "128", 128)]
    if given:
        raise InputError(f"--{given[0].replace('_', '-')} applies to the PyTorch backend; an engine's precision "
                         "is fixed at export")
    if not engine:
        raise InputError(f"--backend {backend} runs an exported engine: give --engine DIR (see `blip3v export`)")
    device = _auto_device(backend) if device == "auto" else device
    if backend == "onnxruntime":
        from blip3v.runtime.ort_backend import OrtBackend

        return OrtBackend.load(engine, device=device, spinning=spinning, parallel_clips=parallel_clips)
    from blip3v.runtime.trt_backend import TrtBackend

    return TrtBackend.load(engine)


def _auto_device(backend: str) -> str:
    """cuda when the backend can run there: ONNX Runtime built with its CUDA provider
    (onnxruntime-gpu), torch seeing a CUDA device (torch is imported for the torch backend only)."""
    if backend == "onnxruntime":
        import onnxruntime as ort

        return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    if backend == "torch":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda"  # TensorRT runs on the GPU only
