"""The README's promises: every flag its command list shows exists, and the first screen's commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _command_block() -> str:
    section = README.split("## Commands", 1)[1]
    return section.split("```", 2)[1]


def _commands() -> list[tuple[tuple[str, ...], set[str]]]:
    """(subcommand words, flags) for each `caption ...` in the block, continuation lines included."""
    found: list[tuple[tuple[str, ...], set[str]]] = []
    for line in _command_block().splitlines():
        for part in re.split(r"\s{3,}(?=caption )", line.strip()):
            if part.startswith("caption "):
                words = re.findall(r"caption ((?:[a-z]+(?:\|[a-z]+)*)(?: (?:status|collect|cancel|prepare|ingest)"
                                   r"(?:\|[a-z]+)*)?)", part)[0].split()
                found.append((tuple(words), set()))
            if found:
                found[-1][1].update(re.findall(r"--[a-z][a-z-]+", part))
    return found


def _expand(words: tuple[str, ...]) -> list[list[str]]:
    head, *rest = words
    options = [[w] for w in head.split("|")]
    for word in rest:
        options = [o + [w] for o in options for w in word.split("|")]
    return options


@pytest.mark.parametrize("words, flags", _commands(), ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_flag_in_the_readme_command_list_exists(words, flags, cli, capsys):
    for argv in _expand(words):
        with pytest.raises(SystemExit) as done:
            cli(*argv, "--help")
        assert done.value.code == 0
        help_text = capsys.readouterr().out
        missing = sorted(f for f in flags if f not in help_text)
        assert not missing, f"caption {' '.join(argv)} --help lacks {missing}"


def test_the_first_screen_has_the_two_commands():
    first_screen = "\n".join(README.splitlines()[:20])
    assert "pip install . && caption run sample_data --job jobs/demo.toml --out out/" in first_screen
    assert "pip install '.[test]' && python -m pytest -q" in first_screen
