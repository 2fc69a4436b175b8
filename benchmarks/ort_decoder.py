"""The ONNX Runtime backend's decoder alone: a decoder.onnx without an engine directory around it.

The decode benchmark times this project's decoder graph on a plain Phi-3, which has no visual graph
and so no engine directory; the AWQ study runs decoders quantized in memory. Both need the decoder
side of `OrtBackend` (its KV storage `OrtCache`, IO binding, `forward`, `step`, `prepare_decode`)
exactly as it ships, driven by the runtime's one decode loop:

    from blip3v.runtime.decoding import generate
    backend = OrtDecoder(session, embeddings, kv_heads=32, head_dim=96, max_context=4096,
                         past_names=..., present_names=..., attention="gqa")
    ids = generate(backend, backend.embed(prompt_ids[None]), mask, SamplingConfig(max_new_tokens=64), ())

`OrtDecoder` is an `OrtBackend` whose constructor takes the decoder session and the few facts an
engine's manifest would give, instead of an engine directory; every decoder method is inherited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from blip3v.runtime.hugepages import Backed
from blip3v.runtime.manifest import Manifest
from blip3v.runtime.ort_backend import OrtBackend

IO_NAMES = ("inputs_embeds", "attention_mask", "position_ids", "logits")  # blip3v.export's names


class OrtDecoder(OrtBackend):
    """OrtBackend's decoder interface (blip3v.runtime.decoding) on one decoder session.

    embeddings: the table (V, D) in the graph's dtype (rows by id); past_names / present_names: the
    KV inputs / outputs in OrtBackend's order (key, value of layer 0, then layer 1, ...); attention:
    "gqa" or "standard" (what chunked prefill the graph takes); names: inputs_embeds, attention_mask,
    position_ids, logits tensor names."""

    def __init__(self, session: ort.InferenceSession, embeddings: np.ndarray, *, kv_heads: int, head_dim: int,
                 max_context: int, past_names: list[str], present_names: list[str], attention: str,
                 names: tuple[str, str, str, str] = IO_NAMES, device: str = "cpu", huge_pages: Backed | None = None):
        # No super().__init__: that opens an engine directory. What the inherited decoder methods and
        # OrtCache read is set here, from the arguments.
        self.decoder = session
        self.device = device
        self.ort_device = "cuda" if device in ("cuda", "tensorrt") else "cpu"
        self.embeddings = embeddings
        self.dtype = self.embed_dtype = np.dtype(embeddings.dtype)
        self.kv_heads, self.head_dim, self.max_context = kv_heads, head_dim, max_context
        self.past_names, self.present_names = list(past_names), list(present_names)
        self.embeds_name, self.mask_name, self.position_name, self.logits_name = names
        self.stop_ids: tuple[int, ...] = ()
        self.huge_pages = huge_pages or Backed()
        logits = next(o for o in session.get_outputs() if o.name == self.logits_name)
        width = logits.shape[-1] if isinstance(logits.shape[-1], int) else len(embeddings)
        # The two manifest facts OrtBackend's decoder side reads: the logits width and the attention.
        self.manifest = Manifest(Path("."), {"model": {"num_logits": int(width)}, "decoder": {"attention": attention}})

    @classmethod
    def of_engine(cls, engine: OrtBackend, session: ort.InferenceSession) -> OrtDecoder:
        """Another decoder graph (a quantized copy, say) with the tensor names, sizes and embedding
        table of an engine's."""
        return cls(session, engine.embeddings, kv_heads=engine.kv_heads, head_dim=engine.head_dim,
                   max_context=engine.max_context, past_names=engine.past_names, present_names=engine.present_names,
                   attention=str(engine.manifest["decoder"].get("attention", "standard")),
                   names=(engine.embeds_name, engine.mask_name, engine.position_name, engine.logits_name),
                   device=engine.device)

    def encode_video(self, pixel_values: np.ndarray) -> Any:
        raise NotImplementedError("a decoder alone has no visual graph")
