"""Tile sweep of the Mosaic GPU flash-attention forward (Hopper only): which
``MosaicFlashConfig`` (key tile, pipeline depth, compute warpgroups, their turns on the
tensor cores) is fastest, against cuDNN timed in the same run.

    python scripts/mosaic_sweep.py --out $OUT/mosaic_sweep.json
    python scripts/mosaic_sweep.py --pass fwdbwd --out $OUT/mosaic_sweep_bwd.json  # causal
      forward+backward: the Triton backward against the Mosaic GPU one

For each (S, causal) it checks every candidate against ``impl="xla"`` on the same inputs, then
times it (median of ``--repeats``); a candidate that does not compile (shared memory, say) or
disagrees is recorded with its error and not timed. ``--smoke`` runs tiny shapes in the
Mosaic GPU interpreter on CPU (the code path, not the speed).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from attnlab.bench.harness import (
    add_timing_args,
    attention_flops,
    check_then_time,
    ints,
    pass_fn,
    run_record,
    write_json,
)
from attnlab.ops import attention
from attnlab.testing import random_qkv, tolerance
from pallas_kernels.gpu.mgpu_common import SMEM_BYTES, MosaicFlashConfig


def candidates() -> list[MosaicFlashConfig]:
    """First 128-key tiles with two compute warpgroups (JAX's own Mosaic GPU attention's
    shape), with approximate math, with and without turns on the tensor cores and K through
    transposed views, and 64-key tiles with the same, the best of earlier runs; then the
    overlapped logits, and key tile x pipeline depth x (two compute warpgroups with and
    without turns, one) x P in registers or in SMEM; configs whose tiles do not fit the
    shared memory at head dim 128 left out."""
    out = [MosaicFlashConfig(block_kv=bk, approx_math=True, **kw)
           for kw in ({}, dict(pingpong=True), dict(k_view=True)) for bk in (128, 64)]
    out += [MosaicFlashConfig(block_kv=128), MosaicFlashConfig(),
            MosaicFlashConfig(overlap=True, k_view=True, approx_math=True)]
    for kv, st, (w, pp), regs in itertools.product(
            (64, 128), (2, 3), ((2, False), (2, True), (1, False)), (True, False)):
        cfg = MosaicFlashConfig(block_kv=kv, compute_wgs=w, max_concurrent_steps=st,
                                pingpong=pp, p_in_registers=regs)
        if cfg not in out and cfg.smem_bytes(128, 128) <= SMEM_BYTES:
            out.append(cfg)
    return [c for c in out if c.smem_bytes(128, 128) <= SMEM_BYTES]


def backward_candidates() -> list[MosaicFlashConfig]:
    """``--pass fwdbwd``: the default forward and 128-key tiles with the Triton backward,
    then the default with the Mosaic GPU backward at one and two compute warpgroups, with and
    without approximate math."""
    return [MosaicFlashConfig(), MosaicFlashConfig(block_kv=128, approx_math=True)] + [
        MosaicFlashConfig(mosaic_backward=True, compute_wgs=w, approx_math=a)
        for w in (2, 1) for a in (False, True)]


def sweep(seq_lens, *, batch_tokens: int, heads: int, head_dim: int, repeats: int,
          warmup: int, budget_s: float, out: str | None, argv,
          max_candidates: int | None = None, pass_: str = "fwd") -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    record = run_record(argv, dims=dict(batch_tokens=batch_tokens, heads=heads,
                                        head_dim=head_dim), dtype="bfloat16", passes=pass_,
                        rows=rows)
    t0 = time.perf_counter()
    tol = tolerance(jnp.bfloat16, "gpu").out
    backward = pass_ == "fwdbwd"
    for s, causal in itertools.product(seq_lens, (True,) if backward else (True, False)):
        b = max(1, batch_tokens // s)
        q, k, v = random_qkv(jax.random.key(s), b, s, s, heads, heads, head_dim, jnp.bfloat16)
        ct = jax.random.normal(jax.random.key(s + 1), q.shape, jnp.bfloat16)
        args = (q, k, v, ct)

        def op(impl, cfg=None, c=causal):
            return pass_fn(lambda qa, ka, va: attention(qa, ka, va, is_causal=c, impl=impl,
                                                        config=cfg), pass_)

        want = jax.jit(op("xla"))(*args)
        flops = attention_flops(b, s, heads, head_dim, causal=causal) * (3.5 if backward else 1)
        configs = backward_candidates() if backward else candidates()
        named = [("cudnn", None)] + [("pallas_mosaic_gpu", c) for c in configs[:max_candidates]]
        for impl, cfg in named:
            row: dict[str, Any] = dict(S=s, B=b, causal=causal, impl=impl,
                                       config=None if cfg is None else dataclasses.asdict(cfg))
            if time.perf_counter() - t0 > budget_s:
                row["status"] = "skipped (time budget)"
                rows.append(row)
                continue
            # bf16 outputs (and gradients) of O(1) values against xla's: 4 tolerances.
            row.update(check_then_time(op(impl, cfg), args, want, tol * 4 * (1 + 3 * backward),
                                       flops=flops, repeats=repeats, warmup=warmup))
            rows.append(row)
            print({k_: (round(x, 3) if isinstance(x, float) else x) for k_, x in row.items()},
                  flush=True)
        ref = [r for r in rows if r["S"] == s and r["causal"] == causal and r.get("ms")]
        cudnn = [r["ms"] for r in ref if r["impl"] == "cudnn"]
        for r in ref:
            if cudnn:
                r["ratio_cudnn"] = cudnn[0] / r["ms"]
        if out:
            write_json(out, record)
    return record


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python scripts/mosaic_sweep.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=ints, default=[8192, 32768])
    p.add_argument("--batch-tokens", type=int, default=32768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--budget-s", type=float, default=400.0)
    p.add_argument("--max-candidates", type=int, default=None,
                   help="time only the first N candidates (the default and its variants first)")
    add_timing_args(p, repeats=10)
    p.add_argument("--pass", dest="pass_", choices=("fwd", "fwdbwd"), default="fwd",
                   help="fwdbwd: causal forward+backward, the Triton against the Mosaic GPU "
                   "backward")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted on CPU")
    a = p.parse_args(argv)
    if a.smoke:
        a.seq_lens, a.batch_tokens, a.heads, a.head_dim, a.repeats = [128], 128, 1, 64, 1
    sweep(a.seq_lens, batch_tokens=a.batch_tokens, heads=a.heads, head_dim=a.head_dim,
          repeats=a.repeats, warmup=a.warmup, budget_s=a.budget_s, out=a.out, argv=argv,
          max_candidates=a.max_candidates, pass_=a.pass_)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
