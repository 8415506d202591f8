"""One process of the two-process ring- and star-attention test (run by test_multiprocess.py).

Usage: python -m tests.sharding.mp_worker <port> <process_id> <out.npz>
Each process owns 4 simulated CPU devices; the mesh spans all 8 of both processes.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

SHAPE = dict(b=1, s=64, n=4, kh=2, h=16)


def inputs():
    """The same random q, k, v, dout on every process (and in the test)."""
    ks = jax.random.split(jax.random.key(1234), 4)
    b, s, n, kh, h = (SHAPE[x] for x in ("b", "s", "n", "kh", "h"))
    q = jax.random.normal(ks[0], (b, s, n, h))
    k = jax.random.normal(ks[1], (b, s, kh, h))
    v = jax.random.normal(ks[2], (b, s, kh, h))
    w = jax.random.normal(ks[3], (b, s, n, h))
    return [np.asarray(x) for x in (q, k, v, w)]


def main(port: int, pid: int, out_path: str) -> None:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from sharding.api import attention
    from sharding.star import star_attention, star_query

    mesh = jax.make_mesh((8,), ("sp",), axis_types=(jax.sharding.AxisType.Explicit,))
    sh = NamedSharding(mesh, P(None, "sp"))

    def global_array(x):
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    q, k, v, w = (global_array(x) for x in inputs())

    def loss(q, k, v, w):
        o = attention(q, k, v, mesh=mesh, strategy="ring", is_causal=True, impl="xla")
        return jnp.sum(o * w), o

    with jax.set_mesh(mesh):
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
            q, k, v, w
        )
        # Star Attention across the two processes: the context phase (8 blocks of 8, the
        # anchor broadcast from process 0's first device) and a 4-token query over the cache.
        star_out = jax.jit(lambda q, k, v: star_attention(q, k, v, mesh=mesh, impl="xla"))(
            q, k, v)
        query = jax.device_put(inputs()[0][:, :4], NamedSharding(mesh, P()))
        star_q = jax.jit(lambda q, k, v: star_query(q, k, v, mesh=mesh, impl="xla"))(
            query, k, v)
    got = [multihost_utils.process_allgather(x, tiled=True)
           for x in (out, *grads, star_out, star_q)]
    np.savez(out_path, out=got[0], dq=got[1], dk=got[2], dv=got[3], star=got[4],
             star_query=got[5])
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
