"""``attnlab bench attention``: check, time and record every implementation and the anchors.

The benchmark itself is :mod:`attnlab.bench.attention`; this module turns the command line into
its :class:`~attnlab.bench.attention.BenchConfig`, shows progress and prints the table.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from attnlab.cli.common import (
    fmt,
    make_console,
    nonneg_float,
    nonneg_int,
    positive_int,
    progress,
)

if TYPE_CHECKING:
    from rich.console import Console

    from attnlab.bench.attention import BenchConfig, Row


def _int_list(text: str, what: str, parser: argparse.ArgumentParser) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        parser.error(f"{what} must be comma-separated integers, got {text!r}")
    if not vals:
        parser.error(f"{what} is empty")
    return vals


# Defaults of the sizes and timing options: on a GPU or TPU the sizes of the published
# tables; on CPU about a minute (the same heads and head dim, fewer tokens, float32,
# which a CPU computes natively, and fewer timed calls).
ACCELERATOR_DEFAULTS = {"shapes": "2048,8192", "batch_tokens": 32768, "dtype": "bfloat16",
                        "repeats": 20, "warmup": 2}
CPU_DEFAULTS = {"shapes": "256,512", "batch_tokens": 1024, "dtype": "float32", "repeats": 3,
                "warmup": 1}
RESULTS_DIR = "experiments/results"


def apply_platform_defaults(args: argparse.Namespace, plat: str) -> dict[str, Any]:
    """Fills the options left unset (None) with :data:`CPU_DEFAULTS` on ``plat`` "cpu", else
    :data:`ACCELERATOR_DEFAULTS`; returns the ones filled from the CPU table (empty on an
    accelerator), for the note the command prints."""
    table = CPU_DEFAULTS if plat == "cpu" else ACCELERATOR_DEFAULTS
    filled = {k: v for k, v in table.items() if getattr(args, k) is None}
    for k, v in filled.items():
        setattr(args, k, v)
    return filled if plat == "cpu" else {}


def default_out(device_kind: str) -> str:
    """``experiments/results/bench_attention_<device kind>_<UTC date and time>.json`` (relative
    to the working directory): where the record goes without ``--out``."""
    import datetime

    kind = re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_") or "unknown"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d_%H%M%S")
    return f"{RESULTS_DIR}/bench_attention_{kind}_{stamp}.json"


def bench_config_from_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> BenchConfig:
    """Builds and validates a :class:`attnlab.bench.attention.BenchConfig`; bad input ends in
    ``parser.error`` (exit status 2 with a message saying what to change). Options left unset
    take :data:`CPU_DEFAULTS` on CPU and :data:`ACCELERATOR_DEFAULTS` elsewhere."""
    from attnlab.bench import attention, candidates, harness
    from attnlab.ops import platform

    args.cpu_defaults = apply_platform_defaults(args, platform())

    causal = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    passes = tuple(p.strip() for p in args.passes.split(",") if p.strip())
    impls: tuple[str, ...] | None = None
    if args.impls != "auto":
        impls = tuple(n.strip() for n in args.impls.split(",") if n.strip())
        if not impls:
            parser.error(f"--impls {args.impls!r} names no implementation; give a comma list "
                         "or 'auto'")
        known = candidates.registered_names()
        unknown = [n for n in impls if n not in known]
        if unknown:
            parser.error(
                f"unknown implementation {', '.join(map(repr, unknown))} in --impls; registered "
                f"implementations are {', '.join(known)} (or use 'auto'; the anchors "
                f"{harness.ANCHOR_XLA}, {harness.ANCHOR_CUDNN} and tokamax are always timed)"
            )
    try:
        return attention.BenchConfig(
            shapes=_int_list(args.shapes, "--shapes", parser),
            batch_tokens=args.batch_tokens,
            batch=args.batch,
            heads=args.heads,
            kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            dtype=args.dtype,
            causal=causal,
            passes=passes,
            bwd_causal_only=args.bwd_causal_only,
            impls=impls,
            anchors=not args.no_anchors,
            repeats=args.repeats,
            warmup=args.warmup,
            max_ref_bytes=int(args.max_ref_gib * harness.GiB),
            max_logits_bytes=int(args.max_logits_gib * harness.GiB),
            seed=args.seed,
        )
    except ValueError as e:
        parser.error(str(e))


def bench_table(rows: Sequence[Row], title: str, ceiling_tflops: float | None = None) -> Any:
    """A rich table of bench rows; the ratio is to cuDNN when it was timed, else to jax.nn xla;
    with ``ceiling_tflops``, a column of each rate's fraction of that matmul ceiling."""
    from rich.markup import escape
    from rich.table import Table

    from attnlab.bench import harness

    vs_cudnn = any(r.ratio_cudnn is not None for r in rows)
    # CPU rates are GFLOP/s-sized; print them in those units rather than as 0.00x TFLOP/s.
    giga = max((r.tflops or 0.0 for r in rows), default=0.0) < 1.0
    unit, mult = ("GFLOP/s", 1e3) if giga else ("TFLOP/s", 1.0)
    table = Table(title=title, title_justify="left")
    for col, just in (("impl", "left"), ("S", "right"), ("B", "right"), ("causal", "left"),
                      ("pass", "left"), ("ms", "right"), (unit, "right"),
                      ("vs cuDNN" if vs_cudnn else f"vs {harness.ANCHOR_XLA}", "right"),
                      *((("of matmul", "right"),) if ceiling_tflops else ()),
                      ("max err", "right"), ("status", "left")):
        table.add_column(escape(col), justify=just, no_wrap=col != "status",  # type: ignore[arg-type]
                         overflow="fold" if col == "status" else "ellipsis")
    style = {harness.OK: "green", harness.FAILED: "bold red", harness.ERROR: "red"}
    for r in rows:
        ratio = r.ratio_cudnn if vs_cudnn else r.ratio_xla
        status = f"[{style.get(r.status, 'yellow')}]{r.status}[/]"
        if r.note:
            status += f" [dim]{escape(r.note)}[/]"
        table.add_row(
            escape(r.impl), str(r.S), str(r.B), "yes" if r.causal else "no", r.pass_,
            fmt(r.ms, ".3f"), fmt(None if r.tflops is None else r.tflops * mult, ".1f"),
            fmt(ratio, ".2f"),
            *((fmt(None if r.tflops is None else r.tflops / ceiling_tflops, ".2f"),)
              if ceiling_tflops else ()),
            fmt(r.max_abs_err, ".1e"), status,
        )
    return table


