"""Sequence-parallel attention benchmark: ring / striped / zigzag / Ulysses vs one device.

    python -m attnlab.bench.sp --out $OUT/bench_sp.json            # GPUs: all visible devices
    python -m attnlab.bench.sp --smoke --out /tmp/bench_sp.json    # 8 simulated CPU devices

For each total sequence length S (causal, B=1, N=K=16 heads, H=128, bf16 by default):

* ``single``: one device, the fastest single-device implementation (``impl="auto"``: cuDNN on
  GPU) and the per-block implementation the ring uses (``--block-impl``, default "auto",
  which on GPU is the Triton kernel: cuDNN returns no LSE and takes no positions).
* ``sp``: every strategy on a mesh of all devices (``sp`` axis). Ring-type strategies get
  inputs already in their layout (``inputs_permuted``: the data loader's job), so the time is
  that of the attention alone.
* ``compute_only``: the same ring with ``communicate=False`` (every ppermute replaced by the
  identity; the numbers are not attention, only the time is meaningful): ring time minus
  this is the communication that was not hidden behind compute.
* ratios: ``sp_time / single_time`` (ideal 1 / P) and scaling efficiency
  ``single / (P * sp)``.
* ``maxlen``: the longest S (doubling) whose fwd+bwd fits in device memory, on one device
  and with the ring on all devices: decided from the compiled program's memory analysis
  (argument + output + temp bytes vs the device's memory limit), and, with
  ``--maxlen-run``, confirmed by running it once.
* ``anchor``: the ``ringattention`` package (Liu et al.), where importable, same shapes.

Times: jit-compiled, warm-up, median of ``--repeats`` (:func:`attnlab.bench.harness.time_call`).
Before timing, every strategy's output and gradients at ``--check-seq`` are compared with one
device (the XLA path in f32 accumulation).
The JSON is rewritten after every group, so a run cut off by a time limit keeps what ran.

``--smoke`` asks for 8 simulated CPU devices (``XLA_FLAGS``, unless already set) in
:func:`main`, before JAX starts a backend; importing this module changes nothing.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attnlab.bench.harness import (
    grad_fn,
    pass_fn,
    run_record,
    simulate_cpu_devices,
    time_or_error,
    write_json,
)
from attnlab.bench.memory import device_memory_limit, memory_fits, search_maxlen
from attnlab.bench.sharded import STRATEGIES, make_inputs, sp_fn
from attnlab.ops import attention as single_attention
from sharding.api import attention as sp_attention


def _log(msg: str) -> None:
    print(f"[bench_sp {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Record:
    """The JSON record, rewritten after every group."""

    def __init__(self, path: str, args: argparse.Namespace, argv: Sequence[str]):
        self.path = path
        self.data: dict[str, Any] = run_record(
            argv, config=dict(vars(args)), check=[], single=[], sp=[], compute_only=[],
            ratios=[], maxlen={}, anchor=[],
        )

    def add(self, group: str, row: Any) -> None:
        if isinstance(self.data[group], list):
            self.data[group].append(row)
        else:
            self.data[group].update(row)
        self.flush()

    def flush(self) -> None:
        if self.path:
            write_json(self.path, self.data)


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Runs the benchmark of ``args`` (see :func:`parse_args`); returns the record."""
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}[args.dtype]
    devices = jax.devices()
    n_dev = len(devices)
    rec = Record(args.out, args, argv)
    mesh = jax.make_mesh((n_dev,), ("sp",), axis_types=(jax.sharding.AxisType.Explicit,))
    causal = not args.no_causal
    strategies = [s for s in args.strategies.split(",") if s]
    _log(f"{n_dev} x {devices[0].device_kind}; S={args.seqs}; strategies={strategies}")

    if args.only_maxlen:
        _maxlen(rec, args, mesh, dtype, causal)
        _log(f"done; wrote {args.out}")
        return rec.data
    _check(rec, args, mesh, dtype, causal, strategies)
    for s in args.seqs:
        _time_length(rec, args, mesh, dtype, causal, strategies, s)
    if not args.no_maxlen:
        _maxlen(rec, args, mesh, dtype, causal)
    _log(f"done; wrote {args.out}")
    return rec.data


