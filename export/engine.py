"""Checkpoint -> engine directory for ONNX Runtime (and later TensorRT):

    visual.onnx        pixel_values (B, T, 3, S, S) -> video_tokens (B, M, D)
    frame.onnx         pixel_values (B, 3, S, S) -> frame_latents (B, N, D_vis)   } the visual path split,
    temporal.onnx      frame_latents (B, T, N, D_vis) -> video_tokens (B, M, D) } for live video (split.py)
    decoder.onnx       inputs_embeds + mask + positions + in-place KV buffers -> last logits (B, V+3)
    embed_tokens.npy   (additional_vocab_start + 3, D): Phi-3 rows then xGen-MM's extra rows, by token id
    tokenizer.json     the checkpoint's fast tokenizer
    manifest.json      the contract with the runtime (blip3v.runtime.manifest), written last

Graphs go through `torch.onnx.export(dynamo=True)` (torch.export + onnxscript; the TorchScript
exporter still works in torch 2.13 and is ~10x faster on tiny models, but it is deprecated and
frozen). Each graph is checked right after export against the PyTorch reference on fresh random
inputs: the visual path on random pixels, the decoder on a left-padded batch for a prefill and
several cached decode steps (reference: the model's own `decoder` with a transformers cache).
Everything is written into a temporary sibling folder that replaces the output only when complete
(blip3v.atomic.atomic_dir: an atomic exchange where the OS has one, so the name is never empty).
The manifest is built as the runtime's typed model (blip3v.runtime.manifest.EngineSpec) and checked
by the same code that reads it.

    from blip3v.export.engine import export_engine
    export_engine(model, tokenizer, "engines/demo")          # or: blip3v export --model DIR --out DIR
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blip3v import __version__
from blip3v.atomic import atomic_dir
from blip3v.errors import EngineError, InputError
from blip3v.export.graphs import ATTENTION, DecoderGraph, VisualGraph
from blip3v.export.split import FRAME, TEMPORAL, check_split, export_split, manifest_sections, split_golden
from blip3v.model.tokenizer import check_tokenizer, encode_prompt, stop_token_ids
from blip3v.model.xgenmm import XGenMMVideoModel
from blip3v.progress import PartBar, StepBar, null_bar
from blip3v.runtime.manifest import (MANIFEST_NAME, DecoderSpec, EmbeddingsSpec, EngineSpec, FileEntry,
                                     KVCacheSpec, ModelSpec, PromptSpec, TokenizerSpec, VisualSpec, file_entries,
                                     seal, write_manifest)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
# Max abs difference to the float32 PyTorch reference. fp16 rounds every weight and activation
# (10-bit mantissa), so its bound is relative to the output's scale: tol * max(1, max |ref|).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
DEFAULT_OPSET = 18  # torch 2.13's torchlib opset; TensorRT 10 parses it
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to NAME.onnx.data (protobuf's 2 GB cap)
VALIDATION_STEPS = 4  # cached decode steps checked after the prefill
VALIDATION_SEED = 20241021  # not the seed of the tracing inputs: validation sees fresh inputs

VISUAL, DECODER, EMBEDDINGS, TOKENIZER = "visual.onnx", "decoder.onnx", "embed_tokens.npy", "tokenizer.json"
# export_engine's steps and their shares of its time, for progress bars: seconds of `blip3v export`
# of the demo model on the shared 2-core dev box (tracing and optimising the graphs dominate; the
# split graphs are two exports). A larger decoder takes a larger share; the ETA corrects itself.
EXPORT_STEPS = {"tokenizer": 1.0, "reference outputs": 4.0, VISUAL: 40.0, f"{FRAME} + {TEMPORAL}": 90.0,
                DECODER: 11.0, f"{DECODER} check": 1.0, "manifest": 1.0}
KV_TEMPLATES = {"past_key": "past_key.{layer}", "past_value": "past_value.{layer}",
                "present_key": "present_key.{layer}", "present_value": "present_value.{layer}"}

Log = Callable[[str], None]


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    return {"blip3v": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]}


def _require_onnxscript() -> None:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ModuleNotFoundError:
        raise InputError("exporting needs the onnxscript package: pip install 'blip3v[export]'") from None


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _to_onnx(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
             dynamic_shapes: dict[str, Any], opset: int, translations: dict | None = None) -> list[str]:
    """torch.onnx.export(dynamo=True) -> the file names written (the graph, maybe its external data)."""
    external = _param_bytes(module) > EXTERNAL_DATA_BYTES
    # The exporter prints its own progress to stdout and warns about torchvision/deprecations: both
    # dropped, so stdout stays clean for `--json`, --quiet is quiet, and the caller's bar and step
    # lines are the progress report (a failed export raises with its own message).
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_torch_logs():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
                                    verbose=False, optimize=True, custom_translation_table=translations)
        program.save(str(path), external_data=external)
    names = [path.name]
    if (path.parent / (path.name + ".data")).is_file():
        names.append(path.name + ".data")
    return names


@contextlib.contextmanager
def _quiet_torch_logs():
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check(name: str, got: np.ndarray, ref: np.ndarray, precision: str) -> float:
    """Max abs difference of `got` to the reference; raises naming the output when out of tolerance."""
    if got.shape != ref.shape:
        raise EngineError(f"export check failed: {name} has shape {got.shape}, the reference {ref.shape}")
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if got.size else 0.0
    bound = TOLERANCE[precision] * (1.0 if precision == "fp32" else max(1.0, float(np.abs(ref).max())))
    if not np.isfinite(diff) or diff > bound:
        raise EngineError(f"export check failed: {name} differs from the PyTorch reference by max abs "
                          f"{diff:.3g} (tolerance {bound:.3g} for {precision})")
    return diff


# ----------------------------------------------------------------------------------- visual


def export_visual(model: XGenMMVideoModel, path: Path, frames: int, opset: int) -> list[str]:
    cfg = model.config
    size = cfg.image_size
    dtype = next(model.parameters()).dtype
    example = torch.randn(2, frames, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    batch = torch.export.Dim("batch", min=1, max=4096)
    return _to_onnx(VisualGraph(model).eval(), (example,), path, ["pixel_values"], ["video_tokens"],
                    {"pixel_values": {0: batch}}, opset)


def visual_golden(model: XGenMMVideoModel, frames: int, batch: int = 2) -> dict[str, np.ndarray]:
    """Fresh random pixels and the float32 reference's video tokens for them."""
    g = torch.Generator().manual_seed(VALIDATION_SEED)
    size = model.config.image_size
    pixels = torch.randn(batch, frames, 3, size, size, generator=g)
    with torch.inference_mode():
        tokens = model.float().encode_video(pixels)
    return {"pixel_values": pixels.numpy(), "video_tokens": tokens.numpy()}


