"""`blip3v build --engine DIR`: TensorRT 10 plans (visual.plan, decoder.plan) from an exported engine directory."""

from __future__ import annotations

import json

import click


@click.command("build")
@click.option("--engine", "engine_dir", type=click.Path(path_type=str), required=True,
              help="Engine directory from `blip3v export --attention standard`; plans are written into it.")
@click.option("--precision", type=click.Choice(["fp16", "bf16", "int8", "fp8"]), default="fp16", show_default=True,
              help="fp16/bf16 keep norms and softmax in FP32; int8/fp8 need a graph with Q/DQ nodes.")
@click.option("--workspace", type=click.FloatRange(min=0.125), default=4.0, show_default=True,
              help="Builder workspace limit in GB (Orin Nano: 1-2).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Timing cache file, loaded and saved (default: ENGINE/timing.cache); shared across builds.")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Largest batch the profiles cover.")
@click.option("--max-context", type=click.IntRange(min=1), default=None,
              help="Longest prompt + answer (default: the manifest's max_context).")
@click.option("--rebuild", is_flag=True, help="Build even if plans exist, replacing ones built elsewhere.")
@click.option("--check-only", is_flag=True, help="Only check the graphs against TensorRT 10's ONNX parser "
                                                 "(no TensorRT needed).")
@click.option("--json", "as_json", is_flag=True, help="Print the check report / build record as JSON.")
def command(engine_dir: str, precision: str, workspace: float, timing_cache: str | None, max_batch: int,
            max_context: int | None, rebuild: bool, check_only: bool, as_json: bool) -> None:
    """Build TensorRT engines for an exported engine directory (or only check that they would build).

    \b
    Examples:
      blip3v build --engine engines/demo --check-only
      blip3v build --engine engines/demo --precision fp16 --max-batch 4
    """
    from blip3v.export.trt_check import check_engine_dir

    report = check_engine_dir(engine_dir, max_batch, max_context, precision)
    if check_only:
        if as_json:
            click.echo(json.dumps(report.to_json(), indent=2))
        else:
            click.echo(report.summary())
        report.raise_if_failed()
        return
    from blip3v.export.trt_build import build_engines

    section = build_engines(engine_dir, precision, workspace, timing_cache, max_batch, max_context, rebuild,
                            log=lambda msg: click.echo(msg, err=True))
    click.echo(json.dumps(section, indent=2) if as_json else
               f"{engine_dir}: {', '.join(section['plans'].values())} ({section['precision']}, "
               f"TensorRT {section['tensorrt_version']}, {section['gpu']})")
