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
    Presets are built on the meta device, so full-size ones cost no memory. For a checkpoint, the
    config and the weight index are validated, and tensor names of the authors' training code
    (`.gttm.`, `.ttm.`, `.tts.`, loaded as `.temporal_encoder.`) are counted under renamed_keys.
    """
    from blip3v.errors import InputError

    if not target.strip():  # Path("") is the current directory: say so instead of inspecting it
        raise InputError("PRESET_OR_DIR is empty: give a preset name or a checkpoint directory")
    from blip3v.model.checkpoint import build_meta_model, canonical_names, has_weights, load_config, read_weight_map
    from blip3v.model.config import preset
    from blip3v.model.xgenmm import count_parameters

    renamed: dict[str, int] = {}
    inferred: list[str] = []
    if Path(target).is_dir():
        directory = Path(target)
        (cfg, inferred), source = load_config(directory), "checkpoint"
        if has_weights(directory):
            renamed = canonical_names(read_weight_map(directory), directory)[1]
    else:
        cfg, source = preset(target), "preset"
    counts = count_parameters(build_meta_model(cfg, target))
    report = {
        "name": target,
        "source": source,
        "temporal_encoder": cfg.temporal_encoder_config.type,
        "num_frames": cfg.num_frames,
        "video_tokens": cfg.num_video_tokens,
        "image_size": cfg.image_size,
        "parameters": counts,
        "renamed_keys": renamed,
        "inferred": inferred,
        "config": cfg.to_dict(),
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{target} ({source}): temporal encoder {report['temporal_encoder']}, "
               f"{cfg.num_frames} frames at {cfg.image_size}px -> {cfg.num_video_tokens} video tokens")
    for part, n in counts.items():
        click.echo(f"  {part:<17} {n:>15,}")
    for note in inferred:
        click.echo(f"  inferred: {note}")
    if renamed:
        click.echo("  keys loaded as .temporal_encoder.: "
                   + ", ".join(f"{n:,} named .{alias}." for alias, n in renamed.items()))
