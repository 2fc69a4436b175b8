"""`blip3v train`: train a small model of the released architecture on synthetic video QA."""

from __future__ import annotations

import json

import click


@click.command("train")
@click.option("--preset", default="demo", show_default=True,
              help="Task preset: `demo` (gttm, 16 tokens) or an ablation preset such as task-tl-16, "
                   "task-mean-16, task-none-128.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Checkpoint directory (released layout). Re-running resumes from its trainer_state.json (+ .safetensors).")
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="Train on a folder from `blip3v data synth`. Default: clips generated on the fly "
                   "from training seeds (>= 1,000,000) that evaluation seeds never use.")
@click.option("--steps", type=click.IntRange(min=1), default=3000, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Clips per step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Peak learning rate (linear warm-up, cosine decay).")
@click.option("--questions", type=click.IntRange(min=1), default=4, show_default=True,
              help="Questions per generated clip: its own plus up to N-1 colour/shape/count questions the "
                   "scene also answers; they share the clip's vision pass. Folders (--data) give one.")
@click.option("--categories", default=None, metavar="LIST",
              help="Comma-separated question categories of the generated clips (colour, shape, count, direction, "
                   "change, order). Default: all, uniformly.")
@click.option("--seed", type=int, default=0, show_default=True, help="Initialisation and data-stream seed.")
@click.option("--position-gain", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="From-scratch init only: scale the vision tower's position embeddings by this. 4 keeps a "
                   "moving shape's direction readable through the resampler at init (linear probe 0.43 -> "
                   "0.79); the shipped demo used 1 (see benchmarks/RESULTS.md).")
@click.option("--layout-loss", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of an auxiliary loss that makes the resampler keep where things are: a training-only "
                   "head predicts each frame's coarse layout (non-background share per 8x8-pixel cell) from its "
                   "latents. Not saved in the checkpoint. Generated clips only.")
@click.option("--save-every", type=click.IntRange(min=1), default=500, show_default=True,
              help="Write a resumable checkpoint every N steps.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the model trains. Data is rendered on the CPU by --workers processes.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Loader processes rendering clips (about 6 ms a clip each; a GPU step wants several).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the training summary as JSON.")
def command(preset, out, data, steps, batch_size, lr, questions, categories, seed, position_gain, layout_loss,
            save_every, device, workers, quiet, as_json) -> None:
    """Train PRESET into OUT on synthetic video QA (answer-only loss), resumably."""
    from blip3v.model.trainer_state import refuse_legacy

    refuse_legacy(out)  # before the heavy imports: an old pickled trainer_state.pt is refused at once

    from blip3v.data.synth import CATEGORIES
    from blip3v.errors import InputError
    from blip3v.model.train import TrainConfig, train

    if categories is not None:
        categories = tuple(c.strip() for c in categories.split(",") if c.strip())
        bad = [c for c in categories if c not in CATEGORIES]
        if bad or not categories:
            raise InputError(f"--categories: {', '.join(bad) or 'none given'}; choose from {', '.join(CATEGORIES)}")

    summary = train(preset, out, TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, questions=questions,
                                              position_gain=position_gain, categories=categories,
                                              layout_loss=layout_loss,
                                              save_every=save_every), progress=not quiet,
                    log=lambda m: click.echo(m, err=True), data=data, device=device, workers=workers)
    if as_json:
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    else:
        click.echo(f"trained {summary['preset']} for {summary['steps']} steps in {summary['seconds']:.0f} s "
                   f"(final loss {summary['final_ema_loss']:.4f}) -> {out}")
