"""The ``attnlab`` command: ``info``, ``bench``, ``demo``, ``train``, ``eval`` and ``generate``.

    attnlab info [--json]
    attnlab bench attention --shapes 2048,8192 --causal both --passes fwd,fwdbwd --out r.json
    attnlab demo [--json PATH]
    attnlab train --config tiny --attention hybrid --task mqar --steps 200 --out runs/t
    attnlab eval --ckpt runs/t
    attnlab generate --ckpt runs/t --prompt "def " --max-new-tokens 64 [--temperature 0.8]

Also runs as ``python -m attnlab.cli`` (the GPU machine has the repo on PYTHONPATH only).
Heavy imports happen inside the subcommands so that ``--help`` and argument errors are quick,
and so that ``demo`` can pick JAX's platform before any backend starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from attnlab.bench.attention import BenchConfig, Row

# The typical call `info` reports availability for (B=1, T=S=1024, N=K=8, H=128).
_TYPICAL = {"b": 1, "s": 1024, "n": 8, "kh": 8, "h": 128}


# ----------------------------------------------------------------------------- info


def make_console() -> Console:
    """A rich console; 160 columns wide when output goes to a file or pipe (logs stay readable
    instead of being cut at rich's default of 80)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def collect_info() -> dict[str, Any]:
    """Versions, devices, every registered attention implementation and what ``auto`` picks.

    Availability is for the typical call: bf16 on GPU/TPU, f32 on CPU, B=1, T=S=1024, N=K=8,
    H=128, causal. Returns a JSON-ready dict (what ``attnlab info --json`` prints).
    """
    import jax
    import jax.numpy as jnp

    import attnlab
    from attnlab import ops
    from attnlab.bench import harness

    env = harness.environment()
    plat = ops.platform()
    kinds: dict[str, int] = {}
    for d in jax.devices():
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    dtype = jnp.float32 if plat == "cpu" else jnp.bfloat16
    t = _TYPICAL
    q = jax.ShapeDtypeStruct((t["b"], t["s"], t["n"], t["h"]), dtype)
    kv = jax.ShapeDtypeStruct((t["b"], t["s"], t["kh"], t["h"]), dtype)
    impls = ops.implementations()
    why = ops.explain(q, kv, kv, is_causal=True)
    rows = [
        {
            "name": name,
            "available": why.get(name) is None,
            "reason": why.get(name),
            "interpreted": harness.runs_interpreted(impl, plat),
            "returns_lse": impl.returns_lse,
            "description": impl.description,
        }
        for name, impl in impls.items()
    ]

    def auto(**kw: Any) -> str:
        try:
            return ops.auto_choice(q, kv, kv, **kw)
        except ValueError as e:
            return f"none ({e})"

    return {
        "attnlab_version": attnlab.__version__,
        **env,
        "backend": jax.default_backend(),
        "devices": [{"kind": k, "count": c} for k, c in kinds.items()],
        "typical_call": {
            "q": list(q.shape), "k": list(kv.shape), "v": list(kv.shape),
            "dtype": jnp.dtype(dtype).name, "is_causal": True,
        },
        "implementations": rows,
        "auto_order": _auto_order(plat),
        "auto": {
            "causal": auto(is_causal=True),
            "non_causal": auto(is_causal=False),
            "causal_return_residuals": auto(is_causal=True, return_residuals=True),
        },
        "anchors": {
            harness.ANCHOR_XLA: "yes",
            harness.ANCHOR_CUDNN: "yes" if plat == "gpu" else f"no (platform is {plat})",
            "tokamax": env["tokamax_version"] or "not importable",
        },
    }


def _auto_order(plat: str) -> list[str]:
    from attnlab.ops import AUTO_ORDER

    return list(AUTO_ORDER.get(plat, ()))


def _print_info(info: dict[str, Any], console: Console, *, short: bool = False) -> None:
    from rich.markup import escape
    from rich.table import Table

    devs = ", ".join(f"{d['count']} x {d['kind']}" for d in info["devices"])
    console.print(
        f"[bold]attnlab[/] {info['attnlab_version']}  JAX {info['jax_version']}  "
        f"jaxlib {info['jaxlib_version']}  Python {info['python']}"
    )
    console.print(f"platform [bold]{info['platform']}[/]  devices: {devs}")
    tc = info["typical_call"]
    table = Table(
        title=f"attention implementations for a typical call: q {tc['q']} k/v {tc['k']} "
        f"{tc['dtype']}, causal",
        title_justify="left",
    )
    table.add_column("impl", style="bold")
    table.add_column("available")
    table.add_column("description" if not short else "note", overflow="fold")
    for r in info["implementations"]:
        if r["available"]:
            avail = "[green]yes[/]" + (" (interpret mode)" if r["interpreted"] else "")
            note = r["description"]
        else:
            avail, note = "[red]no[/]", r["reason"]
        table.add_row(escape(r["name"]), avail, escape(note or ""))
    console.print(table)
    a = {k: escape(v) for k, v in info["auto"].items()}
    console.print(
        f"impl='auto' (order {', '.join(info['auto_order'])}) chooses: causal -> [bold]"
        f"{a['causal']}[/], non-causal -> [bold]{a['non_causal']}[/], causal + "
        f"return_residuals -> [bold]{a['causal_return_residuals']}[/]"
    )
    if not short:
        anchors = ", ".join(f"{k}: {v}" for k, v in info["anchors"].items())
        console.print(f"anchors: {anchors}", markup=False)


def cmd_info(args: argparse.Namespace) -> int:
    """``attnlab info``: prints :func:`collect_info` as tables, or as JSON with ``--json``."""
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    _print_info(info, make_console())
    return 0


# ----------------------------------------------------------------------------- bench


def _int_list(text: str, what: str, parser: argparse.ArgumentParser) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        parser.error(f"{what} must be comma-separated integers, got {text!r}")
    if not vals:
        parser.error(f"{what} is empty")
    return vals


def bench_config_from_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> BenchConfig:
    """Builds and validates a :class:`attnlab.bench.attention.BenchConfig`; bad input ends in
    ``parser.error`` (exit status 2 with a message saying what to change)."""
    from attnlab.bench import attention, candidates, harness

    causal = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    passes = tuple(p.strip() for p in args.passes.split(",") if p.strip())
    impls: tuple[str, ...] | None = None
    if args.impls != "auto":
        impls = tuple(n.strip() for n in args.impls.split(",") if n.strip())
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


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def bench_table(rows: Sequence[Row], title: str) -> Any:
    """A rich table of bench rows; the ratio is to cuDNN when it was timed, else to jax.nn xla."""
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
            _fmt(r.ms, ".3f"), _fmt(None if r.tflops is None else r.tflops * mult, ".1f"),
            _fmt(ratio, ".2f"), _fmt(r.max_abs_err, ".1e"), status,
        )
    return table


