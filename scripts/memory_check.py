"""Peak temporary memory of each attention implementation at two sequence lengths.

    python3 scripts/memory_check.py --lengths 32768,65536 --out memory.json

Compiles (does not run) forward and forward+backward for each implementation that supports
the call and reads XLA's ``memory_analysis().temp_size_in_bytes``. A memory-linear
implementation roughly doubles from one length to twice that length; an O(S^2) one
quadruples. Used for the issue's "no O(S^2) buffers at any length" check on the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnlab.bench.memory import temp_memory_bytes  # noqa: E402
from attnlab.ops import attention, explain  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="32768,65536")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--impls", default="xla,cudnn,pallas_triton,pallas_tpu")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dtype = jnp.dtype(a.dtype)
    rows = []
    for s in (int(x) for x in a.lengths.split(",")):
        x = jax.ShapeDtypeStruct((1, s, a.heads, a.head_dim), dtype)
        why = explain(x, x, x, is_causal=True)
        for impl in a.impls.split(","):
            if why.get(impl, "not registered") is not None:
                continue

            def fwd(q, k, v, impl=impl):
                return attention(q, k, v, is_causal=True, impl=impl)

            def fwdbwd(q, k, v, impl=impl):
                return jax.grad(lambda *t: jnp.sum(fwd(*t).astype(jnp.float32)),
                                argnums=(0, 1, 2))(q, k, v)

            for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
                b = temp_memory_bytes(fn, x, x, x)
                rows.append({"impl": impl, "S": s, "pass": name, "temp_bytes": b})
                mib = b / 2**20 if b else float("nan")
                print(f"{impl:14s} S={s:6d} {name:6s} temp={mib:9.1f} MiB", flush=True)
    # Growth factor from the first to the last length, per (impl, pass).
    growth = {}
    for r in rows:
        k = f"{r['impl']}/{r['pass']}"
        growth.setdefault(k, []).append(r["temp_bytes"])
    ratios = {k: (v[-1] / v[0] if v[0] else None) for k, v in growth.items() if len(v) > 1}
    for k, r in ratios.items():
        print(f"growth {k}: x{r:.2f}" if r else f"growth {k}: n/a")
    if a.out:
        Path(a.out).write_text(json.dumps({
            "device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": vars(a), "rows": rows, "growth": ratios,
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
