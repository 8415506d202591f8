"""The ``attnlab`` command: ``info``, ``bench``, ``demo``, ``train``, ``eval``, ``generate``,
``convert``.

    attnlab info [--json]
    attnlab bench attention --shapes 2048,8192 --causal both --passes fwd,fwdbwd --out r.json
    attnlab demo [--json PATH]
    attnlab train --config tiny --attention hybrid --task mqar --steps 200 --out runs/t
    attnlab eval --ckpt runs/t
    attnlab generate --ckpt runs/t --prompt "def " --max-new-tokens 64 [--temperature 0.8]
    attnlab convert --from llama_ckpt/ [--rank 256] --out mla/

Also runs as ``python -m attnlab.cli`` (the GPU machine has the repo on PYTHONPATH only).
One module per subcommand (:mod:`~attnlab.cli.info`, :mod:`~attnlab.cli.bench`,
:mod:`~attnlab.cli.demo`, :mod:`~attnlab.cli.train`, :mod:`~attnlab.cli.evaluate`,
:mod:`~attnlab.cli.generate`, :mod:`~attnlab.cli.convert`), each with an ``add_parser(sub)``
that registers its arguments and its ``cmd_*(args, parser)``; this module wires them. Heavy
imports happen inside the subcommands so that ``--help`` and argument errors are quick, and so
that ``demo`` can pick JAX's platform before any backend starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from attnlab.cli import bench, convert, demo, evaluate, generate, info, train
from attnlab.cli.common import show_defaults

SUBCOMMANDS = (info, bench, demo, train, evaluate, generate, convert)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``attnlab`` command."""
    p = argparse.ArgumentParser(
        prog="attnlab",
        description="attnlab: attention in JAX (info, bench, demo, train, eval, generate, "
                    "convert)",
    )
    sub = p.add_subparsers(dest="command", required=True,
                           metavar="{info,bench,demo,train,eval,generate,convert}")
    for module in SUBCOMMANDS:
        show_defaults(module.add_parser(sub))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnlab`` console script; returns the exit status.

    Example:
      >>> main(["info", "--json"])
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.run(args, args.subparser)
