"""LASP-2H: a lightning layer (LASP-2) feeding a softmax layer (ring / zigzag) on one mesh
equals the same two layers on one device, values and gradients; each layer keeps its own
collective (all-gather of states, collective-permute of K/V)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from attnlab.ops import attention, lightning_attention, minimax_decay
from sharding.hybrid import HybridParallel

B, T, N, H = 2, 64, 2, 16


def _two_layers(lin, soft, decay):
    def f(q, k, v):
        y = lin(q, k, v, decay=decay)
        return soft(y, k, v)  # the lightning output queries the softmax layer
    return f


def _loss(f):
    def loss(q, k, v):
        o = f(q, k, v)
        w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape))
        return jnp.sum(o * w)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("strategy", ["ring", "zigzag"])
def test_lightning_then_softmax_equals_single_device(strategy, key):
    mesh = jax.make_mesh((2, 4), ("data", "sp"), axis_types=(AxisType.Explicit,) * 2)
    hp = HybridParallel(mesh=mesh, batch_axis="data", softmax_strategy=strategy, impl="xla")
    ks = jax.random.split(key, 3)
    q, k, v = (0.3 * jax.random.normal(kk, (B, T, N, H)) for kk in ks)
    decay = minimax_decay(N, 1, 4)
    want_val, want_grads = _loss(_two_layers(
        lambda q, k, v, decay: lightning_attention(q, k, v, decay=decay, impl="xla"),
        lambda q, k, v: attention(q, k, v, is_causal=True, impl="xla"), decay))(q, k, v)
    sh = NamedSharding(mesh, P("data", "sp"))
    qs, kss, vs = (jax.device_put(x, sh) for x in (q, k, v))
    fn = _loss(_two_layers(hp.layer("lightning"), hp.layer("softmax"), decay))
    with jax.set_mesh(mesh):
        val, grads = fn(qs, kss, vs)
        hlo = fn.lower(qs, kss, vs).compile().as_text()
    np.testing.assert_allclose(val, want_val, rtol=2e-5, atol=1e-4)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)
    assert "collective-permute" in hlo
    assert "all-gather" in hlo  # LASP-2's states
    # No all-gather of a sequence-length float array: only [.., N, H, Hv(+3)] states.
    for line in hlo.splitlines():
        if "all-gather(" in line and f",{T}," in line.split("all-gather(")[0]:
            raise AssertionError(f"sequence gathered: {line.strip()[:200]}")


def test_rule_registry():
    """Names resolve to their rules; a new mechanism registers one or a 'not sequence-parallel'
    marker; duplicates are refused."""
    from sharding import hybrid

    mesh = jax.make_mesh((8,), ("sp",), axis_types=(AxisType.Explicit,))
    assert {"lightning", "softmax"} <= set(hybrid.rules())
    try:
        @hybrid.register_rule("zattn")
        def _z(plan, q, k, v, **kw):
            return plan.seq_axis, q, kw

        assert HybridParallel(mesh=mesh).layer("zattn")(1, 2, 3, w=4) == ("sp", 1, {"w": 4})
        with pytest.raises(ValueError, match="'zattn' already has a sequence-parallel rule"):
            hybrid.register_rule("zattn")(_z)
        hybrid.not_sequence_parallel("yattn", "its state is global")
        assert hybrid.not_parallel()["yattn"] == "its state is global"
        with pytest.raises(ValueError, match="yattn has no sequence-parallel form: its state"):
            HybridParallel(mesh=mesh).layer("yattn")
        with pytest.raises(ValueError, match="say why"):
            hybrid.not_sequence_parallel("xattn", "")
    finally:
        hybrid._RULES.pop("zattn", None)
        hybrid._NOT_PARALLEL.pop("yattn", None)
    with pytest.raises(ValueError, match="registered under a mechanism name"):
        hybrid.register_rule("")


def test_bad_layer_kind_and_axis():
    mesh = jax.make_mesh((8,), ("sp",), axis_types=(AxisType.Explicit,))
    with pytest.raises(ValueError, match="no sequence-parallel rule"):
        HybridParallel(mesh=mesh).layer("X")
    with pytest.raises(ValueError, match="is not an axis of the mesh"):
        HybridParallel(mesh=mesh, seq_axis="seq")
    with pytest.raises(ValueError, match="softmax_strategy 'star'"):
        HybridParallel(mesh=mesh, softmax_strategy="star")
