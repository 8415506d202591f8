"""Every op and implementation runs, forward and backward, under
``jax_numpy_rank_promotion="raise"`` (the strict mode of JAX's own tests and many research
codebases): no implicit rank promotion anywhere in attnlab's code paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import attention, decode_attention, lightning_attention, mla
from tests.helpers import random_qkv

IMPLS = ["reference", "xla", "pallas_triton", "pallas_tpu"]


def _loss(fn):
    def f(*args):
        out = fn(*args)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(jnp.sin(out.astype(jnp.float32)))
    return f


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_with_every_mask_kind(impl, key):
    q, k, v = random_qkv(key, 1, 40, 40, 4, 2, 32)
    seg = jnp.asarray(np.repeat([0, 1], 20)[None], jnp.int32)
    kw = dict(is_causal=True, segment_ids=seg, local_window_size=(5, 3), logits_soft_cap=3.0,
              q_offset=2, return_residuals=True, impl=impl)
    with jax.numpy_rank_promotion("raise"):
        f = _loss(lambda q, k, v: attention(q, k, v, **kw))
        grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_and_latent_decode(impl, key):
    q, k, v = random_qkv(key, 2, 40, 40, 4, 2, 32)
    lengths = jnp.array([30, 7], jnp.int32)
    with jax.numpy_rank_promotion("raise"):
        out = jax.jit(lambda q, k, v: decode_attention(
            q, k, v, kv_lengths=lengths, local_window_size=9, impl=impl))(q[:, :2], k, v)
        lat = jax.jit(lambda q, c: mla.latent_decode(
            q, c, v_dim=24, kv_lengths=lengths, impl=impl))(q[:, :2], k[:, :, 0])
    assert out.shape == (2, 2, 4, 32) and lat.shape == (2, 2, 4, 24)


@pytest.mark.parametrize("impl", IMPLS)
def test_lightning(impl, key):
    q, k, v = random_qkv(key, 1, 64, 64, 2, 2, 32)
    seg = jnp.asarray(np.repeat([0, 1], 32)[None], jnp.int32)
    with jax.numpy_rank_promotion("raise"):
        f = _loss(lambda q, k, v: lightning_attention(
            q, k, v, decay=jnp.array([0.9, 0.99]), segment_ids=seg, impl=impl))
        grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
