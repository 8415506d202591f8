"""``attnlab eval``: validation loss and task accuracy of a run's latest checkpoint."""

from __future__ import annotations

import argparse
import json
from typing import Any

from attnlab.cli.common import load_run_or_exit, make_console, positive_int


def cmd_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``attnlab eval``: validation loss and task accuracy of a run's latest checkpoint."""
    run = load_run_or_exit(args, parser)
    from attnlab.train import evaluate_run

    res = {"run": str(run.run_dir), "step": run.step, "task": run.train_config.task,
           **evaluate_run(run, batches=args.batches)}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        make_console().print(
            f"{res['run']} step {res['step']} ({res['task']}): validation loss "
            f"{res['val_loss']:.4f}, accuracy {res['val_accuracy']:.4f}", highlight=False)
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``eval`` to the ``attnlab`` subparsers ``sub``."""
    p = sub.add_parser("eval", help="validation loss and task accuracy of a run")
    p.add_argument("--ckpt", required=True, help="run directory (or its checkpoints folder)")
    p.add_argument("--batches", type=positive_int, default=None,
                   help="validation batches (default: the run's eval_batches, or 4 if it has "
                   "none)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_eval, subparser=p)
    return p
