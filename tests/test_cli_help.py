"""`jaxinfer ... --help`: every (sub)command prints an example line, and each option's default once."""

from __future__ import annotations

import argparse
import re

import pytest

from jaxinfer.cli import build_parser


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, path + (name,))


ALL = list(commands(build_parser()))


def test_every_command_is_covered():
    names = {" ".join(p) for p, _ in ALL}
    assert {"serve", "generate", "score", "convert", "eval perplexity", "eval choice", "eval generate",
            "client generate", "client health", "bench serve"} <= names


@pytest.mark.parametrize(("path", "parser"), ALL, ids=[" ".join(p) or "jaxinfer" for p, _ in ALL])
def test_help_has_an_example_and_each_default_once(path, parser):
    text = parser.format_help()
    examples = text.split("example", 1)[-1] if re.search(r"^examples?:$", text, re.M) else ""
    assert "jaxinfer" in examples, f"`jaxinfer {' '.join(path)} --help` has no example line:\n{text}"
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.help or action.help == argparse.SUPPRESS:
            continue
        shown = formatter._expand_help(action)
        n = len(re.findall(r"default", shown, re.I))
        assert n <= 1, f"{' '.join(path)} {action.option_strings}: {shown!r} states its default {n} times"
        if action.option_strings and action.default not in (None, False, [], "", argparse.SUPPRESS) \
                and not isinstance(action, argparse._HelpAction):
            assert f"(default: {action.default})" in shown, f"{action.option_strings}: default not shown: {shown!r}"
