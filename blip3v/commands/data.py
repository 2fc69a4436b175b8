"""`blip3v data`: make datasets. `blip3v data synth --out runs/val --n 200 --seed 1` writes
synthetic shape clips (mp4), questions and answers (see blip3v/data/synth.py for what they contain).

Parses and displays only; the generator is imported inside the command.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from blip3v.errors import InputError


@click.group("data")
def command() -> None:
    """Make datasets for training and evaluation."""


@command.command("synth")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Folder to create: clips/NNNNN.mp4, qa.jsonl and meta.json go inside.")
@click.option("--n", "n", required=True, type=int, help="Number of clips (one question each).")
@click.option("--seed", required=True, type=int,
              help="Random seed: the same seed gives identical files; use different seeds for train/val/test.")
@click.option("--size", default=128, show_default=True, type=int,
              help="Canvas width and height in pixels (even).")
@click.option("--frames", "num_frames", default=24, show_default=True, type=int,
              help="Frames per clip.")
@click.option("--model-frames", default=8, show_default=True, type=int,
              help="Frames the model samples per clip; events are placed between these.")
@click.option("--fps", default=12, show_default=True, type=int,
              help="Frame rate written into the mp4 files.")
@click.option("--categories", default=None, metavar="LIST",
              help="Comma-separated subset of colour,shape,count,direction,change,order (default: all, uniform).")
@click.option("--force", is_flag=True, help="Replace --out if it already exists and is not empty.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def synth(out: Path, n: int, seed: int, size: int, num_frames: int, model_frames: int, fps: int,
          categories: str | None, force: bool, quiet: bool, as_json: bool) -> None:
    """Write a synthetic video-QA dataset of coloured shapes (deterministic by --seed)."""
    from blip3v.data import synth as synth_lib

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise InputError(f"{out} already exists and is not empty; pass --force to replace it")
    cats = None if categories is None else [c.strip() for c in categories.split(",") if c.strip()]
    start = time.perf_counter()
    path = synth_lib.write_dataset(out, n, seed, categories=cats, size=size, num_frames=num_frames,
                                   model_frames=model_frames, fps=fps, progress=not quiet, overwrite=force)
    seconds = time.perf_counter() - start
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    if as_json:
        click.echo(json.dumps({"out": str(path), **meta, "seconds": round(seconds, 2)}))
        return
    click.echo(f"wrote {meta['n']} clips ({meta['size']}x{meta['size']}, {meta['num_frames']} frames "
               f"at {meta['fps']} fps, seed {meta['seed']}) in {seconds:.1f}s")
    for cat, count in meta["counts"].items():
        click.echo(f"  {cat:<10} {count}")
    click.echo(f"  -> {path}")
