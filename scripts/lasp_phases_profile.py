"""Where LASP-2's per-device time goes on one GPU: the single-device op against the Triton
kernels' block phases chained without collectives (what LASP-2 runs per block), with and
without the late final-state cotangent in the dq/dk/dv kernel, and the generic phases.

    PYTHONPATH=. python scripts/lasp_phases_profile.py --seq-lens 32768,65536 [--out x.json]

B = 1, H = 16 heads of 128, bf16, forward + backward (loss sum(o) + sum(final state)).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from attnlab import bench as _bench
from attnlab.ops import lightning as L


def chain(phases, carry):
    """The block phases as one differentiable function of (q, k, v, s_in): what LASP-2
    computes per device, without the exchange (s_out = carry * s_in + state)."""

    @jax.custom_vjp
    def run(q, k, v, s_in):
        return fwd(q, k, v, s_in)[0]

    def fwd(q, k, v, s_in):
        state, aux = phases.summarize(k, v)
        o, res = phases.forward(q, k, v, s_in, aux)
        return (o, carry[..., None, None] * s_in + state), res

    def bwd(res, cts):
        do, ds_out = cts
        ds_in, res = phases.state_grad(res, do)
        dq, dk, dv = phases.backward(res, ds_out)
        return dq, dk, dv, ds_in + carry[..., None, None] * ds_out

    run.defvjp(fwd, bwd)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-lens", default="32768,65536")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    n, h, dt = a.heads, 128, jnp.bfloat16
    decay = jnp.asarray(L.minimax_decay(n, 1, 4))
    ld = jnp.log(decay)
    rows = []
    for t in (int(x) for x in a.seq_lens.split(",")):
        ks = jax.random.split(jax.random.key(t), 4)
        q, k, v = (jax.random.normal(kk, (1, t, n, h)).astype(dt) * 0.1 for kk in ks[:3])
        s_in = jnp.zeros((1, n, h, h), jnp.float32)
        args = L.LightningArgs(ld, s_in, None, 1.0, None, None)
        own = L.block_phases(q, k, v, args, "pallas_triton")
        impl = L.REGISTRY.choose(q, k, v, args, "pallas_triton")
        carry = L.block_carry(ld, None, 1, t)
        variants = {
            "op": lambda q, k, v, s: L.lightning_attention(
                q, k, v, decay=decay, initial_state=s, return_state=True),
            "own_phases": chain(own, carry),
            "own_phases_no_late_cotangent": chain(own._replace(
                backward=lambda res, ds_out, own=own: own.backward(res, None)), carry),
            "generic_phases": chain(L._generic_phases(impl, args), carry),
        }
        fns = {}
        for name, f in variants.items():
            def loss(q, k, v, s, f=f):
                o, s_out = f(q, k, v, s)
                return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s_out)

            fns[name] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
            jax.block_until_ready(fns[name](q, k, v, s_in))  # compile
        # Rounds over the variants in turn (clock and thermal drift hit all alike); each
        # variant's time is its best round's median.
        best = {name: float("inf") for name in fns}
        for _ in range(a.rounds):
            for name, g in fns.items():
                ms = _bench.time_call(g, q, k, v, s_in, repeats=a.repeats, warmup=1).median_ms
                best[name] = min(best[name], ms)
        for name, ms in best.items():
            rows.append(dict(variant=name, T=t, ms=ms, mtok_s=t / ms / 1e3,
                             vs_op=best["op"] / ms))
            print(f"{name:<30} T={t:<6} {ms:8.3f} ms {t / ms / 1e3:7.2f} Mtok/s "
                  f"{best['op'] / ms:5.2f}x op", flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({**_bench.environment(), "argv": sys.argv, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
