"""Pieces the ``attnlab`` subcommands share: the console, the progress bar, loading a run."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


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
