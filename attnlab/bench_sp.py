"""Sequence-parallel attention benchmark: ring / striped / zigzag / Ulysses vs one device.

    python -m attnlab.bench_sp --out $OUT/bench_sp.json            # GPUs: all visible devices
    python -m attnlab.bench_sp --smoke --out /tmp/bench_sp.json    # 8 simulated CPU devices

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

Times: jit-compiled, warm-up, median of ``--repeats`` (``attnlab.bench.time_call``). Before
timing, every strategy's output and gradients at ``--check-seq`` are compared with one device
(the XLA path in f32 accumulation).
The JSON is rewritten after every group, so a run cut off by a time limit keeps what ran.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv and "XLA_FLAGS" not in os.environ:  # before jax is imported
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from attnlab.bench import environment, time_call, write_json  # noqa: E402
from attnlab.ops import attention as single_attention  # noqa: E402
from sharding._common import default_check_vma as _default_check_vma  # noqa: E402
from sharding.api import attention as sp_attention  # noqa: E402
from sharding.ring import ring_attention  # noqa: E402

STRATEGIES = ("ring", "striped", "zigzag", "ulysses")
_LAYOUT = {"ring": "contiguous", "striped": "striped", "zigzag": "zigzag"}


def _log(msg: str) -> None:
    print(f"[bench_sp {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _inputs(key, b, s, n, h, dtype, sharding=None):
    """q, k, v, dout [B, S, N, H] random normal, placed by ``sharding`` (default device if None).

    On an accelerator they are generated where ``sharding`` puts them (no full-size copy on
    one device first); on CPU they come from NumPy, because compiling JAX's threefry
    generator there costs seconds per new shape and sharding.
    """
    shape = (b, s, n, h)
    if jax.devices()[0].platform == "cpu":
        seed = np.asarray(jax.random.key_data(key)).astype(np.uint64).tolist()
        rng = np.random.default_rng(seed)
        arrs = [jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(4)]
        return [jax.device_put(x, sharding) for x in arrs] if sharding is not None else arrs

    def gen(key):
        ks = jax.random.split(key, 4)
        return [jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in ks]

    if sharding is None:
        return list(jax.jit(gen)(key))
    return list(jax.jit(gen, out_shardings=[sharding] * 4)(key))  # q, k, v, dout


def _fwd_bwd(fn: Callable) -> Callable:
    """(q, k, v, dout) -> (dq, dk, dv) of sum(fn(q, k, v) * dout)."""

    def f(q, k, v, do):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do),
                        argnums=(0, 1, 2))(q, k, v)

    return f


def _fwd(fn: Callable) -> Callable:
    return lambda q, k, v, do: fn(q, k, v)


def _ring_fn(mesh, strategy, *, causal, impl, communicate=True, accum="float32",
             batch_axis=None):
    """The sharded attention as timed: inputs already in the strategy's layout, sequence on
    mesh axis "sp" and batch on ``batch_axis`` (or replicated)."""
    if strategy == "ulysses":
        return functools.partial(
            sp_attention, mesh=mesh, strategy="ulysses", is_causal=causal, impl=impl,
            batch_axis=batch_axis,
        )
    spec = P(batch_axis, "sp")
    per_shard = functools.partial(
        ring_attention, axis_name="sp", is_causal=causal, layout=_LAYOUT[strategy], impl=impl,
        communicate=communicate, grad_accum_dtype=None if accum == "input" else accum,
    )
    return jax.shard_map(
        per_shard, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
        check_vma=_default_check_vma(impl),
    )


def _memory_info(compiled: jax.stages.Compiled) -> dict[str, Any]:
    """Per-device bytes of a compiled program: arguments + outputs + temporaries - aliases."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {"memory_analysis": None}
    total = int(
        ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
        - getattr(ma, "alias_size_in_bytes", 0)
    )
    return {"bytes_per_device": total, "temp_bytes": int(ma.temp_size_in_bytes)}


def _memory_fits(fn: Callable, args: Sequence[Any], limit: int | None) -> tuple[bool, dict]:
    """Compiles fn(*args) (ShapeDtypeStructs) and compares its memory with ``limit``."""
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - compile-time OOM is an answer, not a crash
        return False, {"compile_error": str(e).splitlines()[0][:200]}
    info = _memory_info(compiled)
    total = info.get("bytes_per_device")
    return (limit is None or total is None or total <= limit), info


def _device_limit() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU has none
        return None
    return stats.get("bytes_limit")


