"""The TensorRT backend: an engine directory with visual.plan / decoder.plan (from `blip3v build`) -> answers.

    OrtBackend's pipeline, on TensorRT engines: video -> visual.plan -> video tokens (B, M, D); prompt
    ids -> rows of embed_tokens.npy with `<image>` replaced (numpy); then the runtime's one decode
    loop (blip3v.runtime.decoding) over decoder.plan: this backend implements its decoder interface.

No torch: CUDA is reached through ctypes on libcudart (`CudaRuntime`, a dozen runtime-API calls), which
ships with every CUDA / JetPack install and needs no extra package. tensorrt is imported lazily.
Allocated once, in `__init__`, for the engine's max batch B and context C (recorded by `blip3v build`
in the manifest's `tensorrt` section):
  * device buffers for inputs_embeds (B, C, D), attention_mask (B, C), position_ids (B, C), logits (B, V)
    and pinned host buffers of the same sizes, one CUDA stream; a call of batch b uses the leading rows;
  * two execution contexts on decoder.plan, one per optimization profile (0 prefill, 1 decode), sharing
    one device scratch allocation (they never run at the same time: one stream).
Per KV cache (`new_cache`, the runtime's KVCache holds it as `TrtCache`): per layer one K and one V
device buffer (b, Hkv, capacity, dh), bound as both `past_*` and `present_*` for each call on that
cache, so the graph's ScatterElements writes the new slots in place (the manifest's
past_present_share_buffer). A fork copies the filled slots device to device.

The decode step (copy in, execute, copy logits out) is captured as a CUDA graph. The decoder contract
writes the step's token at slot L - 1 where L is the mask's width, so each step has a new shape and a
graph is valid for one cache storage and one (b, L) only: a graph is captured the second time a (b, L)
shape is seen on a storage and replayed from then on. Storages of dropped caches are kept (a few,
sized in whole blocks of slots) and handed to the next cache of the same shape with their graphs, so
repeated questions and benchmarks hit them; one-off shapes never pay for capture.

    from blip3v.runtime.session import Engine
    Engine.open(engine="engines/demo", backend="tensorrt").ask("clip.mp4", "what colour does the square turn?")
"""

from __future__ import annotations

import ctypes
import ctypes.util
import weakref
from collections import OrderedDict
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from blip3v.errors import EngineError, InputError
from blip3v.runtime.decoding import KVCache
from blip3v.runtime.host import EngineHost
from blip3v.runtime.manifest import Manifest, load_manifest

if TYPE_CHECKING:
    import tensorrt as trt

# Keys of the manifest's `tensorrt` section that tie a plan to where it can run (a plan is specific to
# the TensorRT version and the GPU model it was built with: TensorRT developer guide, "Engine compatibility").
DEVICE_KEYS = ("tensorrt_version", "gpu", "compute_capability")
MAX_GRAPHS = 256  # captured decode-step graphs kept per cache storage (each (b, L) shape is one graph)
H2D, D2H, D2D = 1, 2, 3  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice
SLOT_BLOCK = 256  # cache storages are sized in whole blocks of slots, so similar requests share one
KEPT_STORAGES = 2  # storages of dropped caches kept (with their graphs) for the next cache of that shape
CAPTURE_GLOBAL = 0  # cudaStreamCaptureModeGlobal (the mode TensorRT's docs capture enqueue with)


def import_tensorrt() -> ModuleType:
    """`import tensorrt`, or one EngineError line saying how to get it. tensorrt-stubs alone installs a
    `tensorrt` folder of .pyi files that imports as an empty namespace package: that is not TensorRT."""
    try:
        import tensorrt
    except ImportError:
        raise EngineError("TensorRT is not installed: pip install 'tensorrt>=10,<11' (desktop) or use "
                          "JetPack 6's python3-libnvinfer (Jetson)") from None
    if not hasattr(tensorrt, "Builder"):
        raise EngineError("the installed `tensorrt` has no Builder (only type stubs?): install TensorRT 10")
    return tensorrt


def provenance_diff(recorded: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...] | None = None) -> list[str]:
    """'KEY: recorded -> current' for every key whose value differs (all keys of both, or `keys`)."""
    names = keys if keys is not None else tuple(sorted(set(recorded) | set(current)))
    return [f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in names if recorded.get(k) != current.get(k)]


