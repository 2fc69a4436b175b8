"""The GPU fast path of the PyTorch backend: Phi-3 decoding on a static KV cache, gpt-fast style.

    from blip3v.model.fast_decode import FastDecoder
    dec = FastDecoder(model, max_batch=1, max_seq=1024, dtype=torch.float16, weights="int4")
    rows = dec.generate(inputs_embeds, attention_mask, SamplingConfig(), stop_ids)

`FastDecoder` runs the loaded Phi-3 of an `XGenMMVideoModel` (`model.vlm.lang_model`; its modules are
shared, not copied, when the dtype already matches) with its own forward:

- The KV cache is two buffers per layer, (B_max, H_kv, S_max, dh), allocated once and written in
  place. Rows are stored compactly: slot p holds the token at position p (positions come from the
  attention mask as in `blip3v.model.generate`), so left padding costs no cache and each row's
  filled length is its position + 1; the decode attention reads only the filled slots.
- The one-token step has fixed shapes (tokens (B,), positions (B,) in, logits (B, V+3) out), so on
  CUDA it is captured once per batch size as a CUDA graph (`graph="cuda_graph"`, the default there)
  or compiled (`graph="compile"`: torch.compile mode="reduce-overhead", fullgraph=True). The loop
  that samples and stops stays plain Python, as in `generate`.
- The kernels of `blip3v.kernels` replace PyTorch's ops through their dispatchers: decode attention,
  residual add + RMSNorm, and the INT4 matmul for `weights="int4"` (weight-only, round-to-nearest,
  `group_size` along K; the decoder Linear layers are swapped for `Int4Linear`, the embedding and
  `lm_head` stay in `dtype`). `backend="auto"` uses them on CUDA with Triton and the PyTorch
  references elsewhere; `"torch"`/`"triton"` force one (tests run `"triton"` in the CPU interpreter).

In fp32 with the references it gives `generate(..., use_cache=True)`'s greedy tokens token for token
(tests/test_fast_decode.py). One deliberate difference: a sliding window (Phi-3: 2047) is counted in
positions, so a padded row sees the window it would see alone; transformers counts it in padded
cache slots. The two only differ for prompts longer than the window.

    python -m blip3v.model.fast_decode [CHECKPOINT_DIR]    # decode tokens/s on a GPU (random
                                                          # xgen-mm-vid-128 weights without a dir)
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable

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
from blip3v.runtime.generation import Sampler, SamplingConfig, accept_tokens

WEIGHTS = ("dense", "int4")
GRAPH_MODES = ("auto", "none", "cuda_graph", "compile")


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

class KVCache(nn.Module):
    """Static K/V buffers of one layer, (B_max, H_kv, S_max, dh); slot p holds position p."""

    def __init__(self, batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, heads, seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write_prompt(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """k, v (B, H_kv, S, dh) of a padded prompt; only the unmasked tokens are stored, at their positions."""
        rows, cols = mask.nonzero(as_tuple=True)  # (nnz,), (nnz,)
        slots = positions[rows, cols]
        self.k[rows, :, slots] = k[rows, :, cols]  # (nnz, H_kv, dh)
        self.v[rows, :, slots] = v[rows, :, cols]

    def write_step(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """k, v (B, H_kv, dh) of one new token per row, at slot positions[b]: fixed shapes, no sync."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[rows, :, positions] = k
        self.v[rows, :, positions] = v


