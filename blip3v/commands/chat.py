"""`blip3v chat VIDEO`: a multi-turn conversation about a video, questions read line by line.

Works from a terminal (a `> ` prompt on stderr) and from a pipe (`printf 'q1\\nq2\\n' | blip3v chat
clip.mp4 --json`). The clip is encoded once and the conversation's KV cache grows turn by turn.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from blip3v.commands.ask import answer_json, check_video_arg, model_options, open_engine, sampling_options, torch_options


@click.command("chat")
@click.argument("video", type=click.Path(dir_okay=False, path_type=Path))
@model_options
@torch_options
@sampling_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per turn (as `blip3v ask --json`).")
def command(video: Path, model, engine, backend, device, decoder, dtype, weights, group_size, max_new_tokens,
            temperature, top_p, seed, as_json: bool) -> None:
    """Chat about VIDEO: each line of standard input is a question; each answer sees the earlier turns.

    \b
    Examples:
      blip3v chat clip.mp4 --engine engines/demo
      printf 'what colour is the square?\\nand the circle?\\n' | blip3v chat clip.mp4 --json
    """
    from blip3v.errors import InputError
    from blip3v.runtime.generation import SamplingConfig
    from blip3v.runtime.session import read_questions

    check_video_arg(video)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    sampling.validate()
    runner = open_engine(model, engine, backend, device, dtype, decoder, weights, group_size)
    chat = runner.clip(video).chat()
    interactive = sys.stdin.isatty()
    stream = sys.stdin
    if interactive:
        click.echo("> ", err=True, nl=False)
    try:
        for question in read_questions(stream):
            try:
                if as_json:
                    click.echo(json.dumps(answer_json(question, chat.ask(question, sampling))))
                else:
                    chat.ask(question, sampling, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
                    sys.stdout.write("\n")
                    sys.stdout.flush()
            except InputError as exc:
                if not interactive:
                    raise
                click.echo(f"error: {exc}", err=True)  # a terminal user can ask again
            if interactive:
                click.echo("> ", err=True, nl=False)
    except UnicodeDecodeError:
        raise InputError("standard input is not valid UTF-8") from None
