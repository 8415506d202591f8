"""``attnlab demo``: a report computed on the spot (CPU by default, a few minutes at most).

Five sections, each a function: 1. the platform (:func:`platform_section`); 2. every available
implementation vs the reference over a grid of masks: outputs, LSE, gradients
(:func:`checks_section`); 3. merging K/V chunks by LSE (:func:`merge_section`); 4. timings vs
jax.nn's XLA attention and compiled temporary memory (:func:`timing_section`); 5. a tiny hybrid
model trained on MQAR (:func:`attnlab.cli.demo_train.training_section`).

The demo picks JAX's platform (``--platform``, default cpu) through ``jax.config`` before any
backend starts; nothing else in the CLI starts one before that.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from attnlab.cli.bench import bench_table, run_bench
from attnlab.cli.common import fmt, make_console, nonneg_int, positive_int, progress
from attnlab.cli.demo_train import training_section
from attnlab.cli.info import collect_info, print_info

if TYPE_CHECKING:
    from rich.console import Console


def cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``attnlab demo``: runs the five sections (the fifth unless ``--no-train``), prints a
    verdict, writes the report to ``--json``; exit status 1 when a check failed."""
    t_start = time.perf_counter()
    _set_platform(args.platform)
    from rich.rule import Rule

    from attnlab.bench import harness

    console = make_console()
    report: dict[str, Any] = {}
    info = platform_section(console, report)
    failures, interp = checks_section(console, args, info["platform"], report)
    failures += merge_section(console, args, info["platform"], report)
    failures += timing_section(console, args, info, interp, report)
    if not args.no_train:
        failures += training_section(console, args, report)

    elapsed = time.perf_counter() - t_start
    console.print(Rule())
    verdict = "[green]all checks passed[/]" if not failures else \
        f"[bold red]{failures} check(s) failed[/]"
    console.print(f"{verdict}; demo took {elapsed:.0f} s")
    report["seconds"] = elapsed
    report["failures"] = failures
    report["date"] = harness.now()
    report["argv"] = ["attnlab", *args.argv]
    if args.json:
        harness.write_json(args.json, report)
        console.print(f"wrote {args.json}")
    return 1 if failures else 0


def _set_platform(name: str) -> None:
    if name == "default":
        return
    import jax

    # Must happen before the first backend use; the CLI imports nothing that starts one.
    jax.config.update("jax_platforms", name)


def vars_of(obj: Any) -> dict[str, Any]:
    """A dataclass instance as a plain dict (for the demo's JSON)."""
    return dataclasses.asdict(obj)


# ----------------------------------------------------------------------------- 1. platform


def platform_section(console: Console, report: dict[str, Any]) -> dict[str, Any]:
    """Section 1: versions, devices, implementations (:func:`attnlab.cli.info.collect_info`)."""
    from rich.rule import Rule

    console.print(Rule("[bold]1. platform"))
    info = collect_info()
    print_info(info, console, short=True)
    report["info"] = info
    return info


# ----------------------------------------------------------------------------- 2. correctness


def checks_section(
    console: Console, args: argparse.Namespace, plat: str, report: dict[str, Any]
) -> tuple[int, list[str]]:
    """Section 2: every implementation but the reference against the reference over
    :data:`attnlab.testing.DEMO_CASES`. Returns (failed checks, the implementations that
    ran in Pallas interpret mode)."""
    import jax
    from rich.rule import Rule

    from attnlab import ops
    from attnlab.bench import checks, harness
    from attnlab.testing import DEMO_CASES, tolerance

    console.print(Rule("[bold]2. every implementation vs the reference"))
    impls = [n for n in ops.implementations() if n != "reference"]
    console.print(_case_legend(DEMO_CASES))
    key = jax.random.key(args.seed)
    opts = checks.FAST_COMPILE_CPU if plat == "cpu" else None
    ref_cache: dict[Any, Any] = {}
    # The first implementation's checks fill the reference cache. XLA compiles with the GIL
    # released, so two threads keep two cores busy through these compile-bound checks (runs
    # are serialized inside check_case).
    jobs = [(n, i, c) for n in impls for i, c in enumerate(DEMO_CASES)]
    with progress(console) as prog, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        task = prog.add_task("checking", total=len(jobs))

        def run(job: tuple[str, int, Any]) -> checks.CheckResult:
            name, i, case = job
            r = checks.check_case(name, case, jax.random.fold_in(key, i),
                                  compiler_options=opts, cache=ref_cache)
            prog.update(task, advance=1, description=f"{name}: {case.name}")
            return r

        results = list(pool.map(run, jobs))
    grid, failures = _check_grid(impls, results, tolerance("float32", plat))
    console.print(grid)
    if opts:
        console.print(f"[dim]checks compiled with {opts} (they are not timed; it only saves "
                      "compile time)[/]")
    interp = [n for n in impls if harness.runs_interpreted(ops.implementations()[n], plat)]
    if interp:
        console.print(f"[dim]{', '.join(interp)} ran in Pallas interpret mode (correctness only; "
                      "not timed below).[/]")
    report["checks"] = [vars_of(r) for r in results]
    return failures, interp


