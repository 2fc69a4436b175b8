"""`blip3v live SOURCE`: answer questions about a live video (a stream URL, a camera or a file
played in real time), each frame encoded once as it arrives (blip3v.runtime.live)."""

from __future__ import annotations

import json
import sys
import time

import click

from blip3v.commands.ask import model_options, sampling_options, torch_options


def _key_value(_ctx, _param, values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _positive(_ctx, param, value):
    if value is not None and not (value > 0 and value < float("inf")):
        raise click.BadParameter("must be a positive number")
    return value


@click.command("live")
@click.argument("source")
@model_options
@torch_options
@sampling_options
@click.option("--fps", type=float, default=None, callback=_positive,
              help="Frames sampled per second of stream time (default 1, or T frames over --window).")
@click.option("--window", type=float, default=None, callback=_positive,
              help="Seconds the model's T frames span (sets --fps to T / WINDOW).")
@click.option("--question", "-q", default=None,
              help="Ask this question every --every seconds instead of reading stdin.")
@click.option("--every", type=float, default=5.0, show_default=True, callback=_positive,
              help="Seconds between two --question answers.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Stop after this many answers (default: until the source or stdin ends).")
@click.option("--realtime/--no-realtime", default=None,
              help="Pace frames by their timestamps (default for files; a stream or camera comes at its own "
                   "pace, but an HLS recording on a server may need it); --no-realtime reads a file as fast "
                   "as it is encoded, dropping nothing.")
@click.option("--reconnect", type=click.IntRange(min=0), default=5, show_default=True,
              help="Reopen attempts in a row (exponential backoff from 0.5 s) after a stream or camera drops.")
@click.option("--timeout", type=float, default=10.0, show_default=True, callback=_positive,
              help="Seconds to wait for a network stream to open or to deliver data.")
@click.option("--format", "fmt", default=None, help="Force the demuxer (e.g. v4l2, mpegts, hls).")
@click.option("--option", "options", multiple=True, callback=_key_value, metavar="KEY=VALUE",
              help="FFmpeg option for the source (repeatable), e.g. rtsp_transport=udp or video_size=640x480.")
@click.option("--queue", type=click.IntRange(min=1), default=None,
              help="Sampled frames that may wait for the encoder before the oldest is dropped (default T).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object per answer: {question, window: [t0, t1], answer, frames, finish_reason, "
                   "timings_ms, frames_seen, frames_sampled, frames_encoded, frames_dropped}.")
def command(source, model, engine, backend, device, decoder, dtype, weights, group_size, max_new_tokens, temperature,
            top_p, seed, fps, window, question, every, count, realtime, reconnect, timeout, fmt, options, queue,
            as_json) -> None:
    """Answer questions about a live SOURCE: a stream URL (rtsp, rtmp, http(s)/HLS, udp, tcp, srt),
    a camera (/dev/videoN) or a video file played in real time.

    Sampled frames are encoded as they arrive; a question runs only the temporal encoder over the
    last T frames, the prefill and the decode, and says which stream seconds it covers. Questions
    come from stdin, one a line, or --question every --every seconds.

    \b
    Examples:
      blip3v live rtsp://camera.local/stream --engine engines/demo --question "what happens?" --every 10
      blip3v live /dev/video0 --engine engines/demo --window 8 --json
      echo "what colour does the square turn?" | blip3v live clip.mp4 --engine engines/demo --window 2
    """
    from blip3v.commands.ask import open_engine
    from blip3v.errors import InputError
    from blip3v.runtime.generation import SamplingConfig
    from blip3v.runtime.live import LiveSession, Source, SourceOptions
    from blip3v.runtime.session import check_question, read_questions

    if fps is not None and window is not None:
        raise InputError("give --fps or --window, not both")
    if question is not None:
        check_question(question)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    sampling.validate()
    src = Source(source, SourceOptions(format=fmt, options=options, realtime=realtime, reconnect=reconnect,
                                       timeout=timeout))  # checks the path / scheme before a model loads
    runner = open_engine(model, engine, backend, device, dtype, decoder, weights, group_size, spinning=False)

    def show(answer) -> None:
        if as_json:
            click.echo(json.dumps(answer.to_json()))
        else:
            t0, t1 = answer.window
            click.echo(f"[{t0:.1f}s-{t1:.1f}s] {answer.text}")
        sys.stdout.flush()

    with LiveSession(runner, fps=fps or 1.0, window=window, queue=queue) as live:
        live.play(src)
        if question is None:
            for asked, line in enumerate(read_questions(sys.stdin), start=1):
                show(live.ask(line, sampling))
                if count is not None and asked >= count:
                    break
            return
        answers = 0
        deadline = time.monotonic() + every
        while count is None or answers < count:
            live.wait_until(deadline)
            live.wait_ready()  # raises what stopped the source (a stream that could not be reopened)
            if live.ended and answers and not live.new_frames:
                break  # a file that ended: its last window has been answered
            show(live.ask(question, sampling))
            answers += 1
            if live.ended:
                break
            deadline = max(deadline + every, time.monotonic())
