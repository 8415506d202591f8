"""``attnlab train``: trains (or resumes) a model on a task; writes a run directory."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from attnlab.cli.common import (
    make_console,
    nonneg_int,
    positive_float,
    positive_int,
)

# What each preset trains, as `attnlab train --help` says it: attnlab.train.presets.
# describe_preset(name), written out so that building the parser imports no model code
# (tests/cli/test_help.py checks the two agree).
PRESETS_HELP = {
    "tiny": "tiny: 2 softmax layers, d_model 64, 4 heads; task mqar (num_kv_pairs=4), 200 "
            "steps of 16 x 64 tokens, float32 compute",
    "small": "small: 8 softmax layers, d_model 512, 8 heads; task stdlib, 5000 steps of 32 x "
             "1024 tokens, bfloat16 compute",
    "350m": "350m: 24 softmax layers, d_model 1024, 16 heads; task stdlib, 20000 steps of 8 x "
            "4096 tokens, bfloat16 compute",
}


def run_config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """(model Config, TrainConfig, dataset, mesh) of ``attnlab train``; every configuration
    error ends in ``parser.error`` (exit status 2) before anything is compiled."""
    from attnlab.train import load_run_config, prepare
    from attnlab.train.trainer import check_run_dir, recorded_train_config

    if args.out is None:  # a fresh run directory each time; --out DIR names (and resumes) one
        stem = Path(args.config).stem if args.config not in PRESETS_HELP else args.config
        args.out = str(Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        args.default_out = True
    try:
        model, tc = load_run_config(args.config, attention=args.attention)
        if args.task is not None and args.task != tc.task:
            tc = dataclasses.replace(tc, task=args.task, task_options={})
        overrides = {
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "lr": args.lr, "seed": args.seed, "checkpoint_every": args.checkpoint_every,
            "keep": args.keep, "log_every": args.log_every, "dtype": args.dtype,
            "data_parallel": args.data_parallel, "seq_parallel": args.seq_parallel,
            "sp_strategy": args.sp_strategy, "debug_nan_step": args.debug_nan_step,
        }
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "steps" in overrides and tc.warmup_steps > overrides["steps"]:
            overrides["warmup_steps"] = max(1, overrides["steps"] // 10)
        old = recorded_train_config(args.out)
        if "steps" in overrides and old is not None and old.steps != overrides["steps"]:
            # Extending (or re-running) a run keeps the warm-up it started with, which the
            # rule above derived from its first --steps.
            overrides["warmup_steps"] = min(old.warmup_steps, overrides["steps"])
        tc = dataclasses.replace(tc, **overrides)
        cfg, dataset, mesh = prepare(model, tc)
        check_run_dir(args.out, cfg, tc)
    except ValueError as e:
        parser.error(str(e))
    return cfg, tc, dataset, mesh


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``attnlab train``: trains (or resumes) a run in ``--out``; exit 1 on a NaN/inf loss or
    when every checkpoint of the run is damaged."""
    cfg, tc, _, mesh = run_config_from_args(args, parser)
    from attnlab.train import NonFiniteLossError, plot_losses, train
    from attnlab.train.checkpoint import CheckpointError

    console = make_console()
    if getattr(args, "default_out", False):
        console.print(f"no --out given: the run goes to {args.out} (pass --out DIR to choose "
                      "the directory; the same --out resumes or extends a run)",
                      highlight=False, markup=False)
    sp = f" ({tc.sp_strategy} / LASP-2 over sp)" if tc.seq_parallel > 1 else ""
    console.print(
        f"[bold]train[/] task {tc.task}, pattern {cfg.layer_pattern}, d_model {cfg.d_model}, "
        f"{tc.steps} steps of {tc.batch_size} x {tc.seq_len} tokens, {tc.dtype} compute, "
        f"mesh {dict(mesh.shape)}{sp} -> {args.out}", highlight=False,
    )
    try:
        res = train(cfg, tc, args.out, progress=not args.no_progress)
    except NonFiniteLossError as e:
        console.print(f"[bold red]stopped:[/] {e}", highlight=False)
        return 1
    except CheckpointError as e:  # every checkpoint of the run is damaged
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    png = plot_losses(res.metrics_path, res.out_dir / "loss.png",
                      title=f"{tc.task}, {cfg.layer_pattern}")
    resumed = "" if res.resumed_from is None else f" (resumed from step {res.resumed_from})"
    val = ", ".join(f"{k} {v:.4f}" for k, v in res.validation.items())
    console.print(f"{res.num_params:,} parameters; {res.steps_done} steps{resumed}; final loss "
                  f"{res.final_loss:.4f}; {val}", highlight=False)
    console.print(f"metrics {res.metrics_path}\ncheckpoints {res.checkpoint_dir}\nloss plot {png}",
                  highlight=False, markup=False)
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``train`` to the ``attnlab`` subparsers ``sub``."""
    p = sub.add_parser(
        "train", help="train (or resume) a model on a task; writes a run dir",
        description="Trains a model on a task and writes a run directory (config.json, "
        "metrics.jsonl, orbax checkpoints, loss.png). Run again with the same --out to resume "
        "after an interruption, or with a larger --steps to extend a finished run. Presets: "
        + "; ".join(PRESETS_HELP.values()) + ".",
    )
    p.add_argument("--config", default="tiny",
                   help="preset (tiny, small, 350m; see above) or a .py/.yaml config file "
                   "(default: tiny, softmax attention learning MQAR on CPU)")
    p.add_argument("--attention", default=None, choices=["softmax", "lightning", "hybrid"],
                   help="layer pattern: all softmax, all lightning, or 7:1 lightning:softmax "
                   "(default: the config's pattern)")
    p.add_argument("--task", default=None,
                   choices=["mqar", "induction", "passkey", "calendar", "stdlib"],
                   help="dataset (default: the config's)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimizer steps of the whole run; more than a finished run's extends "
                   "it from its last checkpoint (default: the config's)")
    p.add_argument("--out", default=None,
                   help="run directory; resumes (or extends) the run in it if it has "
                   "checkpoints (default: a new runs/<config>-<date>-<time>, printed)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="sequences per step (default: the config's)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per sequence (default: the config's)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (default: the config's)")
    p.add_argument("--seed", type=nonneg_int, default=None,
                   help="initialisation and data seed (default: the config's)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="compute dtype; params stay float32 (default: the config's)")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=None,
                   help="save every N steps and at the end; 0: only at the end (default: the "
                   "config's)")
    p.add_argument("--keep", type=positive_int, default=None,
                   help="checkpoints kept on disk (default: the config's)")
    p.add_argument("--log-every", type=positive_int, default=None,
                   help="a metrics record every N steps (default: the config's)")
    p.add_argument("--data-parallel", type=positive_int, default=None,
                   help="devices on the data axis (default: as many as divide the batch)")
    p.add_argument("--seq-parallel", type=positive_int, default=None, metavar="N",
                   help="devices on the sequence axis: each sequence is split into N blocks "
                   "and attention runs across them (default 1)")
    p.add_argument("--sp-strategy", default=None,
                   help="softmax layers' sequence-parallel strategy: ring, striped, zigzag "
                   "or ulysses (default zigzag; lightning layers use LASP-2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug-nan-step", type=nonneg_int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(run=cmd_train, subparser=p)
    return p