def run_bench(
    cfg: BenchConfig, console: Console, *, out: str | None = None,
    argv: Sequence[str] = (), log_rows: bool = True, ceiling: dict[str, Any] | None = None,
) -> list[Row]:
    """Runs :func:`attnlab.bench.attention.bench_attention` under a progress bar, saving JSON to
    ``out`` after every (S, causal, pass) group (with the matmul ``ceiling`` when given)."""
    from attnlab.bench import attention, harness

    def on_row(r: Row) -> None:
        if log_rows:
            tf = "" if r.tflops is None else f"{r.tflops:8.2f} TFLOP/s {r.ms:9.3f} ms"
            console.print(
                f"  {r.impl:>16}  S={r.S:<6} {'causal' if r.causal else 'full  '} "
                f"{r.pass_:<6} {r.status:<11} {tf} {r.note}", highlight=False, markup=False,
            )

    def on_group(rows: list[Row]) -> None:
        if out:
            harness.write_json(out, attention.bench_record(cfg, rows, argv, ceiling))

    with progress(console) as prog:
        task = prog.add_task("bench", total=None)

        def on_step(done: int, total: int, label: str) -> None:
            prog.update(task, completed=done, total=total, description=label)

        rows = attention.bench_attention(cfg, on_step=on_step, on_row=on_row, on_group=on_group)
    return rows