def check_visual(path: Path, golden: dict[str, np.ndarray], precision: str, dtype: np.dtype) -> float:
    out = _session(path).run(["video_tokens"], {"pixel_values": golden["pixel_values"].astype(dtype)})[0]
    return _check("visual.onnx output video_tokens", out.astype(np.float32), golden["video_tokens"], precision)


# ----------------------------------------------------------------------------------- decoder


def _decoder_io(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["inputs_embeds", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [KV_TEMPLATES["past_key"].format(layer=i), KV_TEMPLATES["past_value"].format(layer=i)]
        outputs += [KV_TEMPLATES["present_key"].format(layer=i), KV_TEMPLATES["present_value"].format(layer=i)]
    return inputs, outputs


def decoder_example(graph: DecoderGraph, dtype: torch.dtype, capacity: int = 9,
                    past_len: int = 2) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """Tracing inputs and their dynamic axes: batch 2, S=3 new tokens after `past_len` cached ones
    in a `capacity`-slot buffer; all distinct sizes so torch.export keeps every one symbolic."""
    b, s = 2, 3
    d = graph.layers[0].self_attn.o_proj.out_features
    n = len(graph.layers)
    embeds = torch.randn(b, s, d).to(dtype)
    mask = torch.ones(b, past_len + s, dtype=torch.long)
    positions = torch.arange(past_len, past_len + s).expand(b, s).contiguous()
    past = tuple(torch.zeros(b, graph.num_kv_heads, capacity, graph.head_dim, dtype=dtype) for _ in range(2 * n))
    B, S, L, C = (torch.export.Dim(name, min=1, max=1 << 20) for name in ("batch", "sequence", "total", "capacity"))
    dynamic = {"inputs_embeds": {0: B, 1: S}, "attention_mask": {0: B, 1: L}, "position_ids": {0: B, 1: S},
               "past": tuple({0: B, 2: C} for _ in range(2 * n))}
    return (embeds, mask, positions, *past), dynamic


def export_decoder(model: XGenMMVideoModel, path: Path, opset: int, attention: str = "gqa",
                   graph_cls: type[DecoderGraph] = DecoderGraph) -> list[str]:
    from blip3v.export import gqa, ort_ops

    graph = graph_cls(model, attention=attention).eval()
    args, dynamic = decoder_example(graph, next(model.parameters()).dtype)
    inputs, outputs = _decoder_io(len(graph.layers))
    return _to_onnx(graph, args, path, inputs, outputs, dynamic, opset,
                    {**gqa.translation_table(), **ort_ops.translation_table()} if attention == "gqa" else None)


def decoder_golden(model: XGenMMVideoModel, steps: int = VALIDATION_STEPS, prompt: int = 7,
                   pad: int = 3) -> dict[str, Any]:
    """A left-padded batch of 2 (row 1 has `pad` padding slots) of real token embeddings: a prefill and
    `steps` decode steps through the float32 reference with a transformers DynamicCache.
    -> {"embeds": [(B, S, D) per call], "logits": [(B, V+3) per call]}."""
    from transformers import DynamicCache

    model = model.float()
    g = torch.Generator().manual_seed(VALIDATION_SEED + 1)
    vocab = model.config.num_logits
    b = 2
    mask = torch.ones(b, prompt, dtype=torch.long)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.vlm.lang_model.config)
    calls, logits = [], []
    with torch.inference_mode():
        embeds = model.embed_tokens(torch.randint(0, vocab, (b, prompt), generator=g))
        step_pos = positions
        for _ in range(steps + 1):
            out, _ = model.decoder(embeds, attention_mask=mask, position_ids=step_pos, cache=cache,
                                   use_cache=True)
            calls.append(embeds.numpy().copy())
            logits.append(out[:, -1].numpy().copy())
            embeds = model.embed_tokens(torch.randint(0, vocab, (b, 1), generator=g))
            step_pos = positions[:, -1:] + 1
            positions = torch.cat([positions, step_pos], dim=1)
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
    return {"embeds": calls, "logits": logits, "mask": mask.numpy(), "prompt": prompt}


def check_decoder(path: Path, golden: dict[str, Any], precision: str, dtype: np.dtype,
                  kv_heads: int, head_dim: int, num_layers: int) -> float:
    """Runs the golden calls through the graph, feeding each call's presents back as the next pasts."""
    sess = _session(path)
    inputs, outputs = _decoder_io(num_layers)
    b = golden["embeds"][0].shape[0]
    full_mask = golden["mask"].astype(np.int64)  # (B, prompt + steps + 1)
    capacity = full_mask.shape[1] + 2  # spare slots: never written, must never be read
    cache = [np.full((b, kv_heads, capacity, head_dim), 1e4, dtype) for _ in range(2 * num_layers)]
    positions = np.clip(full_mask.cumsum(-1) - 1, 0, None)
    used, worst = 0, 0.0
    for step, (embeds, ref) in enumerate(zip(golden["embeds"], golden["logits"])):
        s = embeds.shape[1]
        feed = {"inputs_embeds": embeds.astype(dtype), "attention_mask": full_mask[:, :used + s],
                "position_ids": positions[:, used:used + s]}
        feed.update(zip(inputs[3:], cache))
        result = sess.run(outputs, feed)
        cache = result[1:]
        used += s
        label = "prefill" if step == 0 else f"decode step {step}"
        worst = max(worst, _check(f"decoder.onnx output logits ({label})", result[0].astype(np.float32), ref, precision))
    return worst


# ----------------------------------------------------------------------------------- tokenizer


PROBE_QUESTIONS = ("what colour does the square turn?", "Which way does the circle move, left or right?",
                   "How many  triangles are there? 3, 4 or 5!")


def export_tokenizer(model: XGenMMVideoModel, tokenizer, directory: Path) -> None:
    """Writes tokenizer.json and checks the torch-free PromptTokenizer against the checkpoint's."""
    from blip3v.runtime.tokenizer import PromptTokenizer

    cfg = model.config
    check_tokenizer(cfg, tokenizer)
    scratch = directory / ".tokenizer"
    tokenizer.save_pretrained(str(scratch))
    if not (scratch / TOKENIZER).is_file():
        raise EngineError(f"the checkpoint's tokenizer ({type(tokenizer).__name__}) writes no {TOKENIZER}; "
                          "an engine needs a fast tokenizer")
    os.replace(scratch / TOKENIZER, directory / TOKENIZER)
    shutil.rmtree(scratch)
    fast = PromptTokenizer(directory / TOKENIZER, cfg.prompt_template, cfg.system_prompt, cfg.special_token_ids)
    for q in PROBE_QUESTIONS:
        want = encode_prompt(cfg, tokenizer, q)
        got = fast.encode_prompt(q)
        if got != want:
            raise EngineError(f"{TOKENIZER} encodes the prompt differently from the checkpoint's tokenizer "
                              f"(question {q!r})")
        text = tokenizer.decode(want, skip_special_tokens=True).strip()
        if fast.decode(want) != text:
            raise EngineError(f"{TOKENIZER} decodes differently from the checkpoint's tokenizer ({text!r})")


def embedding_table(model: XGenMMVideoModel, dtype: np.dtype) -> np.ndarray:
    """(additional_vocab_start + 3, D): row i is what DecoupledEmbedding gives token id i."""
    emb = model.vlm.lang_model.model.embed_tokens
    start = model.config.additional_vocab_start
    base = emb.weight.detach()[:start].float().numpy()
    extra = emb.additional_embedding.weight.detach().float().numpy()
    return np.concatenate([base, extra]).astype(dtype)


# ----------------------------------------------------------------------------------- engine


def _check_out(out: Path) -> None:
    """`out` may be absent, empty or an engine directory (replaced); anything else is the user's."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise InputError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise InputError(f"{out} exists and is not an engine directory; choose a new --out")


def export_engine(model: XGenMMVideoModel, tokenizer, out: str | Path, *, frames: int | None = None,
                  precision: str = "fp32", opset: int = DEFAULT_OPSET, max_context: int | None = None,
                  attention: str = "gqa", source: str = "", log: Log | None = None,
                  bar: StepBar | PartBar | None = None) -> dict[str, Any]:
    """Exports, validates and writes an engine directory; returns the manifest.

    `model` must be float32 (the reference); for fp16 it is cast in place after the reference
    outputs are taken. `frames` (default: the config's) fixes T in the visual graph. `attention`
    "gqa" (ONNX Runtime's fused GroupQueryAttention, the fast choice for this runtime) or
    "standard" (plain ONNX ops, for TensorRT and other consumers); see export/graphs.py.
    `log` gets one line per finished step (its check's figures); `bar` (a blip3v.progress bar with
    the steps of EXPORT_STEPS, or a part of a larger one) moves as the steps finish.
    """
    log = log or (lambda _msg: None)
    bar = bar or null_bar(EXPORT_STEPS)
    _require_onnxscript()
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose {' or '.join(PRECISIONS)}")
    cfg = model.config
    frames = int(frames or cfg.num_frames)
    if frames < 1:
        raise InputError("--frames must be at least 1")
    model_context = int(cfg.text_config["max_position_embeddings"])
    max_context = int(max_context or model_context)
    if not 1 <= max_context <= model_context:
        raise InputError(f"--max-context must be in 1..{model_context} (the model's positions)")
    if attention not in ATTENTION:
        raise InputError(f"unknown attention {attention!r}; choose {' or '.join(ATTENTION)}")
    if opset < 18:
        raise InputError("--opset must be 18 or higher (the torch.onnx dynamo exporter's minimum)")
    out = Path(out)
    np_dtype = np.dtype("float16" if precision == "fp16" else "float32")
    model = model.float().eval()
    conf = model.vlm.lang_model.config
    num_layers = int(conf.num_hidden_layers)
    head_dim = int(getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads)
    kv_heads = int(conf.num_key_value_heads)

    if max_context <= cfg.num_video_tokens:
        raise InputError(f"--max-context must exceed the model's {cfg.num_video_tokens} video tokens")
    _check_out(out)

    with atomic_dir(out) as tmp:  # replaces `out` only when everything below succeeded
        with bar.step("tokenizer"):
            log(f"tokenizer and embedding table ({cfg.additional_vocab_start + cfg.num_additional_tokens} rows)")
            export_tokenizer(model, tokenizer, tmp)
            np.save(tmp / EMBEDDINGS, embedding_table(model, np_dtype))

        with bar.step("reference outputs"):  # float32 PyTorch on fresh random inputs
            vis_golden = visual_golden(model, frames)
            split_ref = split_golden(model, frames)  # frame.onnx / temporal.onnx (export/split.py)
            dec_golden = decoder_golden(model)
            if precision == "fp16":
                model = model.half()

        with bar.step(VISUAL):
            files = export_visual(model, tmp / VISUAL, frames, opset)
            vis_diff = check_visual(tmp / VISUAL, vis_golden, precision, np_dtype)
        log(f"{VISUAL} (T={frames}, {cfg.image_size}px, {precision}): video_tokens max abs diff {vis_diff:.2e}")
        with bar.step(f"{FRAME} + {TEMPORAL}"):  # the visual path split per frame, for live video
            files += export_split(model, tmp, frames, opset)
            split_diffs = check_split(tmp, split_ref, vis_golden, precision, np_dtype)
        log(f"{FRAME} + {TEMPORAL}: " + ", ".join(f"{k} {v:.2e}" for k, v in split_diffs.items()))

        with bar.step(DECODER):
            files += export_decoder(model, tmp / DECODER, opset, attention)
        with bar.step(f"{DECODER} check"):  # prefill + VALIDATION_STEPS cached decode steps
            dec_diff = check_decoder(tmp / DECODER, dec_golden, precision, np_dtype, kv_heads, head_dim, num_layers)
        log(f"{DECODER} ({num_layers} layers, {attention} attention on in-place KV buffers): logits max abs diff "
            f"{dec_diff:.2e} (prefill + {VALIDATION_STEPS} cached steps)")

        with bar.step("manifest"):  # hashes, the manifest, the TensorRT compatibility check
            files += [EMBEDDINGS, TOKENIZER]
            spec = EngineSpec(
                precision=precision,
                dtype=np_dtype.name,
                model=ModelSpec(
                    temporal_encoder=cfg.temporal_encoder_config.type,  # informational only
                    num_frames=frames, image_size=cfg.image_size,
                    image_mean=tuple(float(x) for x in cfg.image_mean),  # type: ignore[arg-type]
                    image_std=tuple(float(x) for x in cfg.image_std),  # type: ignore[arg-type]
                    num_video_tokens=int(vis_golden["video_tokens"].shape[1]), hidden_size=int(conf.hidden_size),
                    num_logits=int(cfg.num_logits), num_layers=num_layers,
                    num_attention_heads=int(conf.num_attention_heads), num_key_value_heads=kv_heads,
                    head_dim=head_dim, max_context=max_context, sliding_window=getattr(conf, "sliding_window", None)),
                visual=VisualSpec(file=VISUAL, pixel_values="pixel_values", video_tokens="video_tokens"),
                decoder=DecoderSpec(
                    file=DECODER, inputs_embeds="inputs_embeds", attention_mask="attention_mask",
                    position_ids="position_ids", logits="logits", attention=attention,
                    # Prefill from an empty cache, then 1 token per call: GQA refuses S > 1 after a
                    # non-empty cache for batch > 1, so the runtime never makes such calls.
                    calls="chunks",  # a chunk after a cached prefix (sessions; GQA at batch 1, see runtime)
                    kv_cache=KVCacheSpec(**KV_TEMPLATES,
                                         update="group_query_attention" if attention == "gqa" else "scatter_elements")),
                embeddings=EmbeddingsSpec(file=EMBEDDINGS, rows=cfg.additional_vocab_start + cfg.num_additional_tokens,
                                          dim=int(conf.hidden_size), dtype=np_dtype.name),
                tokenizer=TokenizerSpec(file=TOKENIZER, add_special_tokens=False, padding_side="left"),
                prompt=PromptSpec(template=cfg.prompt_template, system=cfg.system_prompt, image_token="<image>"),
                special_token_ids={k: int(v) for k, v in cfg.special_token_ids.items()},
                stop_token_ids=tuple(int(i) for i in stop_token_ids(cfg)),
                export={
                    "exporter": "torch.onnx.export(dynamo=True)",
                    "opset": opset,
                    "versions": _versions(),
                    "source": source,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "validation": {"tolerance": TOLERANCE[precision],
                                   "tolerance_rule": "max abs diff" if precision == "fp32" else "max abs diff / max(1, max |ref|)",
                                   "visual_max_abs_diff": vis_diff, "decoder_max_abs_diff": dec_diff,
                                   "decoder_steps": 1 + VALIDATION_STEPS, **split_diffs},
                },
                files={n: FileEntry(e["sha256"], e["bytes"]) for n, e in file_entries(tmp, files).items()},
                extra=manifest_sections(model, frames),  # optional `frame` / `temporal`: blip3v.runtime.live
            )
            manifest = seal(spec)  # checked by the reader's own code: what export writes, the runtime reads
            write_manifest(tmp, spec)
            # TensorRT compatibility, checked without TensorRT: a gqa export is ONNX Runtime-only by
            # design (the report says so); a standard export that TensorRT could not build fails here.
            from blip3v.export.trt_check import check_engine_dir

            trt_report = check_engine_dir(tmp)
            if attention == "gqa" and not trt_report.ok:
                log("TensorRT: not this engine (its decoder uses ONNX Runtime's fused kernels: "
                    "GroupQueryAttention, SimplifiedLayerNormalization, ...); export with "
                    "--attention standard for TensorRT")
            else:
                log(trt_report.summary())
            if attention == "standard":
                trt_report.raise_if_failed()
    log(f"engine written to {out}")
    return manifest


def preset_tokenizer(cfg) -> Any:
    """A word tokenizer laid out as the preset expects (`additional_vocab_start - 15` ordinary words
    before the 15 specials), for exporting random-weight presets in benchmarks and tests."""
    import re

    from blip3v.data.synth import question_words
    from blip3v.model.config import DEFAULT_SYSTEM, PHI3_SPECIAL_TOKENS
    from blip3v.model.tokenizer import BASE_SPECIALS, build_word_tokenizer

    want = cfg.additional_vocab_start - len(PHI3_SPECIAL_TOKENS) - len(BASE_SPECIALS)
    words = list(dict.fromkeys(w.lower() for w in re.findall(r"\w+|[^\w\s]", DEFAULT_SYSTEM) + question_words() + ["?"]))
    words = sorted(words)[:want]
    words += [f"w{i:05d}" for i in range(want - len(words))]
    return build_word_tokenizer(words)