def _check(rec, args, mesh, dtype, causal, strategies) -> None:
    """Correctness (values and gradients) at --check-seq: every strategy vs one device."""
    n_dev = mesh.devices.size
    b, n, h, s0 = args.batch, args.heads, args.head_dim, args.check_seq
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sh = NamedSharding(mesh, P(None, "sp"))
    q, k, v, do = make_inputs(jax.random.key(0), b, s0, n, h, dtype, one)

    def f32(x):
        return np.asarray(x, np.float32)

    ref = functools.partial(single_attention, is_causal=causal, impl="xla")
    want = [jax.jit(ref)(q, k, v), *jax.jit(grad_fn(ref))(q, k, v, do)]
    for strat in strategies:
        if strat == "ulysses" and n % n_dev:
            continue
        xs = [jax.device_put(x, sh) for x in (q, k, v, do)]
        fn = functools.partial(sp_attention, mesh=mesh, strategy=strat, is_causal=causal,
                               impl=args.block_impl)
        try:
            got = [jax.jit(fn)(*xs[:3]), *jax.jit(grad_fn(fn))(*xs)]
        except Exception as e:  # noqa: BLE001 - record, time the others
            rec.add("check", {"strategy": strat, "s": s0, "error": str(e)[:300]})
            _log(f"check {strat} failed: {e}")
            continue
        row = {"strategy": strat, "s": s0}
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            row[f"{name}_max_abs_err"] = float(np.max(np.abs(f32(g) - f32(w))))
            row[f"{name}_max_abs_ref"] = float(np.max(np.abs(f32(w))))
        row["max_abs_err"] = row["out_max_abs_err"]
        rec.add("check", row)
        _log(f"check {strat} S={s0}: {row}")


