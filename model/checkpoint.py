"""Checkpoint I/O in the released Hugging Face layout.

A checkpoint directory holds `config.json`, `model-0000k-of-0000n.safetensors` shards,
`model.safetensors.index.json` (`metadata.total_size`, `weight_map`) and the tokenizer files,
with the released key names (`vlm.vision_encoder.*`, `vlm.vision_tokenizer.*`,
`vlm.vision_tokenizer.temporal_encoder.*`, `vlm.lang_model.*`).

Loading checks before it allocates: config.json and the index are validated (one-line
`CheckpointError`s naming the file and key), the model is built on the meta device, tensor names,
shapes and dtypes are compared from the shard headers, and only then is each tensor read from the
memory-mapped shard straight into its slot (`assign=True`), so a 17 GB checkpoint needs ~1x RAM.
Each tensor read is checked (cheaply) for being entirely NaN/Inf or, for a matrix, all zeros.
Temporal-encoder names of the authors' training code (`.gttm.`, `.ttm.`, `.tts.`) load as
`.temporal_encoder.`. What a released config.json leaves out and the release still fixes is read
off the checkpoint (`load_config`): the temporal encoder from its tensors, the frame count from the
released repository's name. Saving fills a temporary sibling folder that replaces the target atomically
(`blip3v.atomic.atomic_dir`).

    python -c "from blip3v.model.checkpoint import load_checkpoint; load_checkpoint('DIR')"
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from blip3v.atomic import atomic_dir
from blip3v.errors import CheckpointError
from blip3v.model.config import CONFIG_MAX_BYTES, ConfigCheck, XGenMMConfig, check_sizes, read_json
from blip3v.model.xgenmm import XGenMMVideoModel

try:  # transformers' config classes validate through huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError
except ImportError:  # older huggingface_hub
    class _StrictDataclassError(Exception):
        pass

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
INDEX_MAX_BYTES = 64 << 20  # the released 4B model's index is ~90 kB
MAX_LISTED = 6  # keys named in an error message before "... and N more"
TEMPORAL_ALIASES = ("gttm", "ttm", "tts")  # module names the authors' code uses for temporal_encoder
WIDENS_EXACTLY = ("F32", "F16", "BF16")  # safetensors dtypes a float32 weight is loaded from
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
SAMPLE = 64  # elements looked at per tensor before a full pass is needed (see `degenerate`)


def _listing(keys: list[str]) -> str:
    head = ", ".join(keys[:MAX_LISTED])
    return head + (f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else "")


def save_checkpoint(model: XGenMMVideoModel, directory: str | Path, tokenizer=None,
                    max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Writes `model` (float32, released keys) and its tokenizer into `directory`, atomically:
    everything goes into a temporary sibling that replaces `directory` only once complete."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
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
    return directory


def read_weight_map(directory: Path) -> dict[str, Path]:
    """{stored tensor name: shard path} from the index (validated) or from a single file's header."""
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        return _read_index(directory, index_path)
    single = directory / SINGLE_NAME
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return {k: single for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{single}: corrupt safetensors file ({_first_line(exc)})") from None
    raise CheckpointError(f"{directory}: no {INDEX_NAME} or {SINGLE_NAME} (no weights)")


def has_weights(directory: Path) -> bool:
    return (directory / INDEX_NAME).is_file() or (directory / SINGLE_NAME).is_file()


def _read_index(directory: Path, index_path: Path) -> dict[str, Path]:
    """`model.safetensors.index.json`: UTF-8 JSON, `weight_map` an object of tensor name -> shard file
    name inside `directory`. Each fault is one line naming the file and the key."""
    check = ConfigCheck(str(index_path))
    index = read_json(index_path, "not a valid safetensors index", INDEX_MAX_BYTES)
    if not isinstance(index, dict):
        check.fail("(top level)", "a JSON object with a weight_map", index)
    metadata = check.section(index, "", "metadata", nullable=True)
    total = metadata.get("total_size")
    if total is not None and (isinstance(total, bool) or not isinstance(total, (int, float)) or not total >= 0):
        check.fail("metadata.total_size", "a byte count", total)
    if "weight_map" not in index:
        check.fail("weight_map", "an object mapping tensor names to shard files")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        check.fail("weight_map", "an object mapping tensor names to shard files", weight_map)
    for key, name in weight_map.items():
        if not isinstance(name, str) or not _inside(name):
            check.fail(f"weight_map[{key!r}]", "a shard file name inside the checkpoint directory", name)
    missing_files = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
    if missing_files:
        raise CheckpointError(f"{directory}: shard files listed in the index are missing: {_listing(missing_files)}")
    return {k: directory / f for k, f in weight_map.items()}


def _inside(name: str) -> bool:
    """A relative path that stays in the directory: no absolute path, drive, `..`, backslash or NUL.
    Judged on the name alone: the shards of a hub snapshot are symlinks into a blob store."""
    path = PurePosixPath(name)
    return (bool(name) and "\\" not in name and "\0" not in name and not path.is_absolute()
            and not PureWindowsPath(name).drive and ".." not in path.parts and path.name not in ("", "."))


def canonical_names(stored: list[str] | dict[str, Path], source: str | Path) -> tuple[dict[str, str], dict[str, int]]:
    """Maps each stored tensor name to the released name. The authors' own inference loader renames
    `.gttm.`, `.ttm.` and `.tts.` to `.temporal_encoder.` before loading (SalesforceAIResearch/strefer,
    blip-3-strefer/open_flamingo/inference/run_inference_video_qa_with_mask.py), so checkpoints from
    their training code may name the temporal module that way; the same replacements, in the same
    order, are applied here. Returns ({released name: stored name}, {alias: keys renamed})."""
    names: dict[str, str] = {}
    renamed: dict[str, int] = {}
    for key in stored:
        name = key
        for alias in TEMPORAL_ALIASES:
            if f".{alias}." in name:
                name = name.replace(f".{alias}.", ".temporal_encoder.")
                renamed[alias] = renamed.get(alias, 0) + 1
        if name in names:
            raise CheckpointError(f"{source}: tensors {names[name]} and {key} both load as {name}")
        names[name] = key
    return names, {alias: renamed[alias] for alias in TEMPORAL_ALIASES if alias in renamed}


def build_meta_model(cfg: XGenMMConfig, source: str | Path, attn_implementation: str = "sdpa") -> XGenMMVideoModel:
    """The model on the meta device (no memory). `XGenMMConfig.from_dict` has checked every field the
    model code reads; transformers' config classes also receive the fields a released config carries
    for them, and may reject those: that is a config fault too, reported on one line."""
    try:
        with torch.device("meta"):
            return XGenMMVideoModel(cfg, attn_implementation=attn_implementation)
    except (ValueError, TypeError, KeyError, AttributeError, _StrictDataclassError) as exc:
        raise CheckpointError(f"{source}: config.json does not build the model "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_headers(by_file: dict[Path, list[tuple[str, str]]], expected: dict[str, torch.Tensor],
                   directory: Path) -> None:
    """Shape and dtype of every tensor from the shard headers, before any tensor data is read."""
    absent, mis_shaped, mis_typed = [], [], []
    for path, pairs in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                for name, key in pairs:
                    if key not in present:
                        absent.append(f"{key} (in {path.name})")
                        continue
                    header = f.get_slice(key)
                    shape, stored = tuple(header.get_shape()), header.get_dtype()
                    want = expected[name]
                    if shape != tuple(want.shape):
                        mis_shaped.append(f"{key} {shape} != {tuple(want.shape)}")
                    if not _dtype_fits(stored, want.dtype):
                        mis_typed.append(f"{key} {stored}")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors shard ({_first_line(exc)})") from None
    if absent:
        raise CheckpointError(f"{directory}: tensors the index lists are not in their shard: {_listing(absent)}")
    if mis_shaped:
        raise CheckpointError(f"{directory}: mis-shaped keys: {_listing(mis_shaped)}")
    if mis_typed:
        raise CheckpointError(f"{directory}: tensors of the wrong dtype (expected F32; F16 and BF16 are "
                              f"widened exactly): {_listing(mis_typed)}")


def _dtype_fits(stored: str, want: torch.dtype) -> bool:
    """The model is float32. F16 and BF16 widen to it exactly, so half-precision checkpoints load;
    F64 would round and 8-bit floats need scales this loader does not know, so neither is taken,
    nor any integer or bool type where a float belongs."""
    if want.is_floating_point:
        return stored in WIDENS_EXACTLY
    return SAFETENSORS_DTYPES.get(stored) == want


def degenerate(tensor: torch.Tensor) -> str | None:
    """'entirely NaN/Inf', 'all zeros' (2-D weight matrices only) or None.

    Cheap: a strided sample of `SAMPLE` elements settles the question for any healthy tensor; only a
    tensor whose sample is all non-finite (or all zero) gets the full pass. Biases and norm offsets
    are legitimately zero, so the zero test is for matrices only."""
    flat = tensor.reshape(-1)  # (numel,) a view of the contiguous tensor
    n = flat.numel()
    if n == 0:
        return None
    sample = flat[:: max(1, n // SAMPLE)]  # (<= 2 * SAMPLE,)
    if not bool(torch.isfinite(sample).any()) and not bool(torch.isfinite(flat).any()):
        return "entirely NaN/Inf"
    if tensor.dim() == 2 and not bool(sample.any()) and not bool(flat.any()):
        return "all zeros"
    return None


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


_TEMPORAL = "vlm.vision_tokenizer.temporal_encoder."
_FRAMES_IN_NAME = re.compile(r"-(\d{1,3})frames$")  # ...-128tokens-16frames, the released repositories


def load_config(directory: str | Path) -> tuple[XGenMMConfig, list[str]]:
    """config.json, completed from the checkpoint where a released config is silent -> (config,
    one note per inferred field).

    The released config.json files name their towers only and leave out the temporal encoder and
    the frame count, which differ between the three releases (docs/MODEL.md, "Released
    checkpoints"). When config.json gives no temporal encoder type, its type and sizes are read from the
    tensor names and shard headers: `initial_memory` is the TTM's, `final_output` a TokenLearner
    pooling after it (`gttm_tl`) or alone (`tl`), whose last layer's rows are the token count. When
    it gives no `video_config.num_frames`, a checkpoint directory (or Hub cache folder) named as the
    releases are, `...-16frames`, gives it. What a config states always wins."""
    directory = Path(directory)
    cfg = XGenMMConfig.load(directory)
    raw = read_json(directory / "config.json", "not valid JSON", CONFIG_MAX_BYTES)
    notes: list[str] = []
    tokenizer = raw.get("vision_tokenizer_config")
    section = tokenizer.get("temporal_encoder") if isinstance(tokenizer, dict) else None
    section = raw.get("temporal_encoder_config") if section is None else section
    named = isinstance(section, dict) and "type" in section
    if not named and has_weights(directory):
        temporal = _temporal_from_tensors(directory, cfg)
        if temporal is not None and temporal != cfg.temporal_encoder_config:
            cfg = replace(cfg, temporal_encoder_config=temporal)
            notes.append(f"temporal encoder {temporal.type} (from the checkpoint's tensors; config.json names none)")
    video = raw.get("video_config")
    if not (isinstance(video, dict) and "num_frames" in video):
        for name in (directory.name, *(p.name.split("--")[-1] for p in directory.parents if p.name.startswith("models--"))):
            found = _FRAMES_IN_NAME.search(name)
            if found and int(found.group(1)) != cfg.num_frames:
                cfg = replace(cfg, num_frames=int(found.group(1)))
                notes.append(f"{cfg.num_frames} frames (from the name {name}; config.json gives none)")
                break
    if notes:
        check_sizes(cfg, ConfigCheck(str(directory / "config.json")))
    return cfg, notes


def _temporal_from_tensors(directory: Path, cfg: XGenMMConfig):
    """The temporal encoder the tensors hold (type, tokens, memory, process layers), or None when
    they hold none of the parameterised kinds."""
    weight_map = read_weight_map(directory)
    names, _ = canonical_names(weight_map, directory)
    own = {n[len(_TEMPORAL):]: key for n, key in names.items() if n.startswith(_TEMPORAL)}

    def shape(rel: str) -> tuple[int, ...]:
        key = own[rel]
        try:
            with safe_open(str(weight_map[key]), framework="pt") as f:
                return tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{weight_map[key]}: corrupt safetensors shard ({_first_line(exc)})") from None

    pooled = "final_output.mlp.3.weight" in own  # TL(M): Linear(2M -> M), rows = M
    if "initial_memory" in own:
        kind = "gttm_tl" if pooled else "gttm"
    elif pooled:
        kind = "tl"
    else:
        return None
    te = replace(cfg.temporal_encoder_config, type=kind)
    if pooled:
        te = replace(te, num_tokens=shape("final_output.mlp.3.weight")[0])
    if kind != "tl":
        layers = {int(m.group(1)) for rel in own if (m := re.match(r"ttm_unit\.process_layers\.(\d+)\.", rel))}
        te = replace(te, memory_size=shape("initial_memory")[1], process_layers=max(layers) + 1 if layers else te.process_layers)
    return te


def load_checkpoint(directory: str | Path, dtype: torch.dtype | None = None,
                    attn_implementation: str = "sdpa") -> XGenMMVideoModel:
    """Builds the model from `config.json` and loads the shards lazily.

    Order, so that nothing is allocated before it is checked: config.json (validated), the index
    (validated), the model on the meta device, tensor names (missing / unexpected, authors' names
    mapped), every shard header (shape, dtype), then the data (no tensor entirely NaN/Inf, no weight
    matrix all zeros). Each fault raises one `CheckpointError` line naming the file or the keys."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    cfg, _ = load_config(directory)
    weight_map = read_weight_map(directory)
    names, _ = canonical_names(weight_map, directory)
    model = build_meta_model(cfg, directory / "config.json", attn_implementation)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(names[n] for n in set(names) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if problems:
        raise CheckpointError(f"{directory}: checkpoint does not fit its config; " + "; ".join(problems))

    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, key in names.items():
        by_file.setdefault(weight_map[key], []).append((name, key))
    _check_headers(by_file, expected, directory)

    state: dict[str, torch.Tensor] = {}
    damaged = []
    for path, pairs in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for name, key in pairs:
                    tensor = f.get_tensor(key)
                    fault = degenerate(tensor)
                    if fault:
                        damaged.append(f"{key} ({fault})")
                        continue
                    want = expected[name].dtype
                    state[name] = tensor.to(dtype or want) if want.is_floating_point else tensor
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors shard ({_first_line(exc)})") from None
    if damaged:
        raise CheckpointError(f"{directory}: damaged weights: {_listing(damaged)}")
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
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
        raise CheckpointError(
            f"{directory}: cannot load the tokenizer ({type(exc).__name__}: {_first_line(exc)})") from None
