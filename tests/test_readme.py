"""Every `--help` works and every `blip3v ...` line of the README names commands and options that exist.

The README's examples are what users copy; a renamed option would turn one into an error only on
their machine. Running them all is the job of the tests of each command (they need engines, Ray,
cameras); here each README line is parsed by the real click command tree (command names, option
names, choice values), and `--help` of every command and subcommand is rendered.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from blip3v.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def all_commands(group: click.Command = cli, path: tuple[str, ...] = ()):
    yield path, group
    if isinstance(group, click.Group):
        for name in group.list_commands(click.Context(group)):
            yield from all_commands(group.get_command(click.Context(group), name), path + (name,))


def readme_lines() -> list[str]:
    """`blip3v ...` command lines inside the README's code blocks, continuation lines joined,
    comments and `&& ...` tails cut, `[optional parts]` dropped."""
    blocks, block, inside = [], [], False
    for raw in README.read_text().splitlines():
        if raw.strip().startswith("```"):
            if inside:
                blocks.append("\n".join(block))
            block, inside = [], not inside
        elif inside:
            block.append(raw)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.split("  #")[0].strip()
                part = re.sub(r"\[[^\]]*\]", "", part)
                if part.startswith("blip3v "):
                    lines.append(part)
    return lines


@pytest.mark.parametrize("path", [" ".join(p) for p, _ in all_commands()])
def test_every_help_renders(path):
    result = CliRunner().invoke(cli, [*path.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_the_readme_has_examples():
    assert len(readme_lines()) >= 15


@pytest.mark.parametrize("line", readme_lines())
def test_readme_line_parses(line):
    args = shlex.split(line)[1:]
    command: click.Command = cli
    ctx = click.Context(cli, info_name="blip3v")
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        sub = command.get_command(ctx, args[0])
        assert sub is not None, f"README: unknown command {args[0]!r} in {line!r}"
        command, args = sub, args[1:]
        ctx = click.Context(command, info_name=command.name, parent=ctx)
    parser = command.make_parser(ctx)
    values, _, _ = parser.parse_args(args)  # unknown options raise NoSuchOption here
    by_name = {p.name: p for p in command.params}
    for name, value in values.items():
        param = by_name[name]
        if isinstance(param.type, click.Choice) and value is not None:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                assert v in param.type.choices, f"README: {v!r} is not a choice of {param.opts[0]} in {line!r}"
