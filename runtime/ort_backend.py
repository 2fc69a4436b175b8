"""The ONNX Runtime backend: an engine directory (from `blip3v export`) -> answers. No torch.

    video -> visual.onnx -> video tokens (B, M, D)
    prompt ids -> rows of embed_tokens.npy, `<image>` replaced by the M video tokens (numpy)
    -> decoder.onnx prefill -> KV-cached decode, one token per step, until a stop id or max_new_tokens

Everything about the model comes from manifest.json (blip3v.runtime.manifest); this file never
asks which model it runs. The KV cache is owned here: per layer one K and one V buffer of
(B, Hkv, capacity, dh), allocated once per batch as OrtValues on the execution device and bound
as both `past_*` and `present_*` through IO binding, so the graph (GroupQueryAttention or
ScatterElements, see blip3v/export/graphs.py for the choice) writes the new slots in place and
nothing is reallocated or copied whole between steps. capacity = prompt + max_new_tokens, at most
the manifest's max_context. The prompt is prefilled in one call from the empty cache, then one
token per call (the manifest's `calls` contract). Rows are left-padded; positions come from the
attention mask, as in the PyTorch backend, so a padded row decodes exactly as it would alone.

    from blip3v.runtime.ort_backend import OrtBackend
    OrtBackend.load("engines/demo").ask("clip.mp4", "what colour does the square turn?")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from blip3v.errors import EngineError, InputError
from blip3v.runtime.generation import Sampler, SamplingConfig, accept_tokens
from blip3v.runtime.host import EngineHost
from blip3v.runtime.hugepages import Backed, huge_pages
from blip3v.runtime.manifest import Manifest, load_manifest

# --device -> execution providers, most preferred first (ORT falls back along the list per node).
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
MAX_BATCH = 16  # largest batch a TensorRT profile covers (CPU/CUDA take any batch)
PACKAGE_HINT = {"cpu": "onnxruntime", "cuda": "onnxruntime-gpu", "tensorrt": "onnxruntime-gpu (built with TensorRT)"}


def providers_for(device: str) -> list[str]:
    if device not in PROVIDERS:
        raise InputError(f"unknown device {device!r}; choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[device][0]
    available = ort.get_available_providers()
    if wanted not in available:
        raise EngineError(f"device {device} needs {wanted}, which the installed onnxruntime {ort.__version__} "
                          f"lacks (it has {', '.join(available)}); install {PACKAGE_HINT[device]}")
    return [p for p in PROVIDERS[device] if p in available]


def _shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, dims))}" for name, dims in shapes.items())


def tensorrt_profiles(manifest: Manifest, graph: str, max_batch: int = MAX_BATCH) -> dict[str, str]:
    """TensorRT EP options declaring each dynamic input's min/opt/max shape (Polygraphy-style), so
    one engine serves every prefill length and decode step instead of a rebuild per new shape."""
    m = manifest.model
    if graph == "visual":
        frame = (int(m["num_frames"]), 3, int(m["image_size"]), int(m["image_size"]))
        name = manifest["visual"]["inputs"]["pixel_values"]
        lo, opt, hi = {name: (1, *frame)}, {name: (1, *frame)}, {name: (max_batch, *frame)}
    else:
        ctx, d, kv, dh = int(m["max_context"]), int(m["hidden_size"]), int(m["num_key_value_heads"]), int(m["head_dim"])
        names = manifest["decoder"]["inputs"]
        caches = manifest.kv_names("past_key") + manifest.kv_names("past_value")
        lo = {names["inputs_embeds"]: (1, 1, d), names["attention_mask"]: (1, 1), names["position_ids"]: (1, 1),
              **{c: (1, kv, 1, dh) for c in caches}}
        opt = {names["inputs_embeds"]: (1, 1, d), names["attention_mask"]: (1, ctx // 2),
               names["position_ids"]: (1, 1), **{c: (1, kv, ctx // 2, dh) for c in caches}}
        hi = {names["inputs_embeds"]: (max_batch, ctx, d), names["attention_mask"]: (max_batch, ctx),
              names["position_ids"]: (max_batch, ctx), **{c: (max_batch, kv, ctx, dh) for c in caches}}
    return {"trt_profile_min_shapes": _shapes(lo), "trt_profile_opt_shapes": _shapes(opt),
            "trt_profile_max_shapes": _shapes(hi), "trt_fp16_enable": str(manifest["precision"] == "fp16"),
            "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(manifest.directory / ".trt-cache")}


_env_cpu_arena = False  # registered once per process, on first use


def session_options(providers: Sequence[str], threads: int | None = None) -> ort.SessionOptions:
    """The options of every session this runtime opens (the decode benchmark opens its sessions
    with these too, so it times what ships).

    CPU-only sessions allocate from one CPU arena registered on ONNX Runtime's process-wide
    environment (`session.use_env_allocators`), the setup onnxruntime-genai uses for its CPU
    sessions, so the decode benchmark's two ORT runners differ in one thing less. It is not shown
    to be faster: a first scratch A/B on the benchmark's INT4 model suggested about 5 % against
    ORT's default (an arena per session), but the committed A/B (`python -m
    blip3v.benchmarks.decode_ab --settings shipped,session --mode requests`) did not reproduce it
    on the dev box (benchmarks/RESULTS.md, decode section). The arena lives as long as the
    process, shared by every session in it. What did measure faster is putting the weights on huge
    pages (`create_session`)."""
    global _env_cpu_arena
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if list(providers) == ["CPUExecutionProvider"]:
        if not _env_cpu_arena:
            cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, -1, -1, -1))  # ORT's default arena settings
            _env_cpu_arena = True
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def create_session(path: str | Path, options: ort.SessionOptions, providers: Sequence[str],
                   provider_options: list[dict] | None = None, backed: Backed | None = None) -> ort.InferenceSession:
    """An InferenceSession whose weights sit on transparent huge pages when it runs on the CPU alone
    (blip3v.runtime.hugepages; on the dev box INT4 decode is about 5 % faster for it). `backed`, if
    given, receives how much went onto huge pages."""
    with huge_pages(on=None if list(providers) == ["CPUExecutionProvider"] else False) as done:
        session = ort.InferenceSession(str(path), options, providers=list(providers),
                                       provider_options=provider_options)
    if backed is not None:
        backed.bytes, backed.refused = done.bytes, done.refused
    return session


def _open_session(path: Path, providers: list[str], options_by_provider: dict[str, dict] | None = None
                  ) -> ort.InferenceSession:
    options = session_options(providers)
    provider_options = [dict((options_by_provider or {}).get(p, {})) for p in providers]
    try:
        return create_session(path, options, providers, provider_options)
    except Exception as exc:  # noqa: BLE001 (onnxruntime raises its own Fail/InvalidGraph/... types)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"{path}: onnxruntime cannot load it ({first[:300]})") from None


class OrtBackend(EngineHost):
    """Engine directory -> answers on ONNX Runtime. Same methods as `TorchBackend`."""

    def __init__(self, manifest: Manifest, device: str = "cpu"):
        self._read_manifest(manifest)
        self.device = device
        providers = providers_for(device)
        self.max_context = int(manifest.model["max_context"])
        self.num_layers = int(manifest.model["num_layers"])
        self.dtype = self.embed_dtype = np.dtype(manifest["dtype"])

        trt = "TensorrtExecutionProvider"
        self.visual = _open_session(manifest.path("visual"), providers, {trt: tensorrt_profiles(manifest, "visual")})
        self.decoder = _open_session(manifest.path("decoder"), providers, {trt: tensorrt_profiles(manifest, "decoder")})
        self.past_names = [n for pair in zip(manifest.kv_names("past_key"), manifest.kv_names("past_value")) for n in pair]
        self.present_names = [n for pair in zip(manifest.kv_names("present_key"), manifest.kv_names("present_value"))
                              for n in pair]
        have_in = {i.name for i in self.decoder.get_inputs()}
        have_out = {o.name for o in self.decoder.get_outputs()}
        missing = sorted(({self.embeds_name, self.mask_name, self.position_name, *self.past_names} - have_in)
                         | ({self.logits_name, *self.present_names} - have_out))
        if missing:
            raise EngineError(f"{manifest.path('decoder')}: tensors named in the manifest are missing: "
                              f"{', '.join(missing[:6])}")
        # Where the KV buffers live: on the GPU for cuda/tensorrt, so steps never copy them to the host.
        self.ort_device = "cuda" if device in ("cuda", "tensorrt") else "cpu"

    @classmethod
    def load(cls, engine_dir: str | Path, device: str = "cpu", verify_hashes: bool = True) -> OrtBackend:
        return cls(load_manifest(engine_dir, verify_hashes=verify_hashes), device)

    # -- the visual path -------------------------------------------------------------------
    def encode_video(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, T, 3, S, S) -> video tokens (B, M, D)."""
        pixels = np.ascontiguousarray(pixel_values, dtype=self.dtype)
        self.check_pixels(pixels)
        return self.visual.run([self.video_name], {self.pixel_name: pixels})[0]

    def generate(self, embeds: np.ndarray, mask: np.ndarray, sampling: SamplingConfig,
                 on_token: Callable[[int, int], None] | None = None,
                 marks: list[float] | None = None) -> list[list[int]]:
        """Spliced embeddings (B, S, D) + left-padded mask (B, S) -> new token ids per row (stop id
        dropped). `marks` gets the time after the prefill's logits are on the host."""
        sample = Sampler(sampling)
        batch, prompt = mask.shape
        if prompt + sampling.max_new_tokens > self.max_context:
            raise InputError(f"prompt of {prompt} tokens + {sampling.max_new_tokens} new tokens exceeds the "
                             f"engine's context of {self.max_context}")
        capacity = prompt + sampling.max_new_tokens
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        # Zeroed (slots past the written ones are never attended, but stay finite). On the CPU the
        # OrtValue wraps the numpy array's memory; on a GPU it is one upload per batch.
        host = [np.zeros(shape, self.dtype) for _ in self.past_names]
        caches = [ort.OrtValue.ortvalue_from_numpy(h, self.ort_device, 0) for h in host]
        binding = self.decoder.io_binding()
        for past, present, buf in zip(self.past_names, self.present_names, caches):
            binding.bind_ortvalue_input(past, buf)
            binding.bind_ortvalue_output(present, buf)  # same buffer: the update happens in place
        logits = np.empty((batch, int(self.manifest.model["num_logits"])), self.dtype)  # (B, V+3)
        binding.bind_ortvalue_output(self.logits_name, ort.OrtValue.ortvalue_from_numpy(logits))

        full_mask = np.zeros((batch, capacity), dtype=np.int64)  # (B, C): 1 = a real token in that slot
        full_mask[:, :prompt] = mask
        full_mask[:, prompt:] = 1  # every new slot holds a real token; a step binds the first `used` slots
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)  # (B, S)
        # The prefill binds its own arrays; decode steps read buffers bound once and rewritten in place.
        # Each step's host work runs right after the weights have streamed through the caches, where
        # every Python line and numpy call costs several times what it costs warm (about 150 us a
        # step measured on the 2-core dev box, 1 % of an INT4 step), so a step does the least it
        # can: argmax, one row gathered into the bound buffer, a position bump, and the mask rebound
        # at its new length. With B = 1 the mask's OrtValue for every length is made up front (views
        # of `full_mask`): binding a ready OrtValue costs ~27 us cold against ~97 us for bind_input
        # (240 us a step before).
        prompt_embeds = np.ascontiguousarray(embeds, dtype=self.dtype)
        binding.bind_cpu_input(self.embeds_name, prompt_embeds)
        prompt_pos = np.ascontiguousarray(positions, dtype=np.int64)  # bound arrays stay alive until the run
        binding.bind_cpu_input(self.position_name, prompt_pos)
        step_embeds = np.empty((batch, 1, prompt_embeds.shape[-1]), self.dtype)
        step_pos = np.ascontiguousarray(positions[:, -1:], dtype=np.int64)  # (B, 1), bumped before each step
        masks = ([ort.OrtValue.ortvalue_from_numpy(full_mask[:, :prompt + i])  # host memory, no copy
                  for i in range(sampling.max_new_tokens)] if batch == 1 else [])
        greedy = sampling.temperature == 0
        stop = set(self.stop_ids)
        out: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        used = prompt
        for step in range(sampling.max_new_tokens):
            if batch == 1:
                binding.bind_ortvalue_input(self.mask_name, masks[step])
            else:
                step_mask = np.ascontiguousarray(full_mask[:, :used])  # (B, L): kept alive while bound
                binding.bind_cpu_input(self.mask_name, step_mask)
            self.decoder.run_with_iobinding(binding)
            tokens = logits.argmax(-1) if greedy else sample(logits)  # (B,)
            if step == 0:
                if marks is not None:
                    marks.append(time.perf_counter())
                binding.bind_ortvalue_input(self.embeds_name, ort.OrtValue.ortvalue_from_numpy(step_embeds))
                binding.bind_ortvalue_input(self.position_name, ort.OrtValue.ortvalue_from_numpy(step_pos))
            if batch == 1:  # accept_tokens' bookkeeping, inline
                token = int(tokens[0])
                if token in stop:
                    break
                out[0].append(token)
                if on_token is not None:
                    on_token(0, token)
            elif accept_tokens(tokens, self.stop_ids, done, out, on_token):
                break
            if step == sampling.max_new_tokens - 1:
                break
            used += 1
            step_pos += 1
            step_embeds[:, 0] = self.embeddings[tokens]  # argmax/sampled ids < num_logits <= table rows
        return out

