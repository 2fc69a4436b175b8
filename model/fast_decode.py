"""The GPU fast path of the PyTorch backend: Phi-3 decoding on static KV buffers, gpt-fast style.

`FastDecoder` is a decoder of the one decode loop (blip3v.runtime.decoding): the runtime owns the
cache, this module only allocates its buffers, runs a chunk of embeddings through the model, and
runs the one-token step. TorchBackend (`decoder="static"`) is the host that ships; `StaticBackend`
drives a FastDecoder by itself (a bare language model in the benchmarks, the tests):

    from blip3v.model.fast_decode import FastDecoder, StaticBackend
    from blip3v.runtime.decoding import generate
    dec = StaticBackend(FastDecoder(model, dtype=torch.float16, weights="int4"))
    rows = generate(dec, inputs_embeds, attention_mask, SamplingConfig(), stop_ids)   # mask: numpy

`FastDecoder` runs the loaded Phi-3 of an `XGenMMVideoModel` (`model.vlm.lang_model`; its modules are
shared, not copied, when the dtype already matches) with its own forward:

- A cache's storage (`StaticStorage`) is two buffers per layer, (B, H_kv, C, dh), allocated per
  cache and written in place. Rows are stored compactly: slot p holds the token at position p
  (positions come from the runtime's mask), so left padding costs no cache and each row's filled
  length is its next position; attention reads only the filled slots. A chunk of several tokens
  may follow a non-empty cache (a question after a clip's cached prefix): its queries attend over
  the row's cached slots and the chunk's own.
- The one-token step has fixed shapes (tokens (B,), positions (B,) in, logits (B, V+3) out), so on
  CUDA it is captured as a CUDA graph (`graph="cuda_graph"`, the default there) or compiled
  (`graph="compile"`: torch.compile mode="reduce-overhead", fullgraph=True). A graph is tied to the
  addresses of the buffers it was captured on, so it lives on the storage; a storage whose cache
  is dropped is kept (a few) and handed to the next cache of the same shape, its graph with it,
  and storages are sized in whole blocks of slots, so requests of similar lengths capture once.
  The loop that samples and stops is the runtime's, plain Python.
- The kernels of `blip3v.kernels` replace PyTorch's ops through their dispatchers: decode attention,
  residual add + RMSNorm, and the INT4 matmul for `weights="int4"` (weight-only, round-to-nearest,
  `group_size` along K; the decoder Linear layers are swapped for `Int4Linear`, the embedding and
  `lm_head` stay in `dtype`). `backend="auto"` uses them on CUDA with Triton and the PyTorch
  references elsewhere; `"torch"`/`"triton"` force one (tests run `"triton"` in the CPU interpreter).

In fp32 with the references it gives the reference decoder's greedy tokens (TorchBackend,
`decoder="reference"`, transformers' DynamicCache) token for token (tests/test_fast_decode.py). One
deliberate difference: a sliding window (Phi-3: 2047) is counted in positions, so a padded row sees
the window it would see alone; transformers counts it in padded cache slots. The two only differ
for prompts longer than the window.

    python -m blip3v.model.fast_decode [CHECKPOINT_DIR]    # decode tokens/s on a GPU (random
                                                          # xgen-mm-vid-128 weights without a dir)
"""

from __future__ import annotations

import copy
import functools
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

from blip3v.errors import InputError
from blip3v.kernels.decode_attention import decode_attention
from blip3v.kernels.int4_matmul import GROUP_SIZES, Int4Weight, int4_linear, quantize_int4
from blip3v.kernels.rmsnorm import add_rmsnorm
from blip3v.model.xgenmm import XGenMMVideoModel
from blip3v.runtime.decoding import KVCache
from blip3v.runtime.generation import SamplingConfig

WEIGHTS = ("dense", "int4")
GRAPH_MODES = ("auto", "none", "cuda_graph", "compile")
# With a captured step, storages are sized in blocks of this many slots and kept for reuse, so
# caches of similar capacity share one storage and its graph (a capture costs two eager steps).
SLOT_BLOCK = 256
KEPT_STORAGES = 2  # dropped caches' storages kept for the next cache of the same shape (each can be GBs)

# ---------------------------------------------------------------------------------------------
# INT4 weight-only Linear (the module swap)
# ---------------------------------------------------------------------------------------------

