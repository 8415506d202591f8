"""The scaling benchmark's run: :class:`ScalingBench` checks, times and records each task of
:func:`attnlab.bench.scaling_plan.plan` within the time budget (see :mod:`attnlab.bench.scaling`).
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from attnlab.bench.harness import (
    DTYPES,
    LAYER_IDX,
    NUM_LAYERS,
    grad_fn,
    max_abs_err,
    pass_fn,
    run_record,
    short_error,
    time_or_error,
    within,
    write_json,
)
from attnlab.bench.hlo_comm import comm_volume, describe
from attnlab.bench.memory import device_memory_limit, memory_fits, memory_info, search_maxlen
from attnlab.bench.scaling_plan import (
    RING_TYPES,
    SINGLE,
    SINGLE_BEST,
    Budget,
    CostModel,
    MeshSpec,
    Task,
    expected_comm,
    log,
    parse_meshes,
    plan,
)
from attnlab.bench.scaling_report import derive_table, evaluate_bars
from attnlab.bench.sharded import make_inputs, sp_fn
from attnlab.ops import attention as single_attention
from attnlab.ops import lightning as L
from attnlab.testing import tolerance
from sharding.lasp import lasp_attention
from sharding.lasp2 import lasp2_attention
from sharding.layouts import permute, unpermute
from sharding.star import star_attention

STAR_API = "sharding.star.star_attention(q, k, v, *, mesh, seq_axis, is_causal, impl)"


class ScalingBench:
    """Runs and records the scaling benchmark (see :mod:`attnlab.bench.scaling`)."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str], started: float):
        self.args = args
        self.dtype = DTYPES[args.dtype]
        self.plat = jax.devices()[0].platform
        self.n_dev = len(jax.devices())
        self.budget = Budget(args.budget_s, started, args.reserve_s)
        self.meshes = parse_meshes(args.meshes)
        self._mesh_cache: dict[str, Any] = {}
        self._inputs_key: tuple | None = None
        self._inputs_val: list[jax.Array] = []
        self._refs: dict[tuple, list[np.ndarray]] = {}
        self.checks: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.decay = jnp.asarray(L.minimax_decay(args.heads, LAYER_IDX, NUM_LAYERS))
        note = (
            "CPU smoke run on simulated devices that share the host's cores: the checks "
            "and the communication volumes are meaningful, the timings, efficiencies and "
            "maximum lengths are not (CPU has no device memory limit: the one used is "
            "--memory-limit-mib)." if self.plat == "cpu" else
            "GPU run; efficiency = B t(1 device) / (devices t(mesh)) at the same length."
        )
        self.data: dict[str, Any] = run_record(
            ["python -m attnlab.bench.scaling", *argv],
            xla_flags=os.environ.get("XLA_FLAGS", ""), config=dict(vars(args)), note=note,
            budget={"budget_s": args.budget_s, "elapsed_s": 0.0, "finished": False},
            star={"status": "available", "api": STAR_API}, checks=[], rows=[], maxlen=[],
            table=[], bars={},
        )
        self.cost = CostModel(args, self.data["rows"])

    # -------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        a = self.args
        for m in self.meshes:
            if m.devices > self.n_dev:
                log(f"mesh {m.name} needs {m.devices} devices, {self.n_dev} visible: skipped")
        self.meshes = [m for m in self.meshes if m.devices <= self.n_dev]
        self.data["meshes_skipped"] = [m.name for m in parse_meshes(a.meshes)
                                       if m.devices > self.n_dev]
        tasks = plan(a, self.meshes)
        log(f"{self.n_dev} x {jax.devices()[0].device_kind}; {len(tasks)} tasks; budget "
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
                log(f"{task.label()}: {short_error(e)}")
                self._add("rows", {**self._row_head(task), "status": "error",
                                   "note": short_error(e)})
        self.data["budget"]["finished"] = True
        self.flush()
        log(f"done in {self.budget.elapsed():.0f} s; wrote {a.out or '(no --out)'}")
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
            write_json(self.args.out, self.data)

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
                       "error": short_error(e)}
            self.checks[key] = row
            self._add("checks", row)
            detail = row.get("error") or f"out err {row['out_max_abs_err']:.2g}"
            log(f"check {kind}/{strategy} mesh {m.name} S={row['s']}: "
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
        self.cost.compile_s[kind].append(time.perf_counter() - t0)
        got = [np.asarray(unpermute(np.asarray(x), 1, layout, m.sp), np.float32)
               for x in compiled(*xs)]
        tol = tolerance(self.dtype, self.plat)
        row: dict[str, Any] = {"kind": kind, "mesh": m.name, "strategy": strategy, "s": s0,
                               "reference": f"1 device, impl='xla', {a.dtype}"}
        passed = True
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            err = max_abs_err(g, w)
            ok = within(err, tol.get(name), w)
            passed &= ok
            row[f"{name}_max_abs_err"] = err
            row[f"{name}_tolerance"] = tol.get(name) * max(1.0, float(np.abs(w).max()))
        row["passed"] = bool(passed)
        return row

    # -------------------------------------------------------------- tasks

    def _skip(self, t: Task, why: str) -> None:
        log(f"{t.label()}: skipped: {why}")
        self._add("rows", {**self._row_head(t), "status": f"skipped: {why}"})

    def _time_task(self, t: Task) -> None:
        a = self.args
        call = self.cost.call_est(t.kind, t.mesh, t.s)
        repeats = self.cost.repeats(call)
        cost = self.cost.compile_est(t.kind) + (1 + repeats) * call
        checked = self.checks.get(t.config)
        if checked is None and t.what == "time":
            cost += self.cost.compile_est(t.kind)
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
        compiled = jax.jit(grad_fn(fn)).lower(*args).compile()
        row["compile_s"] = time.perf_counter() - t0
        self.cost.compile_s[t.kind].append(row["compile_s"])
        row["memory"] = memory_info(compiled)
        if t.mesh.devices > 1:
            try:
                row["comm"] = comm_volume(compiled.as_text(), t.mesh.devices)
            except ValueError as e:  # an HLO form the parser does not know: keep the timing
                row["comm_error"] = short_error(e)
            if t.what == "time":
                row["comm_expected"] = expected_comm(
                    t.strategy, sp=t.mesh.sp, batch=1, s=t.s, heads=a.heads,
                    head_dim=a.head_dim, itemsize=jnp.dtype(self.dtype).itemsize,
                    accum_itemsize=jnp.dtype(
                        self.dtype if a.accum_dtype == "input" else a.accum_dtype).itemsize,
                )
        timing = time_or_error(compiled, args, repeats, warmup=1)
        del compiled
        row.update(repeats=repeats, ms=timing["ms"],
                   first_run_ms=timing.get("first_call_s", 0) * 1e3 if timing["ms"] else None)
        row["status"] = "ok" if timing["ms"] else "error"
        if timing.get("error"):
            row["note"] = timing["error"]
        self._add("rows", row)
        comm = f"; comm {describe(row['comm'])}" if row.get("comm") else ""
        log(f"{t.label()}: {row['ms'] and round(row['ms'], 3)} ms (compile "
             f"{row['compile_s']:.1f} s, x{repeats}){comm}")

    def _maxlen_task(self, t: Task) -> None:
        a = self.args
        limit = (int(a.memory_limit_mib * 2**20) if a.memory_limit_mib is not None
                 else device_memory_limit())
        entry = {"kind": t.kind, "mesh": t.mesh.name, "devices": t.mesh.devices,
                 "strategy": t.strategy, "memory_limit_bytes": limit,
                 "method": "compiled memory analysis (arguments + outputs + temporaries)",
                 "pass": "fwdbwd"}
        est = self.cost.compile_est(t.kind)
        if not self.budget.allows(est):
            entry.update(max_s=None, status="skipped: budget", tried=[])
            log(f"{t.label()}: skipped: budget")
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
            ok, info = memory_fits(grad_fn(fn), [shp] * 4, limit)
            self.cost.compile_s[t.kind].append(time.perf_counter() - t0)
            return ok, info

        best, tried, complete = search_maxlen(
            fits, start=start, cap=a.maxlen_cap, granularity=a.maxlen_granularity or None,
            floor=a.maxlen_floor, label=f"{t.kind}/{t.strategy} mesh {t.mesh.name}",
            stop=lambda: not self.budget.allows(self.cost.compile_est(t.kind)), log=log,
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
        call = self.cost.call_est("softmax", t.mesh, t.s) / 3.5  # a forward is ~1/3.5 of fwd+bwd
        repeats = self.cost.repeats(call)
        cost = 3 * self.cost.compile_est("softmax") + 2 * (1 + repeats) * call
        if not self.budget.allows(cost):
            star["rows"] = [{**self._row_head(t), "status": "skipped: budget"}]
            self.flush()
            return
        mesh = self._mesh(t.mesh)
        star_fn = functools.partial(star_attention, mesh=mesh, seq_axis="sp", is_causal=True,
                                    impl=a.block_impl)
        # Star attention is approximate by design: its error is recorded, not gated.
        q, k, v, _ = self._make_inputs("softmax", t.mesh, a.check_seq)
        want = single_attention(q, k, v, is_causal=True, impl="xla")
        sh = self._sharding(t.mesh)
        got = jax.jit(star_fn)(*(jax.device_put(x, sh) for x in (q, k, v)))
        star["max_abs_err_vs_exact"] = max_abs_err(got, want)
        star["check_s"] = a.check_seq
        ring = sp_fn(mesh, "ring", causal=True, impl=a.block_impl, batch_axis=t.mesh.batch_axis)
        args = self._inputs("softmax", t.mesh, t.s)
        rows = []
        for name, f in (("ring_prefill", ring), ("star_prefill", star_fn)):
            t0 = time.perf_counter()
            compiled = jax.jit(pass_fn(f, "fwd")).lower(*args).compile()
            row = {**self._row_head(t), "strategy": name, "mode": "fwd",
                   "compile_s": time.perf_counter() - t0}
            row.update(time_or_error(compiled, args, repeats, warmup=1), repeats=repeats)
            rows.append(row)
            log(f"star: {name} S={t.s} mesh {t.mesh.name}: {row.get('ms')} ms")
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
