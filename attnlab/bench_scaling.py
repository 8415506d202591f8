"""Multi-GPU scaling of sequence parallelism, in one call: ring, zigzag, striped, Ulysses,
LASP, LASP-2 (and star attention where ``sharding.star`` exists) on meshes of 1 to 8 devices.

The 8-GPU run is one device call of at most 10 minutes (kind ``nvidia-h200-x8``,
``timeout_s=600``), from the repo root::

    bash scripts/gpu_check.sh scaling

which runs (``SCALING_TIMEOUT`` s, default 570, and NVLink multicast off)::

    python3 -m attnlab.bench_scaling --out $OUT/bench_scaling.json --plot $OUT/bench_scaling.png

On CPU, 8 simulated devices check correctness and communication volume (timings there mean
nothing)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m attnlab.bench_scaling --smoke \\
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
  per device read from the compiled HLO (:func:`attnlab.hlo_comm.comm_volume`) next to the
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
  is_causal, impl)`` against the ring forward at the longest length on the largest mesh, when
  that module exists; otherwise the record says it is not implemented. Nothing is made up.

Before a configuration is timed, its values and gradients at ``--check-seq`` (the exact
function that is timed, inputs permuted into its layout) are compared with one device (XLA
path, tolerance table of ``attnlab.bench``); a configuration that fails is not timed.

The wall-time budget (``--budget-s``, counted from the start of the process) orders the work
by importance (:meth:`ScalingBench.plan`): (0) ring and zigzag at the longest length on the
largest mesh, LASP-2 there, and both baselines on one device; (1) their compute-only twins;
(2) star; (3) the maximum lengths of ring, zigzag and one device (compiles only); (4) the
efficiency-vs-devices curve at ``--curve-seq`` (default: the second longest length) on every
mesh; (5) striped, Ulysses and LASP; (6) the longest length on the smaller meshes; (7) every
other length; (8) cuDNN on one device; (9) the other maximum lengths. A task whose estimated
cost (compile + runs, scaled from the rows measured so far) does not fit the time left is
recorded as ``skipped: budget`` and the next, cheaper ones still run. The JSON is rewritten
after every row, so a run cut off keeps what ran; the plot and the table come at the end.
"""

from __future__ import annotations

import os
import sys
import time

_STARTED = time.monotonic()  # the budget counts from the process start (jax import included)
if "--smoke" in sys.argv and "XLA_FLAGS" not in os.environ:  # before jax is imported
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (shared hosts)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from attnlab import bench as _bench  # noqa: E402
from attnlab.bench_lightning import LAYER_IDX, NUM_LAYERS  # noqa: E402
from attnlab.bench_sp import (  # noqa: E402
    device_memory_limit,
    fwd,
    fwd_bwd,
    make_inputs,
    memory_fits,
    memory_info,
    search_maxlen,
    sp_fn,
    time_fn,
)
from attnlab.hlo_comm import comm_volume, describe  # noqa: E402
from attnlab.ops import attention as single_attention  # noqa: E402
from attnlab.ops import lightning as L  # noqa: E402
from sharding.lasp import lasp_attention  # noqa: E402
from sharding.lasp2 import lasp2_attention  # noqa: E402
from sharding.layouts import permute, unpermute  # noqa: E402

SOFTMAX = ("ring", "zigzag", "striped", "ulysses")
LIGHTNING = ("lasp", "lasp2")
RING_TYPES = {"ring": "contiguous", "zigzag": "zigzag", "striped": "striped"}
SINGLE, SINGLE_BEST = "single", "single_best"  # 1 device: the ring's kernel; impl="auto"
STAR_API = "sharding.star.star_attention(q, k, v, *, mesh, seq_axis, is_causal, impl)"
NOT_IMPLEMENTED = "not implemented in this repo"
BARS = {  # issue 7: (kind, strategies, threshold)
    "ring_zigzag_fwdbwd_efficiency_8": ("softmax", ("ring", "zigzag"), 0.85),
    "lasp2_fwdbwd_efficiency_8": ("lightning", ("lasp2",), 0.90),
}
STAR_BAR = 5.0  # star prefill >= 5x faster than ring prefill at 1M tokens on 8 GPUs


def _log(msg: str) -> None:
    elapsed = time.monotonic() - _STARTED
    print(f"[bench_scaling {time.strftime('%H:%M:%S')} +{elapsed:.0f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- meshes, tasks


@dataclasses.dataclass(frozen=True, slots=True)
class MeshSpec:
    """A mesh of ``data`` x ``sp`` devices (the first ``data * sp`` of ``jax.devices()``)."""

    name: str
    data: int
    sp: int

    @property
    def devices(self) -> int:
        return self.data * self.sp

    @property
    def batch_axis(self) -> str | None:
        return "data" if self.data > 1 else None

    @property
    def spec(self) -> P:
        return P(self.batch_axis, "sp")

    def make(self) -> jax.sharding.Mesh | None:
        """The mesh, or None for one device (the single-device op, no mesh)."""
        if self.devices == 1:
            return None
        explicit = jax.sharding.AxisType.Explicit
        if self.data == 1:
            return jax.make_mesh((self.sp,), ("sp",), axis_types=(explicit,),
                                 devices=jax.devices()[: self.sp])
        return jax.make_mesh((self.data, self.sp), ("data", "sp"),
                             axis_types=(explicit, explicit), devices=jax.devices()[: self.devices])


def parse_meshes(text: str) -> list[MeshSpec]:
    """``"1,2,4,8,2x4"`` -> mesh specs ("DxP": data D x sequence P).

    Raises:
      ValueError: an entry that is neither ``P`` nor ``DxP`` with positive integers.

    Example:
      >>> [m.devices for m in parse_meshes("1,8,2x4")]
      [1, 8, 8]
    """
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = item.lower().split("x")
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            sizes = []
        if len(sizes) not in (1, 2) or min(sizes, default=0) <= 0:
            raise ValueError(f"mesh {item!r}: expected P (sequence devices) or DxP (data x "
                             f"sequence), e.g. '8' or '2x4'")
        data, sp = (1, sizes[0]) if len(sizes) == 1 else sizes
        out.append(MeshSpec(item.lower(), data, sp))
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    """One unit of work: time a row, time its compute-only twin, search a max length, star."""

    tier: int
    what: str  # "time" | "compute_only" | "maxlen" | "star"
    kind: str  # "softmax" | "lightning"
    mesh: MeshSpec
    strategy: str
    s: int = 0

    @property
    def config(self) -> tuple[str, str, str]:
        return self.kind, self.mesh.name, self.strategy

    def label(self) -> str:
        s = f" S={self.s}" if self.s else ""
        return f"{self.what} {self.kind}/{self.strategy} mesh {self.mesh.name}{s}"


class Budget:
    """Wall-time budget: ``allows(cost)`` while ``cost`` fits the time left minus a reserve."""

    def __init__(self, seconds: float, started: float, reserve: float):
        self.seconds, self.started, self.reserve = seconds, started, reserve

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, cost_s: float) -> bool:
        return self.left() - self.reserve >= cost_s


