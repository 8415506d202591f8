"""Sharded inputs and sequence-parallel attention as the ``sp`` and ``scaling`` benchmarks time it.

* :func:`make_inputs`: q, k, v and a cotangent, random normal, generated where a sharding puts
  them;
* :func:`sp_fn`: ring, striped, zigzag (inputs already in their layout: the data loader's
  job) or Ulysses over mesh axis "sp", optionally with every ``ppermute`` replaced by the
  identity (``communicate=False``: not attention, only its time means something).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sharding import default_check_vma
from sharding.api import attention as sp_attention
from sharding.ring import ring_attention

STRATEGIES = ("ring", "striped", "zigzag", "ulysses")
LAYOUTS = {"ring": "contiguous", "striped": "striped", "zigzag": "zigzag"}


def make_inputs(key, b, s, n, h, dtype, sharding=None) -> list[jax.Array]:
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


def sp_fn(mesh, strategy, *, causal, impl, communicate=True, accum="float32",
          batch_axis=None) -> Callable:
    """The sharded attention as timed: inputs already in the strategy's layout, sequence on
    mesh axis "sp" and batch on ``batch_axis`` (or replicated)."""
    if strategy == "ulysses":
        return functools.partial(
            sp_attention, mesh=mesh, strategy="ulysses", is_causal=causal, impl=impl,
            batch_axis=batch_axis,
        )
    spec = P(batch_axis, "sp")
    per_shard = functools.partial(
        ring_attention, axis_name="sp", is_causal=causal, layout=LAYOUTS[strategy], impl=impl,
        communicate=communicate, grad_accum_dtype=None if accum == "input" else accum,
    )
    return jax.shard_map(
        per_shard, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
        check_vma=default_check_vma(impl),
    )
