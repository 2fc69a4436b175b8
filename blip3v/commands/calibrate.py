"""`blip3v calibrate`: quantize an fp32 engine for the edge (INT8 visual graph, INT4/INT8 decoder weights)."""

from __future__ import annotations

import json

import click


@click.command("calibrate")
@click.option("--engine", required=True, type=click.Path(file_okay=False), help="fp32 engine directory (blip3v export).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New engine directory to write.")
@click.option("--videos", type=click.Path(file_okay=False), default=None,
              help="Folder of calibration videos (any the runtime reads). Default: synthetic clips.")
@click.option("--visual", type=click.Choice(["int8", "fp16", "fp32"]), default="int8", show_default=True,
              help="Visual graphs (visual.onnx, and frame.onnx of live mode where the engine has it): int8 Q/DQ "
                   "calibrated on frames, or left as exported.")
@click.option("--decoder", type=click.Choice(["int4", "int8", "fp16", "fp32"]), default="int4", show_default=True,
              help="Decoder weights: weight-only int4/int8 (MatMulNBits), or left as exported.")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="percentile",
              show_default=True,
              help="How the visual activation ranges are chosen (ORT's MinMax, Entropy or Percentile calibrator).")
@click.option("--weights", "weight_method", type=click.Choice(["awq", "rtn"]), default="awq", show_default=True,
              help="Decoder scales: activation-aware (awq) or round-to-nearest (rtn).")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32", show_default=True,
              help="Weight-only quantization block along K.")
@click.option("--accuracy-level", type=click.Choice(["0", "1", "2", "3", "4"]), default="0", show_default=True,
              help="MatMulNBits compute type (0: as the graph, 4: int8 activations, faster on CPUs with VNNI).")
@click.option("--samples", type=click.IntRange(min=1), default=32, show_default=True, help="Calibration clips.")
@click.option("--keep", type=click.IntRange(min=0), default=2, show_default=True,
              help="Most sensitive layers of each visual graph kept in float (0 skips the per-layer pass).")
@click.option("--eval-data", type=click.Path(file_okay=False), default=None,
              help="Held-out folder (blip3v data synth) for the agreement check. Default: 200 synthetic clips.")
@click.option("--eval-n", type=click.IntRange(min=1), default=200, show_default=True,
              help="Synthetic held-out clips when no --eval-data is given.")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Also write the full report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar or log lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (no progress bar either).")
def command(engine, out, videos, visual, decoder, method, weight_method, block_size, accuracy_level, samples, keep,
            eval_data, eval_n, report, quiet, as_json) -> None:
    """Quantize ENGINE into OUT, calibrated on video frames and on prompts that carry video tokens.

    \b
    Q/DQ insertion, calibration statistics and INT4/INT8 packing are ONNX Runtime's
    (onnxruntime.quantization); the activation-aware decoder scales are this project's. An engine
    with the split visual path (frame.onnx, for `blip3v live`) gets its per-frame graph in INT8 too.
    The report gives size on disk before/after, cosine similarity against fp32, per-layer errors,
    answer agreement with the fp32 engine on held-out clips (and, for awq, what round-to-nearest
    would have given), and each quantized graph timed against its fp32 original on the same
    inputs, flagged when slower. A progress bar with an ETA goes to stderr.
    Example:
      blip3v calibrate --engine engines/demo --out engines/demo-w4v8 --report w4v8.json
    """
    from blip3v.calibration.calibrate import CalibrateOptions, calibrate_engine, summary

    opts = CalibrateOptions(visual=visual, decoder=decoder, method=method, weights=weight_method,
                            block_size=int(block_size), accuracy_level=int(accuracy_level), samples=samples,
                            keep=keep, eval_n=eval_n)
    quiet = quiet or as_json
    result = calibrate_engine(engine, out, videos, opts, eval_data=eval_data, progress=not quiet)
    if report:
        from pathlib import Path

        path = Path(report)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"wrote {out}")
    for line in summary(result):
        click.echo(line)