class CudaRuntime:
    """The few CUDA runtime calls the backend needs, through ctypes on libcudart. Pointers are ints."""

    def __init__(self) -> None:
        names = [ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.12", "libcudart.so.11.0"]
        self.lib: ctypes.CDLL | None = None
        for name in [n for n in names if n]:
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if self.lib is None:
            raise EngineError("the CUDA runtime (libcudart.so) is not found: install the CUDA toolkit or JetPack, "
                              "or add its lib directory to LD_LIBRARY_PATH")
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    def _call(self, fn: str, *args: Any) -> None:
        assert self.lib is not None
        status = getattr(self.lib, fn)(*args)
        if status != 0:
            message = self.lib.cudaGetErrorString(status)
            text = message.decode() if isinstance(message, bytes) else str(status)
            raise EngineError(f"CUDA {fn} failed: {text}")

    def device(self) -> tuple[str, str]:
        """(GPU name, compute capability "major.minor") of the current device."""
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        self._call("cudaGetDevice", ctypes.byref(dev))
        self._call("cudaDeviceGetAttribute", ctypes.byref(major), 75, dev)  # cudaDevAttrComputeCapabilityMajor
        self._call("cudaDeviceGetAttribute", ctypes.byref(minor), 76, dev)  # ...Minor
        props = ctypes.create_string_buffer(8192)  # cudaDeviceProp: `char name[256]` is its first field
        self._call("cudaGetDeviceProperties", props, dev)
        return props.raw[:256].split(b"\0", 1)[0].decode(errors="replace"), f"{major.value}.{minor.value}"

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._call("cudaMalloc", ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1)))
        self._call("cudaMemset", ptr, 0, ctypes.c_size_t(max(nbytes, 1)))
        return int(ptr.value or 0)

    def malloc_host(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._call("cudaMallocHost", ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1)))  # pinned
        return int(ptr.value or 0)

    def free(self, ptr: int) -> None:
        self._call("cudaFree", ctypes.c_void_p(ptr))

    def free_host(self, ptr: int) -> None:
        self._call("cudaFreeHost", ctypes.c_void_p(ptr))

    def memcpy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self._call("cudaMemcpyAsync", ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                   ctypes.c_int(kind), ctypes.c_void_p(stream))

    def memcpy_2d_async(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int,
                        kind: int, stream: int) -> None:
        """`height` rows of `width` bytes, rows `src_pitch` / `dst_pitch` bytes apart."""
        self._call("cudaMemcpy2DAsync", ctypes.c_void_p(dst), ctypes.c_size_t(dst_pitch), ctypes.c_void_p(src),
                   ctypes.c_size_t(src_pitch), ctypes.c_size_t(width), ctypes.c_size_t(height), ctypes.c_int(kind),
                   ctypes.c_void_p(stream))

    def memset_async(self, ptr: int, nbytes: int, stream: int) -> None:
        self._call("cudaMemsetAsync", ctypes.c_void_p(ptr), 0, ctypes.c_size_t(nbytes), ctypes.c_void_p(stream))

    def stream_create(self) -> int:
        stream = ctypes.c_void_p()
        self._call("cudaStreamCreateWithFlags", ctypes.byref(stream), ctypes.c_uint(1))  # cudaStreamNonBlocking
        return int(stream.value or 0)

    def stream_destroy(self, stream: int) -> None:
        self._call("cudaStreamDestroy", ctypes.c_void_p(stream))

    def synchronize(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", ctypes.c_void_p(stream))

    def begin_capture(self, stream: int) -> None:
        self._call("cudaStreamBeginCapture", ctypes.c_void_p(stream), ctypes.c_int(CAPTURE_GLOBAL))

    def end_capture(self, stream: int) -> int:
        graph = ctypes.c_void_p()
        self._call("cudaStreamEndCapture", ctypes.c_void_p(stream), ctypes.byref(graph))
        return int(graph.value or 0)

    def instantiate(self, graph: int) -> int:
        # cudaGraphInstantiateWithFlags has the same signature in CUDA 11.4+ and 12 (cudaGraphInstantiate does not).
        exe = ctypes.c_void_p()
        self._call("cudaGraphInstantiateWithFlags", ctypes.byref(exe), ctypes.c_void_p(graph), ctypes.c_ulonglong(0))
        return int(exe.value or 0)

    def graph_launch(self, exe: int, stream: int) -> None:
        self._call("cudaGraphLaunch", ctypes.c_void_p(exe), ctypes.c_void_p(stream))

    def graph_destroy(self, graph: int) -> None:
        self._call("cudaGraphDestroy", ctypes.c_void_p(graph))

    def graph_exec_destroy(self, exe: int) -> None:
        self._call("cudaGraphExecDestroy", ctypes.c_void_p(exe))


class Buffer:
    """A device allocation and its pinned host twin, with a numpy view of the host side."""

    def __init__(self, cuda: CudaRuntime, shape: tuple[int, ...], dtype: np.dtype):
        self.cuda = cuda
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.device = cuda.malloc(self.nbytes)
        self.host_ptr = cuda.malloc_host(self.nbytes)
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.host_ptr)
        self.host = np.ctypeslib.as_array(raw).view(self.dtype)  # flat; calls use leading elements

    def stage(self, array: np.ndarray) -> int:
        """Copies `array` (C order) into the start of the host buffer; returns its byte size."""
        flat = np.ascontiguousarray(array, dtype=self.dtype).reshape(-1)
        self.host[:flat.size] = flat
        return flat.size * self.dtype.itemsize

    def free(self) -> None:
        self.cuda.free(self.device)
        self.cuda.free_host(self.host_ptr)


