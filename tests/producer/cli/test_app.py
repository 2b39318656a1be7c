"""The `vlq` help texts: docstring paragraphs are re-wrapped to the terminal, not broken where the
source lines end."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from producer.cli import app

WIDTH = 80
COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def description(output: str) -> list[str]:
    """The help's prose: the lines between the usage line and the first panel, stripped."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("╭"))
    return [line.strip() for line in lines[start:end]]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_paragraphs_fill_an_80_column_terminal(command: str) -> None:
    res = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": str(WIDTH)}, terminal_width=WIDTH)
    assert res.exit_code == 0, res.output
    assert max(len(line) for line in res.stdout.splitlines()) <= WIDTH
    prose = description(res.stdout)
    assert any(prose), res.stdout
    for line, following in zip(prose, prose[1:]):
        if line and following:  # within a paragraph, a line ends only where the next word would not fit
            next_word = re.split(r"\s", following, maxsplit=1)[0]
            assert len(line) + 1 + len(next_word) > WIDTH - 2, f"{command}: {line!r} / {following!r}"


def test_every_command_is_listed_in_the_main_help() -> None:
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": str(WIDTH)})
    for command in COMMANDS:
        assert f"│ {command} " in res.stdout
