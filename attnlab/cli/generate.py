"""``attnlab generate``: continues a text prompt with a run's model."""

from __future__ import annotations

import argparse
from typing import Any

from attnlab.cli.common import load_run_or_exit, nonneg_float, nonneg_int, positive_int


def cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``attnlab generate``: continues a byte-level prompt with a run's model."""
    star = _star_config(args, parser)
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
        kw = dict(temperature=args.temperature, top_k=args.top_k, rng=jax.random.key(args.seed))
        if star is None:
            out = generate(run.model, jnp.asarray(prompt)[None], args.max_new_tokens, **kw)
        else:
            from attnlab.nn import star_generate

            out = star_generate(run.model, jnp.asarray(prompt)[None], args.max_new_tokens,
                                star=star, context_length=args.context_length, **kw)
    except ValueError as e:
        parser.error(str(e))
    new = jax.device_get(out)[0, len(prompt):]
    # A model whose vocab_size was rounded up past the bytes may emit an id that is no byte:
    # it prints as U+FFFD, as invalid UTF-8 does (0xFF never occurs in UTF-8).
    text = decode(np.where(new < VOCAB_SIZE, new, 0xFF))
    print(args.prompt + text)
    return 0


def _star_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The StarConfig of ``--star`` (None without it); exits 2 on a bad combination."""
    flags = {"--block-size": args.block_size, "--anchor": args.anchor,
             "--anchor-size": args.anchor_size, "--context-length": args.context_length}
    if not args.star:
        given = [name for name, value in flags.items() if value is not None]
        if given:
            parser.error(f"{', '.join(given)} only apply with --star (Star Attention)")
        return None
    if args.block_size is None:
        parser.error("--star needs --block-size (tokens per context block)")
    from attnlab.ops.star import StarConfig

    try:
        return StarConfig(block_size=args.block_size, anchor=args.anchor or "first",
                          anchor_size=args.anchor_size)
    except ValueError as e:
        parser.error(str(e))


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``generate`` to the ``attnlab`` subparsers ``sub``."""
    p = sub.add_parser("generate", help="continue a text prompt with a run's model")
    p.add_argument("--ckpt", required=True, help="run directory (or its checkpoints folder)")
    p.add_argument("--prompt", required=True, help="text (byte-level tokens)")
    p.add_argument("--max-new-tokens", type=nonneg_int, default=64)
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--seed", type=nonneg_int, default=0)
    star = p.add_argument_group("Star Attention (arXiv 2411.17116): blockwise context phase")
    star.add_argument("--star", action="store_true",
                      help="encode the prompt's context block by block with an anchor, then "
                           "decode with exact attention (softmax-only models)")
    star.add_argument("--block-size", type=positive_int, default=None,
                      help="tokens per context block (no default: --star needs it)")
    star.add_argument("--anchor", choices=("first", "none", "previous"), default=None,
                      help="what each later block sees besides itself (default first: the "
                           "start of block 1, as the paper)")
    star.add_argument("--anchor-size", type=positive_int, default=None,
                      help="anchor tokens (default one block)")
    star.add_argument("--context-length", type=positive_int, default=None,
                      help="prompt tokens in the context phase, a multiple of --block-size "
                           "(default: the longest such prefix before the last token)")
    p.set_defaults(run=cmd_generate, subparser=p)
    return p