def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``attnlab bench attention``: check, time and record every implementation and anchor."""
    cfg = bench_config_from_args(args, parser)
    from attnlab.bench import attention, harness

    console = make_console()
    env = harness.environment()
    if args.cpu_defaults:
        given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in args.cpu_defaults.items())
        console.print(f"note: no GPU or TPU, so CPU-sized defaults: {given} (the GPU defaults "
                      f"are {ACCELERATOR_DEFAULTS['shapes']} tokens in bfloat16; CPU timings "
                      "say nothing about GPU speed)", highlight=False, markup=False)
    out = args.out or default_out(env["device_kind"])
    console.print(
        f"[bold]bench attention[/] on {env['device_kind']} ({env['platform']}), JAX "
        f"{env['jax_version']}; H={cfg.head_dim} N={cfg.heads} K={cfg.n_kv_heads} {cfg.dtype}; "
        f"median of {cfg.repeats} after {cfg.warmup} warm-up calls"
    )
    argv = ["attnlab", *args.argv]
    # The roof: a dense matmul of the bench's dtype (a small one on CPU, where only the
    # column's presence is of use).
    ceiling = harness.matmul_ceiling(512 if env["platform"] == "cpu" else 8192, cfg.dtype)
    console.print(f"matmul ceiling: {ceiling['tflops']:.1f} TFLOP/s ({ceiling['n']}^3 "
                  f"{cfg.dtype} matmul, the same run)", highlight=False, markup=False)
    rows = run_bench(cfg, console, out=out, argv=argv, ceiling=ceiling)
    console.print(bench_table(rows, "attention: fwd counts 4*B*S*S*N*H FLOPs (halved causal), "
                                    "fwdbwd 3.5x", ceiling["tflops"]))
    harness.write_json(out, attention.bench_record(cfg, rows, argv, ceiling))
    console.print(f"wrote {out}", highlight=False, markup=False)
    failed = [r for r in rows if r.status == harness.FAILED]
    if failed:
        console.print(f"{len(failed)} check(s) FAILED: "
                      + ", ".join(f"{r.impl} S={r.S} {r.pass_}" for r in failed),
                      style="bold red", markup=False)
        return 1
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``bench`` to the ``attnlab`` subparsers ``sub``."""
    p = sub.add_parser(
        "bench", help="check and time implementations against the anchors",
        description="Checks every implementation against the reference, then times it and "
        "the anchors (jax.nn.dot_product_attention with cuDNN and XLA, tokamax where "
        "installed); prints a table and writes a JSON record. Without a GPU or TPU the sizes "
        "default to CPU-sized ones (a note says which).",
    )
    p.add_argument("op", choices=["attention"], help="the op to benchmark")
    acc, cpu = ACCELERATOR_DEFAULTS, CPU_DEFAULTS
    p.add_argument("--shapes", default=None,
                   help="comma-separated sequence lengths S (T == S) (default: "
                   f"{acc['shapes']} on a GPU or TPU, {cpu['shapes']} on CPU)")
    p.add_argument("--batch-tokens", type=positive_int, default=None,
                   help="B*S tokens per call; B = batch_tokens // S (default: "
                   f"{acc['batch_tokens']} on a GPU or TPU, {cpu['batch_tokens']} on CPU)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="a fixed batch size B for every shape, overriding --batch-tokens (default: "
                   "from --batch-tokens)")
    p.add_argument("--heads", type=positive_int, default=16, help="query heads N (default 16)")
    p.add_argument("--kv-heads", type=positive_int, default=None, help="kv heads K (default N)")
    p.add_argument("--head-dim", type=positive_int, default=128, help="head dim H (default 128)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help=f"input dtype (default: {acc['dtype']} on a GPU or TPU, {cpu['dtype']} "
                   "on CPU)")
    p.add_argument("--causal", default="both", choices=["both", "true", "false"])
    p.add_argument("--passes", default="fwd,fwdbwd",
                   help="comma list of fwd, fwdbwd (forward+backward); default both")
    p.add_argument("--bwd-causal-only", action="store_true",
                   help="run fwdbwd for causal calls only (as BENCHMARKS.md's table)")
    p.add_argument("--impls", default="auto",
                   help="'auto' (every registered impl that supports the call) or a comma list")
    p.add_argument("--no-anchors", action="store_true", help="skip jax.nn and tokamax anchors")
    p.add_argument("--out", default=None, help="write the JSON record here (default: "
                   f"{RESULTS_DIR}/bench_attention_<device kind>_<date>_<time>.json)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help=f"timed calls per point, median reported (default: {acc['repeats']} on "
                   f"a GPU or TPU, {cpu['repeats']} on CPU)")
    p.add_argument("--warmup", type=positive_int, default=None,
                   help=f"untimed calls first (default: {acc['warmup']} on a GPU or TPU, "
                   f"{cpu['warmup']} on CPU)")
    p.add_argument("--max-ref-gib", type=nonneg_float, default=2.0,
                   help="do not time the reference above this many GiB of logits")
    p.add_argument("--max-logits-gib", type=nonneg_float, default=8.0,
                   help="do not time jax.nn xla above this many GiB of S x S logits")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.set_defaults(run=cmd_bench, subparser=p)  # input errors print the bench usage
    return p

