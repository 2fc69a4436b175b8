"""`blip3v export --model DIR --out ENGINE_DIR`: ONNX graphs + manifest for the ONNX Runtime backend."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("export")
@click.option("--model", "model_dir", type=click.Path(path_type=str), default=None,
              help="Checkpoint directory or Hub model id ORG/NAME to export (a local directory of the same "
                   "name wins). Default: the shipped demo model (unless --preset).")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub --model ORG/NAME. Default: main.")
@click.option("--preset", default=None,
              help="Export a preset with random weights instead (benchmarks and tests), e.g. tiny-gttm.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Engine directory to write (replaced atomically if it already holds an engine).")
@click.option("--frames", type=click.IntRange(min=1), default=None,
              help="Frames per clip baked into visual.onnx. Default: the model's.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weights and activations of the graphs (fp16 is checked with a looser tolerance).")
@click.option("--opset", type=click.IntRange(min=18), default=18, show_default=True,
              help="ONNX opset of the exported graphs.")
@click.option("--max-context", type=click.IntRange(min=1), default=None,
              help="Longest prompt + answer the runtime accepts. Default: the model's max positions.")
@click.option("--attention", type=click.Choice(["gqa", "standard"]), default="gqa", show_default=True,
              help="Decoder attention: gqa = ONNX Runtime's fused GroupQueryAttention on the in-place KV "
                   "buffers (fastest here, ORT only); standard = plain ONNX ops (TensorRT, other runtimes).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights for --preset.")
@click.option("--quiet", is_flag=True, help="Nothing on stderr: no progress bar, no step lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON when done (step lines, no bar).")
def command(model_dir, revision, preset, out: Path, frames, precision, opset, max_context, attention, seed,
            quiet: bool, as_json: bool) -> None:
    """Export a checkpoint (or a random-weight preset) to an engine directory.

    \b
    Writes visual.onnx, decoder.onnx, embed_tokens.npy, tokenizer.json and manifest.json, each
    graph checked against the PyTorch reference right after export. A progress bar with an ETA
    (not with --json) and one line per checked graph go to stderr; --quiet silences both.
    Examples:
      blip3v export --model runs/demo --out engines/demo
      blip3v export --model Salesforce/xgen-mm-vid-phi3-mini-r-v1.5-128tokens-8frames --out engines/xgen-mm-vid-128
      blip3v export --preset tiny-gttm --out /tmp/tiny --json
    """
    from blip3v.errors import InputError

    if model_dir is not None and not model_dir.strip():  # "" would otherwise fall back to the demo model
        raise InputError("--model is empty: give a checkpoint directory (or leave it out for the demo model)")

    if model_dir and preset:
        raise InputError("give either --model or --preset, not both")
    if revision is not None and not model_dir:
        raise InputError("--revision selects a version of a Hub model: give --model ORG/NAME")
    directory, source = None, ""
    if not preset:  # a Hub id is resolved (or refused) before torch is imported
        from blip3v.assets import DEMO_MODEL
        from blip3v.model.hub import checkpoint_source, resolve_checkpoint

        directory = resolve_checkpoint(model_dir or DEMO_MODEL, revision)
        source = checkpoint_source(model_dir or DEMO_MODEL, directory)

    show = not (quiet or as_json)  # the bar
    from blip3v.progress import StepBar

    # one bar over loading (torch's imports included) and export_engine's own steps (EXPORT_STEPS)
    with StepBar({"loading": 12.0}, desc="export", enabled=show) as bar:  # seconds, as EXPORT_STEPS
        with bar.step("loading"):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # transformers' own bars: silent with --quiet, under ours otherwise
            from blip3v.export.engine import EXPORT_STEPS, export_engine

            bar.add(EXPORT_STEPS)
            model, tokenizer, source = _load(preset, seed, source, directory)
        manifest = export_engine(model, tokenizer, out, frames=frames, precision=precision, opset=opset,
                                 max_context=max_context, attention=attention, source=source,
                                 log=None if quiet else bar.write, bar=bar)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
    else:
        v = manifest["export"]["validation"]
        click.echo(f"{out}: {manifest['model']['num_video_tokens']} video tokens, {precision}; max abs diff "
                   f"visual {v['visual_max_abs_diff']:.2e}, decoder {v['decoder_max_abs_diff']:.2e}")


def _load(preset, seed, source, directory):
    """-> (float32 model, tokenizer, source): a random-weight preset or the checkpoint in `directory`."""
    import torch

    from blip3v.export.engine import preset_tokenizer

    if preset:
        from blip3v.model.config import preset as preset_config
        from blip3v.model.xgenmm import XGenMMVideoModel

        cfg = preset_config(preset)
        torch.manual_seed(seed)
        model, tokenizer, source = XGenMMVideoModel(cfg).eval(), preset_tokenizer(cfg), f"preset:{preset}"
    else:
        from blip3v.model.checkpoint import load_checkpoint, load_tokenizer

        model, tokenizer = load_checkpoint(directory), load_tokenizer(directory)
    return model, tokenizer, source
