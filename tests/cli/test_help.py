"""``--help`` of every ``attnlab`` subcommand shows each option's default, and ``train
--help`` says what the presets train."""

from __future__ import annotations

import argparse

import pytest

from attnlab.cli import build_parser

SUBCOMMANDS = ("info", "bench", "demo", "train", "eval", "generate", "convert")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_subcommand_is_listed() -> None:
    assert tuple(_subparsers()) == SUBCOMMANDS
    assert "{info,bench,demo,train,eval,generate,convert}" in build_parser().format_help()


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_shows_every_default(name: str) -> None:
    parser = _subparsers()[name]
    text = " ".join(parser.format_help().split())
    formatter = parser._get_formatter()
    for action in parser._actions:
        if (not action.option_strings or action.required or action.nargs == 0
                or action.help == argparse.SUPPRESS):
            continue  # --help, flags, required options and hidden ones have no default to show
        line = " ".join(formatter._expand_help(action).split())
        assert "default" in line.lower(), (name, action.option_strings, line)
        assert line in text  # and it is what --help prints
        if action.default is not None and "(default: " in line and "on CPU" not in line:
            assert f"(default: {action.default})" in line, (action.option_strings, line)


def test_train_help_says_what_each_preset_trains() -> None:
    from attnlab.cli.train import PRESETS_HELP
    from attnlab.train.presets import PRESETS, describe_preset

    assert set(PRESETS_HELP) == set(PRESETS)
    for name in PRESETS:  # the help's words are the presets' own numbers
        assert PRESETS_HELP[name] == describe_preset(name)
    text = " ".join(_subparsers()["train"].format_help().split())
    assert "tiny: 2 softmax layers, d_model 64, 4 heads; task mqar (num_kv_pairs=4), 200 steps" \
        in text
    assert "(default: tiny," in text
