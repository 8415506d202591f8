"""``attnlab generate``: continues a text prompt with a run's model."""

from __future__ import annotations

import argparse
from typing import Any

from attnlab.cli.common import load_run_or_exit, nonneg_float, nonneg_int, positive_int


def cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``attnlab generate``: continues a byte-level prompt with a run's model."""
    run = load_run_or_exit(args, parser)
    from attnlab.cli.common import warn_if_not_text

    warn_if_not_text(run)  # an MQAR-trained model continues text with noise: say why
    import jax
    import jax.numpy as jnp
    import numpy as np

    from attnlab.data import VOCAB_SIZE, decode, encode
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
    new = jax.device_get(out)[0, len(prompt):]
    # A model whose vocab_size was rounded up past the bytes may emit an id that is no byte:
    # it prints as U+FFFD, as invalid UTF-8 does (0xFF never occurs in UTF-8).
    text = decode(np.where(new < VOCAB_SIZE, new, 0xFF))
    print(args.prompt + text)
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``generate`` to the ``attnlab`` subparsers ``sub``."""
    p = sub.add_parser("generate", help="continue a text prompt with a run's model")
    p.add_argument("--ckpt", required=True, help="run directory (or its checkpoints folder)")
    p.add_argument("--prompt", required=True, help="text (byte-level tokens)")
    p.add_argument("--max-new-tokens", type=nonneg_int, default=64)
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.set_defaults(run=cmd_generate, subparser=p)
    return p