def _progress(console: Console) -> Any:
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


def run_bench(
    cfg: BenchConfig, console: Console, *, out: str | None = None,
    argv: Sequence[str] = (), log_rows: bool = True,
) -> list[Row]:
    """Runs :func:`attnlab.bench.attention.bench_attention` under a progress bar, saving JSON to
    ``out`` after every (S, causal, pass) group."""
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
            harness.write_json(out, attention.bench_record(cfg, rows, argv))

    with _progress(console) as prog:
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
    console.print(
        f"[bold]bench attention[/] on {env['device_kind']} ({env['platform']}), JAX "
        f"{env['jax_version']}; H={cfg.head_dim} N={cfg.heads} K={cfg.n_kv_heads} {cfg.dtype}; "
        f"median of {cfg.repeats} after {cfg.warmup} warm-up calls"
    )
    argv = ["attnlab", *args.argv]
    rows = run_bench(cfg, console, out=args.out, argv=argv)
    console.print(bench_table(rows, "attention: fwd counts 4*B*S*S*N*H FLOPs (halved causal), "
                                    "fwdbwd 3.5x"))
    if args.out:
        harness.write_json(args.out, attention.bench_record(cfg, rows, argv))
        console.print(f"wrote {args.out}")
    failed = [r for r in rows if r.status == harness.FAILED]
    if failed:
        console.print(f"{len(failed)} check(s) FAILED: "
                      + ", ".join(f"{r.impl} S={r.S} {r.pass_}" for r in failed),
                      style="bold red", markup=False)
        return 1
    return 0