def expected_comm(
    strategy: str, *, sp: int, batch: int, s: int, heads: int, head_dim: int, itemsize: int,
    accum_itemsize: int = 4,
) -> dict[str, Any] | None:
    """Analytic bytes per device handed to collectives by one fwd+bwd (gradients only).

    Args:
      strategy: ring, zigzag, striped, ulysses, lasp or lasp2.
      sp: devices along the sequence; batch: batch rows per device (global B / data).
      s: total length; heads, head_dim: N (= K) and H (= Hv).
      itemsize: bytes per element of q, k, v; accum_itemsize: of the ring's dK/dV accumulators.

    Returns:
      {"bytes", "formula"} (ring types also "kv_forward_bytes", the forward's K/V share:
      (P - 1) / P of the global K and V, and "bytes_if_hops_merged"), or None on one device.

    Raises:
      ValueError: an unknown strategy.

    Example:
      >>> expected_comm("lasp2", sp=8, batch=1, s=1 << 20, heads=16, head_dim=128,
      ...               itemsize=2)["bytes"]  # two all-gathers of a 1 MiB f32 state
      2097152
    """
    if sp == 1:
        return None
    ln = s // sp  # tokens per device
    if strategy in RING_TYPES:
        kv = batch * ln * heads * head_dim * itemsize  # one of K, V on one device
        acc = batch * ln * heads * head_dim * accum_itemsize
        fwd_bytes = (sp - 1) * (2 * kv + 4 * ln)  # K, V and their int32 positions, P - 1 hops
        return {"bytes": 2 * fwd_bytes + 2 * sp * acc, "kv_forward_bytes": (sp - 1) * 2 * kv,
                "bytes_if_hops_merged": fwd_bytes + 2 * sp * acc,
                "formula": "forward (P-1)(|K|+|V|+|pos|); backward the same plus "
                           "P(|dK|+|dV|) in the accumulator dtype. The backward's K/V hops "
                           "send what the forward's sent: XLA merges them where it sees it "
                           "(P = 2, or an unrolled ring), down to bytes_if_hops_merged"}
    if strategy == "ulysses":
        x = batch * ln * heads * head_dim * itemsize
        return {"bytes": 7 * x,
                "formula": "all-to-all of q, k, v forward and of dout, dq, dk, dv backward "
                           "(the output's own is dead code in a gradient-only program)"}
    state = batch * heads * head_dim * head_dim * 4
    if strategy == "lasp2":
        return {"bytes": 2 * state, "formula": "one all-gather of the [B, N, H, Hv] f32 state "
                                               "forward, one backward: independent of S"}
    if strategy == "lasp":
        return {"bytes": 2 * (sp - 1) * state,
                "formula": "P-1 ppermutes of the [B, N, H, Hv] f32 state forward and P-1 "
                           "backward: independent of S"}
    raise ValueError(f"unknown strategy {strategy!r}")


# ----------------------------------------------------------------------------- the benchmark


