"""`blip3v eval`: exact-match accuracy of a model or engine on a synthetic QA folder."""

from __future__ import annotations

import json

import click

from blip3v.commands.ask import BACKENDS, open_backend, torch_options, video_options


@click.command("eval")
@click.option("--data", required=True, type=click.Path(file_okay=False),
              help="Folder from `blip3v data synth` (qa.jsonl + clips/).")
@click.option("--model", default=None, help="Checkpoint directory (PyTorch). Default: the shipped demo model.")
@click.option("--engine", default=None, help="Exported engine directory (ONNX Runtime by default).")
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help="Default: torch, or onnxruntime with --engine.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True,
              help="Where to run: auto = cuda when the backend sees a usable GPU, else cpu.")
@video_options
@torch_options
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Clips per batch.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N clips.")
@click.option("--predictions", type=click.Path(dir_okay=False), default=None,
              help="Also write every prediction to this JSONL file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help='Print {"accuracy", "per_category", "n", "seconds"} as JSON.')
def command(data, model, engine, backend, device, decoder, dtype, weights, group_size, batch_size, limit, predictions, quiet, as_json) -> None:
    """Greedy answers on every clip of DATA, scored by exact match (overall and per category)."""
    from blip3v.data.evaluate import evaluate

    runner = open_backend(model, engine, backend, device, dtype, decoder, weights, group_size)
    result = evaluate(runner, data, batch_size=batch_size, limit=limit, progress=not quiet)
    if predictions:
        with open(predictions, "w") as f:
            for p in result["predictions"]:
                f.write(json.dumps(p) + "\n")
    summary = {k: v for k, v in result.items() if k != "predictions"}
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"accuracy {summary['accuracy']:.4f} on {summary['n']} clips in {summary['seconds']:.1f} s")
    for cat, acc in summary["per_category"].items():
        click.echo(f"  {cat:<10} {acc:.4f}")