# ----------------------------------------------------------------------------- demo


def _set_platform(name: str) -> None:
    if name == "default":
        return
    import jax

    # Must happen before the first backend use; the CLI imports nothing that starts one.
    jax.config.update("jax_platforms", name)


def cmd_demo(args: argparse.Namespace) -> int:
    """``attnlab demo``: a report computed on the spot (CPU by default, a few minutes at most).

    1. the platform; 2. every available implementation vs the reference over a grid of masks
    (outputs, LSE, gradients); 3. merging K/V chunks by LSE; 4. timings vs jax.nn's XLA
    attention and compiled temporary memory; 5. a tiny hybrid model trained on MQAR (loss
    plot PNG in the run directory, answers generated by the trained model).
    """
    t_start = time.perf_counter()
    _set_platform(args.platform)
    import jax
    import jax.numpy as jnp
    from rich.markup import escape
    from rich.rule import Rule
    from rich.table import Table

    from attnlab import ops
    from attnlab.bench import attention, checks, harness

    console = make_console()
    report: dict[str, Any] = {}
    failures = 0

    # 1. platform ---------------------------------------------------------------------------
    console.print(Rule("[bold]1. platform"))
    info = collect_info()
    _print_info(info, console, short=True)
    report["info"] = info
    plat = info["platform"]

    # 2. correctness grid -------------------------------------------------------------------
    console.print(Rule("[bold]2. every implementation vs the reference"))
    impls = [n for n in ops.implementations() if n != "reference"]
    cases = checks.CHECK_CASES
    tol = harness.tolerance(jnp.float32, plat)
    legend = Table(title="cases (float32; random normal inputs per case, the same for every "
                   "implementation)", title_justify="left")
    legend.add_column("case", style="bold")
    legend.add_column("shape  B,T,S,N,K,H")
    legend.add_column("what it exercises")
    for c in cases:
        legend.add_row(c.name, f"{c.b},{c.t},{c.s},{c.n},{c.kh},{c.h}", c.description)
    console.print(legend)
    key = jax.random.key(args.seed)
    opts = checks.FAST_COMPILE_CPU if plat == "cpu" else None
    ref_cache: dict[Any, Any] = {}
    # The first implementation's checks fill the reference cache. XLA compiles with the GIL
    # released, so two threads keep two cores busy through these compile-bound checks (runs
    # are serialized inside check_case).
    jobs = [(n, i, c) for n in impls for i, c in enumerate(cases)]
    with _progress(console) as prog, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        task = prog.add_task("checking", total=len(jobs))

        def run(job: tuple[str, int, Any]) -> checks.CheckResult:
            name, i, case = job
            r = checks.check_case(name, case, jax.random.fold_in(key, i),
                                 compiler_options=opts, cache=ref_cache)
            prog.update(task, advance=1, description=f"{name}: {case.name}")
            return r

        results = list(pool.map(run, jobs))
    grid = Table(
        title=f"max abs error vs reference (PASS if err <= tol * max(1, |ref|); tol out "
        f"{tol.out:.0e}, lse {tol.lse:.0e}, dq {tol.dq:.0e}, dk {tol.dk:.0e}, dv {tol.dv:.0e})",
        title_justify="left",
    )
    for col in ("impl", "case", *checks.CHECKED, "result", "s"):
        grid.add_column(col, justify="left" if col in ("impl", "case", "result") else "right")
    for name in impls:
        mine = [r for r in results if r.impl == name]
        notes = {r.note for r in mine}
        if all(r.status == "n/a" for r in mine) and len(notes) == 1:
            # One line for an implementation this platform cannot run at all.
            grid.add_row(escape(name), "all", *["-"] * len(checks.CHECKED),
                         f"[yellow]n/a[/] [dim]{escape(mine[0].note)}[/]", "-")
            continue
        for r in mine:
            style = {"PASS": "green", "FAIL": "bold red", "error": "red"}.get(r.status, "yellow")
            failures += r.status in ("FAIL", "error")
            cells = [_fmt(r.errors[n], ".1e") for n in checks.CHECKED]
            note = f" [dim]{escape(r.note)}[/]" if r.note else ""
            grid.add_row(escape(r.impl), r.case, *cells, f"[{style}]{r.status}[/]{note}",
                         f"{r.seconds:.1f}")
        grid.add_section()
    console.print(grid)
    if opts:
        console.print(f"[dim]checks compiled with {opts} (they are not timed; it only saves "
                      "compile time)[/]")
    interp = [n for n in impls if harness.runs_interpreted(ops.implementations()[n], plat)]
    if interp:
        console.print(f"[dim]{', '.join(interp)} ran in Pallas interpret mode (correctness only; "
                      "not timed below).[/]")
    report["checks"] = [vars_of(r) for r in results]

    # 3. merge --------------------------------------------------------------------------------
    console.print(Rule("[bold]3. merging partial results by log-sum-exp"))
    console.print(
        "Causal attention over T=S=192 with K/V split in 3 chunks of 64 (each with its global "
        "kv_offset), merged with attnlab.ops.merge_n, vs the reference over all keys. Chunks "
        "to the right of a query see no key (lse = -inf) and must weigh 0."
    )
    merge_rows = []
    mt = Table()
    for col in ("impl computing the chunks", "max |out err|", "max |lse err|",
                "(chunk, row, head) with lse=-inf", "result"):
        mt.add_column(col)
    with _progress(console) as prog:
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

    # 4. timing and memory --------------------------------------------------------------------
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
    failures += sum(r.status == harness.FAILED for r in rows)
    console.print(bench_table(rows, f"attention timing on {info['device_kind']}"))
    report["timing"] = [r.to_json() for r in rows]

    mem_rows = _memory_table(console)
    report["memory"] = mem_rows

    # 5. training -------------------------------------------------------------------------------
    if not args.no_train:
        failures += _demo_training(console, args, report)

    elapsed = time.perf_counter() - t_start
    console.print(Rule())
    verdict = "[green]all checks passed[/]" if not failures else \
        f"[bold red]{failures} check(s) failed[/]"
    console.print(f"{verdict}; demo took {elapsed:.0f} s")
    report["seconds"] = elapsed
    report["failures"] = failures
    report["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    report["argv"] = ["attnlab", *args.argv]
    if args.json:
        harness.write_json(args.json, report)
        console.print(f"wrote {args.json}")
    return 1 if failures else 0


def _demo_training(console: Console, args: argparse.Namespace, report: dict[str, Any]) -> int:
    """Section 5 of the demo: trains the ``tiny`` preset (7:1 hybrid when lightning is
    registered) on MQAR, plots the loss, and answers fresh MQAR queries with ``generate``.
    Returns the number of failed checks (the loss must fall)."""
    import tempfile
    from pathlib import Path

    import jax.numpy as jnp
    import numpy as np
    from rich.rule import Rule
    from rich.table import Table

    from attnlab.data import MQAR
    from attnlab.nn import generate, mechanisms
    from attnlab.train import load_run, load_run_config, plot_losses, read_metrics, train

    attention = "hybrid" if "L" in mechanisms() else "softmax"
    model, tc = load_run_config("tiny", attention=attention, seed=args.seed)
    console.print(Rule(f"[bold]5. training a tiny {attention} model on MQAR"))
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="attnlab-demo-"))
    note = "" if attention == "hybrid" else " (lightning is not registered: all softmax)"
    console.print(
        f"layer pattern {model.layer_pattern}{note}, d_model {model.d_model}, {tc.steps} steps "
        f"of {tc.batch_size} x {tc.seq_len} tokens; multi-query associative recall with "
        f"{tc.task_options['num_kv_pairs']} key-value pairs per example (chance over the 128 "
        f"values: loss {np.log(128):.2f}); run directory {run_dir}", highlight=False)
    with _progress(console) as prog:
        task = prog.add_task("training", total=tc.steps)

        def on_log(rec: dict[str, Any]) -> None:
            if "loss" in rec and rec.get("loss") is not None:
                prog.update(task, completed=rec["step"],
                            description=f"training: loss {rec['loss']:.3f}")

        res = train(model, tc, run_dir, progress=False, on_log=on_log)
    pairs = tc.task_options["num_kv_pairs"]
    png = plot_losses(res.metrics_path, run_dir / "loss.png",
                      title=f"MQAR, pattern {model.layer_pattern}",
                      references={"chance over the 128 values": float(np.log(128)),
                                  f"uniform over the {pairs} values in context":
                                  float(np.log(pairs))})
    losses = [r for r in read_metrics(res.metrics_path) if r.get("accuracy") is not None]
    first, last = losses[0], losses[-1]
    tps = [r["tokens_per_s"] for r in losses if r.get("tokens_per_s")]
    console.print(
        f"loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step "
        f"{last['step']}; validation loss {res.validation['val_loss']:.3f}, answer accuracy "
        f"{res.validation['val_accuracy']:.1%}; {np.median(tps):,.0f} tokens/s; "
        f"{res.num_params:,} parameters", highlight=False)
    console.print(
        f"[dim]A model that picks one of the {pairs} values in its context at random scores "
        f"loss {np.log(pairs):.2f} and {1 / pairs:.0%}; recalling the right one (the induction "
        "circuit) takes this model far more steps than a demo minute.[/]")
    console.print(f"loss plot: {png}", markup=False, highlight=False)

    # Sample generations: fresh examples, the prompt ends with the first query key.
    run = load_run(run_dir)
    mqar = MQAR(seq_len=tc.seq_len, **tc.task_options)
    rng = np.random.default_rng([args.seed, 12345])
    examples = [mqar.example(rng)[0] for _ in range(6)]
    n = mqar.num_kv_pairs
    prompts = jnp.asarray(np.stack([e[: 2 * n + 1] for e in examples]))
    out = np.asarray(generate(run.model, prompts, 1))
    table = Table(title=f"generate() from checkpoint step {run.step}: the answer to the first "
                  "query of fresh examples", title_justify="left")
    for col in ("key:value pairs in context", "query", "generated", "true", ""):
        table.add_column(col)
    right = 0
    for e, o in zip(examples, out):
        pairs = " ".join(f"{k}:{v}" for k, v in zip(e[: 2 * n : 2], e[1 : 2 * n : 2]))
        ok = int(o[-1]) == int(e[2 * n + 1])
        right += ok
        table.add_row(pairs, str(e[2 * n]), str(o[-1]), str(e[2 * n + 1]),
                      "[green]right[/]" if ok else "[red]wrong[/]")
    console.print(table)
    report["train"] = {"run_dir": str(run_dir), "loss_png": str(png),
                       "layer_pattern": model.layer_pattern, "first": first, "last": last,
                       "validation": res.validation, "generated_right": right,
                       "generated_total": len(examples)}
    fell = last["loss"] < first["loss"] - 0.5
    if not fell:
        console.print("[bold red]FAIL[/] the training loss did not fall by 0.5 nats")
    return 0 if fell else 1


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
    with _progress(console) as prog:
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


