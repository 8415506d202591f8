"""``attnlab convert``: a Llama-layout checkpoint to MLA (TransMLA), written as attnlab files.

    attnlab convert --from ckpt/ --out mla/                 # exact: per-head-RoPE MLA
    attnlab convert --from ckpt/ --rank 256 --out mla/     # compressed: d_c = 256, d_R = H
    attnlab convert --from ckpt/ --rank 256 --rope-dim 32 --calibration tokens.npy --out mla/

Calibration tokens come from ``--calibration`` (a ``.npy`` of [B, T] token ids; real text is
best); without it, random token ids (a weak calibration, said so in the summary). The summary
(JSON on stdout) gives the cache per token before and after and, with ``--check``, the
conversion error on held-out random tokens.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``attnlab convert``: loads, converts, optionally checks, and writes the MLA model."""
    import numpy as np

    from attnlab.convert import conversion_error, gqa_to_mla, load_llama, save_model, transmla

    try:
        model = load_llama(args.src, attention_impl=args.impl)
        cfg = model.cfg
        rng = np.random.default_rng(args.seed)
        t = min(args.calibration_len, cfg.max_seq_len)
        calibration = "none (exact)"
        if args.rank is None:
            mla = gqa_to_mla(model)
        else:
            if args.calibration:
                tokens = np.load(args.calibration)
                calibration = args.calibration
            else:
                tokens = rng.integers(0, cfg.vocab_size, (args.calibration_rows, t))
                calibration = f"random token ids [{args.calibration_rows}, {t}] (weak)"
            mla = transmla(model, tokens, kv_lora_rank=args.rank,
                           qk_rope_head_dim=args.rope_dim)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    k, h = cfg.num_kv_heads, cfg.head_dim
    summary: dict[str, Any] = {
        "from": args.src, "out": args.out, "layer_pattern": mla.cfg.layer_pattern,
        "mla_rope": mla.cfg.mla_rope, "kv_lora_rank": mla.cfg.kv_lora_rank,
        "qk_rope_head_dim": mla.cfg.qk_rope_head_dim, "calibration": calibration,
        "cache_values_per_token_per_layer": {
            "gqa": 2 * k * h, "mla": mla.cfg.kv_lora_rank + mla.cfg.qk_rope_head_dim},
    }
    if args.check:
        heldout = rng.integers(0, cfg.vocab_size, (2, min(64, cfg.max_seq_len)))
        summary["check"] = conversion_error(model, mla, heldout)._asdict()
    save_model(mla, args.out)
    print(json.dumps(summary, indent=2))
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``convert`` to the ``attnlab`` subparsers ``sub``."""
    p = sub.add_parser("convert", help="convert a Llama-layout checkpoint to MLA (TransMLA)")
    p.add_argument("--from", dest="src", required=True,
                   help="Llama-layout checkpoint directory (config.json, model.safetensors)")
    p.add_argument("--out", required=True, help="output directory (attnlab files)")
    p.add_argument("--rank", type=int, default=None,
                   help="latent rank d_c (default: the exact conversion, d_c = 2 K H)")
    p.add_argument("--rope-dim", type=int, default=None,
                   help="decoupled RoPE dims d_R (default head_dim; R / d_R must be an int)")
    p.add_argument("--calibration", default=None,
                   help=".npy of [B, T] calibration token ids (default: random tokens, "
                   "--calibration-rows x --calibration-len)")
    p.add_argument("--calibration-rows", type=int, default=8)
    p.add_argument("--calibration-len", type=int, default=128)
    p.add_argument("--check", action="store_true",
                   help="report the logit error, losses and KL on held-out random tokens")
    p.add_argument("--impl", default="auto", help="attention_impl of the models")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_convert, subparser=p)
    return p
