"""One test base for ``attention_bwd``: summing per-key-block shares (with the global out and
lse) gives the gradient of attention, for every case of the shared grid.

An implementation's test file subclasses :class:`AttentionBwdTestBase` (a ``Test...`` class
that sets ``IMPL``, and ``CONFIG``/``INTERPRET`` for kernels); the base is not collected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import attention_bwd, reference
from attnlab.testing import ATTENTION_CASES, Case
from tests.helpers import case_inputs, random_qkv
from tests.ops.attention_base import ImplTestBase
from tests.ops.masked_garbage import FILLS, check_block_share_garbage, softmax_scenario

# Window and soft-cap together (the grid has each alone).
WINDOW_SOFTCAP = Case("window_softcap", t=32, s=32, h=16,
                      kwargs={"local_window_size": (9, 3), "logits_soft_cap": 2.5})
N_BLOCKS = 4


def split_grads(q, k, v, dout, dlse, kwargs, impl, config=None, n_blocks=N_BLOCKS):
    """Sum of attention_bwd over ``n_blocks`` key blocks (the last may be shorter), each
    given its global kv_offset, with the global out and lse of the reference."""
    kwargs = dict(kwargs)
    out, lse = reference(q, k, v, return_residuals=True, **kwargs)
    seg = kwargs.pop("segment_ids", None)
    if seg is not None and not isinstance(seg, tuple):
        seg = (seg, seg)
    kv_offset = kwargs.pop("kv_offset", 0)
    s = k.shape[1]
    cuts = [-(-s * i // n_blocks) for i in range(n_blocks + 1)]
    dq = jnp.zeros(q.shape, jnp.float32)
    dks, dvs = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        extra = {} if seg is None else {"segment_ids": (seg[0], seg[1][:, lo:hi])}
        dq_i, dk_i, dv_i = attention_bwd(
            q, k[:, lo:hi], v[:, lo:hi], out, lse, dout, dlse, kv_offset=kv_offset + lo,
            impl=impl, config=config, **kwargs, **extra,
        )
        dq = dq + dq_i
        dks.append(dk_i)
        dvs.append(dv_i)
    return dq, jnp.concatenate(dks, 1), jnp.concatenate(dvs, 1)


class AttentionBwdTestBase(ImplTestBase):
    """Every shared ``attention_bwd`` case for ``IMPL``.

    Attributes: those of ``ImplTestBase``; CASES, the cases run (default: the shared grid and
    ``WINDOW_SOFTCAP``).
    """

    CASES: ClassVar[Sequence[Case]] = (*ATTENTION_CASES, WINDOW_SOFTCAP)

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", [
                pytest.param(c, id=repr(c),
                             marks=pytest.mark.slow if c.name in self.SLOW_CASES else ())
                for c in self.CASES])

    def test_block_shares_sum_to_gradient(self, case, key):
        k1, k2 = jax.random.split(key)
        q, k, v, kwargs = case_inputs(case, k1)
        dout = jax.random.normal(k2, case.out_shape)
        dlse = jax.random.normal(jax.random.fold_in(k2, 1), q.shape[:3])

        def f(q, k, v):
            return reference(q, k, v, return_residuals=True, **kwargs)

        out, vjp = jax.vjp(f, q, k, v)
        dlse_ct = jnp.where(jnp.isfinite(out[1]), dlse, 0.0)  # no gradient through -inf rows
        want = vjp((dout, dlse_ct))
        got = jax.jit(
            lambda q, k, v, dout, dlse: split_grads(q, k, v, dout, dlse, kwargs, self.IMPL,
                                                    self.CONFIG),
            compiler_options=self.options,
        )(q, k, v, dout, dlse_ct)
        tol = self.tol(q.dtype)
        for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
            assert np.isfinite(np.asarray(g)).all(), name
            # Twice the table's bound: N_BLOCKS shares are summed.
            np.testing.assert_allclose(g, w, atol=2 * tol.get(name), err_msg=name)

    @pytest.mark.parametrize(
        "scenario", ["causal_future", "window_both_sides", "segments_padding",
                     "offsets_no_key_rows"])
    def test_masked_garbage_in_block_shares(self, scenario, key):
        """NaN in queries, keys, values and cotangents where rows cannot see: the summed block
        shares (the ring backward's) of the clean rows and keys equal those with zeros
        there (tests/ops/masked_garbage.py)."""
        p = softmax_scenario(scenario, key, 32)

        def grads(q, k, v, dout, dlse):
            return split_grads(q, k, v, dout, dlse, p.kwargs, self.IMPL, self.CONFIG)

        check_block_share_garbage(grads, p, FILLS["nan"], compiler_options=self.options,
                                  plat=self.plat)

    def test_bad_shapes_and_impl(self, key):
        q, k, v = random_qkv(key, 1, 16, 16, 2, 1, 16)
        out, lse = reference(q, k, v, return_residuals=True)
        with pytest.raises(ValueError, match="lse must have shape"):
            attention_bwd(q, k, v, out, lse[:, :8], out, impl=self.IMPL)
        with pytest.raises(ValueError, match="unknown impl"):
            attention_bwd(q, k, v, out, lse, out, impl="nope")
