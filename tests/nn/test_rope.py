"""RoPE: against a direct complex-number reference, the relative-position property, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops.rope import rope
from tests.helpers import fwd_tol


def _complex_reference(x, positions, theta, rope_dim):
    """Dims i and i + R/2 as the complex number x_i + j x_{i+R/2}, times exp(j p theta^(-2i/R))."""
    x = np.asarray(x, np.float64)
    half = rope_dim // 2
    z = x[..., :half] + 1j * x[..., half:rope_dim]
    freq = theta ** (-np.arange(half) * 2.0 / rope_dim)
    z = z * np.exp(1j * np.asarray(positions, np.float64)[:, :, None, None] * freq)
    return np.concatenate([z.real, z.imag, x[..., rope_dim:]], axis=-1)


@pytest.mark.parametrize("rope_dim", [16, 8, 0], ids=["full", "half", "none"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_matches_complex_reference(key, rope_dim, dtype):
    kx, kp = jax.random.split(key)
    x = jax.random.normal(kx, (2, 9, 3, 16), jnp.float32).astype(dtype)
    positions = jax.random.randint(kp, (2, 9), 0, 4096)
    out = rope(x, positions, theta=10_000.0, rope_dim=rope_dim)
    assert out.dtype == dtype and out.shape == x.shape
    want = _complex_reference(x.astype(jnp.float32), positions, 10_000.0, rope_dim)
    # f32 angles of positions ~4096 carry ~1e-4 relative error in the phase.
    tol = max(fwd_tol(dtype), 2e-3)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.asarray(out[..., rope_dim:]), np.asarray(x[..., rope_dim:]))


@pytest.mark.parametrize("rope_dim", [16, 6])
def test_rope_scores_depend_only_on_position_difference(key, rope_dim):
    kq, kk, kp, ks = jax.random.split(key, 4)
    q = jax.random.normal(kq, (1, 1, 1, 16))
    k = jax.random.normal(kk, (1, 1, 1, 16))
    p = jax.random.randint(kp, (), 0, 200)
    shifts = jax.random.randint(ks, (4,), 1, 300)

    @jax.jit
    @jax.vmap
    def score(qp, kp_):
        rq = rope(q, jnp.full((1, 1), qp), theta=500.0, rope_dim=rope_dim)
        rk = rope(k, jnp.full((1, 1), kp_), theta=500.0, rope_dim=rope_dim)
        return jnp.sum(rq * rk)

    scores = score(p + 7 + jnp.append(0, shifts), p + jnp.append(0, shifts))
    np.testing.assert_allclose(scores[1:], jnp.full((4,), scores[0]), atol=1e-4, rtol=1e-4)
    # A different offset gives a different score (the property is not vacuous).
    other = score(jnp.stack([p + 3]), jnp.stack([p]))
    assert abs(float(other[0]) - float(scores[0])) > 1e-3


def test_rope_bad_input(key):
    x = jax.random.normal(key, (2, 5, 2, 8))
    pos = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="rope_dim=3 must be an even number"):
        rope(x, pos, rope_dim=3)
    with pytest.raises(ValueError, match="rope_dim=10 must be an even number in \\[0, head_dim=8\\]"):
        rope(x, pos, rope_dim=10)
    with pytest.raises(ValueError, match="positions must have shape \\[batch, seq\\] = \\(2, 5\\)"):
        rope(x, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="x must have shape"):
        rope(x[0], pos)
    with pytest.raises(ValueError, match="theta=0.0 must be positive"):
        rope(x, pos, theta=0.0)
