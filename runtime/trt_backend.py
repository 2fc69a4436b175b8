"""The TensorRT backend: an engine directory with visual.plan / decoder.plan (from `blip3v build`) -> answers.

    OrtBackend's pipeline, on TensorRT engines: video -> visual.plan -> video tokens (B, M, D); prompt
    ids -> rows of embed_tokens.npy with `<image>` replaced (numpy); decoder.plan prefill, then one token
    per call (the manifest's `calls` contract) until a stop id or max_new_tokens.

No torch: CUDA is reached through ctypes on libcudart (`CudaRuntime`, a dozen runtime-API calls), which
ships with every CUDA / JetPack install and needs no extra package. tensorrt is imported lazily.
Everything is allocated once, in `__init__`, for the engine's max batch B and context C (recorded by
`blip3v build` in the manifest's `tensorrt` section):
  * per layer one K and one V device buffer (B, Hkv, C, dh), bound as both `past_*` and `present_*`, so
    the graph's ScatterElements writes the new slots in place (the manifest's past_present_share_buffer);
  * device buffers for inputs_embeds (B, C, D), attention_mask (B, C), position_ids (B, C), logits (B, V)
    and pinned host buffers of the same sizes, one CUDA stream; a call of batch b uses the leading rows;
  * two execution contexts on decoder.plan, one per optimization profile (0 prefill, 1 decode), sharing
    one device scratch allocation (they never run at the same time: one stream).
The decode step (copy in, execute, copy logits out) is captured as a CUDA graph. The decoder contract
writes the step's token at slot L - 1 where L is the mask's width, so each step has a new shape and a
graph is valid for one (b, L) only: a graph is captured the second time a (b, L) shape is seen and
replayed from then on (repeated questions and benchmarks hit it; one-off shapes never pay for capture).

    from blip3v.runtime.trt_backend import TrtBackend
    TrtBackend.load("engines/demo").ask("clip.mp4", "what colour does the square turn?")
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from blip3v.errors import EngineError, InputError
from blip3v.runtime.generation import Sampler, SamplingConfig, accept_tokens
from blip3v.runtime.host import EngineHost
from blip3v.runtime.manifest import Manifest, load_manifest

if TYPE_CHECKING:
    import tensorrt as trt

# Keys of the manifest's `tensorrt` section that tie a plan to where it can run (a plan is specific to
# the TensorRT version and the GPU model it was built with: TensorRT developer guide, "Engine compatibility").
DEVICE_KEYS = ("tensorrt_version", "gpu", "compute_capability")
MAX_GRAPHS = 256  # captured decode-step graphs kept (each (b, L) shape is one graph)
H2D, D2H = 1, 2  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost
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


class TrtBackend(EngineHost):
    """Engine directory (built by `blip3v build`) -> answers on TensorRT. Same methods as OrtBackend."""

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
        self.past_names = manifest.kv_names("past_key") + manifest.kv_names("past_value")
        self.present_names = manifest.kv_names("present_key") + manifest.kv_names("present_value")

        self.logger: trt.ILogger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        plans = built["plans"]
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
        kv_dtype = self._dtype(self.decoder, self.past_names[0])
        kv_bytes = b * self.kv_heads * c * self.head_dim * kv_dtype.itemsize
        self.kv = [self.cuda.malloc(kv_bytes) for _ in self.past_names]  # (B, Hkv, C, dh) each, device only

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
            self._bind_decoder(ctx)
        self._bind(self.visual_ctx, self.pixel_name, self.pixels.device, plans["visual"])
        self._bind(self.visual_ctx, self.video_name, self.video.device, plans["visual"])
        self.cuda.synchronize(self.stream)
        self.graphs: OrderedDict[tuple[int, int], tuple[int, int]] = OrderedDict()  # (b, L) -> (graph, exec)
        self.seen: set[tuple[int, int]] = set()

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

    def _bind_decoder(self, ctx: trt.IExecutionContext) -> None:
        file = self.manifest.raw["tensorrt"]["plans"]["decoder"]
        for name, ptr in ((self.embeds_name, self.embeds_buf.device), (self.mask_name, self.mask_buf.device),
                          (self.position_name, self.pos_buf.device), (self.logits_name, self.logits_buf.device)):
            self._bind(ctx, name, ptr, file)
        for past, present, ptr in zip(self.past_names, self.present_names, self.kv):
            self._bind(ctx, past, ptr, file)
            self._bind(ctx, present, ptr, file)  # same buffer: the new slots are written in place

    @staticmethod
    def _set_shape(ctx: trt.IExecutionContext, name: str, shape: tuple[int, ...], file: str) -> None:
        if not ctx.set_input_shape(name, shape):  # False when the shape is outside the active profile
            raise EngineError(f"{file}: shape {shape} of input {name!r} is outside the engine's profile "
                              "(blip3v build --max-batch / --max-context)")

    def close(self) -> None:
        """Frees every CUDA allocation (also done when the object is collected)."""
        for graph, exe in self.graphs.values():
            self.cuda.graph_exec_destroy(exe)
            self.cuda.graph_destroy(graph)
        self.graphs.clear()
        for buf in self._buffers:
            buf.free()
        self._buffers = []
        for ptr in self.kv:
            self.cuda.free(ptr)
        self.kv = []

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

    # -- one decoder call -----------------------------------------------------------------
    def _enqueue(self, ctx: trt.IExecutionContext, embeds_bytes: int, mask_bytes: int, pos_bytes: int,
                 logits_bytes: int) -> None:
        """Host -> device inputs, the engine, logits -> host: all on the one stream (capturable)."""
        cuda, stream = self.cuda, self.stream
        cuda.memcpy_async(self.embeds_buf.device, self.embeds_buf.host_ptr, embeds_bytes, H2D, stream)
        cuda.memcpy_async(self.mask_buf.device, self.mask_buf.host_ptr, mask_bytes, H2D, stream)
        cuda.memcpy_async(self.pos_buf.device, self.pos_buf.host_ptr, pos_bytes, H2D, stream)
        if not ctx.execute_async_v3(stream):
            raise EngineError("decoder.plan: TensorRT execution failed")
        cuda.memcpy_async(self.logits_buf.host_ptr, self.logits_buf.device, logits_bytes, D2H, stream)

    def step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """embeds (b, S, D), mask (b, L), positions (b, S) -> logits (b, V), writing the KV slots [L - S, L).
        S > 1 runs the prefill profile; S = 1 the decode profile, through a CUDA graph once (b, L) repeats."""
        b, s = positions.shape
        length = mask.shape[1]
        sizes = (self.embeds_buf.stage(embeds), self.mask_buf.stage(mask), self.pos_buf.stage(positions),
                 b * self.num_logits * self.logits_buf.dtype.itemsize)
        ctx = self.prefill_ctx if s > 1 else self.decode_ctx
        key = (b, length)
        if s == 1 and key in self.graphs:
            self.graphs.move_to_end(key)
            self.cuda.graph_launch(self.graphs[key][1], self.stream)
        else:
            self._set_shape(ctx, self.embeds_name, (b, s, self.hidden), "decoder.plan")
            self._set_shape(ctx, self.mask_name, (b, length), "decoder.plan")
            self._set_shape(ctx, self.position_name, (b, s), "decoder.plan")
            for name in self.past_names:
                self._set_shape(ctx, name, (b, self.kv_heads, self.max_context, self.head_dim), "decoder.plan")
            self._enqueue(ctx, *sizes)  # also the warm-up TensorRT wants before a capture
            if s == 1 and key in self.seen:
                self.cuda.synchronize(self.stream)
                self._capture(key, sizes)
            elif s == 1:
                self.seen.add(key)
        self.cuda.synchronize(self.stream)
        return self.logits_buf.host[:b * self.num_logits].reshape(b, self.num_logits)

    def _capture(self, key: tuple[int, int], sizes: tuple[int, int, int, int]) -> None:
        """Records the decode step for shape `key` as a CUDA graph (not launched: this step already ran)."""
        self.cuda.begin_capture(self.stream)
        try:
            self._enqueue(self.decode_ctx, *sizes)
        finally:
            graph = self.cuda.end_capture(self.stream)
        self.graphs[key] = (graph, self.cuda.instantiate(graph))
        if len(self.graphs) > MAX_GRAPHS:
            old_graph, old_exe = self.graphs.popitem(last=False)[1]
            self.cuda.graph_exec_destroy(old_exe)
            self.cuda.graph_destroy(old_graph)

    # -- generation -----------------------------------------------------------------------
    def generate(self, embeds: np.ndarray, mask: np.ndarray, sampling: SamplingConfig,
                 on_token: Callable[[int, int], None] | None = None,
                 marks: list[float] | None = None) -> list[list[int]]:
        """Spliced embeddings (B, S, D) + left-padded mask (B, S) -> new token ids per row (stop id
        dropped). Same contract and loop as OrtBackend.generate; B <= the engine's max batch."""
        sample = Sampler(sampling)
        batch, prompt = mask.shape
        if batch > self.max_batch:
            raise InputError(f"batch of {batch} exceeds the engine's max batch {self.max_batch} (blip3v build --max-batch)")
        if prompt + sampling.max_new_tokens > self.max_context:
            raise InputError(f"prompt of {prompt} tokens + {sampling.max_new_tokens} new tokens exceeds the "
                             f"engine's context of {self.max_context}")
        full_mask = np.zeros((batch, self.max_context), dtype=np.int64)  # (B, C): 1 = a real token in that slot
        full_mask[:, :prompt] = mask
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)  # (B, S)
        step_embeds, step_pos, used = embeds, positions, 0
        out: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        for step in range(sampling.max_new_tokens):
            s = step_embeds.shape[1]
            logits = self.step(step_embeds, full_mask[:, :used + s], step_pos)  # (B, V)
            tokens = sample(logits.astype(np.float32))  # (B,)
            if step == 0 and marks is not None:
                marks.append(time.perf_counter())
            used += s
            if accept_tokens(tokens, self.stop_ids, done, out, on_token) or step == sampling.max_new_tokens - 1:
                break
            full_mask[:, used] = 1
            step_pos = step_pos[:, -1:] + 1  # (B, 1)
            step_embeds = self.embed(tokens.reshape(batch, 1))  # (B, 1, D)
        return out