def vars_of(obj: Any) -> dict[str, Any]:
    """A dataclass instance as a plain dict (for the demo's JSON)."""
    import dataclasses

    return dataclasses.asdict(obj)



# ----------------------------------------------------------------------------- train / eval


def run_config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """(model Config, TrainConfig, dataset, mesh) of ``attnlab train``; every configuration
    error ends in ``parser.error`` (exit status 2) before anything is compiled."""
    from attnlab.train import load_run_config, prepare
    from attnlab.train.trainer import check_run_dir

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
        tc = dataclasses.replace(tc, **overrides)
        cfg, dataset, mesh = prepare(model, tc)
        check_run_dir(args.out, cfg, tc)
    except ValueError as e:
        parser.error(str(e))
    return cfg, tc, dataset, mesh


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``attnlab train``: trains (or resumes) a run in ``--out``; exit 1 on a NaN/inf loss."""
    cfg, tc, _, mesh = run_config_from_args(args, parser)
    from attnlab.train import NonFiniteLossError, plot_losses, train

    console = make_console()
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
    png = plot_losses(res.metrics_path, res.out_dir / "loss.png",
                      title=f"{tc.task}, {cfg.layer_pattern}")
    resumed = "" if res.resumed_from is None else f" (resumed from step {res.resumed_from})"
    val = ", ".join(f"{k} {v:.4f}" for k, v in res.validation.items())
    console.print(f"{res.num_params:,} parameters; {res.steps_done} steps{resumed}; final loss "
                  f"{res.final_loss:.4f}; {val}", highlight=False)
    console.print(f"metrics {res.metrics_path}\ncheckpoints {res.checkpoint_dir}\nloss plot {png}",
                  highlight=False, markup=False)
    return 0


def _load_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    from attnlab.train import load_run

    try:
        return load_run(args.ckpt)
    except ValueError as e:
        parser.error(str(e))


def cmd_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``attnlab eval``: validation loss and task accuracy of a run's latest checkpoint."""
    run = _load_run(args, parser)
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


def cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``attnlab generate``: continues a byte-level prompt with a run's model."""
    run = _load_run(args, parser)
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


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``attnlab`` command."""
    p = argparse.ArgumentParser(
        prog="attnlab",
        description="attnlab: attention in JAX (info, bench, demo, train, eval, generate)",
    )
    sub = p.add_subparsers(dest="command", required=True,
                           metavar="{info,bench,demo,train,eval,generate}")

    pi = sub.add_parser("info", help="versions, devices, attention implementations, auto choice")
    pi.add_argument("--json", action="store_true", help="print JSON instead of tables")

    pb = sub.add_parser("bench", help="check and time implementations against the anchors")
    pb.add_argument("op", choices=["attention"], help="the op to benchmark")
    pb.add_argument("--shapes", default="2048,8192",
                    help="comma-separated sequence lengths S (T == S); default 2048,8192")
    pb.add_argument("--batch-tokens", type=int, default=32768,
                    help="B*S tokens per call; B = batch_tokens // S (default 32768)")
    pb.add_argument("--batch", type=int, default=None,
                    help="a fixed batch size B for every shape (overrides --batch-tokens)")
    pb.add_argument("--heads", type=int, default=16, help="query heads N (default 16)")
    pb.add_argument("--kv-heads", type=int, default=None, help="kv heads K (default N)")
    pb.add_argument("--head-dim", type=int, default=128, help="head dim H (default 128)")
    pb.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    pb.add_argument("--causal", default="both", choices=["both", "true", "false"])
    pb.add_argument("--passes", default="fwd,fwdbwd",
                    help="comma list of fwd, fwdbwd (forward+backward); default both")
    pb.add_argument("--bwd-causal-only", action="store_true",
                    help="run fwdbwd for causal calls only (as BENCHMARKS.md's table)")
    pb.add_argument("--impls", default="auto",
                    help="'auto' (every registered impl that supports the call) or a comma list")
    pb.add_argument("--no-anchors", action="store_true", help="skip jax.nn and tokamax anchors")
    pb.add_argument("--out", default=None, help="write the JSON record here "
                    "(e.g. experiments/results/bench_attention_h100.json)")
    pb.add_argument("--repeats", type=int, default=20, help="timed calls per point (median)")
    pb.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    pb.add_argument("--max-ref-gib", type=float, default=2.0,
                    help="do not time the reference above this many GiB of logits")
    pb.add_argument("--max-logits-gib", type=float, default=8.0,
                    help="do not time jax.nn xla above this many GiB of S x S logits")
    pb.add_argument("--seed", type=int, default=0)
    pb.set_defaults(subparser=pb)  # so input errors print the bench usage

    pd = sub.add_parser("demo", help="a report computed on the spot: correctness, merge, timing")
    pd.add_argument("--platform", default="cpu", choices=["cpu", "gpu", "tpu", "default"],
                    help="JAX platform to run on (default cpu)")
    pd.add_argument("--repeats", type=int, default=5, help="timed calls per point (median)")
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--jobs", type=int, default=2,
                    help="threads for the correctness checks (compile-bound; default 2)")
    pd.add_argument("--json", default=None, metavar="PATH", help="also save the results here")
    pd.add_argument("--run-dir", default=None,
                    help="run directory of the training section (default: a new temp dir)")
    pd.add_argument("--no-train", action="store_true", help="skip the training section")

    pt = sub.add_parser("train", help="train (or resume) a model on a task; writes a run dir")
    pt.add_argument("--config", default="tiny",
                    help="preset (tiny, small, 350m) or a .py/.yaml file (default tiny)")
    pt.add_argument("--attention", default=None, choices=["softmax", "lightning", "hybrid"],
                    help="layer pattern: all softmax, all lightning, or 7:1 lightning:softmax "
                    "(default: the config's pattern)")
    pt.add_argument("--task", default=None,
                    choices=["mqar", "induction", "passkey", "calendar", "stdlib"],
                    help="dataset (default: the config's)")
    pt.add_argument("--steps", type=int, default=None, help="optimizer steps")
    pt.add_argument("--out", required=True, help="run directory (resumes if it has checkpoints)")
    pt.add_argument("--batch-size", type=int, default=None)
    pt.add_argument("--seq-len", type=int, default=None)
    pt.add_argument("--lr", type=float, default=None, help="peak learning rate")
    pt.add_argument("--seed", type=int, default=None)
    pt.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="compute dtype (params stay float32)")
    pt.add_argument("--checkpoint-every", type=int, default=None)
    pt.add_argument("--keep", type=int, default=None, help="checkpoints kept on disk")
    pt.add_argument("--log-every", type=int, default=None)
    pt.add_argument("--data-parallel", type=int, default=None,
                    help="devices on the data axis (default: as many as divide the batch)")
    pt.add_argument("--seq-parallel", type=int, default=None, metavar="N",
                    help="devices on the sequence axis: each sequence is split into N blocks "
                    "and attention runs across them (default 1)")
    pt.add_argument("--sp-strategy", default=None,
                    help="softmax layers' sequence-parallel strategy: ring, striped, zigzag "
                    "or ulysses (default zigzag; lightning layers use LASP-2)")
    pt.add_argument("--no-progress", action="store_true", help="no progress bar")
    pt.add_argument("--debug-nan-step", type=int, default=None, help=argparse.SUPPRESS)
    pt.set_defaults(subparser=pt)

    pe = sub.add_parser("eval", help="validation loss and task accuracy of a run")
    pe.add_argument("--ckpt", required=True, help="run directory (or its checkpoints folder)")
    pe.add_argument("--batches", type=int, default=None, help="validation batches")
    pe.add_argument("--json", action="store_true", help="print JSON")
    pe.set_defaults(subparser=pe)

    pg = sub.add_parser("generate", help="continue a text prompt with a run's model")
    pg.add_argument("--ckpt", required=True, help="run directory (or its checkpoints folder)")
    pg.add_argument("--prompt", required=True, help="text (byte-level tokens)")
    pg.add_argument("--max-new-tokens", type=int, default=64)
    pg.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    pg.add_argument("--top-k", type=int, default=None)
    pg.add_argument("--seed", type=int, default=0)
    pg.set_defaults(subparser=pg)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnlab`` console script; returns the exit status.

    Example:
      >>> main(["info", "--json"])
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "info":
        return cmd_info(args)
    if args.command == "bench":
        return cmd_bench(args, args.subparser)
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "train":
        return cmd_train(args, args.subparser)
    if args.command == "eval":
        return cmd_eval(args, args.subparser)
    if args.command == "generate":
        return cmd_generate(args, args.subparser)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
