"""The ONNX Runtime backend: an engine directory (from `blip3v export`) -> answers. No torch.

    video -> visual.onnx -> video tokens (B, M, D)
    prompt ids -> rows of embed_tokens.npy, `<image>` replaced by the M video tokens (numpy)
    -> decoder.onnx prefill -> KV-cached decode, one token per step, until a stop id or max_new_tokens

Everything about the model comes from manifest.json (blip3v.runtime.manifest); this file never
asks which model it runs. The KV cache is the runtime's (blip3v.runtime.decoding.KVCache); its
storage here (`OrtCache`) is per layer one K and one V buffer of (B, Hkv, capacity, dh), allocated
once per cache as OrtValues on the execution device and bound as both `past_*` and `present_*`
through IO binding, so the graph (GroupQueryAttention or ScatterElements, see
blip3v/export/graphs.py for the choice) writes the new slots in place and nothing is reallocated
or copied whole between calls. A chunk of several tokens may follow a non-empty cache (a question
after a clip's cached prefix) on the standard graph, and on the GQA graph at batch 1. Rows are
left-padded; positions come from the attention mask, as in the PyTorch backend, so a padded row
decodes exactly as it would alone.

    from blip3v.runtime.session import Engine
    Engine.open(engine="engines/demo").ask("clip.mp4", "what colour does the square turn?")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from blip3v.cpus import usable_cores
from blip3v.errors import EngineError, InputError
from blip3v.runtime.decoding import KVCache
from blip3v.runtime.host import EngineHost
from blip3v.runtime.hugepages import Backed, huge_pages
from blip3v.runtime.manifest import Manifest, decoder_shape_ranges, load_manifest, visual_shape_ranges

# --device -> execution providers, most preferred first (ORT falls back along the list per node).
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
MAX_BATCH = 16  # largest batch a TensorRT profile covers (CPU/CUDA take any batch)
MAX_ENCODE_WORKERS = 8  # clips encoding side by side with parallel_clips (each holds its activations)
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
    spec = manifest.spec
    ranges = (visual_shape_ranges(spec, max_batch) if graph == "visual"
              else decoder_shape_ranges(spec, max_batch, call="any"))  # one profile: prefill and steps
    lo, opt, hi = ({name: r[i] for name, r in ranges.items()} for i in range(3))
    return {"trt_profile_min_shapes": _shapes(lo), "trt_profile_opt_shapes": _shapes(opt),
            "trt_profile_max_shapes": _shapes(hi), "trt_fp16_enable": str(manifest["precision"] == "fp16"),
            "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(manifest.directory / ".trt-cache")}


_env_cpu_arena = False  # registered once per process, on first use


def session_options(providers: Sequence[str], threads: int | None = None, spinning: bool = True) -> ort.SessionOptions:
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
    pages (`create_session`).

    `spinning=False` stops idle intra-op threads from busy-waiting between ops. Spinning buys a
    little latency when ONNX Runtime has the cores to itself; when the same process decodes video
    beside it (eval's and batch's prefetch), the spinning threads take the cores the decoder needs:
    `blip3v eval` on 200 clips of the demo engine went from 8.3 to 3.9-4.7 s of loop time with it
    off, at 2 threads under a shared load (benchmarks/RESULTS.md, video input)."""
    global _env_cpu_arena
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


def _open_session(path: Path, providers: list[str], options_by_provider: dict[str, dict] | None = None,
                  spinning: bool = True, threads: int | None = None) -> ort.InferenceSession:
    options = session_options(providers, threads=threads, spinning=spinning)
    provider_options = [dict((options_by_provider or {}).get(p, {})) for p in providers]
    try:
        return create_session(path, options, providers, provider_options)
    except Exception as exc:  # noqa: BLE001 (onnxruntime raises its own Fail/InvalidGraph/... types)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"{path}: onnxruntime cannot load it ({first[:300]})") from None


