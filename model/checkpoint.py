"""Checkpoint I/O in the released Hugging Face layout.

A checkpoint directory holds `config.json`, `model-0000k-of-0000n.safetensors` shards,
`model.safetensors.index.json` (`metadata.total_size`, `weight_map`) and the tokenizer files,
with the released key names (`vlm.vision_encoder.*`, `vlm.vision_tokenizer.*`,
`vlm.vision_tokenizer.temporal_encoder.*`, `vlm.lang_model.*`).

Loading is lazy: the model is built on the meta device and each tensor is read from the
memory-mapped shard straight into its slot (`assign=True`), so a 17 GB checkpoint needs ~1x RAM.
Saving writes to a temporary sibling folder and renames it into place when complete.

    python -c "from blip3v.model.checkpoint import load_checkpoint; load_checkpoint('DIR')"
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from blip3v.errors import CheckpointError
from blip3v.model.config import XGenMMConfig
from blip3v.model.xgenmm import XGenMMVideoModel

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_LISTED = 6  # keys named in an error message before "... and N more"


def _listing(keys: list[str]) -> str:
    head = ", ".join(keys[:MAX_LISTED])
    return head + (f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else "")


def save_checkpoint(model: XGenMMVideoModel, directory: str | Path, tokenizer=None,
                    max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Writes `model` (float32, released keys) and its tokenizer into `directory`, atomically."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = tensor
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        model.config.save(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _weight_map(directory: Path) -> dict[str, Path]:
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from None
        missing_files = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing_files:
            raise CheckpointError(f"{directory}: shard files listed in the index are missing: {_listing(missing_files)}")
        return {k: directory / f for k, f in weight_map.items()}
    single = directory / SINGLE_NAME
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return {k: single for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{single}: corrupt safetensors file ({exc})") from None
    raise CheckpointError(f"{directory}: no {INDEX_NAME} or {SINGLE_NAME} (no weights)")


def _materialise_buffers(model: XGenMMVideoModel) -> None:
    """Non-persistent buffers are not in the checkpoint; recompute the ones left on meta."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    lm = model.vlm.lang_model.model
    if lm.rotary_emb.inv_freq.is_meta:
        lm.rotary_emb = Phi3RotaryEmbedding(config=lm.config)
    emb = model.vlm.vision_encoder.embeddings
    if emb.position_ids.is_meta:
        emb.position_ids = torch.arange(emb.num_positions).expand((1, -1))
    temporal = model.vlm.vision_tokenizer.temporal_encoder
    if hasattr(temporal, "pos_emb") and temporal.pos_emb.inv_freq.is_meta:
        raise CheckpointError("checkpoint lacks vlm.vision_tokenizer.temporal_encoder.pos_emb.inv_freq")
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"tensors not set by the checkpoint: {_listing(leftover)}")


def load_checkpoint(directory: str | Path, dtype: torch.dtype | None = None,
                    attn_implementation: str = "sdpa") -> XGenMMVideoModel:
    """Builds the model from `config.json` and loads the shards lazily. Any missing, unexpected
    or mis-shaped key raises one `CheckpointError` that names them."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    cfg = XGenMMConfig.load(directory)
    with torch.device("meta"):
        model = XGenMMVideoModel(cfg, attn_implementation=attn_implementation)
    expected = model.state_dict()
    weight_map = _weight_map(directory)
    missing = sorted(set(expected) - set(weight_map))
    unexpected = sorted(set(weight_map) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if problems:
        raise CheckpointError(f"{directory}: checkpoint does not fit its config; " + "; ".join(problems))

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key, path in weight_map.items():
        by_file.setdefault(path, []).append(key)
    mis_shaped = []
    for path, keys in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in keys:
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(expected[key].shape):
                        mis_shaped.append(f"{key} {tuple(tensor.shape)} != {tuple(expected[key].shape)}")
                        continue
                    state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors shard ({exc})") from None
    if mis_shaped:
        raise CheckpointError(f"{directory}: mis-shaped keys: {_listing(mis_shaped)}")
    model.load_state_dict(state, strict=True, assign=True)
    _materialise_buffers(model)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_tokenizer(directory: str | Path):
    """The checkpoint's tokenizer through `AutoTokenizer` (SentencePiece Llama for the release)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config.json's model_type "xgenmm" is unknown to transformers; harmless
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
        raise CheckpointError(f"{directory}: cannot load the tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
