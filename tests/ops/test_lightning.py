"""Lightning attention: the reference against the float64 oracle; ``impl="xla"`` through the
shared base (``lightning_base.py``: values, final state, gradients, two halves, prefill then
decode, traced decay, bad inputs) with chunk lengths that divide T, do not, and exceed it;
dispatch and the decay helpers. The kernels' subclasses live in ``tests/pallas_kernels``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import XlaLightningConfig
from attnlab.ops import lightning as L
from attnlab.testing import linear_tolerance
from tests.helpers import lightning_oracle
from tests.ops.lightning_base import (
    LIGHTNING_CASES,
    LightningCase,
    LightningTestBase,
    assert_close_rel,
)


class TestXla(LightningTestBase):
    IMPL = "xla"
    CONFIG = XlaLightningConfig(chunk_size=8)  # outside the grid: several ragged chunks
    DTYPES = {"float32": None, "bfloat16": ("ragged_all",)}

    def config_for(self, case: LightningCase) -> XlaLightningConfig:
        return XlaLightningConfig(chunk_size=case.chunk)


@pytest.mark.parametrize("case", LIGHTNING_CASES[0:3:2], ids=repr)
def test_reference_matches_float64_oracle(case, key):
    q, k, v, decay, h0, seg = case.inputs(key)
    kw = dict(initial_state=h0, segment_ids=seg)
    o, s = L.reference(q, k, v, decay=decay, return_state=True, scale=0.5, **kw)
    want_o, want_s = lightning_oracle(q, k, v, decay, h0, seg, 0.5)
    assert_close_rel(o, want_o, 2e-6, "o")
    assert_close_rel(s, want_s, 2e-6, "state")


def test_auto_on_cpu_is_xla_and_kernels_report_why(key):
    q, k, v, decay, _, _ = LIGHTNING_CASES[0].inputs(key)
    assert L.REGISTRY.auto_choice(q, k, v, decay=decay, plat="cpu") == "xla"
    why = L.explain(q, k, v, decay=decay, plat="cpu")
    assert why["xla"] is None and why["reference"] is None
    for name in ("pallas_triton", "pallas_tpu"):  # either registered (None) or a reason
        assert name in why


def test_decay_helpers():
    np.testing.assert_allclose(L.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    # Non-power-of-two: the 4-head slopes, then every other 8-head slope.
    np.testing.assert_allclose(
        L.alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    )
    n, layers = 16, 8
    for layer in (0, 3, 7):
        s = np.asarray([2.0 ** (-8 * (h + 1) / n) for h in range(n)])
        want = np.exp(-s * (1 - layer / (layers - 1) + 1e-5))
        np.testing.assert_allclose(L.minimax_decay(n, layer, layers), want, rtol=1e-6)
    d = L.minimax_decay(n, 7, layers)
    assert np.all(d > 0.99999) and np.all(d < 1)  # last layer: almost no decay
    assert np.all(np.diff(L.minimax_decay(n, 0, layers)) > 0)  # later heads decay slower
    np.testing.assert_allclose(L.transnormer_decay(8), np.exp(-L.alibi_slopes(8)), rtol=1e-6)
    assert L.minimax_decay(4, 0, 1).shape == (4,)


def test_xla_float16_scores_beyond_its_range(key):
    """float16 inputs whose q.k (86436) is beyond float16's range (65504) while o is not:
    the xla path keeps the score tile and the states in float32, as the reference does, and
    returns o within float16's tolerance of it (it overflowed to inf)."""
    b, t, n, h = 1, 24, 2, 16
    k1, k2 = jax.random.split(key)
    big = 73.5 + jax.random.uniform(k1, (b, t, n, h), minval=-0.05, maxval=0.05)
    q = k = big.astype(jnp.float16)  # q.k ~ 16 * 73.5^2
    v = (1e-3 * jax.random.normal(k2, (b, t, n, h))).astype(jnp.float16)
    kw = dict(decay=[0.9, 1.0], return_state=True)
    want, want_s = L.reference(q, k, v, **kw)
    assert np.isfinite(np.asarray(want, np.float32)).all()
    for chunk in (8, 64):
        o, s = jax.jit(lambda q, k, v, c=chunk: L.lightning_attention(
            q, k, v, impl="xla", chunk_size=c, **kw))(q, k, v)
        tol = linear_tolerance(jnp.float16).values
        assert_close_rel(o.astype(jnp.float32), want.astype(jnp.float32), tol, f"o, C={chunk}")
        assert_close_rel(s, want_s, tol, f"state, C={chunk}")
