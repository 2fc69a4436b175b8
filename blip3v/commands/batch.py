"""`blip3v batch`: answer questions about every clip of a corpus, results in a Parquet or JSONL table.

On one machine (the default) worker processes decode and sample clips ahead of the engine, which
answers in this process; `--ray` runs the same stages as a Ray Data pipeline (local, or a cluster
with `--ray-address`). A rerun with the same --out skips the rows already written. The work is in
blip3v.runtime.batch and blip3v.runtime.batch_ray; this module only parses and displays.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from blip3v.commands.ask import model_options, open_engine, sampling_options, torch_options


@click.command("batch")
@click.option("--videos", required=True, metavar="FOLDER|GLOB|LIST",
              help="A folder (searched recursively for videos), a quoted glob ('clips/**/*.mp4'), one video, or a "
                   ".jsonl/.csv/.parquet list with a `video` (or `path`) column and an optional `question` column; "
                   "relative paths in a list are under the list's folder.")
@click.option("-q", "--question", "questions", multiple=True,
              help="A question to ask about every video (repeatable); adds to a list's per-row questions.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Results table, FILE.parquet or FILE.jsonl: one row per (video, question). A rerun with the same "
                   "--out skips the rows already in it.")
@model_options
@torch_options
@sampling_options
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decoding processes (without --ray). Default: CPU cores - 1, at most 8; 0 decodes in the main "
                   "process.")
@click.option("--in-flight", type=click.IntRange(min=1), default=None,
              help="Clips decoded ahead of the engine (without --ray). Default: 2 per worker.")
@click.option("--retry-errors", is_flag=True, help="Redo the rows of --out that have an error (by default a rerun "
                                                   "skips them like any other row already done).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run as a Ray Data pipeline (pip install 'blip3v[batch]'): a local Ray unless --ray-address.")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="An existing Ray cluster (HOST:PORT, ray://HOST:PORT or auto); implies --ray.")
@click.option("--ray-actors", type=click.IntRange(min=1), default=1, show_default=True,
              help="Engine actors (each loads the model once).")
@click.option("--ray-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Clips per decoding task and per call of an engine actor.")
@click.option("--ray-decode-cpus", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="CPUs reserved per decoding task.")
@click.option("--ray-actor-cpus", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="CPUs reserved per engine actor.")
@click.option("--ray-actor-gpus", type=click.FloatRange(min=0), default=None,
              help="GPUs per engine actor (fractions share a GPU). Default: 1 with --device cuda or tensorrt, and "
                   "with --device auto where the cluster has GPUs; else 0 (and --device auto runs on the CPU).")
@click.option("--ray-actor-memory", type=click.FloatRange(min=0, min_open=True), default=None, metavar="GIB",
              help="Memory each engine actor reserves, GiB. Default: the model's files + 1 GiB.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True,
              help='Print the summary as JSON: {"rows", "errors", "skipped", "clips", "seconds", "clips_per_s", '
                   '"rows_per_s", "decoder_restarts", "out"}.')
def command(videos: str, questions: tuple[str, ...], out: Path, model, engine, backend, device, decoder, dtype,
            weights, group_size, max_new_tokens, temperature, top_p, seed, workers, in_flight, retry_errors,
            use_ray, ray_address, ray_actors, ray_batch_size, ray_decode_cpus, ray_actor_cpus, ray_actor_gpus,
            ray_actor_memory, quiet, as_json) -> None:
    """Answer every --question about every video of --videos, into a table (--out).

    Each row: video, question, answer, error (a clip that cannot be read gets error rows and the run
    goes on), finish_reason, per-stage timings in ms (decode_video, visual: on a clip's first row;
    prefill, generate) and token counts. Answers are those of `blip3v ask` on the same clip.

    \b
    Examples:
      blip3v batch --videos runs/val/qa.jsonl --out answers.parquet --engine engines/demo
      blip3v batch --videos 'corpus/**/*.mp4' -q "what happens?" -q "how many shapes are there?" --out qa.jsonl
      blip3v batch --videos list.parquet -q "what happens?" --out qa.parquet --engine /shared/eng \\
          --device cuda --ray-address auto --ray-actors 8
    """
    from blip3v.commands.ask import REVISION_KEY, VIDEO_KEY
    from blip3v.errors import InputError
    from blip3v.runtime import batch
    from blip3v.runtime.generation import SamplingConfig

    meta = click.get_current_context().meta  # --revision and the video options (see model_options)
    revision, video_options = meta.get(REVISION_KEY), dict(meta.get(VIDEO_KEY) or {})
    torch_opts = {"dtype": dtype, "decoder": decoder, "weights": weights, "group_size": group_size}

    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    sampling.validate()
    if Path(videos).exists() and Path(videos).resolve() == out.resolve():
        raise InputError(f"--out {out} is the --videos list itself; write the results elsewhere")
    wanted = batch.read_videos(videos, questions)
    with batch.Results(out, retry_errors=retry_errors) as results:
        # The model's frame sampling, from its files: checks --model / --engine before any work starts.
        settings = batch.video_settings(model, engine, backend, revision, video_options, **torch_opts)
        tasks = batch.plan(wanted, results.done)
        skipped = sum((v, q) in results.done for v, qs in wanted.items() for q in qs)
        if use_ray or ray_address:
            from blip3v.runtime.batch_ray import run_ray

            # Actors open the model on any node: local paths made absolute (valid where the file system
            # is shared); a Hub id stays as it is and resolves on each node.
            options = {"model": _absolute(model), "engine": _absolute(engine), "backend": backend, "device": device,
                       "revision": revision, "spinning": False, **torch_opts}  # decoding runs beside it
            summary = run_ray(tasks, settings, options, sampling, results, address=ray_address, actors=ray_actors,
                              batch_size=ray_batch_size, decode_cpus=ray_decode_cpus, actor_cpus=ray_actor_cpus,
                              actor_gpus=ray_actor_gpus, progress=not quiet,
                              actor_memory=None if ray_actor_memory is None else int(ray_actor_memory * 2**30))
        else:
            summary = batch.run_local(
                tasks, settings, lambda: open_engine(model, engine, backend, device, dtype, decoder, weights, group_size,
                                                   spinning=False, parallel_clips=True),
                sampling, results, workers=workers, in_flight=in_flight, progress=not quiet)
        results.finish(batch.input_order(wanted))
    summary.skipped = skipped
    if as_json:
        click.echo(json.dumps(summary.as_dict()))
        return
    click.echo(f"{summary.rows} rows ({summary.errors} errors) for {summary.clips} clips in {summary.seconds:.1f} s "
               f"({summary.clips_per_s:.2f} clips/s); {summary.skipped} rows were already done -> {summary.out}")


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path and os.path.exists(path) else path
