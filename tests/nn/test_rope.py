"""RoPE: against a direct complex-number reference, the relative-position property, bad input."""

from __future__ import annotations

import functools

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


def _rng(key) -> np.random.Generator:
    """NumPy generator seeded by the test's key (inputs without a compilation per shape)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


_rope = jax.jit(rope, static_argnames=("theta", "rope_dim"))


@pytest.mark.parametrize(
    "rope_dim,dtype",
    [(16, jnp.float32), (8, jnp.float32), (0, jnp.float32), (8, jnp.bfloat16)],
    ids=["full", "half", "none", "half_bf16"],
)
def test_rope_matches_complex_reference(key, rope_dim, dtype):
    rng = _rng(key)
    x = jnp.asarray(rng.normal(size=(2, 9, 3, 16)), dtype)
    positions = jnp.asarray(rng.integers(0, 4096, (2, 9)), jnp.int32)
    out = _rope(x, positions, theta=10_000.0, rope_dim=rope_dim)
    assert out.dtype == dtype and out.shape == x.shape
    want = _complex_reference(x.astype(jnp.float32), positions, 10_000.0, rope_dim)
    # f32 angles of positions ~4096 carry ~1e-4 relative error in the phase.
    tol = max(fwd_tol(dtype), 2e-3)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.asarray(out[..., rope_dim:]), np.asarray(x[..., rope_dim:]))


@functools.partial(jax.jit, static_argnames=("rope_dim",))
def _scores(q, k, q_pos, k_pos, rope_dim):
    """<rope(q, q_pos[i]), rope(k, k_pos[i])> for each i; q, k [1, 1, 1, H]."""

    def score(qp, kp):
        rq = rope(q, jnp.full((1, 1), qp), theta=500.0, rope_dim=rope_dim)
        rk = rope(k, jnp.full((1, 1), kp), theta=500.0, rope_dim=rope_dim)
        return jnp.sum(rq * rk)

    return jax.vmap(score)(q_pos, k_pos)


@pytest.mark.parametrize("rope_dim", [16, 6])
def test_rope_scores_depend_only_on_position_difference(key, rope_dim):
    rng = _rng(key)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
    p = int(rng.integers(0, 200))
    shifts = np.concatenate([[0], rng.integers(1, 300, 4)])
    # Offset 7 at five shifts, then offset 3 at shift 0.
    q_pos = jnp.asarray(np.append(p + 7 + shifts, p + 3), jnp.int32)
    k_pos = jnp.asarray(np.append(p + shifts, p), jnp.int32)
    scores = _scores(q, k, q_pos, k_pos, rope_dim)
    np.testing.assert_allclose(scores[1:5], jnp.full((4,), scores[0]), atol=1e-4, rtol=1e-4)
    # A different offset gives a different score (the property is not vacuous).
    assert abs(float(scores[5]) - float(scores[0])) > 1e-3


def test_rope_bad_input():
    x = np.random.default_rng(0).normal(size=(2, 5, 2, 8)).astype(np.float32)
    pos = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError, match="rope_dim=3 must be an even number"):
        rope(x, pos, rope_dim=3)
    with pytest.raises(ValueError, match="rope_dim=10 must be an even number in \\[0, head_dim=8\\]"):
        rope(x, pos, rope_dim=10)
    with pytest.raises(ValueError, match="positions must have shape \\[batch, seq\\] = \\(2, 5\\)"):
        rope(x, np.zeros((5,), np.int32))
    with pytest.raises(ValueError, match="x must have shape"):
        rope(x[0], pos)
    with pytest.raises(ValueError, match="theta=0.0 must be positive"):
        rope(x, pos, theta=0.0)
