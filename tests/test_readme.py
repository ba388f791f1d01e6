"""The README stays true: its set-up commands are the ones CI runs, and its CLI table names real commands and flags."""

import argparse
import re
from pathlib import Path

import pytest

from nanoseek.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# The two set-up commands, as a user copies them. `.ci/run` runs the second one verbatim.
SPEEDRUN = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/nanoseek speedrun --out runs/first"
TESTS = ("apt-get install -y -q chromium chromium-driver && python3 -m venv .venv && "
         ".venv/bin/pip install -e '.[dev]' && .venv/bin/python -m pytest -q")


def bash_lines(text: str) -> list[str]:
    """Every line inside the ```bash blocks of a markdown text, stripped."""
    blocks = re.findall(r"^```bash[ \t]*\n(.*?)^```", text, re.M | re.S)
    return [line.strip() for block in blocks for line in block.splitlines()]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """`nanoseek`'s subcommands by name, from the parser the CLI itself builds."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def cli_table() -> list[list[str]]:
    """The words of each `nanoseek ...` command in the first column of a README table."""
    rows = []
    for line in README.splitlines():
        if not line.startswith("|"):
            continue
        first = re.split(r"(?<!\\)\|", line)[1]  # cells split on unescaped pipes; [0] is before the first
        m = re.match(r"\s*`nanoseek ([^`]+)`", first)
        if m:
            rows.append(m.group(1).replace("\\|", "|").split())
    return rows


def test_readme_is_short():
    assert len(README.splitlines()) <= 250, "README.md is a product page: keep it to 250 lines, move detail to docs/"


@pytest.mark.parametrize("command", [SPEEDRUN, TESTS], ids=["speedrun", "tests"])
def test_setup_commands_are_verbatim_in_a_bash_block(command):
    assert command in bash_lines(README), f"README.md lost its set-up command:\n{command}"


def test_ci_runs_the_readme_test_command():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert commands[-1] == TESTS


def test_cli_table_names_every_command_and_only_real_ones():
    rows = cli_table()
    assert len(rows) >= 10, "the README's CLI table was not found (rows start with | `nanoseek COMMAND ...`)"
    named = {words[0] for words in rows}
    real = set(subcommands())
    assert named <= real, f"README names commands `nanoseek --help` does not have: {sorted(named - real)}"
    assert real <= named, f"README's CLI table leaves out: {sorted(real - named)}"


def test_cli_table_flags_exist():
    commands = subcommands()
    for words in cli_table():
        assert words[0] in commands, f"README names `nanoseek {words[0]}`, which `nanoseek --help` does not have"
        parser = commands[words[0]]
        options = {s for a in parser._actions for s in a.option_strings}
        for word in words[1:]:
            flag = re.match(r"\[?(--[a-z][a-z0-9-]*)", word)
            if flag:
                assert flag.group(1) in options, f"`nanoseek {words[0]}` has no {flag.group(1)} (README's CLI table)"
        positional = [a for a in parser._actions if not a.option_strings and a.choices]
        if positional and len(words) > 1 and not words[1].startswith(("-", "[")):
            assert words[1] in positional[0].choices, f"`nanoseek {words[0]} {words[1]}` is not a choice"
