"""merge / merge_n: attention over split keys, merged, equals attention over all keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnlab.ops import attention, merge, merge_n
from tests.helpers import random_qkv, random_segments


def _chunked(q, k, v, cuts, impl, **kwargs):
    """Attention over K/V chunks [cuts[i], cuts[i+1]), merged."""
    outs, lses = [], []
    seg = kwargs.pop("segment_ids", None)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        extra = {} if seg is None else {"segment_ids": (seg[0], seg[1][:, lo:hi])}
        o, lse = attention(q, k[:, lo:hi], v[:, lo:hi], kv_offset=lo, return_residuals=True,
                           impl=impl, **kwargs, **extra)
        outs.append(o)
        lses.append(lse)
    return merge_n(outs, lses)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    s=st.integers(4, 48),
    n_chunks=st.integers(1, 5),
    causal=st.booleans(),
    segments=st.booleans(),
    impl=st.sampled_from(["reference", "xla"]),
)
def test_merge_of_chunks_equals_whole(seed, s, n_chunks, causal, segments, impl):
    key = jax.random.key(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    q, k, v = random_qkv(k1, 2, 12, s, 4, 2, 16)
    cuts = sorted(set([0, s] + list(np.asarray(jax.random.randint(k2, (n_chunks - 1,), 1, s)))))
    kwargs = dict(is_causal=causal, q_offset=s - 12)
    if segments:
        kwargs["segment_ids"] = (random_segments(k3, 2, 12, 3), random_segments(k3, 2, s, 3))

    def whole(q, k, v):
        return attention(q, k, v, return_residuals=True, impl=impl, **kwargs)

    def parts(q, k, v):
        return _chunked(q, k, v, cuts, impl, **dict(kwargs))

    o_w, l_w = jax.jit(whole)(q, k, v)
    o_p, l_p = jax.jit(parts)(q, k, v)
    np.testing.assert_allclose(o_p, o_w, atol=2e-5)
    np.testing.assert_array_equal(np.isfinite(l_p), np.isfinite(l_w))
    fin = np.isfinite(np.asarray(l_w))
    np.testing.assert_allclose(np.asarray(l_p)[fin], np.asarray(l_w)[fin], atol=2e-5)

    def loss(f):
        def g(q, k, v):
            o, lse = f(q, k, v)
            return jnp.sum(o * jnp.cos(o)) + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))
        return jax.jit(jax.grad(g, argnums=(0, 1, 2)))(q, k, v)

    for a, b in zip(loss(parts), loss(whole)):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, atol=5e-5)


def test_merge_two_equals_merge_n(key):
    q, k, v = random_qkv(key, 1, 8, 16, 2, 2, 8)
    a = attention(q, k[:, :7], v[:, :7], return_residuals=True)
    b = attention(q, k[:, 7:], v[:, 7:], kv_offset=7, return_residuals=True)
    o1, l1 = merge(*a, *b)
    o2, l2 = merge_n([a[0], b[0]], [a[1], b[1]])
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(l1, l2)


def test_merge_all_empty_parts_is_zero_and_finite_gradients(key):
    o = jax.random.normal(key, (3, 1, 4, 2, 8))
    lse = jnp.full((3, 1, 4, 2), -jnp.inf)
    out, lse_out = merge_n(o, lse)
    np.testing.assert_array_equal(out, 0.0)
    assert np.isneginf(np.asarray(lse_out)).all()
    g = jax.grad(lambda o, lse: jnp.sum(merge_n(o, lse)[0]), argnums=(0, 1))(o, lse)
    for x in g:
        assert np.isfinite(np.asarray(x)).all()
