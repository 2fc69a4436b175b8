"""The PyTorch backend: KV-cached generation for the reference model, and `ask` on a video.

The engine owns the KV cache (a transformers `DynamicCache` here; the GPU fast path uses static
buffers) and the model only reads it. Prompts in a batch are left-padded; positions come from
the attention mask so padded rows decode exactly as they would alone.

    from blip3v.model.generate import TorchBackend
    TorchBackend.load("DIR").ask("clip.mp4", "what colour does the square turn?")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from blip3v.errors import InputError
from blip3v.model.checkpoint import load_checkpoint, load_tokenizer
from blip3v.model.tokenizer import check_tokenizer, encode_prompt, stop_token_ids
from blip3v.model.xgenmm import XGenMMVideoModel
from blip3v.runtime.generation import AskMixin, Sampler, SamplingConfig, accept_tokens, record_timings


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, S), mask (B, S) with padding on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.inference_mode()
def generate(model: XGenMMVideoModel, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
             sampling: SamplingConfig, stop_ids: tuple[int, ...], *, use_cache: bool = True,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Generates from spliced embeddings (B, S, D) with a left-padded mask (B, S).

    Returns each row's new tokens, without the stop token. `on_token(row, id)` sees each kept token.
    `use_cache=False` recomputes the whole sequence every step (the check that the cache is exact).
    """
    sample = Sampler(sampling)
    batch = inputs_embeds.shape[0]
    max_context = int(model.config.text_config["max_position_embeddings"])
    if inputs_embeds.shape[1] + sampling.max_new_tokens > max_context:
        raise InputError(
            f"prompt of {inputs_embeds.shape[1]} tokens + {sampling.max_new_tokens} new tokens exceeds "
            f"the model's context of {max_context}"
        )
    mask = attention_mask.clone()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, S)
    cache = DynamicCache(config=model.vlm.lang_model.config) if use_cache else None
    embeds = inputs_embeds
    step_embeds, step_positions = inputs_embeds, positions
    out: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    for _ in range(sampling.max_new_tokens):
        logits, _ = model.decoder(step_embeds, attention_mask=mask, position_ids=step_positions,
                                  cache=cache, use_cache=use_cache)
        tokens = sample(logits[:, -1].float().cpu().numpy())  # (B,)
        if accept_tokens(tokens, stop_ids, done, out, on_token):
            break
        next_ids = torch.from_numpy(tokens).view(batch, 1).to(inputs_embeds.device)
        next_embeds = model.embed_tokens(next_ids).to(inputs_embeds.dtype)  # (B, 1, D)
        next_pos = positions[:, -1:] + 1
        positions = torch.cat([positions, next_pos], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        if use_cache:
            step_embeds, step_positions = next_embeds, next_pos
        else:
            embeds = torch.cat([embeds, next_embeds], dim=1)
            step_embeds, step_positions = embeds, positions
    return out


DECODERS = ("auto", "reference", "static")


class TorchBackend(AskMixin):
    """Checkpoint -> answers, on the PyTorch reference model.

    `decoder="reference"` generates through transformers' DynamicCache (`generate` above);
    `"static"` through `FastDecoder` (static KV buffers, CUDA-graph step, Triton kernels, optional
    INT4 weights); `"auto"` picks static on CUDA and reference elsewhere.
    """

    def __init__(self, model: XGenMMVideoModel, tokenizer, device: str = "cpu", *, decoder: str = "auto",
                 weights: str = "dense", group_size: int = 128, max_batch: int = 16):
        check_tokenizer(model.config, tokenizer)
        if device == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda: this PyTorch build sees no CUDA GPU")
        if device not in ("cpu", "cuda"):
            raise InputError(f"the PyTorch backend runs on cpu or cuda, not {device!r}")
        if decoder not in DECODERS:
            raise InputError(f"decoder must be one of {', '.join(DECODERS)}")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.cfg = model.config
        self.device = device
        self.stop_ids = stop_token_ids(self.cfg)
        self.num_video_tokens = self.cfg.num_video_tokens
        if decoder == "auto":
            decoder = "static" if device == "cuda" or weights != "dense" else "reference"
        self.fast = None
        if decoder == "static":
            from blip3v.model.fast_decode import FastDecoder

            self.fast = FastDecoder(self.model, max_batch=max_batch, weights=weights, group_size=group_size)
        elif weights != "dense":
            raise InputError("--weights int4 needs the static decoder (--decoder static or auto)")

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
             **options) -> "TorchBackend":
        return cls(load_checkpoint(directory, dtype=dtype), load_tokenizer(directory), device, **options)

    def load_video(self, path: str | Path) -> np.ndarray:
        """(T, 3, S, S) float32 through the shared runtime video path."""
        from blip3v.runtime.video import load_clip

        return load_clip(path, self.cfg.num_frames, self.cfg.image_size, self.cfg.image_mean, self.cfg.image_std)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @torch.inference_mode()
    def answer_batch(self, pixel_values: np.ndarray, questions: list[str], sampling: SamplingConfig,
                     on_token: Callable[[int, int], None] | None = None,
                     timings: dict[str, float] | None = None) -> list[list[int]]:
        """pixel_values (B, T, 3, S, S), one question per clip -> new token ids per row."""
        dtype = next(self.model.parameters()).dtype
        t0 = time.perf_counter()
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(self.device, dtype)
        video = self.model.encode_video(pixels)  # (B, M, D)
        t1 = time.perf_counter()
        rows = [encode_prompt(self.cfg, self.tokenizer, q) for q in questions]
        ids, mask = left_pad(rows, self.cfg.special_token_ids["pad"])
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = self.model.splice(ids, video)
        wide_mask = self.model.widen_mask(ids, mask)
        first: list[float] = []

        def _on_token(row: int, tok: int) -> None:
            if not first:
                first.append(time.perf_counter())
            if on_token is not None:
                on_token(row, tok)

        if self.fast is not None:
            out = self.fast.generate(embeds, wide_mask, sampling, self.stop_ids, on_token=_on_token)
        else:
            out = generate(self.model, embeds, wide_mask, sampling, self.stop_ids, on_token=_on_token)
        record_timings(timings, t0, t1, first[0] if first else None, time.perf_counter())
        return out