class FastLayer(nn.Module):
    """One Phi-3 decoder layer on the static cache. The norms are applied by the caller (fused with
    the residual add), so this holds the projections and the attention."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype, cache: KVCache, window: int | None):
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
        self.cache = cache

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, S, (H_q + 2 H_kv) dh) -> q (B, H_q, S, dh), k, v (B, H_kv, S, dh)."""
        b, s, _ = qkv.shape
        q_end = self.h_q * self.head_dim
        k_end = q_end + self.h_kv * self.head_dim
        q = qkv[..., :q_end].view(b, s, self.h_q, self.head_dim).transpose(1, 2)
        k = qkv[..., q_end:k_end].view(b, s, self.h_kv, self.head_dim).transpose(1, 2)
        v = qkv[..., k_end:].view(b, s, self.h_kv, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend_prompt(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                      mask: torch.Tensor, positions: torch.Tensor, backend: str) -> torch.Tensor:
        """x (B, S, D) normed; allowed (B, S, S) bool -> attention output (B, S, D)."""
        b, s, _ = x.shape
        q, k, v = self.split_heads(_linear(self.qkv, x, backend))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # transformers' own RoPE: identical numerics
        self.cache.write_prompt(k, v, mask, positions)
        group = self.h_q // self.h_kv
        if group > 1:  # GQA: query head h reads KV head h // group, as transformers' repeat_kv
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H_q, S, dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=self.scale)  # (B, H_q, S, dh)
        return _linear(self.o, out.transpose(1, 2).reshape(b, s, -1), backend)

    def attend_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                    backend: str) -> torch.Tensor:
        """x (B, D) normed, one token per row at `positions` (B,) -> (B, D)."""
        b = x.shape[0]
        q, k, v = self.split_heads(_linear(self.qkv, x[:, None], backend))  # (B, H, 1, dh)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        self.cache.write_step(k[:, :, 0], v[:, :, 0], positions)
        out = decode_attention(q[:, :, 0], self.cache.k[:b], self.cache.v[:b], positions + 1,
                               scale=self.scale, window=self.window, backend=backend)  # (B, H_q, dh)
        return _linear(self.o, out.reshape(b, -1), backend)

    def feed_forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        gate, up = _linear(self.gate_up, x, backend).chunk(2, dim=-1)  # as Phi3MLP
        return _linear(self.down, up * self.act(gate), backend)


