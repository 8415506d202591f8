"""Pieces the ``attnlab`` subcommands share: the console, the progress bar, loading a run,
and the argument types of counts and amounts.

Every argument error ends in ``parser.error``: one line naming the argument, what was given
and what is allowed, exit status 2, no traceback. Counts and amounts are checked by their
argparse ``type`` (:func:`positive_int`, :func:`nonneg_int`, :func:`positive_float`,
:func:`nonneg_float`); what needs several arguments together is checked by the subcommand,
which turns the library's ``ValueError`` into ``parser.error``.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` that shows every option's default: ``(default: X)`` is appended unless the
    help text already says what the default is (``default`` in it), and an option without help
    text still gets its default line. Flags (``store_true``) have none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (not action.option_strings or _no_default(action.default)
                or "default" in text.lower() or action.help == argparse.SUPPRESS):
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


def _no_default(default: Any) -> bool:
    # Identity, not ==: a default of 0 is a default to show, not False.
    return default is None or default is False or default is argparse.SUPPRESS


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Makes ``parser``'s ``--help`` list the defaults (:class:`HelpFormatter`); an option
    without help text gets a help line holding just its default ("not set" for None)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if (action.help is None and action.option_strings and not action.required
                and action.nargs != 0):
            action.help = ("(default: not set)" if action.default is None
                           else "(default: %(default)s)")


def warn_if_not_text(run: Any) -> None:
    """One warning line on stderr when ``run`` (a :class:`attnlab.train.LoadedRun`) was
    trained on a task that is not text (MQAR, induction: token ids that are not bytes of
    text), so a continued text prompt is noise rather than a bug."""
    from attnlab.data import DATASETS

    task = run.train_config.task
    if getattr(DATASETS.get(task), "is_text", True):
        return
    text_tasks = ", ".join(name for name, cls in DATASETS.items() if cls.is_text)
    print(f"warning: {run.run_dir} was trained on the {task!r} task ({DATASETS[task].__name__}: "
          "synthetic token sequences, not text), so its continuation of a text prompt is not "
          f"meaningful; for a model that writes text, train on a text task ({text_tasks}), "
          "e.g. `attnlab train --task stdlib`", file=sys.stderr)


def make_console() -> Console:
    """A rich console; 160 columns wide when output goes to a file or pipe (logs stay readable
    instead of being cut at rich's default of 80)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def progress(console: Console) -> Any:
    """A rich progress bar (spinner, description, bar, done / total, elapsed time)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console,
    )


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (``--steps``, ``--batches``, ``--heads`` ...)."""
    return _int(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    """argparse type: an int >= 0 (``--seed``, ``--max-new-tokens``, ``--checkpoint-every``)."""
    return _int(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0 (``--lr``)."""
    return _float(text, lambda x: x > 0, "a positive number")


def nonneg_float(text: str) -> float:
    """argparse type: a finite float >= 0 (``--temperature``, ``--max-ref-gib``)."""
    return _float(text, lambda x: x >= 0, "a number >= 0")


def _int(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def _float(text: str, ok: Any, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def fmt(x: float | None, spec: str) -> str:
    """``format(x, spec)``, or "-" for a missing number."""
    return "-" if x is None else format(x, spec)


def load_run_or_exit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The run at ``--ckpt`` (:func:`attnlab.train.load_run`); a bad path ends in
    ``parser.error`` (exit status 2), a damaged checkpoint in one line on stderr naming it and
    what is wrong (exit status 1: the arguments were fine, the files are not)."""
    from attnlab.train import load_run
    from attnlab.train.checkpoint import CheckpointError

    try:
        return load_run(args.ckpt)
    except CheckpointError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except ValueError as e:
        parser.error(str(e))
