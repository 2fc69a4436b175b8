"""`blip3v inspect PRESET_OR_DIR`: the config and parameter counts of a preset or checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("inspect")
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (config + parameters).")
def command(target: str, as_json: bool) -> None:
    """Show the config and parameter counts of PRESET_OR_DIR.

    PRESET_OR_DIR is a preset name (e.g. xgen-mm-vid-128, tiny-gttm) or a checkpoint directory.
    Presets are built on the meta device, so full-size ones cost no memory.
    """
    import torch

    from blip3v.model.config import XGenMMConfig, preset
    from blip3v.model.xgenmm import XGenMMVideoModel, count_parameters

    if Path(target).is_dir():
        cfg, source = XGenMMConfig.load(target), "checkpoint"
    else:
        cfg, source = preset(target), "preset"
    with torch.device("meta"):
        counts = count_parameters(XGenMMVideoModel(cfg))
    report = {
        "name": target,
        "source": source,
        "temporal_encoder": cfg.temporal_encoder_config.type,
        "num_frames": cfg.num_frames,
        "video_tokens": cfg.num_video_tokens,
        "image_size": cfg.image_size,
        "parameters": counts,
        "config": cfg.to_dict(),
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{target} ({source}): temporal encoder {report['temporal_encoder']}, "
               f"{cfg.num_frames} frames at {cfg.image_size}px -> {cfg.num_video_tokens} video tokens")
    for part, n in counts.items():
        click.echo(f"  {part:<17} {n:>15,}")
