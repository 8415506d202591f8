"""Star Attention prefill on one device: the context phase against full causal attention.

Star Attention's phase 1 (:func:`attnlab.ops.star.context_attention`) encodes a context of T
tokens in blocks of ``block`` tokens, each attending causally to an anchor (the first block,
``anchor = block``) and itself. Its work is O(T * 2 * block) where full causal prefill's is
O(T^2 / 2), so the speed-up grows with T / block. This benchmark times one attention layer's
prefill (forward), bf16, [B, T, N, H] inputs:

* ``full``: :func:`attnlab.ops.attention` with ``is_causal=True`` over the whole context;
* ``star``: the context phase with blocks of ``block`` tokens and a one-block anchor.

Each (kind, implementation) pair is checked before it is timed, at a cropped length (T_check,
with blocks of T_check / 4) against :func:`attnlab.ops.star.reference` (the dense masked
definition) for ``star`` and :func:`attnlab.ops.reference` for ``full``: at the timed lengths
neither reference fits. cuDNN (``jax.nn``) is timed as a full-attention anchor too. Rows give
ms, TFLOP/s of the work done (the masked-out tiles not counted) and ``speedup`` = the same
implementation's full causal time over its star time.

Standalone: ``python -m attnlab.bench.star --out star.json``; ``--smoke`` runs tiny shapes on CPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.bench.harness import (
    add_shape_args,
    add_timing_args,
    check_dtype,
    ints,
    max_abs_err,
    names,
    run_record,
    runs_interpreted,
    short_error,
    tflops_per_s,
    time_call,
    within,
    write_json,
)
from attnlab.ops import attention, platform, star
from attnlab.ops import reference as attention_reference
from attnlab.testing import random_qkv, tolerance

CUDNN = "cudnn (jax.nn)"


def star_flops(b: int, t: int, n: int, h: int, block: int) -> float:
    """FLOPs of the context phase with a one-block anchor: block 1 causal over itself, every
    later block causal over itself plus the whole anchor (4 * B * N * H per score)."""
    nb = t // block
    scores = nb * block * block / 2 + (nb - 1) * block * block
    return 4.0 * b * n * h * scores


def full_flops(b: int, t: int, n: int, h: int) -> float:
    """FLOPs of full causal attention over T tokens (the lower triangle)."""
    return 4.0 * b * n * h * t * t / 2


def _fn(kind: str, impl: str, block: int):
    cfg = star.StarConfig(block_size=block) if kind == "star" else None
    if impl == CUDNN:
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                            implementation="cudnn")
    if kind == "star":
        return lambda q, k, v: star.context_attention(q, k, v, star=cfg, impl=impl)
    return lambda q, k, v: attention(q, k, v, is_causal=True, impl=impl)


def check(kind: str, impl: str, *, t_check: int, n: int, h: int, dtype: Any) -> float | None:
    """``kind``/``impl`` against the dense reference at T = ``t_check`` (blocks of
    t_check / 4): None when within the dtype's output tolerance, else the max abs error."""
    q, k, v = random_qkv(jax.random.key(1), 1, t_check, t_check, n, n, h, dtype)
    block = t_check // 4
    got = jax.jit(_fn(kind, impl, block))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    if kind == "star":
        want = star.reference(*f32, block_size=block, is_causal=True)
    else:
        want = attention_reference(*f32, is_causal=True)
    err = max_abs_err(got, want)
    return None if within(err, tolerance(dtype, platform()).out, want) else err


