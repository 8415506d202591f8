"""``attnlab generate``: continues a text prompt with a run's model."""

from __future__ import annotations

import argparse
from typing import Any

from attnlab.cli.common import load_run_or_exit


def cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``attnlab generate``: continues a byte-level prompt with a run's model."""
    run = load_run_or_exit(args, parser)
    import jax
    import jax.numpy as jnp

    from attnlab.data import decode, encode
    from attnlab.nn import generate

    prompt = encode(args.prompt)
    if len(prompt) == 0:
        parser.error("--prompt is empty; give at least one character")
    try:
        out = generate(run.model, jnp.asarray(prompt)[None], args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k,
                       rng=jax.random.key(args.seed))
    except ValueError as e:
        parser.error(str(e))
    text = decode(jax.device_get(out)[0, len(prompt):])
    print(args.prompt + text)
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``generate`` to the ``attnlab`` subparsers ``sub``."""
    p = sub.add_parser("generate", help="continue a text prompt with a run's model")
    p.add_argument("--ckpt", required=True, help="run directory (or its checkpoints folder)")
    p.add_argument("--prompt", required=True, help="text (byte-level tokens)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_generate, subparser=p)
    return p