class TrtCache:
    """TensorRT storage of a KVCache: per layer one K and one V device buffer (b, Hkv, C, dh), bound
    as both `past_*` and `present_*` for every call on the cache, and the decode-step CUDA graphs
    captured on these addresses, by (b, L). Freed when collected (or by `close`)."""

    def __init__(self, cuda: CudaRuntime, shape: tuple[int, int, int, int], itemsize: int, buffers: int):
        self.shape = shape
        self.layer_bytes = int(np.prod(shape)) * itemsize
        self.nbytes = self.layer_bytes * buffers
        self.kv = [cuda.malloc(self.layer_bytes) for _ in range(buffers)]  # zeroed by malloc
        self.graphs: OrderedDict[tuple[int, int], tuple[int, int]] = OrderedDict()  # (b, L) -> (graph, exec)
        self.seen: set[tuple[int, int]] = set()
        self._free = weakref.finalize(self, _free_cache, cuda, self.kv, self.graphs)
        self._free.atexit = False  # the driver releases everything at exit anyway

    def close(self) -> None:
        self._free()


def _free_cache(cuda: CudaRuntime, kv: list[int], graphs: OrderedDict[tuple[int, int], tuple[int, int]]) -> None:
    for graph, exe in graphs.values():
        cuda.graph_exec_destroy(exe)
        cuda.graph_destroy(graph)
    graphs.clear()
    for ptr in kv:
        cuda.free(ptr)
    kv.clear()


