"""The PyTorch backend: the reference model behind the runtime's decoder interface.

The runtime owns the KV cache (blip3v.runtime.decoding.KVCache) and runs the one decode loop; this
backend stores a cache either as transformers' `DynamicCache` (`decoder="reference"`) or as the
static buffers of `FastDecoder` (`decoder="static"`, blip3v.model.fast_decode), and runs the
decoder on a chunk of embeddings. Prompts in a batch are left-padded; positions come from the
attention mask so padded rows decode exactly as they would alone.

    from blip3v.runtime.session import Engine
    Engine.open(model="DIR").ask("clip.mp4", "what colour does the square turn?")
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from blip3v.errors import InputError
from blip3v.model.checkpoint import load_checkpoint, load_tokenizer
from blip3v.model.tokenizer import check_tokenizer, encode_prompt, stop_token_ids
from blip3v.model.xgenmm import XGenMMVideoModel
from blip3v.runtime.decoding import KVCache
from blip3v.runtime.session import HostConveniences


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, S), mask (B, S) with padding on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


class DynamicStorage:
    """A KVCache's storage on the reference decoder: transformers' DynamicCache, which grows as
    tokens are written (the KVCache's capacity is the runtime's bound on it)."""

    def __init__(self, cache: DynamicCache):
        self.cache = cache

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for layer in self.cache.layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)

    def crop(self, slots: int) -> None:
        """Keeps the first `slots` slots of every layer. Written on the layers' key/value tensors, not
        on DynamicCache.crop, whose argument changed meaning within transformers 5 (an absolute
        length before, a negative count to remove in 5.25)."""
        for layer in self.cache.layers:
            keys = getattr(layer, "keys", None)
            if keys is None or not getattr(layer, "is_initialized", True):
                continue
            held = getattr(layer, "cumulative_length", keys.shape[-2])
            if held != keys.shape[-2]:
                raise InputError("cannot rewind a cache past its sliding window")
            layer.keys, layer.values = keys[..., :slots, :], layer.values[..., :slots, :]
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = slots


DECODERS = ("auto", "reference", "static")


class TorchBackend(HostConveniences):
    """Checkpoint -> answers, on the PyTorch reference model: a host of blip3v.runtime.session and a
    decoder of blip3v.runtime.decoding.

    `decoder="reference"` stores the cache as transformers' DynamicCache; `"static"` runs
    `FastDecoder` (static KV buffers, CUDA-graph step, Triton kernels, optional INT4 weights);
    `"auto"` picks static on CUDA and reference elsewhere.
    """

    def __init__(self, model: XGenMMVideoModel, tokenizer, device: str = "cpu", *, decoder: str = "auto",
                 weights: str = "dense", group_size: int = 128, max_batch: int = 16, fingerprint: str = ""):
        check_tokenizer(model.config, tokenizer)
        if device == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda: this PyTorch build sees no CUDA GPU")
        if device not in ("cpu", "cuda"):
            raise InputError(f"the PyTorch backend runs on cpu or cuda, not {device!r}")
        if decoder not in DECODERS:
            raise InputError(f"decoder must be one of {', '.join(DECODERS)}")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.cfg = cfg = model.config
        self.device = device
        self.dtype = next(self.model.parameters()).dtype
        self.stop_ids = stop_token_ids(cfg)
        self.special_ids = dict(cfg.special_token_ids)
        self.num_video_tokens = cfg.num_video_tokens
        self.num_frames, self.image_size = cfg.num_frames, cfg.image_size
        self.image_mean, self.image_std = tuple(cfg.image_mean), tuple(cfg.image_std)
        self.prompt_template = cfg.prompt_template
        self.max_context = int(cfg.text_config["max_position_embeddings"])
        self.max_batch = max_batch
        self.fingerprint = fingerprint or f"torch:{id(model)}"
        if decoder == "auto":
            decoder = "static" if device == "cuda" or weights != "dense" else "reference"
        self.visual = self.model.encode_video
        if device == "cuda":  # the visual call captured as a CUDA graph (model/visual_graph.py)
            from blip3v.model.visual_graph import GraphedVisual

            self.visual = GraphedVisual(self.model)
        self.fast = None
        if decoder == "static":
            from blip3v.model.fast_decode import FastDecoder

            self.fast = FastDecoder(self.model, max_batch=max_batch, weights=weights, group_size=group_size)
        elif weights != "dense":
            raise InputError("--weights int4 needs the static decoder (--decoder static or auto)")
        self.fingerprint += f"|{device}|{self.dtype}|{decoder}|{weights}|{group_size}"

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = None,
             **options) -> "TorchBackend":
        if isinstance(dtype, str):
            names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
            if dtype not in names:
                raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
            dtype = names[dtype]
        if dtype is None:
            dtype = torch.float16 if device == "cuda" else torch.float32
        options = {k: v for k, v in options.items() if v is not None}
        if "group_size" in options:
            options["group_size"] = int(options["group_size"])
        return cls(load_checkpoint(directory, dtype=dtype), load_tokenizer(directory), device,
                   fingerprint=_checkpoint_fingerprint(Path(directory)), **options)

    # -- the host side (blip3v.runtime.session) ---------------------------------------------
    video_options: dict = {}  # load_clip keywords (aspect, decoder, scaler); part of the clip cache key

    def load_video(self, path: str | Path, timings: dict[str, float] | None = None) -> np.ndarray:
        """(T, 3, S, S) float32 through the shared runtime video path; `timings` gets its parts (ms)."""
        from blip3v.runtime.video import load_clip

        return load_clip(path, self.num_frames, self.image_size, self.image_mean, self.image_std,
                         timings=timings, **self.video_options)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def encode_prompt(self, question: str) -> list[int]:
        return encode_prompt(self.cfg, self.tokenizer, question)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def encode_video(self, pixel_values: np.ndarray) -> torch.Tensor:
        """(B, T, 3, S, S) -> video tokens (B, M, D) on the model's device."""
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(self.device, self.dtype)
        return self.visual(pixels)

    # The visual path split per frame, as export/split.py's frame.onnx / temporal.onnx (live video,
    # blip3v.runtime.live): encode_temporal(encode_frames(frames)) is encode_video.
    @torch.inference_mode()
    def encode_frames(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) frames -> each frame's resampler latents (B, N, D_vis), float32 numpy."""
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(self.device, self.dtype)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise InputError(f"frames must be (B, 3, {self.image_size}, {self.image_size}), got {tuple(pixels.shape)}")
        return self.model.frame_latents(pixels[:, None])[:, 0].float().cpu().numpy()  # (B, 1, N, D) -> (B, N, D)

    @torch.inference_mode()
    def encode_temporal(self, latents: np.ndarray) -> torch.Tensor:
        """(B, T, N, D_vis) frame latents -> video tokens (B, M, D) on the model's device."""
        x = torch.from_numpy(np.ascontiguousarray(latents)).to(self.device, self.dtype)
        return self.model.vlm.vision_tokenizer.tokens(x)

    @torch.inference_mode()
    def splice(self, rows: list[list[int]], video: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Prompt ids per row + video tokens (B, M, D) -> left-padded embeddings (B, S, D) with each
        row's `<image>` replaced by its M tokens, and the mask (B, S)."""
        image = self.special_ids["image"]
        for r in rows:
            if r.count(image) != 1:
                raise InputError(f"each prompt needs exactly one <image> token; found {r.count(image)}")
        ids, mask = left_pad(rows, self.special_ids["pad"])
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = self.model.splice(ids, video.to(self.dtype))
        return embeds, self.model.widen_mask(ids, mask).cpu().numpy()

    # -- the decoder (blip3v.runtime.decoding) -------------------------------------------------
    @torch.inference_mode()
    def embed(self, ids: np.ndarray) -> torch.Tensor:
        return self.model.embed_tokens(torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.device)).to(self.dtype)

    def chunked_prefill(self, batch: int) -> bool:
        return True

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        if self.fast is not None:
            return self.fast.new_cache(self, batch, capacity)
        return KVCache(self, DynamicStorage(DynamicCache(config=self.model.vlm.lang_model.config)), batch, capacity)

    def copy_cache(self, src: KVCache, dst: KVCache, slots: int) -> None:
        if self.fast is not None:
            return self.fast.copy_cache(src, dst, slots)
        dst.storage = DynamicStorage(copy.deepcopy(src.storage.cache))
        dst.storage.crop(slots)

    def truncate_cache(self, cache: KVCache, slots: int) -> None:
        if self.fast is None:
            cache.storage.crop(slots)

    @torch.inference_mode()
    def forward(self, cache: KVCache, embeds: torch.Tensor, positions: np.ndarray) -> np.ndarray:
        if self.fast is not None:
            return self.fast.forward(cache, embeds, positions)
        mask = torch.from_numpy(cache.mask[:, :cache.used]).to(self.device)
        pos = torch.from_numpy(positions).to(self.device)
        logits, _ = self.model.decoder(embeds.to(self.dtype), attention_mask=mask, position_ids=pos,
                                       cache=cache.storage.cache, use_cache=True)
        return logits[:, -1].float().cpu().numpy()  # (B, V+3)

    def step(self, cache: KVCache, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if self.fast is not None:
            return self.fast.step_tokens(cache, tokens, positions)
        return self.forward(cache, self.embed(tokens[:, None]), positions)


def _checkpoint_fingerprint(directory: Path) -> str:
    """What identifies a checkpoint's answers cheaply: its config and index bytes and shard sizes."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.json")) + sorted(directory.glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.suffix == ".json" else str(path.stat().st_size).encode())
    return "torch:" + digest.hexdigest()