class FastDecoder(nn.Module):
    """Phi-3 of an XGenMMVideoModel on a static KV cache; see the module docstring.

    max_batch, max_seq: the cache size (rows; prompt width + new tokens). dtype: the decoder's
    (default: the model's). weights: "dense" or "int4" (round-to-nearest, `group_size` along K).
    graph: "auto" (CUDA graph on CUDA, none elsewhere), "none", "cuda_graph", "compile".
    backend: "auto" | "triton" | "torch" for every kernel dispatcher.
    """

    def __init__(self, model: XGenMMVideoModel, *, max_batch: int = 1, max_seq: int | None = None,
                 dtype: torch.dtype | None = None, weights: str = "dense", group_size: int = 128,
                 graph: str = "auto", backend: str = "auto"):
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
        self.max_seq = min(max_seq or self.max_context, self.max_context)
        self.eps = float(conf.rms_norm_eps)
        self.backend = backend
        self.graph_mode = ("cuda_graph" if self.device.type == "cuda" else "none") if graph == "auto" else graph
        if self.graph_mode in ("cuda_graph", "compile") and self.device.type != "cuda":
            raise InputError(f"graph={self.graph_mode!r} needs the model on CUDA (it is on {self.device})")
        rope = (getattr(conf, "rope_parameters", None) or {}).get("rope_type", "default")
        if self.graph_mode != "none" and rope != "default":
            # dynamic / longrope update inv_freq from max(position) on the host: not capturable
            raise InputError(f"rope_type {rope!r} cannot run in a captured step; use graph='none'")
        window = getattr(conf, "sliding_window", None)
        head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
        self.embed = _shared(lm.model.embed_tokens, self.dtype)
        self.rotary = lm.model.rotary_emb  # buffers only (inv_freq); casts cos/sin to the input dtype
        self.norm = _shared(lm.model.norm, self.dtype)
        self.lm_head = _shared(lm.lm_head, self.dtype)
        self.layers = nn.ModuleList(
            FastLayer(layer, self.dtype,
                      KVCache(max_batch, conf.num_key_value_heads, self.max_seq, head_dim, self.dtype, self.device),
                      window)
            for layer in lm.model.layers[: conf.num_hidden_layers]
        )
        if weights == "int4":
            quantize_layers(self.layers, group_size, self.dtype)
        self._tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # static step inputs
        self._positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._steps: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}

    # -- forward passes ------------------------------------------------------------------
    def _norm_weights(self) -> list[torch.Tensor]:
        """The norm applied after each residual add, in order: post-attention of layer i, then the
        input norm of layer i + 1 (the final norm after the last layer)."""
        return [w for i, layer in enumerate(self.layers) for w in (
            layer.post_norm.weight,
            self.layers[i + 1].input_norm.weight if i + 1 < len(self.layers) else self.norm.weight)]

    @torch.inference_mode()
    def prefill(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """inputs_embeds (B, S, D), attention_mask (B, S) -> logits of the last column (B, V+3);
        fills the cache with the prompt's unmasked tokens."""
        b, s, _ = inputs_embeds.shape
        x = inputs_embeds.to(self.device, self.dtype)
        attention_mask = attention_mask.to(self.device)
        mask = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S), as generate()
        cos, sin = self.rotary(x, positions)  # (B, S, dh)
        idx = torch.arange(s, device=x.device)
        allowed = mask[:, None, :] & (idx[None, :] <= idx[:, None])[None]  # (B, S_q, S_k): causal over kept keys
        if self.layers[0].window is not None:
            allowed &= (positions[:, :, None] - positions[:, None, :]) < self.layers[0].window
        allowed |= torch.eye(s, dtype=torch.bool, device=x.device)[None]  # pad queries see themselves: no NaN rows
        norms = iter(self._norm_weights())
        h, normed = add_rmsnorm(x, None, self.layers[0].input_norm.weight, self.eps, self.backend)
        for layer in self.layers:
            attn = layer.attend_prompt(normed, cos, sin, allowed, mask, positions, self.backend)
            h, normed = add_rmsnorm(attn, h, next(norms), self.eps, self.backend)
            h, normed = add_rmsnorm(layer.feed_forward(normed, self.backend), h, next(norms), self.eps, self.backend)
        return self.lm_head(normed[:, -1])  # (B, V+3)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row: tokens (B,), positions (B,) (= cache slot) -> logits (B, V+3).
        Fixed shapes and no host sync: this is what gets captured or compiled."""
        x = self.embed(tokens[:, None]).to(self.dtype)  # (B, 1, D)
        cos, sin = self.rotary(x, positions[:, None])  # (B, 1, dh)
        x = x[:, 0]  # (B, D)
        norms = iter(self._norm_weights())
        h, normed = add_rmsnorm(x, None, self.layers[0].input_norm.weight, self.eps, self.backend)
        for layer in self.layers:
            attn = layer.attend_step(normed, cos, sin, positions, self.backend)
            h, normed = add_rmsnorm(attn, h, next(norms), self.eps, self.backend)
            h, normed = add_rmsnorm(layer.feed_forward(normed, self.backend), h, next(norms), self.eps, self.backend)
        return self.lm_head(normed)  # (B, V+3)

    # -- the step runner: eager, CUDA graph or compiled ------------------------------------
    def _step_for(self, batch: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if batch not in self._steps:
            if self.graph_mode == "cuda_graph":
                self._steps[batch] = GraphedStep(self.step, self._tokens[:batch], self._positions[:batch])
            elif self.graph_mode == "compile":
                self._steps[batch] = torch.compile(self.step, mode="reduce-overhead", fullgraph=True)
            else:
                self._steps[batch] = self.step
        return self._steps[batch]

    # -- generation ----------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingConfig,
                 stop_ids: tuple[int, ...], *, on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """Same contract as `blip3v.model.generate.generate`: each row's new tokens without the stop token."""
        sample = Sampler(sampling)
        batch, width = inputs_embeds.shape[:2]
        if batch > self.max_batch:
            raise InputError(f"batch of {batch} exceeds the decoder's max_batch {self.max_batch}")
        if width + sampling.max_new_tokens > self.max_seq:
            raise InputError(f"prompt of {width} tokens + {sampling.max_new_tokens} new tokens exceeds the "
                             f"static cache of {self.max_seq} (the model's context is {self.max_context})")
        logits = self.prefill(inputs_embeds, attention_mask)
        positions = attention_mask.long().sum(-1).to(self.device)  # (B,) next slot = filled length
        step = self._step_for(batch)
        out: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        for _ in range(sampling.max_new_tokens):
            tokens = sample(logits.float().cpu().numpy())  # (B,)
            if accept_tokens(tokens, stop_ids, done, out, on_token):
                break
            logits = step(torch.from_numpy(tokens).to(self.device), positions)
            positions = positions + 1
        return out