class TrtBackend(EngineHost):
    """Engine directory (built by `blip3v build`) -> answers on TensorRT: a host of
    blip3v.runtime.session and a decoder of blip3v.runtime.decoding, as OrtBackend."""

    def __init__(self, manifest: Manifest):
        built = manifest.raw.get("tensorrt")
        if not isinstance(built, dict) or "plans" not in built:
            raise EngineError(f"{manifest.directory}: no TensorRT engines; run `blip3v build --engine "
                              f"{manifest.directory}` first")
        import_tensorrt()  # one clear EngineError if TensorRT is missing
        import tensorrt as trt

        self.cuda = CudaRuntime()
        gpu, cc = self.cuda.device()
        current = {"tensorrt_version": trt.__version__, "gpu": gpu, "compute_capability": cc}
        differs = provenance_diff(built, current, DEVICE_KEYS)
        if differs:
            raise EngineError(f"{manifest.directory}: the TensorRT engines were built elsewhere ({'; '.join(differs)}); "
                              f"rebuild here: blip3v build --engine {manifest.directory} --rebuild")
        self._read_manifest(manifest)
        model = manifest.model
        self.num_logits = int(model["num_logits"])
        self.hidden = int(model["hidden_size"])
        self.max_batch = int(built["max_batch"])
        self.max_context = int(built["max_context"])
        self.attention = str(manifest["decoder"].get("attention", "standard"))
        self.past_names = manifest.kv_names("past_key") + manifest.kv_names("past_value")
        self.present_names = manifest.kv_names("present_key") + manifest.kv_names("present_value")

        self.logger: trt.ILogger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        plans = built["plans"]
        self.decoder_file = str(plans["decoder"])
        self.visual = self._deserialize(manifest.directory / plans["visual"])
        self.decoder = self._deserialize(manifest.directory / plans["decoder"])
        self._check_tensors(self.visual, [self.pixel_name], [self.video_name], plans["visual"])
        self._check_tensors(self.decoder, [self.embeds_name, self.mask_name, self.position_name, *self.past_names],
                            [self.logits_name, *self.present_names], plans["decoder"])

        self.stream = self.cuda.stream_create()
        self._buffers: list[Buffer] = []
        b, c = self.max_batch, self.max_context
        t, s = self.num_frames, self.image_size
        self.pixels = self._buffer((b, t, 3, s, s), self._dtype(self.visual, self.pixel_name))
        self.video = self._buffer((b, self.num_video_tokens, self.hidden), self._dtype(self.visual, self.video_name))
        self.embeds_buf = self._buffer((b, c, self.hidden), self._dtype(self.decoder, self.embeds_name))
        self.embed_dtype = self.embeds_buf.dtype
        self.mask_buf = self._buffer((b, c), self._dtype(self.decoder, self.mask_name))
        self.pos_buf = self._buffer((b, c), self._dtype(self.decoder, self.position_name))
        self.logits_buf = self._buffer((b, self.num_logits), self._dtype(self.decoder, self.logits_name))
        self.kv_dtype = self._dtype(self.decoder, self.past_names[0])
        self._kept: list[TrtCache] = []  # storages of dropped caches, newest last

        self.visual_ctx = self.visual.create_execution_context()
        # Prefill and decode contexts share one scratch allocation: same stream, never concurrent.
        scratch = max(self.decoder.get_device_memory_size_for_profile_v2(i) for i in range(2))
        self.scratch = self.cuda.malloc(scratch)
        user = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.prefill_ctx = self.decoder.create_execution_context(user)
        self.decode_ctx = self.decoder.create_execution_context(user)
        for profile, ctx in enumerate((self.prefill_ctx, self.decode_ctx)):
            ctx.set_device_memory(self.scratch, scratch)
            if not ctx.set_optimization_profile_async(profile, self.stream):
                raise EngineError(f"{plans['decoder']}: has no optimization profile {profile}; rebuild it")
            self._bind_io(ctx)
        self._bind(self.visual_ctx, self.pixel_name, self.pixels.device, plans["visual"])
        self._bind(self.visual_ctx, self.video_name, self.video.device, plans["visual"])
        self.cuda.synchronize(self.stream)

    @classmethod
    def load(cls, engine_dir: str | Path, verify_hashes: bool = True) -> TrtBackend:
        return cls(load_manifest(engine_dir, verify_hashes=verify_hashes))

    # -- setup ----------------------------------------------------------------------------
    def _deserialize(self, path: Path) -> trt.ICudaEngine:
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineError(f"{path}: TensorRT cannot deserialize it (built with another TensorRT version or "
                              "GPU?); rebuild with `blip3v build --rebuild`")
        return engine

    def _check_tensors(self, engine: trt.ICudaEngine, inputs: list[str], outputs: list[str], file: str) -> None:
        import tensorrt as trt

        mode = trt.TensorIOMode
        have = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        got_in = {n for n in have if engine.get_tensor_mode(n) == mode.INPUT}
        missing = sorted((set(inputs) - got_in) | (set(outputs) - (have - got_in)))
        if missing:
            raise EngineError(f"{file}: tensors named in the manifest are missing: {', '.join(missing[:6])}")

    def _dtype(self, engine: trt.ICudaEngine, name: str) -> np.dtype:
        import tensorrt as trt

        return np.dtype(trt.nptype(engine.get_tensor_dtype(name)))

    def _buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> Buffer:
        buf = Buffer(self.cuda, shape, dtype)
        self._buffers.append(buf)
        return buf

    @staticmethod
    def _bind(ctx: trt.IExecutionContext, name: str, ptr: int, file: str) -> None:
        if not ctx.set_tensor_address(name, ptr):  # False (and a TensorRT log line) when the name is unknown
            raise EngineError(f"{file}: TensorRT refused the address of tensor {name!r}")

    def _bind_io(self, ctx: trt.IExecutionContext) -> None:
        """The per-backend buffers; the KV buffers are the cache's, bound per call (`_bind_cache`)."""
        for name, ptr in ((self.embeds_name, self.embeds_buf.device), (self.mask_name, self.mask_buf.device),
                          (self.position_name, self.pos_buf.device), (self.logits_name, self.logits_buf.device)):
            self._bind(ctx, name, ptr, self.decoder_file)

    def _bind_cache(self, ctx: trt.IExecutionContext, storage: TrtCache) -> None:
        for past, present, ptr in zip(self.past_names, self.present_names, storage.kv):
            self._bind(ctx, past, ptr, self.decoder_file)
            self._bind(ctx, present, ptr, self.decoder_file)  # same buffer: the new slots are written in place
            self._set_shape(ctx, past, storage.shape, self.decoder_file)

    @staticmethod
    def _set_shape(ctx: trt.IExecutionContext, name: str, shape: tuple[int, ...], file: str) -> None:
        if not ctx.set_input_shape(name, shape):  # False when the shape is outside the active profile
            raise EngineError(f"{file}: shape {shape} of input {name!r} is outside the engine's profile "
                              "(blip3v build --max-batch / --max-context)")

    def close(self) -> None:
        """Frees every CUDA allocation of the backend and of its kept cache storages (live caches
        free theirs when collected; also done when the objects are collected)."""
        for storage in self._kept:
            storage.close()
        self._kept = []
        for buf in self._buffers:
            buf.free()
        self._buffers = []

    def encode_video(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, T, 3, S, S) -> video tokens (B, M, D), max_batch clips per engine call."""
        self.check_pixels(pixel_values)
        out = []
        for start in range(0, len(pixel_values), self.max_batch):
            chunk = pixel_values[start:start + self.max_batch]  # (b, T, 3, S, S)
            b = len(chunk)
            nbytes = self.pixels.stage(chunk)
            self.cuda.memcpy_async(self.pixels.device, self.pixels.host_ptr, nbytes, H2D, self.stream)
            self._set_shape(self.visual_ctx, self.pixel_name, chunk.shape, "visual.plan")
            if not self.visual_ctx.execute_async_v3(self.stream):
                raise EngineError("visual.plan: TensorRT execution failed")
            m = b * self.num_video_tokens * self.hidden
            self.cuda.memcpy_async(self.video.host_ptr, self.video.device, m * self.video.dtype.itemsize, D2H,
                                   self.stream)
            self.cuda.synchronize(self.stream)
            out.append(self.video.host[:m].reshape(b, self.num_video_tokens, self.hidden).copy())  # (b, M, D)
        return np.concatenate(out)

    # -- the decoder interface (blip3v.runtime.decoding) -------------------------------------
    def chunked_prefill(self, batch: int) -> bool:
        """The standard graph (ScatterElements at slots [L - S, L), positions as given) takes a chunk
        after a non-empty cache at any batch."""
        return self.attention == "standard"

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        if batch > self.max_batch:
            raise InputError(f"batch of {batch} exceeds the engine's max batch {self.max_batch} (blip3v build --max-batch)")
        if capacity > self.max_context:
            raise InputError(f"a cache of {capacity} slots exceeds the engine's context of {self.max_context} "
                             "(blip3v build --max-context)")
        slots = min(-(-capacity // SLOT_BLOCK) * SLOT_BLOCK, self.max_context)
        shape = (batch, self.kv_heads, slots, self.head_dim)
        storage = next((s for s in reversed(self._kept) if s.shape == shape), None)
        if storage is not None:
            self._kept.remove(storage)
            for ptr in storage.kv:  # as fresh as a new one (every slot below L is rewritten before it is read)
                self.cuda.memset_async(ptr, storage.layer_bytes, self.stream)
        else:
            storage = TrtCache(self.cuda, shape, self.kv_dtype.itemsize, len(self.past_names))
        cache = KVCache(self, storage, batch, capacity)
        weakref.finalize(cache, self._keep, storage).atexit = False
        return cache

    def _keep(self, storage: TrtCache) -> None:
        self._kept.append(storage)
        for old in self._kept[:-KEPT_STORAGES]:
            old.close()
        del self._kept[:-KEPT_STORAGES]

    def copy_cache(self, src: KVCache, dst: KVCache, slots: int) -> None:
        """dst's buffers get src's first `slots` slots, device to device: per layer B * Hkv rows of
        slots * dh elements, at each storage's own row pitch (capacity * dh)."""
        a, b = src.storage, dst.storage
        row = self.head_dim * self.kv_dtype.itemsize
        height = a.shape[0] * a.shape[1]  # B * Hkv
        for s_ptr, d_ptr in zip(a.kv, b.kv):
            self.cuda.memcpy_2d_async(d_ptr, b.shape[2] * row, s_ptr, a.shape[2] * row, slots * row, height,
                                      D2D, self.stream)
        self.cuda.synchronize(self.stream)

    def forward(self, cache: KVCache, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """A chunk of S tokens (a prompt, or a later chunk) -> the last column's logits (B, V)."""
        return self._run(cache.storage, embeds, cache.mask[:, :cache.used], positions).astype(np.float32)

    def step(self, cache: KVCache, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One token per row, through the storage's CUDA graph for (b, L) once that shape repeats."""
        embeds = self.embed(tokens.reshape(-1, 1))  # (B, 1, D)
        return self._run(cache.storage, embeds, cache.mask[:, :cache.used], positions).astype(np.float32)

    # -- one decoder call -----------------------------------------------------------------
    def _enqueue(self, ctx: trt.IExecutionContext, embeds_bytes: int, mask_bytes: int, pos_bytes: int,
                 logits_bytes: int) -> None:
        """Host -> device inputs, the engine, logits -> host: all on the one stream (capturable)."""
        cuda, stream = self.cuda, self.stream
        cuda.memcpy_async(self.embeds_buf.device, self.embeds_buf.host_ptr, embeds_bytes, H2D, stream)
        cuda.memcpy_async(self.mask_buf.device, self.mask_buf.host_ptr, mask_bytes, H2D, stream)
        cuda.memcpy_async(self.pos_buf.device, self.pos_buf.host_ptr, pos_bytes, H2D, stream)
        if not ctx.execute_async_v3(stream):
            raise EngineError(f"{self.decoder_file}: TensorRT execution failed")
        cuda.memcpy_async(self.logits_buf.host_ptr, self.logits_buf.device, logits_bytes, D2H, stream)

    def _run(self, storage: TrtCache, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """embeds (b, S, D), mask (b, L), positions (b, S) -> logits (b, V), writing the KV slots [L - S, L)
        of `storage`. S > 1 runs the prefill profile; S = 1 the decode profile, through a CUDA graph
        once (b, L) repeats on this storage."""
        b, s = positions.shape
        length = mask.shape[1]
        sizes = (self.embeds_buf.stage(embeds), self.mask_buf.stage(mask), self.pos_buf.stage(positions),
                 b * self.num_logits * self.logits_buf.dtype.itemsize)
        ctx = self.prefill_ctx if s > 1 else self.decode_ctx
        key = (b, length)
        if s == 1 and key in storage.graphs:
            storage.graphs.move_to_end(key)
            self.cuda.graph_launch(storage.graphs[key][1], self.stream)
        else:
            self._bind_cache(ctx, storage)  # the contexts are shared by every cache
            self._set_shape(ctx, self.embeds_name, (b, s, self.hidden), self.decoder_file)
            self._set_shape(ctx, self.mask_name, (b, length), self.decoder_file)
            self._set_shape(ctx, self.position_name, (b, s), self.decoder_file)
            self._enqueue(ctx, *sizes)  # also the warm-up TensorRT wants before a capture
            if s == 1 and key in storage.seen:
                self.cuda.synchronize(self.stream)
                self._capture(storage, key, sizes)
            elif s == 1:
                storage.seen.add(key)
        self.cuda.synchronize(self.stream)
        return self.logits_buf.host[:b * self.num_logits].reshape(b, self.num_logits)

    def _capture(self, storage: TrtCache, key: tuple[int, int], sizes: tuple[int, int, int, int]) -> None:
        """Records the decode step for shape `key` on `storage` as a CUDA graph (not launched: this
        step already ran). The graph holds the storage's KV addresses, so it lives on the storage."""
        self.cuda.begin_capture(self.stream)
        try:
            self._enqueue(self.decode_ctx, *sizes)
        finally:
            graph = self.cuda.end_capture(self.stream)
        storage.graphs[key] = (graph, self.cuda.instantiate(graph))
        if len(storage.graphs) > MAX_GRAPHS:
            old_graph, old_exe = storage.graphs.popitem(last=False)[1]
            self.cuda.graph_exec_destroy(old_exe)
            self.cuda.graph_destroy(old_graph)
