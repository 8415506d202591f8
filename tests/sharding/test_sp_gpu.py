"""Sequence parallelism on the GPUs of the machine, per-block work on the Triton kernels.

Marked ``gpu`` (skipped without CUDA; run by ``scripts/gpu_check.sh`` as ``pytest -m gpu``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType

from attnlab.ops import attention as single_attention
from sharding.api import attention
from tests.helpers import assert_bf16_value_and_grads_close, random_qkv


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ring", "zigzag", "ulysses"])
def test_strategy_on_gpus_matches_one_gpu(strategy, key):
    gpus = jax.devices("gpu")
    n = len(gpus)
    mesh = jax.make_mesh((n,), ("sp",), axis_types=(AxisType.Explicit,), devices=gpus)
    q, k, v = random_qkv(key, 1, 1024 * n, 1024 * n, 2 * n, n, 128, jnp.bfloat16)
    w = jax.random.normal(jax.random.fold_in(key, 1), q.shape)

    def value_and_grad(fn):
        def loss(q, k, v):
            o = fn(q, k, v)
            return jnp.sum(o.astype(jnp.float32) * w), o

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    ref = functools.partial(single_attention, is_causal=True, impl="xla")
    want = jax.jit(lambda q, k, v: value_and_grad(ref))(q, k, v)
    fn = functools.partial(attention, mesh=mesh, strategy=strategy, is_causal=True)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: value_and_grad(fn))(q, k, v)
    assert_bf16_value_and_grads_close(got, want)
