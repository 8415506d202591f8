"""What the scaling benchmark runs: meshes, tasks in order of importance, the time budget and
cost estimates, and the analytic communication volume of each algorithm.

:func:`plan` orders the work (the tiers are listed in :mod:`attnlab.bench.scaling`); the
:class:`Budget` decides, task by task, whether the cost the :class:`CostModel` estimates still
fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from attnlab.bench.harness import attention_flops

SOFTMAX = ("ring", "zigzag", "striped", "ulysses")
LIGHTNING = ("lasp", "lasp2")
RING_TYPES = {"ring": "contiguous", "zigzag": "zigzag", "striped": "striped"}
SINGLE, SINGLE_BEST = "single", "single_best"  # 1 device: the ring's kernel; impl="auto"

# The run's clock: the budget and the log count from here (the package's import, JAX's with it,
# comes first; a run's main() passes this as its start).
STARTED = time.monotonic()


def log(msg: str) -> None:
    """Prints ``msg`` with the time and the seconds since :data:`STARTED`."""
    elapsed = time.monotonic() - STARTED
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


class CostModel:
    """Seconds a task will take, estimated from what the run has measured so far: compile
    times per kind, and the timed rows of the record (``rows``, the list the run appends to)."""

    def __init__(self, args: argparse.Namespace, rows: list[dict[str, Any]]):
        self.args, self.rows = args, rows
        self.compile_s: dict[str, list[float]] = {"softmax": [], "lightning": []}

    def compile_est(self, kind: str) -> float:
        """The longest of the recent compile times of ``kind`` (``--compile-guess-s`` first)."""
        seen = self.compile_s[kind][-8:]  # recent ones: the program sizes change by tier
        return max(seen) if seen else self.args.compile_guess_s

    def call_est(self, kind: str, m: MeshSpec, s: int) -> float:
        """Seconds of one fwd+bwd call, scaled from the nearest measured row (S^2 for softmax,
        S for lightning, 1 / sp), or from FLOPs at ``--assumed-tflops`` before any."""
        e = 2 if kind == "softmax" else 1
        rows = [r for r in self.rows if r.get("kind") == kind and r.get("ms")
                and r.get("mode") == "time" and r.get("strategy") != SINGLE_BEST]
        same = [r for r in rows if r["devices"] == m.devices] or rows
        if same:
            r = min(same, key=lambda r: abs(math.log(r["s"] / s)))
            return r["ms"] / 1e3 * (s / r["s"]) ** e * (r["sp"] / m.sp)
        a = self.args
        if kind == "softmax":
            flops = attention_flops(m.data, s, a.heads, a.head_dim, causal=True, pass_="fwdbwd")
        else:  # chunked form: intra-chunk (C) and state (H) work per token, fwd + bwd
            flops = 3.5 * 4 * m.data * s * a.heads * a.head_dim * (64 + a.head_dim)
        return flops / m.devices / (a.assumed_tflops * 1e12)

    def repeats(self, call_s: float) -> int:
        """Timed runs of a row: ``--row-target-s`` worth of calls, 1 to ``--repeats``."""
        a = self.args
        if call_s <= 0:
            return a.repeats
        return int(min(a.repeats, max(1, a.row_target_s // call_s)))


def plan(a: argparse.Namespace, meshes: Sequence[MeshSpec]) -> list[Task]:
    """Every task of the run ``a`` (:func:`attnlab.bench.scaling.parse_args`) on ``meshes``,
    most important first (the tiers of :mod:`attnlab.bench.scaling`'s docstring)."""
    seqs = sorted(set(a.seqs), reverse=True)
    smax = seqs[0]
    curve = a.curve_seq or (seqs[1] if len(seqs) > 1 else smax)
    one = next((m for m in meshes if m.devices == 1), None)
    sp_meshes = sorted((m for m in meshes if m.data == 1 and m.sp > 1),
                       key=lambda m: -m.sp)
    top = sp_meshes[0] if sp_meshes else None
    others = [m for m in meshes if m.devices > 1 and m is not top]
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

    def add_all(tier, mesh, softmax_strategies, lightning_strategies, s, compute_only=()):
        """Time rows of both kinds on ``mesh`` at ``s``, then the compute-only twins."""
        add(tier, "time", "softmax", mesh, softmax_strategies, s)
        add(tier, "time", "lightning", mesh, lightning_strategies, s)
        add(tier, "compute_only", "softmax", mesh, compute_only, s)

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
    add(2, "star", "softmax", top, ["star"], smax)
    if not a.no_maxlen:  # compiles only; the 1-device result seeds the others' start
        add(3, "maxlen", "softmax", one, base_s)
        add(3, "maxlen", "softmax", top, first)
    # 4: efficiency vs devices at a length every mesh runs quickly.
    add_all(4, one, base_s, base_l, curve)
    for m in meshes:
        add_all(4, m, first, lasp2, curve)
    # 5: the other strategies.
    add_all(5, top, rest, lightning, smax, compute_only=rest)
    for m in meshes:
        add_all(5, m, rest, lightning, curve, compute_only=softmax)
    # 6: the longest length on the smaller meshes (slow: S^2 / P per device).
    for m in others:
        add_all(6, m, softmax, lightning, smax, compute_only=softmax)
    # 7: every remaining length, longest first.
    for s in seqs:
        add_all(7, one, base_s, base_l, s)
        for m in meshes:
            add_all(7, m, softmax, lightning, s, compute_only=softmax)
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