def _time_length(rec, args, mesh, dtype, causal, strategies, s) -> None:
    """One device, then every strategy on all devices (and its compute-only twin), at S=s."""
    n_dev = mesh.devices.size
    b, n, h = args.batch, args.heads, args.head_dim
    key = jax.random.key(0)
    passes = [p for p in args.passes.split(",") if p]
    # -- one device
    q, k, v, do = make_inputs(key, b, s, n, h, dtype,
                              jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    single = {}
    for impl in dict.fromkeys(["auto", args.block_impl]):
        fn = functools.partial(single_attention, is_causal=causal, impl=impl)
        for p in passes:
            t = time_or_error(pass_fn(fn, p), (q, k, v, do), args.repeats)
            single[(impl, p)] = t["ms"]
            rec.add("single", {"s": s, "impl": impl, "pass": p, **t})
            _log(f"single S={s} {impl} {p}: {t}")
    del q, k, v, do
    # -- all devices
    q, k, v, do = make_inputs(key, b, s, n, h, dtype, NamedSharding(mesh, P(None, "sp")))
    for strat in strategies:
        if strat == "ulysses" and n % n_dev:
            rec.add("sp", {"s": s, "strategy": strat, "skipped": "heads not divisible"})
            continue
        fn = sp_fn(mesh, strat, causal=causal, impl=args.block_impl)
        for p in passes:
            t = time_or_error(pass_fn(fn, p), (q, k, v, do), args.repeats)
            rec.add("sp", {"s": s, "strategy": strat, "pass": p, "devices": n_dev, **t})
            _log(f"sp S={s} {strat} {p}: {t}")
            base = single.get(("auto", p))
            same = single.get((args.block_impl, p))
            if t["ms"] and base:
                rec.add("ratios", {
                    "s": s, "strategy": strat, "pass": p,
                    "vs_best_single": t["ms"] / base,
                    "vs_same_kernel_single": t["ms"] / same if same else None,
                    "scaling_efficiency": base / (n_dev * t["ms"]),
                })
            if strat != "ulysses" and not args.no_compute_only:
                fn0 = sp_fn(mesh, strat, causal=causal, impl=args.block_impl, communicate=False)
                t0 = time_or_error(pass_fn(fn0, p), (q, k, v, do), args.repeats)
                rec.add("compute_only", {"s": s, "strategy": strat, "pass": p, **t0})
                _log(f"compute-only S={s} {strat} {p}: {t0}")
    if s <= args.anchor_max_seq:
        _anchor(rec, args, mesh, q, k, v, do, s, causal)
    del q, k, v, do


def _anchor(rec, args, mesh, q, k, v, do, s, causal) -> None:
    """The ringattention package (JAX, Liu et al.), if it imports here."""
    try:
        ra = _load_ringattention()
    except Exception as e:  # noqa: BLE001 - the anchor is optional
        if not rec.data["anchor"]:
            rec.add("anchor", {"status": "not importable", "error": str(e)[:200]})
            _log(f"anchor ringattention not importable: {e}")
        return
    fn = _anchor_fn(ra, mesh, s, args.anchor_chunk, q.dtype, causal)
    if s == min(args.seqs):  # its output against one device, at --check-seq
        try:
            s0 = args.check_seq
            xs = make_inputs(jax.random.key(0), q.shape[0], s0, q.shape[2], q.shape[3], q.dtype)
            want = single_attention(*xs[:3], is_causal=causal, impl="xla")
            sh = NamedSharding(mesh, P(None, "sp"))
            got = jax.jit(_anchor_fn(ra, mesh, s0, args.anchor_chunk, q.dtype, causal))(
                *(jax.device_put(x, sh) for x in xs[:3])
            )
            err = float(np.max(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))))
            rec.add("anchor", {"s": s0, "impl": "ringattention", "max_abs_err": err})
            _log(f"anchor check S={s0}: max|err| = {err:.3g}")
        except Exception as e:  # noqa: BLE001
            rec.add("anchor", {"impl": "ringattention", "check_error": str(e)[:300]})
    for p in [p for p in args.passes.split(",") if p]:
        t = time_or_error(pass_fn(fn, p), (q, k, v, do), args.repeats)
        rec.add("anchor", {"s": s, "impl": "ringattention", "pass": p, **t})
        _log(f"anchor ringattention S={s} {p}: {t}")


def _anchor_fn(ra, mesh, s, chunk, dtype, causal) -> Callable:
    """The ringattention package's ring over ``mesh`` axis "sp" (its own blockwise compute)."""
    chunk = min(chunk, s // mesh.shape["sp"])
    kw = dict(
        causal_block_size=1 if causal else None, query_chunk_size=chunk, key_chunk_size=chunk,
        deterministic=True, dropout_rng=None, attn_pdrop=0.0, dtype=dtype, policy=None,
        precision=None, prevent_cse=True,
    )

    def per_shard(q, k, v):
        return ra(q, k, v, None, None, None, "sp", False, kw)

    spec = P(None, "sp")
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                         check_vma=False)


