"""Multi-GPU scaling of sequence parallelism, in one call: ring, zigzag, striped, Ulysses,
LASP, LASP-2 and star attention on meshes of 1 to 8 devices.

The 8-GPU run is one device call of at most 10 minutes (kind ``nvidia-h200-x8``,
``timeout_s=600``), from the repo root::

    bash scripts/gpu_check.sh scaling

which runs (``SCALING_TIMEOUT`` s, default 570, and NVLink multicast off)::

    python3 -m attnlab.bench.scaling --out $OUT/bench_scaling.json --plot $OUT/bench_scaling.png

On CPU, 8 simulated devices check correctness and communication volume (timings there mean
nothing)::

    python -m attnlab.bench.scaling --smoke \\
        --out experiments/results/bench_scaling_cpu8_smoke.json \\
        --plot experiments/results/bench_scaling_cpu8_smoke.png

``--replot X.json --plot X.png`` redraws the figure (and prints the table) from a record.

What is measured (causal, fwd+bwd of one attention layer, B = 1 per data shard, N = 16 heads,
H = 128, bf16 by default, total lengths ``--seqs``, 128K to 1M):

* meshes (``--meshes``): ``P`` devices along the sequence axis "sp" (sub-meshes of the first
  P devices) and ``DxP`` (data D x sp P, global batch D). Mesh "1" is one device running the
  single-device op the way a ring step calls it (the same kernel: positions and LSE, so
  ``impl="auto"`` picks the same implementation): the baseline of every efficiency.
* softmax: ring, zigzag, striped (inputs already in their layout: that is the data loader's
  job) and Ulysses; lightning: LASP (state ring) and LASP-2 (one all-gather of states), with
  the single-device lightning op as baseline.
* per row: median ms (AOT-compiled, one warm-up run, ``repeats`` adapted to the row's length),
  compile seconds, per-device memory from the compiled program, and the communication volume
  per device read from the compiled HLO (:func:`attnlab.bench.hlo_comm.comm_volume`) next to the
  analytic volume of the algorithm (:func:`expected_comm`).
* ``compute_only``: ring, zigzag and striped with ``communicate=False`` (every ppermute is the
  identity; not attention, only the time means something): time minus compute-only time is
  the communication the ring did not hide behind compute.
* efficiency = ``B * t(1 device) / (D * P * t(mesh))`` at the same total length; null with a
  reason where the 1-device row did not run (budget, out of memory, not in ``--meshes``).
  ``efficiency_extrapolated`` fills that gap from the longest 1-device length measured,
  scaled by S^2 (softmax) or S (lightning): an estimate, labelled as one.
* ``maxlen``: the longest total length whose fwd+bwd fits in device memory (compiled memory
  analysis, doubling from ``--maxlen-start``, bounded by ``--maxlen-cap``).
* star: prefill (forward) of ``sharding.star.star_attention(q, k, v, *, mesh, seq_axis,
  is_causal, impl)`` against the ring forward at the longest length on the largest mesh.

Before a configuration is timed, its values and gradients at ``--check-seq`` (the exact
function that is timed, inputs permuted into its layout) are compared with one device (XLA
path, tolerance table of :mod:`attnlab.bench.harness`); a configuration that fails is not timed.

The wall-time budget (``--budget-s``, counted from the start of the process) orders the work by
importance (:func:`attnlab.bench.scaling_plan.plan`): (0) ring and zigzag at the longest length
on the largest mesh, LASP-2 there, and both baselines on one device; (1) their compute-only
twins; (2) star; (3) the maximum lengths of ring, zigzag and one device (compiles only); (4) the
efficiency-vs-devices curve at ``--curve-seq`` (default: the second longest length) on every
mesh; (5) striped, Ulysses and LASP; (6) the longest length on the smaller meshes; (7) every
other length; (8) cuDNN on one device; (9) the other maximum lengths. A task whose estimated
cost (compile + runs, scaled from the rows measured so far) does not fit the time left is
recorded as ``skipped: budget`` and the next, cheaper ones still run. The JSON is rewritten
after every row, so a run cut off keeps what ran; the plot and the table come at the end.

Modules: this one is the command line (:func:`parse_args`, :func:`main`);
:mod:`~attnlab.bench.scaling_plan` (meshes, tasks, budget, analytic communication),
:mod:`~attnlab.bench.scaling_run` (:class:`~attnlab.bench.scaling_run.ScalingBench`: checks,
timings, maximum lengths, star) and :mod:`~attnlab.bench.scaling_report` (table, bars, plot).
:func:`main` sets the environment the run needs before JAX starts a backend (importing changes
nothing): ``NCCL_NVLS_ENABLE=0`` unless set (NVLink multicast stays off on shared hosts) and,
with ``--smoke``, ``XLA_FLAGS`` for 8 simulated CPU devices unless ``XLA_FLAGS`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from attnlab.bench.harness import add_shape_args, ints, simulate_cpu_devices
from attnlab.bench.scaling_plan import LIGHTNING, SOFTMAX, STARTED, parse_meshes
from attnlab.bench.scaling_report import derive_table, markdown, plot
from attnlab.bench.scaling_run import ScalingBench

# The run's knobs after the shapes, in --help order: (flag, type or "flag", default, help).
_KNOBS: tuple[tuple[str, Any, Any, str | None], ...] = (
    ("--block-impl", str, "auto", "softmax per-block impl"),
    ("--lightning-impl", str, "auto", None),
    ("--chunk", int, None, "lightning chunk (xla path)"),
    ("--accum-dtype", str, "float32", "ring dK/dV accumulators or 'input'"),
    ("--curve-seq", int, None,
     "length of the efficiency-vs-devices rows (default: second longest)"),
    ("--check-seq", int, 8192, "length of the correctness check"),
    ("--repeats", int, 5, "most timed runs per row"),
    ("--row-target-s", float, 4.0,
     "timed runs per row = this / the estimated call time (1 to --repeats)"),
    ("--budget-s", float, 540.0, "wall time of the whole run, from the process start"),
    ("--reserve-s", float, 15.0, "kept for the plot and JSON"),
    ("--compile-guess-s", float, None,
     "compile time assumed before one is measured (GPU 30, CPU 2)"),
    ("--assumed-tflops", float, None,
     "fwd+bwd TFLOP/s assumed before a row is measured (GPU 250, CPU 0.02)"),
    ("--no-compute-only", "flag", False, None),
    ("--no-best-single", "flag", False, "skip the 1-device impl='auto' rows (cuDNN on GPU)"),
    ("--no-maxlen", "flag", False, None),
    ("--maxlen-start", int, None, "default: the longest --seqs"),
    ("--maxlen-cap", int, 1 << 25, None),
    ("--maxlen-floor", int, None,
     "halve a start that does not fit down to this (default: shortest --seqs)"),
    ("--maxlen-granularity", int, 0, "0: doubling only"),
    ("--memory-limit-mib", float, None,
     "device memory for the max-length search (default: the device's)"),
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The run's options, checked (meshes, lengths, strategies); ``--smoke`` fills in tiny
    CPU defaults. Bad input ends in ``p.error`` (exit status 2)."""
    p = argparse.ArgumentParser(prog="python -m attnlab.bench.scaling",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", default="", help="JSON path (rewritten after every row)")
    p.add_argument("--plot", default="", help="PNG path")
    p.add_argument("--replot", default="", help="draw --plot from this JSON; run nothing")
    p.add_argument("--smoke", action="store_true",
                   help="8 simulated CPU devices, tiny shapes: correctness and comm volume")
    p.add_argument("--meshes", default="1,2,4,8,2x4", help="P (sequence) or DxP, comma-separated")
    p.add_argument("--seqs", type=ints, default=[131072, 262144, 524288, 1048576])
    p.add_argument("--strategies", type=lambda s: [x for x in s.split(",") if x],
                   default=list(SOFTMAX), help="softmax strategies")
    p.add_argument("--lightning", type=lambda s: [x for x in s.split(",") if x],
                   default=list(LIGHTNING), help="lasp,lasp2 ('' for none)")
    add_shape_args(p, heads=16)
    for flag, kind, default, help_ in _KNOBS:
        if kind == "flag":
            p.add_argument(flag, action="store_true", help=help_)
        else:
            p.add_argument(flag, type=kind, default=default, help=help_)
    args = p.parse_args(list(argv))
    if args.smoke:
        args.seqs = [128, 256] if args.seqs == p.get_default("seqs") else args.seqs
        args.heads, args.head_dim, args.dtype = 8, 16, "float32"
        for name in ("block_impl", "lightning_impl"):  # unless given: the CPU path
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, "xla")
        args.chunk = args.chunk or 16
        args.check_seq, args.repeats, args.row_target_s = min(args.seqs), 1, 0.0
        args.no_best_single = True
        if args.budget_s == p.get_default("budget_s"):  # CPU compiles are slow; nothing to race
            args.budget_s = 1800.0
        args.maxlen_start = args.maxlen_start or min(args.seqs)
        args.maxlen_cap = min(args.maxlen_cap, 8192)
        if args.memory_limit_mib is None:
            args.memory_limit_mib = 4.0
    cpu = jax.devices()[0].platform == "cpu"
    if args.compile_guess_s is None:
        args.compile_guess_s = 2.0 if cpu else 30.0
    if args.assumed_tflops is None:
        args.assumed_tflops = 0.02 if cpu else 250.0
    args.maxlen_start = args.maxlen_start or max(args.seqs)
    args.maxlen_floor = args.maxlen_floor or min(args.seqs)
    unknown = [s for s in args.strategies if s not in SOFTMAX] + [
        s for s in args.lightning if s not in LIGHTNING]
    if unknown:
        p.error(f"unknown strategies {unknown}; softmax: {SOFTMAX}, lightning: {LIGHTNING}")
    try:
        meshes = parse_meshes(args.meshes)
    except ValueError as e:
        p.error(str(e))
    for m in meshes:
        for s in [*args.seqs, args.check_seq, *([args.curve_seq] if args.curve_seq else [])]:
            if s % (2 * m.sp):
                p.error(f"length {s} is not divisible by 2 x {m.sp} (zigzag on mesh {m.name})")
    return args


def main(argv: Sequence[str] | None = None, started: float | None = None) -> dict[str, Any]:
    """Runs the benchmark (or ``--replot``); returns the record. ``started``: when the budget's
    clock started (default: now). Sets the environment first (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (shared hosts)
    if "--smoke" in argv:
        simulate_cpu_devices(8)
    args = parse_args(argv)
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        data["table"] = derive_table(data)  # as this version of the code derives it
        if args.plot:
            plot(data, args.plot)
        print(markdown(data))
        return data
    bench = ScalingBench(args, argv, time.monotonic() if started is None else started)
    data = bench.run()
    if args.plot:
        plot(data, args.plot)
    print(markdown(data))
    print(json.dumps(data["bars"], indent=1))
    return data


if __name__ == "__main__":
    main(started=STARTED)