class Int4Linear(nn.Module):
    """Bias-free Linear holding INT4 weights: buffers `packed` (N, K_pad/2) uint8, `scales` (N, K_pad/G).
    Its state dict is the quantized checkpoint format; `from_linear` is the offline pass."""

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        k_pad = -(-in_features // group_size) * group_size
        self.register_buffer("packed", torch.zeros(out_features, k_pad // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, k_pad // group_size, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, dtype: torch.dtype) -> Int4Linear:
        if linear.bias is not None:
            raise ValueError("Int4Linear takes bias-free Linear layers (Phi-3's decoder has no biases)")
        q = quantize_int4(linear.weight.detach().to(dtype), group_size)
        out = cls(linear.in_features, linear.out_features, group_size, dtype, linear.weight.device)
        out.packed.copy_(q.packed)
        out.scales.copy_(q.scales)
        return out

    def weight_int4(self) -> Int4Weight:
        return Int4Weight(self.packed, self.scales, self.group_size, self.in_features)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return int4_linear(x, self.weight_int4(), backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def _linear(module: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    return module(x, backend) if isinstance(module, Int4Linear) else module(x)


def _shared(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model's own module when it already has `dtype` (weights shared), else a converted copy."""
    if all(p.dtype == dtype for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(dtype)


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------

class StaticStorage:
    """A KVCache's storage on the static decoder: per layer one K and one V buffer (B, H_kv, C, dh),
    slot p holding the token at position p, and the step runners captured or compiled on these
    buffers (`steps`, by batch size: a CUDA graph is tied to the addresses it was captured with)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v
        self.steps: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.k[0].shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


class FastLayer(nn.Module):
    """One Phi-3 decoder layer over a static K/V buffer pair it is handed. The norms are applied by
    the caller (fused with the residual add), so this holds the projections and the attention."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype, window: int | None):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        conf = attn.config
        self.h_q, self.h_kv, self.head_dim = conf.num_attention_heads, conf.num_key_value_heads, attn.head_dim
        self.scale = attn.scaling
        self.window = window
        self.qkv, self.o = _shared(attn.qkv_proj, dtype), _shared(attn.o_proj, dtype)
        self.gate_up, self.down = _shared(mlp.gate_up_proj, dtype), _shared(mlp.down_proj, dtype)
        self.act = mlp.activation_fn
        self.input_norm = _shared(layer.input_layernorm, dtype)
        self.post_norm = _shared(layer.post_attention_layernorm, dtype)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, S, (H_q + 2 H_kv) dh) -> q (B, H_q, S, dh), k, v (B, H_kv, S, dh)."""
        b, s, _ = qkv.shape
        q_end = self.h_q * self.head_dim
        k_end = q_end + self.h_kv * self.head_dim
        q = qkv[..., :q_end].view(b, s, self.h_q, self.head_dim).transpose(1, 2)
        k = qkv[..., q_end:k_end].view(b, s, self.h_kv, self.head_dim).transpose(1, 2)
        v = qkv[..., k_end:].view(b, s, self.h_kv, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend_chunk(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_buf: torch.Tensor,
                     v_buf: torch.Tensor, real: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     allowed: torch.Tensor, backend: str) -> torch.Tensor:
        """x (B, S, D) normed. The chunk's real tokens are written at their positions (`real`: row,
        column, slot of each), then every query attends over its row's first `span` slots as
        `allowed` (B, S, span) says: the cached prefix and the chunk alike -> (B, S, D)."""
        b, s, _ = x.shape
        rows, cols, slots = real
        q, k, v = self.split_heads(_linear(self.qkv, x, backend))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # transformers' own RoPE: identical numerics
        k_buf[rows, :, slots] = k[rows, :, cols]  # (nnz, H_kv, dh)
        v_buf[rows, :, slots] = v[rows, :, cols]
        span = allowed.shape[-1]
        keys, values = k_buf[:, :, :span], v_buf[:, :, :span]  # (B, H_kv, span, dh)
        group = self.h_q // self.h_kv
        if group > 1:  # GQA: query head h reads KV head h // group, as transformers' repeat_kv
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None], scale=self.scale)  # (B, H_q, S, dh)
        return _linear(self.o, out.transpose(1, 2).reshape(b, s, -1), backend)

    def attend_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_buf: torch.Tensor,
                    v_buf: torch.Tensor, positions: torch.Tensor, backend: str) -> torch.Tensor:
        """x (B, D) normed, one token per row at `positions` (B,) -> (B, D). Fixed shapes, no sync."""
        b = x.shape[0]
        q, k, v = self.split_heads(_linear(self.qkv, x[:, None], backend))  # (B, H, 1, dh)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        rows = torch.arange(b, device=x.device)
        k_buf[rows, :, positions] = k[:, :, 0]  # (B, H_kv, dh) at slot positions[b]
        v_buf[rows, :, positions] = v[:, :, 0]
        out = decode_attention(q[:, :, 0], k_buf, v_buf, positions + 1,
                               scale=self.scale, window=self.window, backend=backend)  # (B, H_q, dh)
        return _linear(self.o, out.reshape(b, -1), backend)

    def feed_forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        gate, up = _linear(self.gate_up, x, backend).chunk(2, dim=-1)  # as Phi3MLP
        return _linear(self.down, up * self.act(gate), backend)


class FastDecoder(nn.Module):
    """Phi-3 of an XGenMMVideoModel on static KV buffers; see the module docstring. The methods of
    the decoder interface (new_cache, copy_cache, forward, step_tokens) are what TorchBackend calls.

    max_batch: the most rows a cache may have. dtype: the decoder's (default: the model's).
    weights: "dense" or "int4" (round-to-nearest, `group_size` along K).
    graph: "auto" (CUDA graph on CUDA, none elsewhere), "none", "cuda_graph", "compile".
    backend: "auto" | "triton" | "torch" for every kernel dispatcher.
    """

    def __init__(self, model: XGenMMVideoModel, *, max_batch: int = 16, dtype: torch.dtype | None = None,
                 weights: str = "dense", group_size: int = 128, graph: str = "auto", backend: str = "auto"):
        super().__init__()
        if weights not in WEIGHTS:
            raise InputError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        if weights == "int4" and group_size not in GROUP_SIZES:
            raise InputError(f"INT4 group size must be one of {GROUP_SIZES}, got {group_size}")
        if graph not in GRAPH_MODES:
            raise InputError(f"graph must be one of {', '.join(GRAPH_MODES)}, got {graph!r}")
        lm = model.vlm.lang_model
        conf = lm.config
        first = next(lm.parameters())
        self.device = first.device
        self.dtype = dtype or first.dtype
        self.max_batch = max_batch
        self.max_context = int(conf.max_position_embeddings)
        self.eps = float(conf.rms_norm_eps)
        self.backend = backend
        self.graph_mode = ("cuda_graph" if self.device.type == "cuda" else "none") if graph == "auto" else graph
        if self.graph_mode in ("cuda_graph", "compile") and self.device.type != "cuda":
            raise InputError(f"graph={self.graph_mode!r} needs the model on CUDA (it is on {self.device})")
        rope = (getattr(conf, "rope_parameters", None) or {}).get("rope_type", "default")
        if self.graph_mode != "none" and rope != "default":
            # dynamic / longrope update inv_freq from max(position) on the host: not capturable
            raise InputError(f"rope_type {rope!r} cannot run in a captured step; use graph='none'")
        self.window = getattr(conf, "sliding_window", None)
        self.kv_heads = int(conf.num_key_value_heads)
        self.head_dim = int(getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads)
        self.embed = _shared(lm.model.embed_tokens, self.dtype)
        self.rotary = lm.model.rotary_emb  # buffers only (inv_freq); casts cos/sin to the input dtype
        self.norm = _shared(lm.model.norm, self.dtype)
        self.lm_head = _shared(lm.lm_head, self.dtype)
        self.layers = nn.ModuleList(FastLayer(layer, self.dtype, self.window)
                                    for layer in lm.model.layers[: conf.num_hidden_layers])
        if weights == "int4":
            quantize_layers(self.layers, group_size, self.dtype)
        self._kept: list[StaticStorage] = []  # storages of dropped caches, newest last
        self._pool: Any = None  # one CUDA-graph memory pool for every captured step (they never overlap)
        self._compiled: Callable[..., torch.Tensor] | None = None

    # -- cache storage (the runtime's KVCache holds it) --------------------------------------
    @torch.inference_mode()
    def new_cache(self, host: Any, batch: int, capacity: int) -> KVCache:
        """A KVCache of `batch` rows and `capacity` slots whose decoder is `host` (TorchBackend, or a
        StaticBackend), on zeroed buffers of this decoder's dtype and device."""
        if batch > self.max_batch:
            raise InputError(f"batch of {batch} exceeds the decoder's max_batch {self.max_batch}")
        if capacity > self.max_context:
            raise InputError(f"a cache of {capacity} slots exceeds the model's context of {self.max_context}")
        keep = self.graph_mode != "none"  # a storage is worth keeping for the graph captured on it
        slots = min(-(-capacity // SLOT_BLOCK) * SLOT_BLOCK, self.max_context) if keep else capacity
        shape = (batch, self.kv_heads, slots, self.head_dim)
        storage = next((s for s in reversed(self._kept) if s.shape == shape), None)
        if storage is not None:
            self._kept.remove(storage)
            for t in (*storage.k, *storage.v):
                t.zero_()  # stale slots stay finite: a masked NaN would still poison softmax @ V
        else:
            storage = StaticStorage([torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers],
                                    [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers])
            if self.graph_mode == "compile":
                for t in (*storage.k, *storage.v):  # fixed addresses: cudagraph trees may write them in place
                    torch._dynamo.mark_static_address(t)
        cache = KVCache(host, storage, batch, capacity)
        if keep:
            weakref.finalize(cache, self._keep, storage)
        return cache

    def _keep(self, storage: StaticStorage) -> None:
        self._kept.append(storage)
        del self._kept[:-KEPT_STORAGES]

    @torch.inference_mode()
    def copy_cache(self, src: KVCache, dst: KVCache, slots: int) -> None:
        """dst's buffers get src's first `slots` slots, in place (dst's captured graphs stay valid)."""
        for a, b in zip((*src.storage.k, *src.storage.v), (*dst.storage.k, *dst.storage.v)):
            b[:, :, :slots].copy_(a[:, :, :slots])

    # -- forward passes ------------------------------------------------------------------
    def _norm_weights(self) -> list[torch.Tensor]:
        """The norm applied after each residual add, in order: post-attention of layer i, then the
        input norm of layer i + 1 (the final norm after the last layer)."""
        return [w for i, layer in enumerate(self.layers) for w in (
            layer.post_norm.weight,
            self.layers[i + 1].input_norm.weight if i + 1 < len(self.layers) else self.norm.weight)]

    @torch.inference_mode()
    def forward(self, cache: KVCache, embeds: Any, positions: np.ndarray) -> np.ndarray:
        """A chunk of embeddings (B, S, D) at `positions` (B, S), the last S slots of `cache` (its
        mask says which are real) -> logits of the last column (B, V+3), float32 numpy. The real
        tokens' K/V go to the slots of their positions; the cache may already hold a prefix."""
        st: StaticStorage = cache.storage
        s = positions.shape[1]
        real = cache.mask[:, cache.used - s:cache.used]  # (B, S): the chunk's real columns
        rows, cols = np.nonzero(real)
        span = int(positions.max()) + 1  # slots any query reads: pad columns repeat a real position
        dev = self.device
        x = torch.as_tensor(embeds).to(dev, self.dtype)
        pos = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)).to(dev)  # (B, S)
        rows_t, cols_t = torch.from_numpy(rows).to(dev), torch.from_numpy(cols).to(dev)
        where = (rows_t, cols_t, pos[rows_t, cols_t])
        key_pos = torch.arange(span, device=dev)  # slot j holds position j
        allowed = key_pos[None, None, :] <= pos[:, :, None]  # (B, S, span): causal in positions
        if self.window is not None:
            allowed &= (pos[:, :, None] - key_pos[None, None, :]) < self.window
        # A pad query sits at the position of the real token before it (0 if none): it reads at
        # least that slot, so no softmax row is empty; its output is never used.
        cos, sin = self.rotary(x, pos)  # (B, S, dh)
        norms = iter(self._norm_weights())
        h, normed = add_rmsnorm(x, None, self.layers[0].input_norm.weight, self.eps, self.backend)
        for layer, k_buf, v_buf in zip(self.layers, st.k, st.v):
            attn = layer.attend_chunk(normed, cos, sin, k_buf, v_buf, where, allowed, self.backend)
            h, normed = add_rmsnorm(attn, h, next(norms), self.eps, self.backend)
            h, normed = add_rmsnorm(layer.feed_forward(normed, self.backend), h, next(norms), self.eps, self.backend)
        return self.lm_head(normed[:, -1]).float().cpu().numpy()  # (B, V+3)

    def step(self, k: list[torch.Tensor], v: list[torch.Tensor], tokens: torch.Tensor,
             positions: torch.Tensor) -> torch.Tensor:
        """One token per row on buffers k, v (per layer): tokens (B,), positions (B,) (= cache slot)
        -> logits (B, V+3). Fixed shapes and no host sync: this is what gets captured or compiled."""
        x = self.embed(tokens[:, None]).to(self.dtype)  # (B, 1, D)
        cos, sin = self.rotary(x, positions[:, None])  # (B, 1, dh)
        x = x[:, 0]  # (B, D)
        norms = iter(self._norm_weights())
        h, normed = add_rmsnorm(x, None, self.layers[0].input_norm.weight, self.eps, self.backend)
        for layer, k_buf, v_buf in zip(self.layers, k, v):
            attn = layer.attend_step(normed, cos, sin, k_buf, v_buf, positions, self.backend)
            h, normed = add_rmsnorm(attn, h, next(norms), self.eps, self.backend)
            h, normed = add_rmsnorm(layer.feed_forward(normed, self.backend), h, next(norms), self.eps, self.backend)
        return self.lm_head(normed)  # (B, V+3)

    @torch.inference_mode()
    def step_tokens(self, cache: KVCache, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The decode step of the interface: tokens (B,), positions (B, 1) numpy -> logits (B, V+3)
        float32 numpy; eager, or the storage's captured graph / compiled step."""
        st: StaticStorage = cache.storage
        t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(self.device)
        p = torch.from_numpy(np.ascontiguousarray(positions[:, 0], dtype=np.int64)).to(self.device)
        if self.graph_mode == "none":
            return self.step(st.k, st.v, t, p).float().cpu().numpy()
        run = st.steps.get(len(t))
        if run is None:
            run = st.steps[len(t)] = self._runner(st, len(t))
        return run(t, p).float().cpu().numpy()

    def _runner(self, st: StaticStorage, batch: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if self.graph_mode == "compile":
            if self._compiled is None:  # one compiled step; cudagraph trees key on the static buffers
                self._compiled = torch.compile(self.step, mode="reduce-overhead", fullgraph=True)
            compiled = self._compiled
            k, v = st.k, st.v
            return lambda t, p: compiled(k, v, t, p)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return GraphedStep(functools.partial(self.step, st.k, st.v), batch, self.device, self._pool)


class StaticBackend:
    """A FastDecoder as a decoder of blip3v.runtime.decoding by itself, for a bare language model
    (the decode benchmark's Phi-3) and tests; TorchBackend makes the same calls on the model it hosts."""

    def __init__(self, fast: FastDecoder):
        self.fast = fast
        self.max_context = fast.max_context

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return self.fast.new_cache(self, batch, capacity)

    @torch.inference_mode()
    def embed(self, ids: np.ndarray) -> torch.Tensor:
        """Token ids (B, S) -> embeddings (B, S, D) on the decoder's device."""
        ids_t = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.fast.device)
        return self.fast.embed(ids_t).to(self.fast.dtype)

    def chunked_prefill(self, batch: int) -> bool:
        return True

    def copy_cache(self, src: KVCache, dst: KVCache, slots: int) -> None:
        self.fast.copy_cache(src, dst, slots)

    def forward(self, cache: KVCache, embeds: Any, positions: np.ndarray) -> np.ndarray:
        return self.fast.forward(cache, embeds, positions)

    def step(self, cache: KVCache, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.fast.step_tokens(cache, tokens, positions)


class GraphedStep:
    """A step captured as a CUDA graph for one storage and batch size: inputs are copied into static
    tensors, the graph replays, the static logits are returned (valid until the next replay)."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch: int,
                 device: torch.device, pool: Any):
        self.step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = step
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.pool = pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        if self.graph is None:  # first call: warm up on the real inputs (it rewrites the same slot), capture
            assert self.step is not None
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compiles the Triton kernels, lets cuBLAS pick its algorithms
                    self.step(self.tokens, self.positions)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # The pool is shared by every graph of the decoder: graphs replay one at a time and each
            # keeps its own logits alive, so no replay overwrites another's live memory.
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits = self.step(self.tokens, self.positions)
            self.graph = graph
            self.step = None  # the graph holds the buffers' addresses; no reference back to the storage
        self.graph.replay()
        assert self.logits is not None
        return self.logits


def quantize_layers(layers: nn.Module, group_size: int, dtype: torch.dtype) -> nn.Module:
    """The offline INT4 pass as a module swap: every bias-free nn.Linear under `layers` becomes an
    Int4Linear (the shared model modules are replaced in `layers` only, never in the model)."""
    for name, child in list(layers.named_children()):
        if isinstance(child, nn.Linear) and child.bias is None:
            setattr(layers, name, Int4Linear.from_linear(child, group_size, dtype))
        elif not isinstance(child, Int4Linear):
            quantize_layers(child, group_size, dtype)
    return layers


# ---------------------------------------------------------------------------------------------
# Benchmark (GPU)
# ---------------------------------------------------------------------------------------------

def bench(checkpoint: str | None = None, batch: int = 1, prompt: int = 256, new_tokens: int = 128) -> None:
    """Decode tokens/s through the runtime's decode loop (blip3v.runtime.decoding.generate): the
    reference decoder (transformers' DynamicCache) vs this one (eager, CUDA graph, INT4)."""
    if not torch.cuda.is_available():
        print("fast_decode: no CUDA GPU here, nothing to benchmark (the CPU check is tests/test_fast_decode.py)")
        return
    from blip3v.model.config import PHI3_SPECIAL_TOKENS, preset
    from blip3v.model.generate import TorchBackend
    from blip3v.model.tokenizer import BASE_SPECIALS, build_word_tokenizer
    from blip3v.runtime.decoding import generate

    if checkpoint:
        from blip3v.model.checkpoint import load_checkpoint, load_tokenizer

        model = load_checkpoint(checkpoint, dtype=torch.float16).to("cuda").eval()
        tokenizer = load_tokenizer(checkpoint)
    else:
        with torch.device("cuda"):
            model = XGenMMVideoModel(preset("xgen-mm-vid-128")).half().eval()
        # placeholder words laid out as the preset's ids expect (what export.engine.preset_tokenizer does)
        words = model.config.additional_vocab_start - len(PHI3_SPECIAL_TOKENS) - len(BASE_SPECIALS)
        tokenizer = build_word_tokenizer(f"w{i:05d}" for i in range(words))
    dim = model.vlm.lang_model.config.hidden_size
    embeds = torch.randn(batch, prompt, dim, device="cuda", dtype=torch.float16) * 0.02
    mask = np.ones((batch, prompt), dtype=np.int64)
    sampling = SamplingConfig(max_new_tokens=new_tokens)

    def timed(backend) -> float:
        generate(backend, embeds, mask, sampling, ())  # warm-up (and graph capture)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(backend, embeds, mask, sampling, ())
        torch.cuda.synchronize()
        return batch * new_tokens / (time.perf_counter() - t0)

    print(f"batch {batch}, prompt {prompt}, {new_tokens} new tokens (tokens/s, prefill included)")
    reference = TorchBackend(model, tokenizer, "cuda", decoder="reference", max_batch=batch)
    print(f"  transformers DynamicCache : {timed(reference):8.1f}")
    for weights, graph in (("dense", "none"), ("dense", "cuda_graph"), ("int4", "cuda_graph")):
        dec = StaticBackend(FastDecoder(model, max_batch=batch, weights=weights, graph=graph))
        print(f"  static cache {weights:>5} {graph:>10} : {timed(dec):8.1f}")
        dec = None  # free the caches (and the INT4 copy) before the next variant
        torch.cuda.empty_cache()


if __name__ == "__main__":
    bench(sys.argv[1] if len(sys.argv) > 1 else None)