class GraphedStep:
    """`step` captured as a CUDA graph for one batch size: inputs are copied into static tensors,
    the graph replays, the static logits are returned (valid until the next call)."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 tokens: torch.Tensor, positions: torch.Tensor):
        self.step, self.tokens, self.positions = step, tokens, positions
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        if self.graph is None:  # first call: warm up on the real inputs (it rewrites the same slot), capture
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compiles the Triton kernels, lets cuBLAS pick its algorithms
                    self.step(self.tokens, self.positions)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.step(self.tokens, self.positions)
        self.graph.replay()
        return self.logits


def quantize_layers(layers: nn.Module, group_size: int, dtype: torch.dtype) -> nn.Module:
    """The offline INT4 pass as a module swap: every bias-free nn.Linear under `layers` becomes an
    Int4Linear (the shared model modules are replaced in `layers` only, never in the model)."""
    for name, child in list(layers.named_children()):
        if isinstance(child, nn.Linear) and child.bias is None:
            setattr(layers, name, Int4Linear.from_linear(child, group_size, dtype))
        elif not isinstance(child, (Int4Linear, KVCache)):
            quantize_layers(child, group_size, dtype)
    return layers


# ---------------------------------------------------------------------------------------------
# Benchmark (GPU)
# ---------------------------------------------------------------------------------------------

def bench(checkpoint: str | None = None, batch: int = 1, prompt: int = 256, new_tokens: int = 128) -> None:
    """Decode tokens/s: transformers' DynamicCache loop vs this decoder (eager, CUDA graph, INT4)."""
    if not torch.cuda.is_available():
        print("fast_decode: no CUDA GPU here, nothing to benchmark (the CPU check is tests/test_fast_decode.py)")
        return
    from blip3v.model.config import preset
    from blip3v.model.generate import generate

    if checkpoint:
        from blip3v.model.checkpoint import load_checkpoint

        model = load_checkpoint(checkpoint, dtype=torch.float16).to("cuda").eval()
    else:
        with torch.device("cuda"):
            model = XGenMMVideoModel(preset("xgen-mm-vid-128")).half().eval()
    dim = model.vlm.lang_model.config.hidden_size
    embeds = torch.randn(batch, prompt, dim, device="cuda", dtype=torch.float16) * 0.02
    mask = torch.ones(batch, prompt, dtype=torch.long, device="cuda")
    sampling = SamplingConfig(max_new_tokens=new_tokens)

    def timed(fn) -> float:
        fn()  # warm-up (and graph capture)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return batch * new_tokens / (time.perf_counter() - t0)

    print(f"batch {batch}, prompt {prompt}, {new_tokens} new tokens (tokens/s, prefill included)")
    try:
        print(f"  transformers DynamicCache : {timed(lambda: generate(model, embeds, mask, sampling, ())):8.1f}")
    except RuntimeError as exc:  # generate() must move the sampled ids to the model's device
        print(f"  transformers DynamicCache : failed on CUDA ({str(exc).splitlines()[0]})")
    for weights, graph in (("dense", "none"), ("dense", "cuda_graph"), ("int4", "cuda_graph")):
        dec = FastDecoder(model, max_batch=batch, max_seq=prompt + new_tokens, weights=weights, graph=graph)
        rate = timed(lambda d=dec: d.generate(embeds, mask, sampling, ()))
        print(f"  static cache {weights:>5} {graph:>10} : {rate:8.1f}")
        dec = None  # free the cache (and the INT4 copy) before the next variant
        torch.cuda.empty_cache()


if __name__ == "__main__":
    bench(sys.argv[1] if len(sys.argv) > 1 else None)