class Record:
    """The JSON record, rewritten after every group."""

    def __init__(self, path: str, args: argparse.Namespace, argv: Sequence[str]):
        self.path = path
        self.data: dict[str, Any] = {
            **environment(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "argv": list(argv),
            "config": {k: v for k, v in vars(args).items()},
            "check": [], "single": [], "sp": [], "compute_only": [], "ratios": [],
            "maxlen": {}, "anchor": [],
        }

    def add(self, group: str, row: Any) -> None:
        if isinstance(self.data[group], list):
            self.data[group].append(row)
        else:
            self.data[group].update(row)
        self.flush()

    def flush(self) -> None:
        if self.path:
            write_json(self.path, self.data)


def _time(fn, args, repeats, *, warmup: int = 2) -> dict[str, Any]:
    """Median ms of ``fn(*args)`` (jit-compiled here unless already a ``Compiled``); errors
    (out of memory at large S, say) are returned as ``{"ms": None, "error": ...}``."""
    try:
        f = fn if isinstance(fn, jax.stages.Compiled) else jax.jit(fn)
        t = time_call(f, *args, repeats=repeats, warmup=warmup)
        return {"ms": t.median_ms, "first_call_s": t.first_call_s}
    except Exception as e:  # noqa: BLE001 - record and go on (OOM at large S, say)
        return {"ms": None, "error": str(e).splitlines()[0][:300]}


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}[args.dtype]
    devices = jax.devices()
    n_dev = len(devices)
    rec = Record(args.out, args, argv)
    mesh = jax.make_mesh((n_dev,), ("sp",), axis_types=(jax.sharding.AxisType.Explicit,))
    sh = NamedSharding(mesh, P(None, "sp"))
    one = jax.sharding.SingleDeviceSharding(devices[0])
    b, n, h, causal = args.batch, args.heads, args.head_dim, not args.no_causal
    key = jax.random.key(0)
    strategies = [s for s in args.strategies.split(",") if s]
    passes = [p for p in args.passes.split(",") if p]
    _log(f"{n_dev} x {devices[0].device_kind}; S={args.seqs}; strategies={strategies}")

    if args.only_maxlen:
        _maxlen(rec, args, mesh, dtype, causal)
        _log(f"done; wrote {args.out}")
        return rec.data
    # -- correctness (values and gradients) at --check-seq: every strategy vs one device
    s0 = args.check_seq
    q, k, v, do = _inputs(key, b, s0, n, h, dtype, one)

    def f32(x):
        return np.asarray(x, np.float32)

    ref = functools.partial(single_attention, is_causal=causal, impl="xla")
    want = [jax.jit(ref)(q, k, v), *jax.jit(_fwd_bwd(ref))(q, k, v, do)]
    for strat in strategies:
        if strat == "ulysses" and n % n_dev:
            continue
        xs = [jax.device_put(x, sh) for x in (q, k, v, do)]
        fn = functools.partial(sp_attention, mesh=mesh, strategy=strat, is_causal=causal,
                               impl=args.block_impl)
        try:
            got = [jax.jit(fn)(*xs[:3]), *jax.jit(_fwd_bwd(fn))(*xs)]
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
    del q, k, v, do

    for s in args.seqs:
        # -- one device
        q, k, v, do = _inputs(key, b, s, n, h, dtype, one)
        single = {}
        for impl in dict.fromkeys(["auto", args.block_impl]):
            fn = functools.partial(single_attention, is_causal=causal, impl=impl)
            for p in passes:
                t = _time(_fwd(fn) if p == "fwd" else _fwd_bwd(fn), (q, k, v, do), args.repeats)
                single[(impl, p)] = t["ms"]
                rec.add("single", {"s": s, "impl": impl, "pass": p, **t})
                _log(f"single S={s} {impl} {p}: {t}")
        del q, k, v, do
        # -- all devices
        q, k, v, do = _inputs(key, b, s, n, h, dtype, sh)
        for strat in strategies:
            if strat == "ulysses" and n % n_dev:
                rec.add("sp", {"s": s, "strategy": strat, "skipped": "heads not divisible"})
                continue
            fn = _ring_fn(mesh, strat, causal=causal, impl=args.block_impl)
            for p in passes:
                t = _time(_fwd(fn) if p == "fwd" else _fwd_bwd(fn), (q, k, v, do), args.repeats)
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
                    fn0 = _ring_fn(mesh, strat, causal=causal, impl=args.block_impl,
                                   communicate=False)
                    t0 = _time(_fwd(fn0) if p == "fwd" else _fwd_bwd(fn0), (q, k, v, do),
                               args.repeats)
                    rec.add("compute_only", {"s": s, "strategy": strat, "pass": p, **t0})
                    _log(f"compute-only S={s} {strat} {p}: {t0}")
        if s <= args.anchor_max_seq:
            _anchor(rec, args, mesh, q, k, v, do, s, causal)
        del q, k, v, do

    if not args.no_maxlen:
        _maxlen(rec, args, mesh, dtype, causal)
    _log(f"done; wrote {args.out}")
    return rec.data


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
            xs = _inputs(jax.random.key(0), q.shape[0], s0, q.shape[2], q.shape[3], q.dtype)
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
        t = _time(_fwd(fn) if p == "fwd" else _fwd_bwd(fn), (q, k, v, do), args.repeats)
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