class OrtBackend(EngineHost):
    """Engine directory -> answers on ONNX Runtime. Same methods as `TorchBackend`."""

    def __init__(self, manifest: Manifest, device: str = "cpu", spinning: bool = True, parallel_clips: bool = False):
        """`spinning=False` when the process runs other work beside the engine (session_options).
        `parallel_clips=True` (the CPU only; ignored elsewhere) is for throughput over many clips:
        the visual graph runs on the calling thread alone, so `encode_workers` threads each encode
        their own clip side by side (ONNX Runtime sessions take concurrent runs). Per clip that
        costs less CPU than one clip spread over every core: on the dev box's 2 cores the demo
        engine's visual graph took 6.6-7.0 ms of CPU per clip on one thread and 9.6-10.1 ms on two,
        where the small ops leave the second thread waiting (benchmarks/eval_parts.py)."""
        self._read_manifest(manifest)
        self.device = device
        self.spinning = spinning
        providers = providers_for(device)
        self.max_context = int(manifest.model["max_context"])
        self.num_layers = int(manifest.model["num_layers"])
        self.dtype = self.embed_dtype = np.dtype(manifest["dtype"])
        parallel = parallel_clips and device == "cpu"
        # One thread per clip, and one more than the cores: a thread whose decoding waits on the GIL
        # leaves its core to another clip's visual graph. Capped: each holds its activations.
        self.encode_workers = min(MAX_ENCODE_WORKERS, usable_cores() + 1) if parallel else 0

        trt = "TensorrtExecutionProvider"
        self.visual = _open_session(manifest.path("visual"), providers, {trt: tensorrt_profiles(manifest, "visual")},
                                    spinning, threads=1 if parallel else None)
        self.decoder = _open_session(manifest.path("decoder"), providers, {trt: tensorrt_profiles(manifest, "decoder")},
                                     spinning)
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
    def load(cls, engine_dir: str | Path, device: str = "cpu", verify_hashes: bool = True,
             spinning: bool = True, parallel_clips: bool = False) -> OrtBackend:
        return cls(load_manifest(engine_dir, verify_hashes=verify_hashes), device, spinning, parallel_clips)

    # -- the visual path -------------------------------------------------------------------
    def encode_video(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, T, 3, S, S) -> video tokens (B, M, D)."""
        pixels = np.ascontiguousarray(pixel_values, dtype=self.dtype)
        self.check_pixels(pixels)
        return self.visual.run([self.video_name], {self.pixel_name: pixels})[0]

    # -- the visual path split per frame (live video, blip3v.runtime.live) ------------------
    def open_split(self) -> None:
        """Opens frame.onnx and temporal.onnx (the manifest's optional `frame` / `temporal`
        sections) once; an engine exported without them is a one-line EngineError. Call it before
        threads share the backend (the live session does)."""
        if getattr(self, "split_graphs", None) is None:
            from blip3v.runtime.live import split_spec

            spec = split_spec(self.manifest)
            providers = providers_for(self.device)
            self.split_graphs = {role: (_open_session(self.manifest.directory / part.file, providers,
                                                          spinning=self.spinning), part)
                          for role, part in spec.items()}

    def encode_frames(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) frames -> each frame's latents (B, N, D_vis), through frame.onnx."""
        self.open_split()
        session, part = self.split_graphs["frame"]
        pixels = np.ascontiguousarray(pixel_values, dtype=self.dtype)
        if pixels.ndim != 4 or pixels.shape[1:] != (3, self.image_size, self.image_size):
            raise InputError(f"frames must be (B, 3, {self.image_size}, {self.image_size}), got {pixels.shape}")
        return session.run([part.output], {part.input: pixels})[0]

    def encode_temporal(self, latents: np.ndarray) -> np.ndarray:
        """(B, T, N, D_vis) frame latents -> video tokens (B, M, D), through temporal.onnx."""
        self.open_split()
        session, part = self.split_graphs["temporal"]
        return session.run([part.output], {part.input: np.ascontiguousarray(latents, dtype=self.dtype)})[0]

    # -- the decoder interface (blip3v.runtime.decoding) -------------------------------------
    def chunked_prefill(self, batch: int) -> bool:
        """Can a call with S > 1 follow a non-empty cache? The standard graph always can. ORT's
        GroupQueryAttention takes such a call ("interactive decoding") at batch 1 only, and
        rotates at cache slots (export/gqa.py), which equal positions only for an unpadded row."""
        return self.manifest["decoder"].get("attention") == "standard" or batch == 1

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        if capacity > self.max_context:
            raise InputError(f"a cache of {capacity} slots exceeds the engine's context of {self.max_context}")
        return KVCache(self, OrtCache(self, batch, capacity), batch, capacity)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return EngineHost.embed(self, ids)

    def copy_cache(self, src: KVCache, dst: KVCache, slots: int) -> None:
        for a, b in zip(src.storage.values, dst.storage.values):
            if self.ort_device == "cpu":
                b.numpy()[:, :, :slots] = a.numpy()[:, :, :slots]  # views of the bound host memory
            else:  # no device-to-device copy in ORT's Python API: through the host, once per fork
                full = b.numpy()
                full[:, :, :slots] = a.numpy()[:, :, :slots]
                b.update_inplace(full)

    def forward(self, cache: KVCache, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """A chunk of S tokens (prefill, or a later chunk on batch 1) -> the last column's logits."""
        st: OrtCache = cache.storage
        binding = st.binding
        chunk = np.ascontiguousarray(embeds, dtype=self.dtype)  # bound arrays stay alive until the run
        pos = np.ascontiguousarray(positions, dtype=np.int64)
        mask = np.ascontiguousarray(cache.mask[:, :cache.used])
        binding.bind_cpu_input(self.embeds_name, chunk)
        binding.bind_cpu_input(self.position_name, pos)
        binding.bind_cpu_input(self.mask_name, mask)
        st.step_bound = False
        self.decoder.run_with_iobinding(binding)
        return st.logits.copy()

    def prepare_decode(self, cache: KVCache, steps: int) -> None:
        """With B = 1 the mask's OrtValue for every length the next `steps` steps bind is made up
        front (views of the cache's mask, no copy): binding a ready OrtValue costs ~27 us cold
        against ~97 us for bind_input, right after a step has streamed the weights through the
        caches (about 150 us of host work a step on the 2-core dev box, 1 % of an INT4 step)."""
        st: OrtCache = cache.storage
        if cache.batch == 1:
            hi = min(cache.capacity, cache.used + steps)
            st.masks = {n: ort.OrtValue.ortvalue_from_numpy(cache.mask[:, :n]) for n in range(cache.used + 1, hi + 1)}

    def step(self, cache: KVCache, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One token per row: the step buffers are bound once and rewritten in place."""
        st: OrtCache = cache.storage
        binding = st.binding
        if not st.step_bound:
            binding.bind_ortvalue_input(self.embeds_name, st.step_embeds_value)
            binding.bind_ortvalue_input(self.position_name, st.step_pos_value)
            st.step_bound = True
        st.step_embeds[:, 0] = self.embeddings[tokens]  # sampled ids < num_logits <= table rows
        st.step_pos[:] = positions
        ready = st.masks.get(cache.used) if cache.batch == 1 else None
        if ready is not None:
            binding.bind_ortvalue_input(self.mask_name, ready)
        else:
            st.step_mask = np.ascontiguousarray(cache.mask[:, :cache.used])  # kept alive while bound
            binding.bind_cpu_input(self.mask_name, st.step_mask)
        self.decoder.run_with_iobinding(binding)
        return st.logits


class OrtCache:
    """ONNX Runtime storage of a KVCache: per layer one K and one V buffer (B, Hkv, C, dh) as
    OrtValues on the execution device, bound as both `past_*` and `present_*` of one IO binding, so
    the graph writes the new slots in place and nothing is reallocated or copied between calls.
    Zeroed: slots past the written ones are never attended, but stay finite. On the CPU each
    OrtValue wraps a numpy array's memory; on a GPU it is one upload per cache."""

    def __init__(self, backend: OrtBackend, batch: int, capacity: int):
        shape = (batch, backend.kv_heads, capacity, backend.head_dim)
        dtype = backend.dtype
        self.values = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), backend.ort_device, 0)
                       for _ in backend.past_names]
        self.nbytes = sum(int(np.prod(shape)) * dtype.itemsize for _ in backend.past_names)
        self.binding = backend.decoder.io_binding()
        for past, present, buf in zip(backend.past_names, backend.present_names, self.values):
            self.binding.bind_ortvalue_input(past, buf)
            self.binding.bind_ortvalue_output(present, buf)  # same buffer: the update happens in place
        self.logits = np.empty((batch, int(backend.manifest.model["num_logits"])), dtype)  # (B, V+3)
        self.binding.bind_ortvalue_output(backend.logits_name, ort.OrtValue.ortvalue_from_numpy(self.logits))
        self.step_embeds = np.empty((batch, 1, backend.embeddings.shape[1]), dtype)  # (B, 1, D)
        self.step_pos = np.zeros((batch, 1), dtype=np.int64)
        self.step_embeds_value = ort.OrtValue.ortvalue_from_numpy(self.step_embeds)
        self.step_pos_value = ort.OrtValue.ortvalue_from_numpy(self.step_pos)
        self.step_bound = False
        self.step_mask: np.ndarray | None = None
        self.masks: dict[int, ort.OrtValue] = {}
