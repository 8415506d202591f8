"""MLA decode benchmark: the latent kernel's GB/s against the copy bandwidth, and per-token
time against decoding the same model from a materialized per-head K/V cache.

Shapes (DeepSeek-V2): B sequences, one new token each, N query heads, latent rank d_c, RoPE
dim d_R, per-head no-RoPE dim d_n and value dim d_v; every sequence's cache holds S tokens.

* ``latent``: :func:`attnlab.ops.mla.mla_decode` (absorb W_UK into the query, latent decode
  over the [c ; k_R] cache, W_UV on the output), per implementation. Bytes = the cache read
  once (B * S * (d_c + d_R) values) + q in + out; GB/s = bytes / median time.
* ``kernel_*`` fields of a latent row: the latent kernel alone
  (:func:`attnlab.ops.mla.latent_decode` over queries absorbed beforehand), bytes = the cache +
  the latent queries + the latent output (``kernel_bytes``); ``kernel_ratio_copy*`` is the
  fraction of the copy bandwidth it reads at.
* ``materialized``: :func:`attnlab.ops.decode_attention` over per-head K [B, S, N, d_n + d_R]
  and V [B, S, N, d_v] (what the model would cache without MLA's compression), the query
  [q^C ; q^R]; the Triton kernel gets its cache already padded to its head dim (a model
  would allocate it so), so no padding copy is timed. That cache is ~26x the latent one, so
  it is timed on the first few sequences and its time scaled to the batch (``ms``; the
  measured one is ``ms_timed_batch``).
* ``copy``: jit(x + 1) over a large buffer (:func:`attnlab.bench.decode.copy_bandwidth`).
* Each time is also taken as 8 calls in one program (``*_in_program``,
  :func:`attnlab.bench.harness.time_in_program`): a decode loop on the device, without the
  host's dispatch of every call; ratios in that form are to the copy timed the same way.

Each implementation is checked against ``impl="xla"`` before it is timed.

``--sweep`` times the Triton kernel under each :data:`SWEEP` config instead (rows of kind
``config``, the config's fields in ``config``), to pick the defaults of
:class:`~pallas_kernels.gpu.mla_decode.MlaDecodeConfig` on a GPU; ``--sweep-mosaic`` the
Mosaic GPU kernel under each :data:`MOSAIC_SWEEP` config
(:class:`~pallas_kernels.gpu.mgpu_mla_decode.MosaicMlaDecodeConfig`).

Standalone: ``python -m attnlab.bench.mla --out mla.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.bench.decode import copy_bandwidth
from attnlab.bench.harness import (
    add_timing_args,
    ints,
    max_abs_err,
    per_s,
    run_record,
    time_call,
    time_in_program,
    write_json,
)
from attnlab.ops import decode_attention, mla
from attnlab.ops.attention import platform
from pallas_kernels.gpu.mgpu_mla_decode import MosaicMlaDecodeConfig
from pallas_kernels.gpu.mla_decode import MlaDecodeConfig

# (block_kv, block_rows, num_warps, num_stages, keys_per_split) candidates of ``--sweep``.
SWEEP = tuple(
    (kv, rows, w, st, None)
    for kv in (32, 64) for rows in (32, 64) for w in (4, 8) for st in (1, 2, 3)
    if not (rows == 32 and w == 8)
) + ((64, 64, 8, 2, 2048), (64, 64, 8, 2, 8192), (32, 64, 8, 2, 8192))
# (num_splits, approx_math, overlap) candidates of ``--sweep-mosaic`` (None: one wave).
MOSAIC_SWEEP = tuple((p, a, o) for p in (None, 4) for a in (False, True)
                     for o in (False,)) + ((None, True, True),)
# The implementation a swept config belongs to.
CONFIG_IMPL = {MlaDecodeConfig: "pallas_triton", MosaicMlaDecodeConfig: "pallas_mosaic_gpu"}


def _inputs(key, b, s, n, d_c, d_r, d_n, d_v, dtype):
    ks = jax.random.split(key, 6)
    q_nope = jax.random.normal(ks[0], (b, 1, n, d_n), dtype)
    q_rope = jax.random.normal(ks[1], (b, 1, n, d_r), dtype)
    cache = jax.random.normal(ks[2], (b, s, d_c + d_r), dtype)
    w_uk = (jax.random.normal(ks[3], (d_c, n, d_n)) * d_c ** -0.5).astype(dtype)
    w_uv = (jax.random.normal(ks[4], (d_c, n, d_v)) * d_c ** -0.5).astype(dtype)
    return q_nope, q_rope, cache, w_uk, w_uv


def bench_one(s: int, *, b: int, n: int, d_c: int, d_r: int, d_n: int, d_v: int,
              dtype: Any, impls: Sequence[Any], repeats: int, copy: dict[str, float],
              materialize: bool, materialize_batch: int = 4,
              warmup: int = 2) -> list[dict[str, Any]]:
    """Rows for one cache length: each latent implementation, then the materialized cache."""
    q_nope, q_rope, cache, w_uk, w_uv = _inputs(jax.random.key(s), b, s, n, d_c, d_r, d_n,
                                                d_v, dtype)
    item = jnp.dtype(dtype).itemsize
    nbytes = (cache.size + q_nope.size + q_rope.size + b * n * d_v) * item
    rows = []

    def fn(impl, config=None):
        return jax.jit(lambda *a: mla.mla_decode(*a, impl=impl, config=config))

    # The kernel alone (the bar): latent_decode over pre-absorbed queries; its bytes
    # are the cache, the latent queries and the latent output.
    q_lat = mla.absorb_query(q_nope, q_rope, w_uk)
    kernel_bytes = (cache.size + q_lat.size + b * n * d_c) * item
    scale = 1.0 / (d_n + d_r) ** 0.5

    def kernel_fn(impl, config=None):
        return jax.jit(lambda q, c: mla.latent_decode(q, c, v_dim=d_c, scale=scale, impl=impl,
                                                      config=config))

    want = fn("xla")(q_nope, q_rope, cache, w_uk, w_uv)
    for impl in impls:
        config = None
        if not isinstance(impl, str):  # a config: the sweep of its kernel
            config, impl = impl, CONFIG_IMPL[type(impl)]
        row = dict(kind="latent" if config is None else "config", impl=impl, S=s,
                   bytes=nbytes)
        if config is not None:
            row["config"] = dataclasses.asdict(config)
        try:
            f = fn(impl, config)
            row["max_abs_err_vs_xla"] = err = max_abs_err(f(q_nope, q_rope, cache, w_uk, w_uv),
                                                         want)
            if not err < 5e-2:
                row["status"] = "FAILED"
            else:
                args = (q_nope, q_rope, cache, w_uk, w_uv)
                t = time_call(f, *args, repeats=repeats, warmup=warmup)
                tp = time_in_program(f, *args, repeats=repeats, warmup=warmup)
                row.update(status="ok", ms=t.median_ms, GBps=per_s(nbytes, t.median_ms, 1e9),
                           ms_in_program=tp.median_ms,
                           GBps_in_program=per_s(nbytes, tp.median_ms, 1e9))
                row["ratio_copy"] = row["GBps"] / copy["GBps"]
                row["ratio_copy_in_program"] = (row["GBps_in_program"]
                                                / copy["GBps_in_program"])
                k = kernel_fn(impl, config)
                tk = time_call(k, q_lat, cache, repeats=repeats, warmup=warmup)
                tkp = time_in_program(k, q_lat, cache, repeats=repeats, warmup=warmup)
                row.update(kernel_bytes=kernel_bytes, kernel_ms=tk.median_ms,
                           kernel_ms_in_program=tkp.median_ms,
                           kernel_ratio_copy=per_s(kernel_bytes, tk.median_ms, 1e9)
                           / copy["GBps"],
                           kernel_ratio_copy_in_program=per_s(kernel_bytes, tkp.median_ms, 1e9)
                           / copy["GBps_in_program"])
        except Exception as e:  # noqa: BLE001 - record and go on
            row.update(status="ERROR", error=str(e).splitlines()[0][:300])
        rows.append(row)
    if not materialize:
        return rows
    # The materialized cache is (d_n + d_R + d_v) / (d_c + d_R) times larger (26x at
    # DeepSeek-V2 sizes): timed on the first ``mb`` sequences (it does not fit for all), its
    # per-token time scaled to the whole batch (decoding is memory-bound: time ~ bytes).
    mb = max(1, min(b, materialize_batch))
    try:
        c, k_r = cache[:mb, :, :d_c], cache[:mb, :, d_c:]
        k, v = mla.materialize_kv(c, k_r, w_uk, w_uv)
        q = jnp.concatenate([q_nope[:mb], q_rope[:mb]], -1)
        scale = (d_n + d_r) ** -0.5
        hp = 1 << (d_n + d_r - 1).bit_length()  # the Triton kernel's head dim, pre-padded
        pad = ((0, 0), (0, 0), (0, 0), (0, hp - d_n - d_r))
        want_m = decode_attention(q, k, v, scale=scale, impl="xla")
        for impl in ("pallas_triton", "xla"):
            qq, kk = (jnp.pad(q, pad), jnp.pad(k, pad)) if impl == "pallas_triton" else (q, k)
            f = jax.jit(lambda q, k, v, impl=impl: decode_attention(q, k, v, scale=scale,
                                                                    impl=impl))
            row = dict(kind="materialized", impl=impl, S=s, timed_batch=mb,
                       bytes=(kk.size + v.size) * item)
            row["max_abs_err_vs_xla"] = max_abs_err(f(qq, kk, v), want_m)
            t = time_call(f, qq, kk, v, repeats=repeats, warmup=warmup)
            tp = time_in_program(f, qq, kk, v, repeats=repeats, warmup=warmup)
            row.update(status="ok", ms_timed_batch=t.median_ms, ms=t.median_ms * b / mb,
                       GBps=per_s(row["bytes"], t.median_ms, 1e9),
                       ms_in_program=tp.median_ms * b / mb,
                       GBps_in_program=per_s(row["bytes"], tp.median_ms, 1e9))
            rows.append(row)
            del qq, kk
    except Exception as e:  # noqa: BLE001 - out of memory at long caches, say
        rows.append(dict(kind="materialized", S=s, status="ERROR",
                         error=str(e).splitlines()[0][:300]))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=ints, default=[8192, 32768])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--d-c", type=int, default=512)
    p.add_argument("--d-r", type=int, default=64)
    p.add_argument("--d-n", type=int, default=128)
    p.add_argument("--d-v", type=int, default=128)
    p.add_argument("--impls", default="pallas_triton,pallas_mosaic_gpu,xla")
    p.add_argument("--materialize-up-to", type=int, default=8192,
                   help="time the materialized cache for S up to this (memory)")
    add_timing_args(p, repeats=20)
    p.add_argument("--sweep", action="store_true",
                   help="time the Triton kernel under each SWEEP config (GPU)")
    p.add_argument("--sweep-mosaic", action="store_true",
                   help="time the Mosaic GPU kernel under each MOSAIC_SWEEP config (H100)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.batch, args.heads = [64], 2, 4
        args.d_c, args.d_r, args.d_n, args.d_v, args.repeats = 32, 16, 16, 16, 2
        args.materialize_up_to = 64
        # The Mosaic GPU kernel interpreted takes seconds a call: its CPU checks are tests.
        args.impls = args.impls.replace("pallas_mosaic_gpu,", "")
    dims = dict(b=args.batch, n=args.heads, d_c=args.d_c, d_r=args.d_r, d_n=args.d_n,
                d_v=args.d_v)
    copy = copy_bandwidth(1 << 30 if platform() == "gpu" else 1 << 22)
    impls: list[Any] = args.impls.split(",")
    if args.sweep:
        impls = [MlaDecodeConfig(block_kv=kv, block_rows=r, num_warps=w, num_stages=st,
                                 keys_per_split=kps) for kv, r, w, st, kps in SWEEP]
    if args.sweep_mosaic:
        impls = [MosaicMlaDecodeConfig(num_splits=p, approx_math=a, overlap=o)
                 for p, a, o in MOSAIC_SWEEP]
    rows = []
    for s in args.seq_lens:
        new = bench_one(s, **dims, dtype=jnp.bfloat16, impls=impls,
                        repeats=args.repeats, warmup=args.warmup, copy=copy,
                        materialize=(s <= args.materialize_up_to and not args.sweep
                                     and not args.sweep_mosaic))
        rows += new
        for r in new:
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    for s in args.seq_lens:  # speed-up per token over the best materialized decode
        lat = [r for r in rows if r["S"] == s and r["kind"] == "latent" and r.get("ms")]
        mat = [r for r in rows if r["S"] == s and r["kind"] == "materialized" and r.get("ms")]
        if lat and mat:
            best = min(r["ms"] for r in mat)
            best_prog = min(r["ms_in_program"] for r in mat)
            for r in lat:
                r["speedup_vs_materialized"] = best / r["ms"]
                r["speedup_vs_materialized_in_program"] = best_prog / r["ms_in_program"]
    record = run_record(argv, dims=dims, dtype="bfloat16", copy=copy, rows=rows)
    if args.out:
        write_json(args.out, record)
    print({k: record[k] for k in ("device_kind", "jax_version")}, "copy GB/s",
          round(copy["GBps"], 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