class ScalingBench:
    """Plans, runs and records the scaling benchmark (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str], started: float):
        self.args = args
        self.dtype = _bench.DTYPES[args.dtype]
        self.plat = jax.devices()[0].platform
        self.n_dev = len(jax.devices())
        self.budget = Budget(args.budget_s, started, args.reserve_s)
        self.meshes = parse_meshes(args.meshes)
        self._mesh_cache: dict[str, Any] = {}
        self._inputs_key: tuple | None = None
        self._inputs_val: list[jax.Array] = []
        self._refs: dict[tuple, list[np.ndarray]] = {}
        self.checks: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.compile_s: dict[str, list[float]] = {"softmax": [], "lightning": []}
        self.decay = jnp.asarray(L.minimax_decay(args.heads, LAYER_IDX, NUM_LAYERS))
        self.star_fn, star = _star_attention()
        self.data: dict[str, Any] = {
            **_bench.environment(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "argv": ["python -m attnlab.bench_scaling", *argv],
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "config": dict(vars(args)),
            "note": (
                "CPU smoke run on simulated devices that share the host's cores: the checks "
                "and the communication volumes are meaningful, the timings, efficiencies and "
                "maximum lengths are not (CPU has no device memory limit: the one used is "
                "--memory-limit-mib)." if self.plat == "cpu" else
                "GPU run; efficiency = B t(1 device) / (devices t(mesh)) at the same length."
            ),
            "budget": {"budget_s": args.budget_s, "elapsed_s": 0.0, "finished": False},
            "star": star, "checks": [], "rows": [], "maxlen": [], "table": [], "bars": {},
        }

    # -------------------------------------------------------------- plan

    def plan(self) -> list[Task]:
        """Every task, most important first (see the module docstring)."""
        a = self.args
        seqs = sorted(set(a.seqs), reverse=True)
        smax = seqs[0]
        curve = a.curve_seq or (seqs[1] if len(seqs) > 1 else smax)
        one = next((m for m in self.meshes if m.devices == 1), None)
        sp_meshes = sorted((m for m in self.meshes if m.data == 1 and m.sp > 1),
                           key=lambda m: -m.sp)
        top = sp_meshes[0] if sp_meshes else None
        others = [m for m in self.meshes if m.devices > 1 and m is not top]
        softmax = [s for s in a.strategies if s in SOFTMAX]
        lightning = [s for s in a.lightning if s in LIGHTNING]
        first = [s for s in softmax if s in ("ring", "zigzag")]
        rest = [s for s in softmax if s not in first]
        tasks: list[Task] = []

        def add(tier, what, kind, mesh, strategies, s=0):
            if mesh is None:
                return
            for st in strategies:
                if what == "compute_only" and (st not in RING_TYPES or a.no_compute_only):
                    continue
                tasks.append(Task(tier, what, kind, mesh, st, s))

        base_l = [SINGLE] if lightning else []
        base_s = [SINGLE] if softmax else []
        lasp2 = [s for s in lightning if s == "lasp2"]
        meshes = [top, *others]
        # 0: the bars' rows: ring and zigzag on the largest mesh and one device, LASP-2.
        add(0, "time", "softmax", top, first, smax)
        add(0, "time", "lightning", top, lasp2, smax)
        add(0, "time", "lightning", one, base_l, smax)
        add(0, "time", "softmax", one, base_s, smax)
        add(1, "compute_only", "softmax", top, first, smax)
        if self.star_fn is not None:
            add(2, "star", "softmax", top, ["star"], smax)
        if not a.no_maxlen:  # compiles only; the 1-device result seeds the others' start
            add(3, "maxlen", "softmax", one, base_s)
            add(3, "maxlen", "softmax", top, first)
        # 4: efficiency vs devices at a length every mesh runs quickly.
        add(4, "time", "softmax", one, base_s, curve)
        add(4, "time", "lightning", one, base_l, curve)
        for m in meshes:
            add(4, "time", "softmax", m, first, curve)
            add(4, "time", "lightning", m, lasp2, curve)
        # 5: the other strategies.
        add(5, "time", "softmax", top, rest, smax)
        add(5, "time", "lightning", top, lightning, smax)
        add(5, "compute_only", "softmax", top, rest, smax)
        for m in meshes:
            add(5, "time", "softmax", m, rest, curve)
            add(5, "time", "lightning", m, lightning, curve)
            add(5, "compute_only", "softmax", m, softmax, curve)
        # 6: the longest length on the smaller meshes (slow: S^2 / P per device).
        for m in others:
            add(6, "time", "softmax", m, softmax, smax)
            add(6, "time", "lightning", m, lightning, smax)
            add(6, "compute_only", "softmax", m, softmax, smax)
        # 7: every remaining length, longest first.
        for s in seqs:
            add(7, "time", "softmax", one, base_s, s)
            add(7, "time", "lightning", one, base_l, s)
            for m in meshes:
                add(7, "time", "softmax", m, softmax, s)
                add(7, "time", "lightning", m, lightning, s)
                add(7, "compute_only", "softmax", m, softmax, s)
        if not a.no_best_single:
            for s in seqs:
                add(8, "time", "softmax", one, [SINGLE_BEST] if softmax else [], s)
        if not a.no_maxlen:
            add(9, "maxlen", "lightning", one, base_l)
            for m in meshes:
                add(9, "maxlen", "softmax", m, softmax)
                add(9, "maxlen", "lightning", m, lightning)
        seen, out = set(), []
        for t in tasks:  # the first (most important) occurrence of each task stays
            k = (t.what, t.kind, t.mesh.name, t.strategy, t.s)
            if k not in seen:
                seen.add(k)
                out.append(t)
        return sorted(out, key=lambda t: t.tier)  # stable: the order within a tier stays

    # -------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        a = self.args
        for m in self.meshes:
            if m.devices > self.n_dev:
                _log(f"mesh {m.name} needs {m.devices} devices, {self.n_dev} visible: skipped")
        self.meshes = [m for m in self.meshes if m.devices <= self.n_dev]
        self.data["meshes_skipped"] = [m.name for m in parse_meshes(a.meshes)
                                       if m.devices > self.n_dev]
        tasks = self.plan()
        _log(f"{self.n_dev} x {jax.devices()[0].device_kind}; {len(tasks)} tasks; budget "
             f"{a.budget_s:.0f} s ({self.budget.left():.0f} s left); star: "
             f"{self.data['star']['status']}")
        for task in tasks:
            try:
                if task.what in ("time", "compute_only"):
                    self._time_task(task)
                elif task.what == "maxlen":
                    self._maxlen_task(task)
                elif task.what == "star":
                    self._star_task(task)
            except Exception as e:  # noqa: BLE001 - one broken task must not end the run
                _log(f"{task.label()}: {_bench.short_error(e)}")
                self._add("rows", {**self._row_head(task), "status": "error",
                                   "note": _bench.short_error(e)})
        self.data["budget"]["finished"] = True
        self.flush()
        _log(f"done in {self.budget.elapsed():.0f} s; wrote {a.out or '(no --out)'}")
        return self.data

    # -------------------------------------------------------------- helpers

    def _mesh(self, m: MeshSpec):
        if m.name not in self._mesh_cache:
            self._mesh_cache[m.name] = m.make()
        return self._mesh_cache[m.name]

    def _sharding(self, m: MeshSpec):
        mesh = self._mesh(m)
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return NamedSharding(mesh, m.spec)

    def _fn(self, kind: str, m: MeshSpec, strategy: str, *, communicate: bool = True):
        """(q, k, v) -> out of the configuration, as timed."""
        a = self.args
        mesh = self._mesh(m)
        if kind == "softmax":
            if strategy == SINGLE:  # the call a ring step makes: positions and the LSE
                def single(q, k, v):
                    pos = jnp.arange(q.shape[1], dtype=jnp.int32)
                    return single_attention(q, k, v, is_causal=True, q_positions=pos,
                                            kv_positions=pos, return_residuals=True,
                                            impl=a.block_impl)[0]
                return single
            if strategy == SINGLE_BEST:
                return functools.partial(single_attention, is_causal=True, impl="auto")
            return sp_fn(mesh, strategy, causal=True, impl=a.block_impl, communicate=communicate,
                         accum=a.accum_dtype, batch_axis=m.batch_axis)
        common = dict(decay=self.decay, impl=a.lightning_impl, chunk_size=a.chunk)
        if strategy == SINGLE:
            return functools.partial(L.lightning_attention, **common)
        algo = {"lasp": lasp_attention, "lasp2": lasp2_attention}[strategy]
        return functools.partial(algo, mesh=mesh, seq_axis="sp", batch_axis=m.batch_axis,
                                 **common)

    def _make_inputs(self, kind: str, m: MeshSpec, s: int, sharding=None) -> list[jax.Array]:
        a = self.args
        q, k, v, do = make_inputs(jax.random.key(s), m.data, s, a.heads, a.head_dim, self.dtype,
                                  sharding)
        if kind == "lightning":  # outputs O(1) at scale 1, as bench_lightning
            q = (q * a.head_dim ** -0.5).astype(self.dtype)
        return [q, k, v, do]

    def _inputs(self, kind: str, m: MeshSpec, s: int) -> list[jax.Array]:
        """The row's inputs, placed on the mesh; one set alive at a time (device memory)."""
        key = (kind, m.name, s)
        if key != self._inputs_key:
            for x in self._inputs_val:
                x.delete()
            self._inputs_val, self._inputs_key = [], None
            self._inputs_val = self._make_inputs(kind, m, s, self._sharding(m))
            self._inputs_key = key
        return self._inputs_val

    def _row_head(self, t: Task) -> dict[str, Any]:
        a = self.args
        return {"kind": t.kind, "mesh": t.mesh.name, "devices": t.mesh.devices,
                "data": t.mesh.data, "sp": t.mesh.sp, "strategy": t.strategy, "s": t.s,
                "batch": t.mesh.data, "heads": a.heads, "head_dim": a.head_dim,
                "dtype": a.dtype, "mode": t.what}

    def _add(self, group: str, row: dict[str, Any]) -> None:
        self.data[group].append(row)
        self.flush()

    def flush(self) -> None:
        self.data["budget"]["elapsed_s"] = round(self.budget.elapsed(), 1)
        self.data["table"] = derive_table(self.data)
        self.data["bars"] = evaluate_bars(self.data)
        if self.args.out:
            _bench.write_json(self.args.out, self.data)

    # -------------------------------------------------------------- estimates

    def _compile_est(self, kind: str) -> float:
        seen = self.compile_s[kind][-8:]  # recent ones: the program sizes change by tier
        return max(seen) if seen else self.args.compile_guess_s

    def _call_est(self, kind: str, m: MeshSpec, s: int) -> float:
        """Seconds of one fwd+bwd call, scaled from the nearest measured row (S^2 for softmax,
        S for lightning, 1 / sp), or from FLOPs at ``--assumed-tflops`` before any."""
        e = 2 if kind == "softmax" else 1
        rows = [r for r in self.data["rows"] if r.get("kind") == kind and r.get("ms")
                and r.get("mode") == "time" and r.get("strategy") != SINGLE_BEST]
        same = [r for r in rows if r["devices"] == m.devices] or rows
        if same:
            r = min(same, key=lambda r: abs(math.log(r["s"] / s)))
            return r["ms"] / 1e3 * (s / r["s"]) ** e * (r["sp"] / m.sp)
        a = self.args
        if kind == "softmax":
            flops = _bench.attention_flops(m.data, s, a.heads, a.head_dim, causal=True,
                                           pass_="fwdbwd")
        else:  # chunked form: intra-chunk (C) and state (H) work per token, fwd + bwd
            flops = 3.5 * 4 * m.data * s * a.heads * a.head_dim * (64 + a.head_dim)
        return flops / m.devices / (a.assumed_tflops * 1e12)

    def _repeats(self, call_s: float) -> int:
        a = self.args
        if call_s <= 0:
            return a.repeats
        return int(min(a.repeats, max(1, a.row_target_s // call_s)))

    # -------------------------------------------------------------- correctness

    def _check(self, kind: str, m: MeshSpec, strategy: str) -> dict[str, Any]:
        """Values and gradients of the timed function vs one device, at ``--check-seq``; an
        error counts as a failed check (recorded once, so it is not retried per row)."""
        key = (kind, m.name, strategy)
        if key not in self.checks:
            try:
                row = self._compare(kind, m, strategy)
            except Exception as e:  # noqa: BLE001 - a config that cannot run is not timed
                row = {"kind": kind, "mesh": m.name, "strategy": strategy,
                       "s": self.args.check_seq, "passed": False,
                       "error": _bench.short_error(e)}
            self.checks[key] = row
            self._add("checks", row)
            detail = row.get("error") or f"out err {row['out_max_abs_err']:.2g}"
            _log(f"check {kind}/{strategy} mesh {m.name} S={row['s']}: "
                 f"{'passed' if row['passed'] else 'FAILED'} ({detail})")
        return self.checks[key]

    def _compare(self, kind: str, m: MeshSpec, strategy: str) -> dict[str, Any]:
        a = self.args
        s0 = a.check_seq
        q, k, v, do = self._make_inputs(kind, m, s0)  # global, on device 0
        ref_key = (kind, m.data, s0)
        if ref_key not in self._refs:
            if kind == "softmax":
                ref = functools.partial(single_attention, is_causal=True, impl="xla")
            else:
                ref = functools.partial(L.lightning_attention, decay=self.decay, impl="xla",
                                        chunk_size=a.chunk)
            self._refs[ref_key] = [np.asarray(x, np.float32)
                                   for x in jax.jit(_out_and_grads(ref))(q, k, v, do)]
        want = self._refs[ref_key]
        layout = RING_TYPES.get(strategy, "contiguous") if m.sp > 1 else "contiguous"
        xs = [permute(x, 1, layout, m.sp) for x in (q, k, v, do)]
        sh = self._sharding(m)
        xs = [jax.device_put(x, sh) for x in xs]
        t0 = time.perf_counter()
        compiled = jax.jit(_out_and_grads(self._fn(kind, m, strategy))).lower(*xs).compile()
        self.compile_s[kind].append(time.perf_counter() - t0)
        got = [np.asarray(unpermute(np.asarray(x), 1, layout, m.sp), np.float32)
               for x in compiled(*xs)]
        tol = _bench.tolerance(self.dtype, self.plat)
        row: dict[str, Any] = {"kind": kind, "mesh": m.name, "strategy": strategy, "s": s0,
                               "reference": f"1 device, impl='xla', {a.dtype}"}
        passed = True
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            err = _bench.max_abs_err(g, w)
            ok = _bench.within(err, tol.get(name), w)
            passed &= ok
            row[f"{name}_max_abs_err"] = err
            row[f"{name}_tolerance"] = tol.get(name) * max(1.0, float(np.abs(w).max()))
        row["passed"] = bool(passed)
        return row

    # -------------------------------------------------------------- tasks

    def _skip(self, t: Task, why: str) -> None:
        _log(f"{t.label()}: skipped: {why}")
        self._add("rows", {**self._row_head(t), "status": f"skipped: {why}"})

    def _time_task(self, t: Task) -> None:
        a = self.args
        call = self._call_est(t.kind, t.mesh, t.s)
        repeats = self._repeats(call)
        cost = self._compile_est(t.kind) + (1 + repeats) * call
        checked = self.checks.get(t.config)
        if checked is None and t.what == "time":
            cost += self._compile_est(t.kind)
        if not self.budget.allows(cost):
            return self._skip(t, f"budget (estimated {cost:.0f} s, {self.budget.left():.0f} s "
                                 "left)")
        if t.what == "time" and checked is None:
            checked = self._check(t.kind, t.mesh, t.strategy)
        if checked is not None and not checked["passed"]:
            return self._skip(t, "check failed (not timed)")
        if t.what == "compute_only" and not any(
            r["mode"] == "time" and r.get("ms") and (r["kind"], r["mesh"], r["strategy"], r["s"])
            == (t.kind, t.mesh.name, t.strategy, t.s) for r in self.data["rows"]
        ):
            return self._skip(t, "its timed row did not run")
        fn = self._fn(t.kind, t.mesh, t.strategy, communicate=t.what != "compute_only")
        args = self._inputs(t.kind, t.mesh, t.s)
        row = self._row_head(t)
        t0 = time.perf_counter()
        compiled = jax.jit(fwd_bwd(fn)).lower(*args).compile()
        row["compile_s"] = time.perf_counter() - t0
        self.compile_s[t.kind].append(row["compile_s"])
        row["memory"] = memory_info(compiled)
        if t.mesh.devices > 1:
            try:
                row["comm"] = comm_volume(compiled.as_text(), t.mesh.devices)
            except ValueError as e:  # an HLO form the parser does not know: keep the timing
                row["comm_error"] = _bench.short_error(e)
            if t.what == "time":
                row["comm_expected"] = expected_comm(
                    t.strategy, sp=t.mesh.sp, batch=1, s=t.s, heads=a.heads,
                    head_dim=a.head_dim, itemsize=jnp.dtype(self.dtype).itemsize,
                    accum_itemsize=jnp.dtype(
                        self.dtype if a.accum_dtype == "input" else a.accum_dtype).itemsize,
                )
        timing = time_fn(compiled, args, repeats, warmup=1)
        del compiled
        row.update(repeats=repeats, ms=timing["ms"],
                   first_run_ms=timing.get("first_call_s", 0) * 1e3 if timing["ms"] else None)
        row["status"] = "ok" if timing["ms"] else "error"
        if timing.get("error"):
            row["note"] = timing["error"]
        self._add("rows", row)
        comm = f"; comm {describe(row['comm'])}" if row.get("comm") else ""
        _log(f"{t.label()}: {row['ms'] and round(row['ms'], 3)} ms (compile "
             f"{row['compile_s']:.1f} s, x{repeats}){comm}")

    def _maxlen_task(self, t: Task) -> None:
        a = self.args
        limit = (int(a.memory_limit_mib * 2**20) if a.memory_limit_mib is not None
                 else device_memory_limit())
        entry = {"kind": t.kind, "mesh": t.mesh.name, "devices": t.mesh.devices,
                 "strategy": t.strategy, "memory_limit_bytes": limit,
                 "method": "compiled memory analysis (arguments + outputs + temporaries)",
                 "pass": "fwdbwd"}
        est = self._compile_est(t.kind)
        if not self.budget.allows(est):
            entry.update(max_s=None, status="skipped: budget", tried=[])
            _log(f"{t.label()}: skipped: budget")
            self._add("maxlen", entry)
            return
        fn = self._fn(t.kind, t.mesh, t.strategy)
        sharding = self._sharding(t.mesh)
        start = a.maxlen_start
        one = [m["max_s"] for m in self.data["maxlen"] if m["kind"] == t.kind
               and m["devices"] == 1 and m.get("max_s")]
        if t.mesh.devices > 1 and one:  # per-device memory ~ S / P: start near P x that
            start = max(start, one[0] * t.mesh.sp // 4 // (2 * t.mesh.sp) * (2 * t.mesh.sp))
            entry["start_from"] = f"1-device max {one[0]} x sp {t.mesh.sp} / 4"
        start = min(start, a.maxlen_cap)

        def fits(s):
            shp = jax.ShapeDtypeStruct((t.mesh.data, s, a.heads, a.head_dim), self.dtype,
                                       sharding=sharding)
            t0 = time.perf_counter()
            ok, info = memory_fits(fwd_bwd(fn), [shp] * 4, limit)
            self.compile_s[t.kind].append(time.perf_counter() - t0)
            return ok, info

        best, tried, complete = search_maxlen(
            fits, start=start, cap=a.maxlen_cap, granularity=a.maxlen_granularity or None,
            floor=a.maxlen_floor, label=f"{t.kind}/{t.strategy} mesh {t.mesh.name}",
            stop=lambda: not self.budget.allows(self._compile_est(t.kind)), log=_log,
        )
        entry.update(max_s=best, tried=tried, complete=complete,
                     status="ok" if complete else "partial: budget")
        if best is not None and best >= a.maxlen_cap and complete:
            entry["note"] = f"fits at the cap --maxlen-cap={a.maxlen_cap}: a lower bound"
        self._add("maxlen", entry)

    def _star_task(self, t: Task) -> None:
        """Star prefill vs ring prefill (forward) at the longest length on the largest mesh."""
        a = self.args
        star = self.data["star"]
        call = self._call_est("softmax", t.mesh, t.s) / 3.5  # a forward is ~1/3.5 of fwd+bwd
        repeats = self._repeats(call)
        cost = 3 * self._compile_est("softmax") + 2 * (1 + repeats) * call
        if not self.budget.allows(cost):
            star["rows"] = [{**self._row_head(t), "status": "skipped: budget"}]
            self.flush()
            return
        mesh = self._mesh(t.mesh)
        star_fn = functools.partial(self.star_fn, mesh=mesh, seq_axis="sp", is_causal=True,
                                    impl=a.block_impl)
        # Star attention is approximate by design: its error is recorded, not gated.
        q, k, v, _ = self._make_inputs("softmax", t.mesh, a.check_seq)
        want = single_attention(q, k, v, is_causal=True, impl="xla")
        sh = self._sharding(t.mesh)
        got = jax.jit(star_fn)(*(jax.device_put(x, sh) for x in (q, k, v)))
        star["max_abs_err_vs_exact"] = _bench.max_abs_err(got, want)
        star["check_s"] = a.check_seq
        ring = sp_fn(mesh, "ring", causal=True, impl=a.block_impl, batch_axis=t.mesh.batch_axis)
        args = self._inputs("softmax", t.mesh, t.s)
        rows = []
        for name, f in (("ring_prefill", ring), ("star_prefill", star_fn)):
            t0 = time.perf_counter()
            compiled = jax.jit(fwd(f)).lower(*args).compile()
            row = {**self._row_head(t), "strategy": name, "mode": "fwd",
                   "compile_s": time.perf_counter() - t0}
            row.update(time_fn(compiled, args, repeats, warmup=1), repeats=repeats)
            rows.append(row)
            _log(f"star: {name} S={t.s} mesh {t.mesh.name}: {row.get('ms')} ms")
        star["rows"] = rows
        if rows[0].get("ms") and rows[1].get("ms"):
            star["speedup_star_vs_ring"] = rows[0]["ms"] / rows[1]["ms"]
        star["status"] = "measured"
        self.flush()


def _out_and_grads(fn: Callable) -> Callable:
    """(q, k, v, dout) -> (out, dq, dk, dv): one compiled program for the correctness check."""

    def f(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(do.astype(out.dtype)))

    return f


def _star_attention() -> tuple[Callable | None, dict[str, Any]]:
    """``sharding.star.star_attention`` if that module exists, and the record's star status."""
    try:
        found = importlib.util.find_spec("sharding.star") is not None
    except (ImportError, ValueError):  # ValueError: in sys.modules without a __spec__
        found = "sharding.star" in sys.modules
    if not found:
        return None, {"status": NOT_IMPLEMENTED, "expected_api": STAR_API}
    try:
        mod = importlib.import_module("sharding.star")
    except Exception as e:  # noqa: BLE001 - a broken module is a status, not a crash
        return None, {"status": f"sharding.star does not import: {_bench.short_error(e)}"}
    fn = getattr(mod, "star_attention", None)
    if not callable(fn):
        return None, {"status": f"sharding.star has no star_attention; expected {STAR_API}"}
    return fn, {"status": "available", "api": STAR_API}


# ----------------------------------------------------------------------------- derived


def derive_table(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per timed (kind, mesh, strategy, S): time, compute-only time, efficiencies
    and communication, from the record's rows (recomputed on every write)."""
    rows = data.get("rows", [])
    ok = [r for r in rows if r.get("status") == "ok" and r.get("ms")]
    full = [r for r in ok if r["mode"] == "time"]
    co = {(r["kind"], r["mesh"], r["strategy"], r["s"]): r["ms"] for r in ok
          if r["mode"] == "compute_only"}
    base = {(r["kind"], r["s"]): r["ms"] for r in full if r["strategy"] == SINGLE}
    best = {r["s"]: r["ms"] for r in full if r["strategy"] == SINGLE_BEST}
    base_status = {(r["kind"], r["s"]): r.get("status", "") for r in rows
                   if r.get("strategy") == SINGLE and r.get("mode") == "time"}
    table = []
    for r in full:
        kind, s, dev = r["kind"], r["s"], r["devices"]
        e = {k: r[k] for k in ("kind", "mesh", "devices", "data", "sp", "strategy", "s", "ms")}
        e["compute_only_ms"] = co.get((kind, r["mesh"], r["strategy"], s))
        if e["compute_only_ms"] is not None:
            e["comm_exposed_ms"] = r["ms"] - e["compute_only_ms"]
        elif dev > 1:
            e["compute_only_reason"] = (
                "no communicate=False mode" if r["strategy"] not in RING_TYPES
                else "not measured")
        t1 = base.get((kind, s))
        if t1 is not None:
            e["efficiency"] = r["data"] * t1 / (dev * r["ms"])
            if e["compute_only_ms"]:
                e["efficiency_compute_only"] = r["data"] * t1 / (dev * e["compute_only_ms"])
            if r["data"] > 1:
                e["efficiency_note"] = f"1-device time at B=1 times B={r['data']}"
        else:
            e["efficiency"] = None
            st = base_status.get((kind, s))
            e["efficiency_reason"] = (
                f"1-device row {st}" if st else "1 device not measured at this length")
            shorter = [(s1, t) for (k1, s1), t in base.items() if k1 == kind and s1 < s]
            if shorter:
                s1, t = max(shorter)
                p = 2 if kind == "softmax" else 1
                e["efficiency_extrapolated"] = r["data"] * t * (s / s1) ** p / (dev * r["ms"])
                e["extrapolated_from_s"] = s1
        if kind == "softmax" and best.get(s):
            e["efficiency_vs_best_single"] = r["data"] * best[s] / (dev * r["ms"])
        if r.get("comm"):
            e["comm_bytes"] = r["comm"]["total_bytes"]
        if r.get("comm_expected"):
            e["comm_expected_bytes"] = r["comm_expected"]["bytes"]
            if r["comm_expected"].get("bytes_if_hops_merged"):
                e["comm_expected_merged_bytes"] = r["comm_expected"]["bytes_if_hops_merged"]
            if e.get("comm_bytes") is not None and r["comm_expected"]["bytes"]:
                e["comm_ratio"] = e["comm_bytes"] / r["comm_expected"]["bytes"]
        table.append(e)
    return table


def evaluate_bars(data: dict[str, Any]) -> dict[str, Any]:
    """The issue's bars from the table: value, met / missed / not measured, and why."""
    cpu = data.get("platform") == "cpu"
    out: dict[str, Any] = {}
    table = data.get("table", [])
    for name, (kind, strategies, threshold) in BARS.items():
        per = {}
        for st in strategies:
            es = [e for e in table if e["kind"] == kind and e["strategy"] == st
                  and e["sp"] == 8 and e["data"] == 1]
            measured = [e for e in es if e.get("efficiency") is not None]
            if not measured:
                per[st] = {"status": "not measured", "longest_s_timed":
                           max((e["s"] for e in es), default=None)}
                continue
            e = max(measured, key=lambda e: e["s"])
            per[st] = {"s": e["s"], "efficiency": e["efficiency"],
                       "status": "met" if e["efficiency"] >= threshold else "missed",
                       "longest_s_timed": max(x["s"] for x in es)}
        statuses = {v["status"] for v in per.values()}
        status = ("met" if statuses == {"met"} else "missed" if "missed" in statuses
                  else "not measured")
        out[name] = {"threshold": threshold, "status": status, "per_strategy": per}
    star = data.get("star", {})
    if star.get("speedup_star_vs_ring") is not None:
        sp = star["speedup_star_vs_ring"]
        first = (star.get("rows") or [{}])[0]
        out["star_prefill_speedup_8"] = {"threshold": STAR_BAR, "value": sp,
                                         "s": first.get("s"), "devices": first.get("devices"),
                                         "status": "met" if sp >= STAR_BAR else "missed"}
    else:
        out["star_prefill_speedup_8"] = {"threshold": STAR_BAR, "status": "not measured",
                                         "why": f"star: {star.get('status', 'unknown')}"}
    if cpu:
        for v in out.values():
            v["status"] = f"not applicable on CPU (was: {v['status']})"
    return out


# ----------------------------------------------------------------------------- report


def markdown(data: dict[str, Any]) -> str:
    """The README table: per timed row, time, compute-only time, efficiency, communication."""
    head = ("| kind | strategy | mesh | S | ms | compute-only ms | efficiency | "
            "comm / device (measured / analytic) |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]

    def num(x, f):
        return "–" if x is None else format(x, f)

    for e in sorted(data.get("table", []), key=lambda e: (e["kind"], e["strategy"],
                                                           e["devices"], e["mesh"], e["s"])):
        eff = num(e.get("efficiency"), ".2f")
        if e.get("efficiency") is None and e.get("efficiency_extrapolated") is not None:
            eff = f"~{e['efficiency_extrapolated']:.2f} (extrapolated)"
        comm = "–"
        if e.get("comm_bytes") is not None:
            exp = e.get("comm_expected_bytes")
            comm = f"{_mib(e['comm_bytes'])} / {_mib(exp) if exp else '–'}"
            if exp and e["comm_bytes"] != exp and e.get("comm_expected_merged_bytes") == e[
                    "comm_bytes"]:
                comm += " (= with the backward's K/V hops merged into the forward's)"
        lines.append(f"| {e['kind']} | {e['strategy']} | {e['mesh']} | {e['s']} | "
                     f"{num(e['ms'], '.2f')} | {num(e.get('compute_only_ms'), '.2f')} | {eff} | "
                     f"{comm} |")
    ml = [m for m in data.get("maxlen", []) if m.get("max_s")]
    if ml:
        lines += ["", "| kind | strategy | mesh | max length (fwd+bwd fits) |", "|---|---|---|---|"]
        lines += [f"| {m['kind']} | {m['strategy']} | {m['mesh']} | {m['max_s']}"
                  f"{'' if m.get('complete', True) else ' (partial)'} |" for m in ml]
    return "\n".join(lines)


def _mib(n: float) -> str:
    return f"{n / 2**20:.3g} MiB"


def _fmt_len(s: int) -> str:
    """131072 -> "128K", 1048576 -> "1M", 96 -> "96"."""
    for shift, unit in ((20, "M"), (10, "K")):
        if s >= 1 << shift and s % (1 << shift) == 0:
            return f"{s >> shift}{unit}"
    return str(s)


def plot(data: dict[str, Any], path: str) -> bool:
    """Efficiency vs devices, time vs length, communication vs length, max lengths (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        _log(f"no plot: matplotlib is not importable ({e}); the JSON has every number "
             "(`--replot JSON --plot PNG` draws it where matplotlib is installed)")
        return False
    from matplotlib.ticker import FuncFormatter

    lengths = FuncFormatter(lambda x, _: _fmt_len(int(round(x))))
    table = data.get("table", [])
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    ax = axes[0][0]
    with_eff = [e for e in table if e.get("efficiency") is not None]
    if with_eff:
        s_plot = max({e["s"] for e in with_eff}, key=lambda s: (
            len({e["mesh"] for e in with_eff if e["s"] == s}), s))
        for (kind, st) in sorted({(e["kind"], e["strategy"]) for e in with_eff}):
            es = sorted((e for e in with_eff if e["kind"] == kind and e["strategy"] == st
                         and e["s"] == s_plot), key=lambda e: e["devices"])
            line = [e for e in es if e["data"] == 1]
            if line and st != SINGLE:
                line = [e for e in with_eff if e["kind"] == kind and e["strategy"] == SINGLE
                        and e["s"] == s_plot] + line
                ax.plot([e["devices"] for e in line], [e["efficiency"] for e in line], "o-",
                        label=f"{kind}/{st}")
            for e in (e for e in es if e["data"] > 1):
                ax.plot([e["devices"]], [e["efficiency"]], "x", ms=9,
                        label=f"{kind}/{st} {e['mesh']}")
        ax.set_title(f"scaling efficiency vs devices at S={s_plot}")
    for y, lab in ((0.85, "ring/zigzag bar"), (0.90, "LASP-2 bar")):
        ax.axhline(y, ls=":", lw=1, color="gray")
        ax.text(1, y, lab, fontsize=7, va="bottom", color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.set_xlabel("devices")
    ax.set_ylabel("B t(1) / (devices t(mesh))")
    ax.legend(fontsize=7)

    top_dev = max((e["devices"] for e in table if e["data"] == 1), default=1)
    ax = axes[0][1]
    for (kind, st, mesh) in sorted({(e["kind"], e["strategy"], e["mesh"]) for e in table
                                    if e["mesh"] in ("1", str(top_dev))}):
        es = sorted((e for e in table if (e["kind"], e["strategy"], e["mesh"]) ==
                     (kind, st, mesh)), key=lambda e: e["s"])
        (ln,) = ax.plot([e["s"] for e in es], [e["ms"] for e in es], "o-",
                        label=f"{kind}/{st} ({mesh} dev)")
        co = [e for e in es if e.get("compute_only_ms")]
        if co:
            ax.plot([e["s"] for e in co], [e["compute_only_ms"] for e in co], "--",
                    color=ln.get_color(), label=f"{kind}/{st} compute only")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(lengths)
    ax.set_yscale("log")
    ax.set_xlabel("total length S")
    ax.set_ylabel("fwd+bwd ms")
    ax.set_title(f"time vs length: 1 device and {top_dev} devices (dashed: no communication)")
    ax.legend(fontsize=6)

    ax = axes[1][0]
    for (kind, st) in sorted({(e["kind"], e["strategy"]) for e in table
                              if e.get("comm_bytes") and e["mesh"] == str(top_dev)}):
        es = sorted((e for e in table if (e["kind"], e["strategy"], e["mesh"]) ==
                     (kind, st, str(top_dev)) and e.get("comm_bytes")), key=lambda e: e["s"])
        (ln,) = ax.plot([e["s"] for e in es], [e["comm_bytes"] / 2**20 for e in es], "o-",
                        label=f"{st} (HLO)")
        ex = [e for e in es if e.get("comm_expected_bytes")]
        ax.plot([e["s"] for e in ex], [e["comm_expected_bytes"] / 2**20 for e in ex], "+",
                ms=12, color=ln.get_color())
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(lengths)
    ax.set_yscale("log")
    ax.set_xlabel("total length S")
    ax.set_ylabel("MiB per device, one fwd+bwd")
    ax.set_title(f"communication on {top_dev} devices: HLO operands (o) vs analytic (+)")
    ax.legend(fontsize=7)

    ax = axes[1][1]
    ml = [m for m in data.get("maxlen", []) if m.get("max_s")]
    if ml:
        labels = [f"{m['kind'][:4]}/{m['strategy']} {m['mesh']}" for m in ml]
        ax.barh(range(len(ml)), [m["max_s"] for m in ml], color="tab:blue")
        ax.set_yticks(range(len(ml)), labels, fontsize=7)
        for i, m in enumerate(ml):
            ax.text(m["max_s"], i, f" {_fmt_len(m['max_s'])}", va="center", fontsize=7)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(lengths)
    ax.set_xlabel("longest total length whose fwd+bwd fits (compiled memory)")
    limits = {m.get("memory_limit_bytes") for m in ml}
    ax.set_title("max length per configuration" + (
        f" (memory limit {_mib(limits.pop())} per device)" if len(limits) == 1 and None
        not in limits else ""))

    where = f"{data.get('device_count')} x {data.get('device_kind')}"
    title = f"attnlab sequence-parallel scaling, {where}, {data.get('date', '')[:10]}"
    if data.get("platform") == "cpu":
        title += ("\nCPU SMOKE on simulated devices: correctness and communication volume only; "
                  "timings, efficiencies and max lengths are meaningless")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    _log(f"wrote {path}")
    return True


# ----------------------------------------------------------------------------- CLI


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m attnlab.bench_scaling",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", default="", help="JSON path (rewritten after every row)")
    p.add_argument("--plot", default="", help="PNG path")
    p.add_argument("--replot", default="", help="draw --plot from this JSON; run nothing")
    p.add_argument("--smoke", action="store_true",
                   help="8 simulated CPU devices, tiny shapes: correctness and comm volume")
    p.add_argument("--meshes", default="1,2,4,8,2x4", help="P (sequence) or DxP, comma-separated")
    p.add_argument("--seqs", type=_ints, default=[131072, 262144, 524288, 1048576])
    p.add_argument("--strategies", type=lambda s: [x for x in s.split(",") if x],
                   default=list(SOFTMAX), help="softmax strategies")
    p.add_argument("--lightning", type=lambda s: [x for x in s.split(",") if x],
                   default=list(LIGHTNING), help="lasp,lasp2 ('' for none)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_bench.DTYPES))
    p.add_argument("--block-impl", default="auto", help="softmax per-block impl")
    p.add_argument("--lightning-impl", default="auto")
    p.add_argument("--chunk", type=int, default=None, help="lightning chunk (xla path)")
    p.add_argument("--accum-dtype", default="float32", help="ring dK/dV accumulators or 'input'")
    p.add_argument("--curve-seq", type=int, default=None,
                   help="length of the efficiency-vs-devices rows (default: second longest)")
    p.add_argument("--check-seq", type=int, default=8192, help="length of the correctness check")
    p.add_argument("--repeats", type=int, default=5, help="most timed runs per row")
    p.add_argument("--row-target-s", type=float, default=4.0,
                   help="timed runs per row = this / the estimated call time (1 to --repeats)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="wall time of the whole run, from the process start")
    p.add_argument("--reserve-s", type=float, default=15.0, help="kept for the plot and JSON")
    p.add_argument("--compile-guess-s", type=float, default=None,
                   help="compile time assumed before one is measured (GPU 30, CPU 2)")
    p.add_argument("--assumed-tflops", type=float, default=None,
                   help="fwd+bwd TFLOP/s assumed before a row is measured (GPU 250, CPU 0.02)")
    p.add_argument("--no-compute-only", action="store_true")
    p.add_argument("--no-best-single", action="store_true",
                   help="skip the 1-device impl='auto' rows (cuDNN on GPU)")
    p.add_argument("--no-maxlen", action="store_true")
    p.add_argument("--maxlen-start", type=int, default=None, help="default: the longest --seqs")
    p.add_argument("--maxlen-cap", type=int, default=1 << 25)
    p.add_argument("--maxlen-floor", type=int, default=None,
                   help="halve a start that does not fit down to this (default: shortest --seqs)")
    p.add_argument("--maxlen-granularity", type=int, default=0, help="0: doubling only")
    p.add_argument("--memory-limit-mib", type=float, default=None,
                   help="device memory for the max-length search (default: the device's)")
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
    """Runs the benchmark (or ``--replot``); returns the record."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
    main(started=_STARTED)
