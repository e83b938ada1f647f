"""Every command's --help explains every option: help text on each, the default shown where there is one."""

import argparse

import pytest

from fine_infer.cli import build_parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


COMMANDS = _commands()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(name):
    parser = COMMANDS[name]
    assert parser.description, f"{name} has no description"
    missing = [a.option_strings or [a.dest] for a in parser._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
    assert not missing, f"fine-infer {name}: options without help text: {missing}"
    text = parser.format_help()
    for a in parser._actions:
        shown = a.default not in (None, False, argparse.SUPPRESS) and a.option_strings and a.nargs != 0
        assert not (shown and "default" in (a.help or "") and "%(default)" not in a.help), \
            f"fine-infer {name} {a.option_strings[0]}: the help names a default and the default is shown again"
        if shown:
            assert f"(default: {a.default}" in " ".join(text.split()) or "%(default)" in (a.help or ""), \
                f"fine-infer {name} {a.option_strings[0]}: default {a.default!r} not shown"
    assert "``" not in text, f"fine-infer {name}: reStructuredText markup in --help"


def test_top_level_help_is_plain_text():
    text = build_parser().format_help()
    assert "``" not in text and "COMMAND" in text