def _case_legend(cases: Any) -> Any:
    from rich.table import Table

    legend = Table(title="cases (float32; random normal inputs per case, the same for every "
                   "implementation)", title_justify="left")
    legend.add_column("case", style="bold")
    legend.add_column("shape  B,T,S,N,K,H")
    legend.add_column("what it exercises")
    for c in cases:
        legend.add_row(c.name, f"{c.b},{c.t},{c.s},{c.n},{c.kh},{c.h}", c.description)
    return legend


def _check_grid(impls: list[str], results: list[Any], tol: Any) -> tuple[Any, int]:
    """(the table of errors per implementation and case, the number of FAIL / error cells)."""
    from rich.markup import escape
    from rich.table import Table

    from attnlab.bench.checks import CHECKED

    grid = Table(
        title=f"max abs error vs reference (PASS if err <= tol * max(1, |ref|); tol out "
        f"{tol.out:.0e}, lse {tol.lse:.0e}, dq {tol.dq:.0e}, dk {tol.dk:.0e}, dv {tol.dv:.0e})",
        title_justify="left",
    )
    for col in ("impl", "case", *CHECKED, "result", "s"):
        grid.add_column(col, justify="left" if col in ("impl", "case", "result") else "right")
    failures = 0
    for name in impls:
        mine = [r for r in results if r.impl == name]
        notes = {r.note for r in mine}
        if all(r.status == "n/a" for r in mine) and len(notes) == 1:
            # One line for an implementation this platform cannot run at all.
            grid.add_row(escape(name), "all", *["-"] * len(CHECKED),
                         f"[yellow]n/a[/] [dim]{escape(mine[0].note)}[/]", "-")
            continue
        for r in mine:
            style = {"PASS": "green", "FAIL": "bold red", "error": "red"}.get(r.status, "yellow")
            failures += r.status in ("FAIL", "error")
            cells = [fmt(r.errors[n], ".1e") for n in CHECKED]
            note = f" [dim]{escape(r.note)}[/]" if r.note else ""
            grid.add_row(escape(r.impl), r.case, *cells, f"[{style}]{r.status}[/]{note}",
                         f"{r.seconds:.1f}")
        grid.add_section()
    return grid, failures


# ----------------------------------------------------------------------------- 3. merge


def merge_section(
    console: Console, args: argparse.Namespace, plat: str, report: dict[str, Any]
) -> int:
    """Section 3: K/V chunks computed by each implementation that returns the LSE, merged by
    :func:`attnlab.ops.merge_n`, against the whole. Returns the number of failures."""
    import jax
    from rich.markup import escape
    from rich.rule import Rule
    from rich.table import Table

    from attnlab import ops
    from attnlab.bench import checks, harness

    console.print(Rule("[bold]3. merging partial results by log-sum-exp"))
    console.print(
        "Causal attention over T=S=192 with K/V split in 3 chunks of 64 (each with its global "
        "kv_offset), merged with attnlab.ops.merge_n, vs the reference over all keys. Chunks "
        "to the right of a query see no key (lse = -inf) and must weigh 0."
    )
    key = jax.random.key(args.seed)
    opts = checks.FAST_COMPILE_CPU if plat == "cpu" else None
    failures, merge_rows = 0, []
    mt = Table()
    for col in ("impl computing the chunks", "max |out err|", "max |lse err|",
                "(chunk, row, head) with lse=-inf", "result"):
        mt.add_column(col)
    with progress(console) as prog:
        lse_impls = [n for n in ops.implementations() if _merge_ok(n, plat)]
        task = prog.add_task("merge", total=len(lse_impls))
        for name in lse_impls:
            prog.update(task, description=f"merge: {name}")
            try:
                m = checks.merge_check(name, jax.random.fold_in(key, 100), compiler_options=opts)
                merge_rows.append(m)
                failures += not m.passed
                mt.add_row(escape(name), f"{m.out_err:.1e}", f"{m.lse_err:.1e}",
                           str(m.masked_part_rows), "[green]PASS[/]" if m.passed
                           else "[bold red]FAIL[/]")
            except Exception as e:  # report and go on: one impl's failure is a finding
                failures += 1
                err = escape(harness.short_error(e))
                mt.add_row(escape(name), "-", "-", "-", f"[red]error[/] {err}")
            prog.advance(task)
    console.print(mt)
    report["merge"] = [vars_of(m) for m in merge_rows]
    return failures


