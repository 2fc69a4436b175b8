"""The `blip3v` command line.

The CLI only parses and displays: each command lives in `blip3v/commands/<name>.py`, imports
its heavy modules inside the function, and lets `Blip3vError` reach `main`, which prints it as
one line and exits with code 2 (the single abort path).
"""

from __future__ import annotations

import importlib
import sys

import click

from blip3v import __version__
from blip3v.errors import Blip3vError

# command name -> module in blip3v.commands exposing a click object named `command`.
# Listed here (not discovered) so `--help` is fast and the set of commands is explicit.
COMMANDS = {
    "ask": "ask",
    "chat": "chat",
    "inspect": "inspect",
    "data": "data",
    "train": "train",
    "eval": "evaluate",
    "export": "export",
    "build": "build",
    "calibrate": "calibrate",
    "bench": "bench",
    "batch": "batch",
    "serve": "serve",
    "live": "live",
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command (or its help) is needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        module_name = COMMANDS.get(name)
        if module_name is None:
            return None
        try:
            module = importlib.import_module(f"blip3v.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"blip3v.commands.{module_name}":
                return None  # command not built yet in this tree
            raise
        return module.command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blip3v")
def cli() -> None:
    """BLIP-3-Video at the edge: ask questions about videos, export engines, benchmark.

    \b
    Quick start (uses the shipped demo model):
      blip3v ask sample.mp4 "what colour does the square turn?"
    """


def abort(message: str) -> None:
    """Print one error line and exit with code 2: the only way a user error leaves the CLI."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


# Top-level modules that only an extra installs -> the extra that brings them.
EXTRAS = {"torch": "torch", "transformers": "torch", "safetensors": "torch", "sentencepiece": "torch",
          "onnx": "torch", "onnxscript": "torch", "triton": "kernels", "matplotlib": "bench", "tensorrt": "tensorrt"}


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="blip3v", standalone_mode=False)
    except click.exceptions.Abort:
        abort("interrupted")
    except click.ClickException as exc:  # usage errors: unknown option, bad value
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Blip3vError as exc:
        abort(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        abort("interrupted")
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        abort(f"this command needs {top}, which is not installed: pip install 'blip3v[{EXTRAS[top]}]'"
              + (" (install torch==2.13.0 first for the CPU wheel)" if EXTRAS[top] == "torch" else ""))
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
