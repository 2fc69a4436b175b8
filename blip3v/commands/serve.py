"""`blip3v serve`: answer video questions over HTTP, as OpenAI's chat-completions API.

The model loads once; clips and their prompt prefixes are reused across requests (the Engine's clip
cache). Bound to 127.0.0.1 unless --host says otherwise. See blip3v.runtime.server for the threads
and limits, blip3v.runtime.openai_api for what a request may hold, README.md "Server" for examples.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from blip3v.commands.ask import model_options, open_engine, torch_options


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("serve")
@model_options
@torch_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes the server: set --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on; 0 picks a free one (the URL is printed at start).")
@click.option("--media-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory whose files requests may name as a video_url/image_url path (nothing outside it, "
                   "no '..', symlinks only when they resolve inside). Default: no file paths.")
@click.option("--allow-remote", is_flag=True, help="Let requests give http(s) URLs, fetched by the server.")
@click.option("--api-key", envvar="BLIP3V_API_KEY", default=None, show_envvar=True,
              help="Require `Authorization: Bearer KEY` on /v1/* (also read from BLIP3V_API_KEY).")
@click.option("--max-queue", type=click.IntRange(0, 100_000), default=32, show_default=True,
              help="Requests that may wait while one runs; one more gets 429 with Retry-After.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=86_400), default=120.0,
              show_default=True, help="Seconds a request may take, queue included; then 504 and the generation stops.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True, max=4096), default=64.0,
              show_default=True, help="Largest request body (and media file or download), in MiB; larger gets 413.")
@click.option("--served-model-name", default="blip3v", show_default=True,
              help="The model id clients pass as `model` (GET /v1/models lists it).")
@click.option("--cache-mb", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Memory for cached clips (their video tokens and KV caches), in MiB; least recently used go first.")
@click.option("--access-log", is_flag=True, help="Log every request on stderr.")
def command(model, engine, backend, device, decoder, dtype, weights, group_size, host: str, port: int,
            media_root: Path | None, allow_remote: bool, api_key: str | None, max_queue: int, timeout: float,
            max_upload_mb: float, served_model_name: str, cache_mb: int, access_log: bool) -> None:
    """Serve the model as an OpenAI-compatible API: POST /v1/chat/completions (video_url / image_url parts,
    streaming), GET /v1/models, /health, /metrics.

    \b
    Examples:
      blip3v serve --engine engines/demo --media-root clips
      BLIP3V_API_KEY=secret blip3v serve --engine engines/demo --host 0.0.0.0 --port 8000
    """
    import math

    from blip3v.errors import InputError

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as exc:
        raise InputError(f"blip3v serve needs {exc.name}, which is not installed: pip install 'blip3v[serve]'") from None
    from blip3v.runtime.server import ServeConfig, serve

    if api_key is not None and not api_key.strip():
        raise InputError("--api-key is empty: give a key, or leave the option (and BLIP3V_API_KEY) out")
    if media_root is not None:
        if not media_root.exists():
            raise InputError(f"--media-root {media_root}: no such directory")
        if not media_root.is_dir():
            raise InputError(f"--media-root {media_root}: not a directory")
    if not served_model_name.strip():
        raise InputError("--served-model-name is empty")
    if not _is_loopback(host) and api_key is None:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use it", err=True)
    config = ServeConfig(model_name=served_model_name, api_key=api_key.strip() if api_key else None,
                         media_root=media_root, allow_remote=allow_remote, max_queue=max_queue, timeout=timeout,
                         max_upload_bytes=max(1, math.floor(max_upload_mb * (1 << 20))))
    runner = open_engine(model, engine, backend, device, dtype, decoder, weights, group_size)
    runner.cache_bytes = cache_mb << 20

    def announce(url: str) -> None:
        click.echo(f"blip3v serve: {served_model_name} at {url}/v1 (queue {max_queue}, timeout {timeout:g} s); "
                   "Ctrl-C stops", err=False)

    try:
        serve(runner, config, host, port, access_log=access_log, announce=announce)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: the way a server is stopped
        click.echo("blip3v serve: stopped", err=True)
