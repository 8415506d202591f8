"""The kernels of one decode or attention call, for Nsight Compute (``ncu``) on a GPU.

Compiles and warms the call up first, then brackets one call with ``cudaProfilerStart`` /
``cudaProfilerStop``, so that ``ncu --profile-from-start off`` sees exactly that call's
kernels (the Pallas kernel, and whatever XLA runs around it):

    ncu --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
        python3 scripts/ncu_kernels.py mla --seq-len 8192
    ncu --profile-from-start off ... python3 scripts/ncu_kernels.py attention --seq-len 8192 \\
        --impl pallas_mosaic_gpu --block-kv 128

``mla``: the latent decode alone (``latent_decode`` on absorbed queries; batch 32, 128 heads,
d_c 512, d_R 64, bf16, as ``attnlab.bench.mla``). ``attention``: the causal forward at
H=16, D=128, B*S = 32K, bf16, as ``scripts/mosaic_sweep.py``. Without ``ncu`` it just runs.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops import attention, mla
from pallas_kernels.gpu.mgpu_common import MosaicFlashConfig
from pallas_kernels.gpu.mgpu_mla_decode import MosaicMlaDecodeConfig


def _cudart():
    """The CUDA runtime library of this process (the one JAX's CUDA plugin ships), or None."""
    for d in sys.path:
        for pattern in ("nvidia/*/lib/libcudart.so*", "nvidia/*/*/lib/libcudart.so*"):
            for path in sorted(glob.glob(os.path.join(d, pattern))):
                try:
                    return ctypes.CDLL(path)
                except OSError:
                    continue
    try:
        return ctypes.CDLL("libcudart.so")
    except OSError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("mla", "attention"))
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--impl", default="pallas_mosaic_gpu")
    p.add_argument("--block-kv", type=int, default=None)
    p.add_argument("--num-splits", type=int, default=None)
    p.add_argument("--approx-math", action="store_true")
    p.add_argument("--pingpong", action="store_true")
    p.add_argument("--batch-tokens", type=int, default=32768, help="attention: B * S")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    s = args.seq_len
    if args.what == "mla":
        b, n, d_c, d_r = 32, 128, 512, 64
        q = jnp.asarray(rng.standard_normal((b, 1, n, d_c + d_r), np.float32), jnp.bfloat16)
        cache = jnp.asarray(rng.standard_normal((b, s, d_c + d_r), np.float32), jnp.bfloat16)
        cfg = None
        if args.impl == "pallas_mosaic_gpu":
            kw = dict(num_splits=args.num_splits, approx_math=args.approx_math)
            if args.block_kv:
                kw["block_kv"] = args.block_kv
            cfg = MosaicMlaDecodeConfig(**kw)
        fn = jax.jit(lambda q, c: mla.latent_decode(q, c, v_dim=d_c, scale=192 ** -0.5,
                                                     impl=args.impl, config=cfg))
        call_args = (q, cache)
    else:
        b, h, d = max(1, args.batch_tokens // s), 16, 128
        q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, d), np.float32), jnp.bfloat16)
                   for _ in range(3))
        cfg = None
        if args.impl == "pallas_mosaic_gpu":
            cfg = MosaicFlashConfig(block_kv=args.block_kv or 64, approx_math=args.approx_math,
                                    pingpong=args.pingpong)
        fn = jax.jit(lambda q, k, v: attention(q, k, v, is_causal=True, impl=args.impl,
                                                **({"config": cfg} if cfg else {})))
        call_args = (q, k, v)
    for _ in range(3):
        jax.block_until_ready(fn(*call_args))
    rt = _cudart()
    if rt is None:
        print("ncu_kernels: no libcudart found; the whole run is profiled", file=sys.stderr)
    else:
        rt.cudaProfilerStart()
    jax.block_until_ready(fn(*call_args))
    if rt is not None:
        rt.cudaProfilerStop()
    print("ncu_kernels: done", args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