def _load_ringattention() -> Callable:
    """``ring_attention`` of the ringattention package (its blockwise JAX version).

    The package's ``__init__`` calls ``jax.lib.xla_bridge``, gone from current JAX, so when
    the import fails the module file ``ringattention_jax.py`` is loaded on its own.
    """
    try:
        from ringattention import ring_attention

        return ring_attention
    except ImportError:
        raise
    except Exception:  # noqa: BLE001 - the package __init__ is broken on this JAX
        import importlib.util
        from pathlib import Path

        spec = importlib.util.find_spec("ringattention")
        if spec is None or not spec.submodule_search_locations:
            raise
        path = Path(list(spec.submodule_search_locations)[0]) / "ringattention_jax.py"
        mod_spec = importlib.util.spec_from_file_location("_ringattention_jax", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        return mod.ring_attention


def _maxlen(rec, args, mesh, dtype, causal) -> None:
    n_dev = len(jax.devices())
    b, n, h = args.batch, args.heads, args.head_dim
    limit = device_memory_limit()
    out = {"memory_limit_bytes": limit, "method": "compiled memory analysis"}

    def fits(make_fn, sharding, s):
        shp = jax.ShapeDtypeStruct((b, s, n, h), dtype, sharding=sharding)
        ok, info = memory_fits(grad_fn(make_fn()), [shp] * 4, limit)
        if ok and args.maxlen_run:
            q, k, v, do = make_inputs(jax.random.key(1), b, s, n, h, dtype, sharding)
            t = time_or_error(grad_fn(make_fn()), (q, k, v, do), 1)
            ok, info = t["ms"] is not None, {**info, **t}
            del q, k, v, do
        return ok, info

    def search(make_fn, sharding, label):
        best, tried, _ = search_maxlen(
            lambda s: fits(make_fn, sharding, s), start=args.maxlen_start, cap=args.maxlen_cap,
            granularity=args.maxlen_granularity, label=label, log=_log,
        )
        return best, tried

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for impl in dict.fromkeys(["auto", args.block_impl]):
        best1, tried1 = search(
            lambda impl=impl: functools.partial(single_attention, is_causal=causal, impl=impl),
            one, f"1 device {impl}",
        )
        out[f"single_{impl}"] = {"max_s": best1, "tried": tried1}
        rec.add("maxlen", out)
    strat = args.maxlen_strategy
    bestp, triedp = search(
        lambda: sp_fn(mesh, strat, causal=causal, impl=args.block_impl,
                         accum=args.accum_dtype),
        NamedSharding(mesh, P(None, "sp")), f"{n_dev} devices {strat}",
    )
    out[strat] = {"max_s": bestp, "tried": triedp, "devices": n_dev,
                  "grad_accum_dtype": args.accum_dtype}
    best1 = max((v["max_s"] or 0) for k, v in out.items() if k.startswith("single_"))
    if best1 and bestp:
        out["ratio_vs_best_single"] = bestp / best1
    rec.add("maxlen", out)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m attnlab.bench.sp", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="", help="JSON path (rewritten after every group)")
    p.add_argument("--smoke", action="store_true", help="8 simulated CPU devices, tiny sizes")
    p.add_argument("--seqs", type=int, nargs="+", default=[65536, 131072, 262144])
    p.add_argument("--check-seq", type=int, default=8192, help="S of the correctness check")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--passes", default="fwd,fwdbwd")
    p.add_argument("--block-impl", default="auto", help="per-block attention impl")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compute-only", action="store_true")
    p.add_argument("--no-maxlen", action="store_true")
    p.add_argument("--only-maxlen", action="store_true", help="skip the timings")
    p.add_argument("--maxlen-run", action="store_true", help="also run the largest fits once")
    p.add_argument("--maxlen-start", type=int, default=131072)
    p.add_argument("--maxlen-cap", type=int, default=1 << 24)
    p.add_argument("--maxlen-strategy", default="zigzag")
    p.add_argument("--accum-dtype", default="float32",
                   help="ring dQ/dK/dV accumulator dtype for the max-length search: float32 or "
                        "'input' (the input dtype: less memory)")
    p.add_argument("--maxlen-granularity", type=int, default=16384,
                   help="bisection resolution after the doubling (a multiple of 2 x devices)")
    p.add_argument("--anchor-chunk", type=int, default=2048)
    p.add_argument("--anchor-max-seq", type=int, default=131072,
                   help="time the ringattention anchor only up to this S (it is slow)")
    args = p.parse_args(list(argv))
    if args.smoke:
        args.seqs, args.check_seq = [64], 64
        args.heads, args.head_dim, args.dtype = 8, 16, "float32"
        args.block_impl = "xla"
        args.repeats = 1
        args.maxlen_start, args.maxlen_cap, args.maxlen_granularity = 64, 64, 16
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m attnlab.bench.sp [options]``: runs the benchmark, returns the record.

    ``--smoke`` sets ``XLA_FLAGS`` for 8 simulated CPU devices unless it is set already (so
    call it before anything has started a JAX backend)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--smoke" in argv:
        simulate_cpu_devices(8)
    return run(parse_args(argv), argv)


if __name__ == "__main__":
    main()
