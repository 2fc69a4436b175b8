"""Resumable training state without pickle: `trainer_state.json` + `trainer_state.safetensors`.

Nothing here can run code when it is read (issue 18: `torch.load(weights_only=False)` on a planted
`trainer_state.pt` did). Tensors go to safetensors (a JSON header and raw bytes): the optimizer's
per-parameter state, the layout-loss head, and the RNG states as uint8 tensors. Everything else
(step, time, loss history, where each stretch ran, the preset and TrainConfig, the optimizer's
param_groups) is plain JSON. The JSON records the safetensors file's sha256, so the pair is read
only as written together.

    trainer_state.json:  {format, version, step, elapsed, preset, train_config, history, segments,
                          optimizer: {param_groups, scalars}, tensors: {file, sha256}}
    trainer_state.safetensors:  optimizer.state.<param index>.<name>, layout_head.<key>,
                                rng.torch, rng.cuda.<device>

Earlier versions wrote a pickled `trainer_state.pt`; it is never opened. Resuming such a run is a
one-line error: `torch.load(weights_only=True)` would not run arbitrary code by design, but its
restricted unpickler is still an unpickler (CVE-2025-32434 was code execution through it before
torch 2.6), and "provably safe" is more than can be said for it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip3v.errors import CheckpointError

if TYPE_CHECKING:  # torch is imported where tensors are handled: the legacy check (CLI) stays light
    import torch

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"
FORMAT = "blip3v-trainer-state"
VERSION = 1
MAX_JSON_BYTES = 64 << 20


@dataclass
class TrainerState:
    step: int
    elapsed: float
    preset: str
    train_config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None  # torch.optim state_dict form
    layout_head: dict[str, torch.Tensor] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """param_groups values as JSON: tuples become lists (restored by `_like` on load)."""
    import torch

    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        raise TypeError("a tensor in the optimizer's param_groups (unsupported)")
    return value


def rng_states(device: str) -> dict[str, torch.Tensor]:
    import torch

    states = {"rng.torch": torch.get_rng_state()}
    if device == "cuda" and torch.cuda.is_available():
        states.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def save_trainer_state(directory: str | Path, state: TrainerState) -> None:
    """Writes the two files into `directory` (the caller makes the folder write atomic)."""
    import torch

    from safetensors.torch import save_file

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    if state.optimizer is not None:
        for index, per_param in state.optimizer["state"].items():
            for name, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.state.{int(index)}.{name}"] = value.detach().to("cpu").contiguous()
                else:
                    scalars.setdefault(str(int(index)), {})[name] = _plain(value)
        groups = [{k: _plain(v) for k, v in g.items()} for g in state.optimizer["param_groups"]]
    for key, value in (state.layout_head or {}).items():
        tensors[f"layout_head.{key}"] = value.detach().to("cpu").contiguous()
    tensors.update({k: v.to("cpu").contiguous() for k, v in state.rng.items()})
    save_file(tensors, str(directory / STATE_TENSORS), metadata={"format": FORMAT})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory / STATE_TENSORS, 0o666 & ~umask)  # safetensors writes 0600; an ordinary file here
    meta = {
        "format": FORMAT, "version": VERSION, "step": state.step, "elapsed": state.elapsed, "preset": state.preset,
        "train_config": _plain_dict(state.train_config), "history": state.history, "segments": state.segments,
        "optimizer": None if state.optimizer is None else {"param_groups": groups, "scalars": scalars},
        "layout_head": state.layout_head is not None,
        "tensors": {"file": STATE_TENSORS, "sha256": _sha256(directory / STATE_TENSORS)},
    }
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=1, allow_nan=False) + "\n")


def _plain_dict(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _plain(v) for k, v in d.items()}


def has_trainer_state(directory: str | Path) -> bool:
    return (Path(directory) / STATE_JSON).is_file()


def refuse_legacy(directory: str | Path) -> None:
    """One-line error for a run folder that holds only the old pickled state."""
    directory = Path(directory)
    legacy = directory / LEGACY_STATE
    if legacy.is_file() and not has_trainer_state(directory):
        raise CheckpointError(
            f"{legacy}: a trainer state in the old pickle format, which blip3v no longer opens (unpickling a "
            f"file can run code); start a new run with another --out (the checkpoint's weights in {directory} "
            "still load for ask/eval/export)")


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def _expect(ok: bool, path: Path, key: str, what: str) -> None:
    if not ok:
        raise _fail(path, f"{key}: expected {what}")


def load_trainer_state(directory: str | Path) -> TrainerState:
    """Reads and checks the pair; every problem is one CheckpointError line naming the file and key."""
    import torch

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    refuse_legacy(directory)
    path = directory / STATE_JSON
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise _fail(path, f"larger than {MAX_JSON_BYTES} bytes")
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, absurd nesting
        raise _fail(path, f"not valid JSON ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None
    _expect(isinstance(meta, dict) and meta.get("format") == FORMAT, path, "format", repr(FORMAT))
    _expect(meta.get("version") == VERSION and not isinstance(meta.get("version"), bool), path, "version",
            f"{VERSION} (this blip3v)")
    step, elapsed = meta.get("step"), meta.get("elapsed")
    _expect(isinstance(step, int) and not isinstance(step, bool) and step >= 0, path, "step", "an integer >= 0")
    _expect(isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool) and math.isfinite(elapsed)
            and elapsed >= 0, path, "elapsed", "a number of seconds >= 0")
    _expect(isinstance(meta.get("preset"), str), path, "preset", "a string")
    _expect(isinstance(meta.get("train_config"), dict), path, "train_config", "an object")
    for key in ("history", "segments"):
        _expect(isinstance(meta.get(key), list) and all(isinstance(x, dict) for x in meta[key]), path, key,
                "a list of objects")
    opt = meta.get("optimizer")
    _expect(opt is None or (isinstance(opt, dict) and isinstance(opt.get("param_groups"), list)
                            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"])
                            and isinstance(opt.get("scalars", {}), dict)),
            path, "optimizer", "null or {param_groups: [{params: [...], ...}], scalars: {...}}")
    _expect(isinstance(meta.get("layout_head"), bool), path, "layout_head", "true or false")
    tensors_meta = meta.get("tensors")
    _expect(isinstance(tensors_meta, dict) and tensors_meta.get("file") == STATE_TENSORS
            and isinstance(tensors_meta.get("sha256"), str), path, "tensors",
            f"{{file: {STATE_TENSORS!r}, sha256: ...}}")

    tensor_path = directory / STATE_TENSORS
    if not tensor_path.is_file():
        raise _fail(tensor_path, f"missing (listed in {STATE_JSON})")
    if _sha256(tensor_path) != tensors_meta["sha256"]:
        raise _fail(tensor_path, f"does not match its sha256 in {STATE_JSON} (a torn or modified state)")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _fail(tensor_path, f"not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None

    optimizer = None
    if opt is not None:
        per_param: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer.state."):
                index, _, name = key[len("optimizer.state."):].partition(".")
                _expect(index.isdigit() and bool(name), tensor_path, key, "optimizer.state.<index>.<name>")
                per_param.setdefault(int(index), {})[name] = value
        for index, values in opt.get("scalars", {}).items():
            _expect(str(index).isdigit() and isinstance(values, dict), path, f"optimizer.scalars.{index}",
                    "an object keyed by parameter index")
            per_param.setdefault(int(index), {}).update(values)
        optimizer = {"state": per_param, "param_groups": opt["param_groups"]}
    head = {k[len("layout_head."):]: v for k, v in tensors.items() if k.startswith("layout_head.")}
    _expect(bool(head) == meta["layout_head"], tensor_path, "layout_head.*",
            "the layout head's tensors exactly when trainer_state.json says it has one")
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    for key, value in rng.items():
        _expect(value.dtype == torch.uint8 and value.dim() == 1, tensor_path, key, "a 1-D uint8 RNG state")
    return TrainerState(step=step, elapsed=float(elapsed), preset=meta["preset"], train_config=meta["train_config"],
                        history=meta["history"], segments=meta["segments"], optimizer=optimizer,
                        layout_head=head or None, rng=rng)


def _like(saved: Any, current: Any) -> Any:
    """JSON gave lists where the optimizer had tuples (AdamW's betas): restore the live type."""
    if isinstance(current, tuple) and isinstance(saved, list):
        return tuple(saved)
    return saved


def restore_optimizer(optimizer: torch.optim.Optimizer, state: TrainerState, path: Path) -> None:
    """Loads `state.optimizer` into `optimizer` (one CheckpointError line when it does not fit)."""
    import torch

    if state.optimizer is None:
        raise _fail(path, "optimizer: expected the optimizer's state (this state has none)")
    saved = state.optimizer
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise _fail(path, f"optimizer.param_groups: expected {len(optimizer.param_groups)} groups, "
                          f"got {len(saved['param_groups'])}")
    groups = [{k: _like(v, live.get(k)) for k, v in g.items()} for g, live in zip(saved["param_groups"],
                                                                                  optimizer.param_groups)]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, values in saved["state"].items():
        if index >= len(params):
            raise _fail(path, f"optimizer.state.{index}: expected a parameter index below {len(params)}")
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape:
                raise _fail(path, f"optimizer.state.{index}.{name}: expected shape {tuple(params[index].shape)}, "
                                  f"got {tuple(value.shape)} (a state of another model)")
    try:
        optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise _fail(path, f"optimizer: does not fit this model ({str(exc).splitlines()[0][:200]})") from None


def restore_rng(state: TrainerState, path: Path) -> None:
    """Puts back the RNG states saved with the step (CUDA ones only on the same number of GPUs)."""
    import torch

    cuda = [state.rng[k] for k in sorted(k for k in state.rng if k.startswith("rng.cuda."))]
    try:
        if "rng.torch" in state.rng:
            torch.set_rng_state(state.rng["rng.torch"])
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    except RuntimeError as exc:
        raise _fail(path, f"rng: not an RNG state of this PyTorch ({str(exc).splitlines()[0][:200]})") from None