def bench(seq_lens: Sequence[int], blocks: Sequence[int], *, batch: int, heads: int,
          head_dim: int, dtype: Any, impls: Sequence[str], repeats: int, t_check: int,
          anchors: bool, warmup: int = 2, out: str | None = None,
          argv: Sequence[str] = ()) -> dict[str, Any]:
    """Rows for every (T, kind, block, implementation); the record is rewritten to ``out``
    after each T (a run stopped by a time limit keeps what it measured)."""
    plat = platform()
    impls = [i for i in impls if not runs_interpreted(i, plat)]
    full_impls = impls + ([CUDNN] if anchors and plat == "gpu" else [])
    failed: dict[tuple[str, str], float | str] = {}
    for kind, group in (("full", full_impls), ("star", impls)):
        for impl in group:
            try:
                err = check(kind, impl, t_check=t_check, n=heads, h=head_dim, dtype=dtype)
            except Exception as e:  # noqa: BLE001 - an implementation that refuses the case
                err = short_error(e)
            if err is not None:
                failed[(kind, impl)] = err
    rows: list[dict[str, Any]] = []
    record = run_record(argv, dims=dict(batch=batch, heads=heads, head_dim=head_dim),
                        dtype=jnp.dtype(dtype).name, t_check=t_check, rows=rows)
    for t in seq_lens:
        q, k, v = random_qkv(jax.random.key(t), batch, t, t, heads, heads, head_dim, dtype)
        cases = [("full", impl, None) for impl in full_impls]
        cases += [("star", impl, bs) for bs in blocks if t % bs == 0 and t > bs for impl in impls]
        for kind, impl, bs in cases:
            row: dict[str, Any] = dict(T=t, kind=kind, impl=impl, block=bs)
            if (kind, impl) in failed:
                row.update(status="FAILED", check=failed[(kind, impl)])
            else:
                try:
                    tm = time_call(jax.jit(_fn(kind, impl, bs)), q, k, v, repeats=repeats,
                                   warmup=warmup)
                    flops = (star_flops(batch, t, heads, head_dim, bs) if kind == "star"
                             else full_flops(batch, t, heads, head_dim))
                    row.update(status="ok", ms=tm.median_ms,
                               tflops=tflops_per_s(flops, tm.median_ms))
                except Exception as e:  # noqa: BLE001 - out of memory, say: record, go on
                    row.update(status="ERROR", error=short_error(e))
            rows.append(row)
            print({k_: (round(x, 3) if isinstance(x, float) else x) for k_, x in row.items()},
                  flush=True)
        _speedups(rows, t)
        if out:
            write_json(out, record)
    return record


def _speedups(rows: list[dict[str, Any]], t: int) -> None:
    """``speedup`` (same implementation's full time / star time) and ``speedup_vs_cudnn``."""
    full = {r["impl"]: r["ms"] for r in rows if r["T"] == t and r["kind"] == "full"
            and r.get("ms")}
    for r in rows:
        if r["T"] == t and r["kind"] == "star" and r.get("ms"):
            if r["impl"] in full:
                r["speedup"] = full[r["impl"]] / r["ms"]
            if CUDNN in full:
                r["speedup_vs_cudnn"] = full[CUDNN] / r["ms"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=ints, default=[32768, 65536, 131072])
    p.add_argument("--blocks", type=ints, default=[8192, 16384])
    p.add_argument("--batch", type=int, default=1)
    add_shape_args(p, heads=16)
    p.add_argument("--impls", default="pallas_triton",
                   help="attnlab implementations (comma-separated)")
    p.add_argument("--no-anchors", action="store_true", help="do not time cuDNN")
    p.add_argument("--t-check", type=int, default=2048, help="length of the correctness check")
    add_timing_args(p, repeats=10)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.blocks, args.heads, args.head_dim = [256], [64], 2, 32
        args.t_check, args.repeats, args.dtype, args.impls = 128, 2, "float32", "xla"
    record = bench(args.seq_lens, args.blocks, batch=args.batch, heads=args.heads,
                   head_dim=args.head_dim, dtype=check_dtype(args.dtype),
                   impls=names(args.impls) or [], repeats=args.repeats, t_check=args.t_check,
                   anchors=not args.no_anchors, warmup=args.warmup, out=args.out, argv=argv)
    print({k: record[k] for k in ("device_kind", "jax_version")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