def _merge_ok(name: str, plat: str) -> bool:
    """Whether ``name`` can compute the merge demo's chunks (causal, kv_offset, with LSE)."""
    import jax
    import jax.numpy as jnp

    from attnlab import ops

    q = jax.ShapeDtypeStruct((1, 192, 4, 32), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 64, 2, 32), jnp.float32)
    why = ops.explain(q, kv, kv, impl_names=(name,), plat=plat, is_causal=True, kv_offset=64,
                      return_residuals=True)
    return why.get(name) is None


# ----------------------------------------------------------------------------- 4. timing


def timing_section(
    console: Console, args: argparse.Namespace, info: dict[str, Any], interp: list[str],
    report: dict[str, Any],
) -> int:
    """Section 4: the attention benchmark at two small shapes (the interpreted kernels and the
    reference left out), then compiled temporary memory. Returns the number of FAILED rows."""
    from rich.rule import Rule

    from attnlab.bench import attention, harness

    plat = info["platform"]
    console.print(Rule("[bold]4. timing and memory vs jax.nn.dot_product_attention (xla)"))
    cfg = attention.BenchConfig(
        shapes=(1024, 2048), batch=1, heads=4, head_dim=64, dtype="float32", causal=(True,),
        passes=("fwd", "fwdbwd"), repeats=args.repeats, warmup=2, seed=args.seed,
        # The reference is timed by `attnlab bench`; here it would cost a third of the demo.
        # Interpret-mode kernels are checked above; their CPU time means nothing.
        exclude=("reference", *interp),
    )
    console.print(
        f"B=1, N=K=4, H=64, float32, causal; median of {cfg.repeats} calls after 2 warm-ups; "
        "every implementation checked against the reference first."
        + (f" Not timed: {', '.join(interp)} (Pallas interpret mode on {plat}: correctness "
           "only, its time says nothing about the compiled kernel)." if interp else "")
    )
    rows = run_bench(cfg, console, log_rows=False)
    console.print(bench_table(rows, f"attention timing on {info['device_kind']}"))
    report["timing"] = [r.to_json() for r in rows]
    report["memory"] = _memory_table(console)
    return sum(r.status == harness.FAILED for r in rows)


def _memory_table(console: Console) -> list[dict[str, Any]]:
    """Compiled temporary memory of attnlab's xla path vs jax.nn xla (nothing is allocated)."""
    import jax
    import jax.numpy as jnp
    from rich.markup import escape
    from rich.table import Table

    from attnlab import ops
    from attnlab.bench import harness, memory

    def ours(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return ops.attention(q, k, v, is_causal=True, impl="xla")

    def jax_nn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    out: list[dict[str, Any]] = []
    console.print("Peak temporary memory of the compiled program (XLA's memory_analysis()."
                  "temp_size_in_bytes; compiled only, nothing allocated), B=1, N=K=4, H=64, "
                  "float32, causal:")
    table = Table()
    for col in ("S", "pass", "attnlab xla", harness.ANCHOR_XLA, "jax.nn / attnlab"):
        table.add_column(escape(col), justify="right")
    lengths = (4096, 16384)
    with progress(console) as prog:
        task = prog.add_task("compiling", total=len(lengths) * 2)
        for s in lengths:
            x = jax.ShapeDtypeStruct((1, s, 4, 64), jnp.float32)
            for pass_ in ("fwd", "fwdbwd"):
                prog.update(task, description=f"compiling S={s} {pass_}")
                sizes = []
                for fn in (ours, jax_nn):
                    f = fn if pass_ == "fwd" else harness.grad_fn(fn)
                    args = (x, x, x) if pass_ == "fwd" else (x, x, x, x)
                    sizes.append(memory.temp_memory_bytes(f, *args))
                a, b = sizes
                out.append({"S": s, "pass": pass_, "attnlab_xla_bytes": a, "jax_nn_xla_bytes": b})
                table.add_row(str(s), pass_, _mib(a), _mib(b),
                              "-" if not a or b is None else f"{b / a:.1f}x")
                prog.advance(task)
    console.print(table)
    return out


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.1f} MiB"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``demo`` to the ``attnlab`` subparsers ``sub``."""
    p = sub.add_parser("demo", help="a report computed on the spot: correctness, merge, timing")
    p.add_argument("--platform", default="cpu", choices=["cpu", "gpu", "tpu", "default"],
                   help="JAX platform to run on (default cpu)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls per point (median)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--jobs", type=positive_int, default=2,
                   help="threads for the correctness checks (compile-bound; default 2)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also save the results here as JSON (default: not saved)")
    p.add_argument("--run-dir", default=None,
                   help="run directory of the training section (default: a new temp dir)")
    p.add_argument("--no-train", action="store_true", help="skip the training section")
    p.set_defaults(run=cmd_demo, subparser=p)
    return p
