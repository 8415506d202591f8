"""LightningAttention module: shapes, registry contract, prefill + decode equals the full
forward, segment resets, cache size, finite gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.nn import registry
from attnlab.nn.config import Config
from attnlab.nn.lightning import LightningAttention


def _module(layer_idx=1, **kw):
    cfg = Config(**{**dict(d_model=32, num_heads=2, head_dim=16, num_layers=4,
                           layer_pattern="LLLS"), **kw})
    return cfg, LightningAttention(cfg, layer_idx=layer_idx, rngs=nnx.Rngs(0))


def _pos(b, t):
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@nnx.jit
def _fwd(m, x, segment_ids=None):
    return m(x, positions=_pos(*x.shape[:2]), segment_ids=segment_ids)[0]


def test_forward_shape_and_contract(key):
    cfg, m = _module()
    x = jax.random.normal(key, (2, 16, 32))
    y, cache = nnx.jit(lambda m, x: m(x, positions=_pos(2, 16)))(m, x)
    assert y.shape == x.shape and cache is None and bool(jnp.all(jnp.isfinite(y)))
    assert registry.get("L") is LightningAttention and registry.get("lightning") is LightningAttention
    assert LightningAttention.cache_bytes_per_token(cfg) == 0
    assert LightningAttention.state_bytes(cfg) == 2 * 16 * 16 * 4
    c = m.init_cache(3, 128, jnp.bfloat16)
    assert c["state"].shape == (3, 2, 16, 16) and c["state"].dtype == jnp.float32
    # Different layers decay differently (MiniMax slopes depend on the depth).
    assert _module(0)[1].decay != _module(3)[1].decay


def test_prefill_then_decode_equals_full_forward(key):
    _, m = _module()
    b, t, p = 2, 16, 11
    x = jax.random.normal(key, (b, t, 32))
    want = _fwd(m, x)

    @nnx.jit
    def run(m, x):
        cache = m.init_cache(b, t)
        y0, cache = m(x[:, :p], positions=_pos(b, p), cache=cache)
        ys = [y0]
        for i in range(p, t):
            y, cache = m(x[:, i:i + 1], positions=jnp.full((b, 1), i), cache=cache)
            ys.append(y)
        return jnp.concatenate(ys, axis=1)

    np.testing.assert_allclose(run(m, x), want, atol=2e-5)


def test_segment_ids_reset_the_state(key):
    _, m = _module()
    b, t, cut = 1, 16, 6
    x = jax.random.normal(key, (b, t, 32))
    seg = jnp.where(jnp.arange(t) >= cut, 1, 0)[None].astype(jnp.int32)
    y = _fwd(m, x, seg)
    alone = _fwd(m, x[:, cut:])
    np.testing.assert_allclose(y[:, cut:], alone, atol=2e-5)
    whole = _fwd(m, x)
    assert not np.allclose(y[:, cut:], whole[:, cut:], atol=1e-3)  # the reset matters


def test_gradients_are_finite(key):
    _, m = _module()
    x = jax.random.normal(key, (2, 16, 32))

    def loss(m):
        y, _ = m(x, positions=_pos(2, 16))
        return jnp.mean(y ** 2)

    grads = nnx.jit(nnx.grad(loss))(m)
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_bad_impl():
    with pytest.raises(ValueError, match="attention_impl='cudnn' is not a lightning attention"):
        _module(attention_impl="cudnn")
