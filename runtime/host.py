"""The host side every engine backend shares, read from the manifest alone: clip loading, the prompt
tokenizer, the embedding table and the splice of video tokens into the prompt.

OrtBackend and TrtBackend differ only in where the graphs run and how the KV cache is stored; the
decode loop over that cache is blip3v.runtime.decoding's, and the sessions API on top of it
(blip3v.runtime.session) is the same for every backend.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from blip3v.errors import EngineError, InputError
from blip3v.runtime.manifest import Manifest
from blip3v.runtime.session import HostConveniences
from blip3v.runtime.tokenizer import PromptTokenizer


class EngineHost(HostConveniences):
    """Host-side state and steps of an engine backend. Subclasses call `_read_manifest` first, set
    `embed_dtype` (the decoder's inputs_embeds dtype) and implement `encode_video` and the decoder
    interface of blip3v.runtime.decoding (new_cache, forward, copy_cache, chunked_prefill)."""

    embed_dtype: np.dtype
    max_batch: int | None = None  # rows per `generate` call; None: every row at once

    def _read_manifest(self, manifest: Manifest) -> None:
        self.manifest = manifest
        model = manifest.model
        self.num_frames = int(model["num_frames"])
        self.image_size = int(model["image_size"])
        self.image_mean = tuple(model["image_mean"])
        self.image_std = tuple(model["image_std"])
        self.num_video_tokens = int(model["num_video_tokens"])
        self.kv_heads = int(model["num_key_value_heads"])
        self.head_dim = int(model["head_dim"])
        self.special_ids = {k: int(v) for k, v in manifest["special_token_ids"].items()}
        self.stop_ids = tuple(int(i) for i in manifest["stop_token_ids"])
        self.tokenizer = PromptTokenizer.from_manifest(manifest)
        self.prompt_template = str(manifest["prompt"]["template"])
        self.max_context = int(model["max_context"])
        # What identifies this engine's answers: the hashes of every file it runs (clip cache keys).
        files = sorted((name, str(entry.get("sha256"))) for name, entry in manifest["files"].items())
        self.fingerprint = hashlib.sha256(repr(files).encode()).hexdigest()

        emb = manifest.raw["embeddings"]
        try:
            self.embeddings = np.load(manifest.path("embeddings"), mmap_mode="r")  # (V, D), rows by id
        except (ValueError, OSError) as exc:
            raise EngineError(f"{manifest.path('embeddings')}: not a readable .npy file ({exc})") from None
        if self.embeddings.shape != (int(emb["rows"]), int(emb["dim"])):
            raise EngineError(f"{manifest.path('embeddings')}: shape {self.embeddings.shape}, the manifest says "
                              f"({emb['rows']}, {emb['dim']})")

        vis, dec = manifest["visual"], manifest["decoder"]
        self.pixel_name = vis["inputs"]["pixel_values"]
        self.video_name = vis["outputs"]["video_tokens"]
        self.embeds_name = dec["inputs"]["inputs_embeds"]
        self.mask_name = dec["inputs"]["attention_mask"]
        self.position_name = dec["inputs"]["position_ids"]
        self.logits_name = dec["outputs"]["logits"]

    # -- the pieces TorchBackend also has --------------------------------------------------
    video_options: dict = {}  # load_clip keywords (aspect, decoder, scaler); part of the clip cache key

    def load_video(self, path: str | Path, timings: dict[str, float] | None = None) -> np.ndarray:
        """(T, 3, S, S) float32 through the shared runtime video path; `timings` gets its parts (ms)."""
        from blip3v.runtime.video import load_clip

        return load_clip(path, self.num_frames, self.image_size, self.image_mean, self.image_std,
                         timings=timings, **self.video_options)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def encode_prompt(self, question: str) -> list[int]:
        return self.tokenizer.encode_prompt(question)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def check_pixels(self, pixel_values: np.ndarray) -> None:
        expected = (self.num_frames, 3, self.image_size, self.image_size)
        if pixel_values.ndim != 5 or pixel_values.shape[1:] != expected:
            raise InputError(f"pixel_values must be (B, {', '.join(map(str, expected))}), got {pixel_values.shape}")

    # -- the prompt ------------------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids (...) -> rows of the merged table (..., D); ids >= additional_vocab_start are
        already the xGen-MM extra rows there."""
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.embeddings)):
            raise InputError(f"token id out of range 0..{len(self.embeddings) - 1}")
        return np.asarray(self.embeddings[ids], dtype=self.embed_dtype)

    def splice(self, rows: list[list[int]], video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prompt ids per row + video tokens (B, M, D) -> left-padded embeddings (B, S, D) with each
        row's single `<image>` replaced by its M tokens, and the mask (B, S)."""
        image_id, pad_id = self.special_ids["image"], self.special_ids["pad"]
        width = max(len(r) for r in rows)
        m = video.shape[1]
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width - 1 + m), dtype=np.int64)
        for i, r in enumerate(rows):
            if r.count(image_id) != 1:
                raise InputError(f"each prompt needs exactly one <image> token; found {r.count(image_id)}")
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
        text = self.embed(ids)  # (B, S_text, D)
        out = np.empty((len(rows), width - 1 + m, text.shape[-1]), dtype=text.dtype)
        for i in range(len(rows)):
            at = int(np.flatnonzero(ids[i] == image_id)[0])
            out[i, :at] = text[i, :at]
            out[i, at:at + m] = video[i]
            out[i, at + m:] = text[i, at + 1:]
        return out, mask