def _search_maxlen(
    fits: Callable[[int], tuple[bool, dict]],
    *,
    start: int,
    cap: int,
    granularity: int | None,
    label: str = "",
    floor: int | None = None,
    stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] = _log,
) -> tuple[int | None, list[dict], bool]:
    """The longest S with ``fits(S)`` true: doubling from ``start`` until it does not fit (or
    passes ``cap``), then bisection to ``granularity`` (None: doubling only).

    With ``floor``, a ``start`` that does not fit is halved until it fits or drops below
    ``floor``. ``stop()``, asked before every attempt, ends the search early (a time budget).

    Returns:
      (best S or None, every attempt as {"s", "fits", **info}, whether the search finished).
    """
    tried: list[dict] = []

    def attempt(s):
        ok, info = fits(s)
        tried.append({"s": s, "fits": ok, **info})
        log(f"maxlen {label} S={s}: {'fits' if ok else 'does not fit'} {info}")
        return ok

    def halted():
        return stop is not None and stop()

    s, best, bad = start, None, None
    while s <= cap:
        if halted():
            return best, tried, False
        if not attempt(s):
            bad = s
            break
        best, s = s, s * 2
    while best is None and floor is not None and bad is not None and bad // 2 >= floor:
        if halted():
            return best, tried, False
        s = bad // 2
        if attempt(s):
            best = s
        else:
            bad = s
    g = granularity
    while g and best is not None and bad is not None and bad - best > g:
        mid = (best + bad) // 2 // g * g
        if mid <= best:
            break
        if halted():
            return best, tried, False
        if attempt(mid):
            best = mid
        else:
            bad = mid
    return best, tried, True


def _maxlen(rec, args, mesh, dtype, causal) -> None:
    n_dev = len(jax.devices())
    b, n, h = args.batch, args.heads, args.head_dim
    limit = _device_limit()
    out = {"memory_limit_bytes": limit, "method": "compiled memory analysis"}

    def fits(make_fn, sharding, s):
        shp = jax.ShapeDtypeStruct((b, s, n, h), dtype, sharding=sharding)
        ok, info = _memory_fits(_fwd_bwd(make_fn()), [shp] * 4, limit)
        if ok and args.maxlen_run:
            q, k, v, do = _inputs(jax.random.key(1), b, s, n, h, dtype, sharding)
            t = _time(_fwd_bwd(make_fn()), (q, k, v, do), 1)
            ok, info = t["ms"] is not None, {**info, **t}
            del q, k, v, do
        return ok, info

    def search(make_fn, sharding, label):
        best, tried, _ = _search_maxlen(
            lambda s: fits(make_fn, sharding, s), start=args.maxlen_start, cap=args.maxlen_cap,
            granularity=args.maxlen_granularity, label=label,
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
        lambda: _ring_fn(mesh, strat, causal=causal, impl=args.block_impl,
                         accum=args.accum_dtype),
        NamedSharding(mesh, P(None, "sp")), f"{n_dev} devices {strat}",
    )
    out[strat] = {"max_s": bestp, "tried": triedp, "devices": n_dev,
                  "grad_accum_dtype": args.accum_dtype}
    best1 = max((v["max_s"] or 0) for k, v in out.items() if k.startswith("single_"))
    if best1 and bestp:
        out["ratio_vs_best_single"] = bestp / best1
    rec.add("maxlen", out)


# The pieces attnlab.bench_scaling builds on (one copy of the timing and memory search).
make_inputs = _inputs
fwd = _fwd
fwd_bwd = _fwd_bwd
sp_fn = _ring_fn
time_fn = _time
memory_info = _memory_info
memory_fits = _memory_fits
device_memory_limit = _device_limit
search_maxlen = _search_maxlen


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m attnlab.bench_sp", description=__doc__.split("\n")[0]
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
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(parse_args(argv), argv)


if __name__ == "__main__":
    main()
