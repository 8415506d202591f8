"""``lightning_attention(impl="pallas_tpu")``: the shared cases of
``tests/ops/lightning_base.py`` in TPU interpret mode, plus the kernels' own argument and
config checks.

Everything here runs in TPU interpret mode on CPU: no TPU is available to the project, so
this file is the only check of the kernels' arithmetic (``test_tpu_lowering.py`` lowers them
for TPU). Interpret mode is slow (tens of seconds for one case with gradients on the shared
CPU), so the grid is two small cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tpu.lightning_chunk import TpuLightningConfig, lightning_attention
from tests.helpers import primitives_around_kernels
from tests.ops.lightning_base import (
    HEAD_DIM_NAMES,
    LightningTestBase,
    kernel_bad_inputs_test,
)

INTERPRET = pltpu.InterpretParams()


class TestPallasTpuInterpreted(LightningTestBase):
    IMPL = "pallas_tpu"
    # A sublane-sized chunk so the tiny sequences still span several chunks, the last ragged.
    CONFIG = TpuLightningConfig(chunk=16)
    INTERPRET = True
    # lambda in {0.05, 0.9, 1.0}, state, three documents, T = 40; bf16 without either, T = 24;
    # the tiny head-dim cases (5 / 13 padded to 8 / 16 inside; the others multiples of 8).
    DTYPES = {"float32": ("state_segments", *HEAD_DIM_NAMES), "bfloat16": ("plain_t24",)}
    MAX_HEAD_DIM = 256


def _interpreted(q, k, v, ld, **kw):
    return lightning_attention(q, k, v, ld, interpret=INTERPRET, **kw)


test_bad_inputs = kernel_bad_inputs_test(
    _interpreted, kernels="TPU lightning kernels", padding="padded inside to multiples of 8",
    bad_dtype=(jnp.float16, "must share one dtype out of float32, bfloat16"),
)


def test_wrong_config_type():
    q = jnp.full((1, 16, 1, 16), 0.5)
    with pytest.raises(ValueError, match="config must be a TpuLightningConfig"):
        _interpreted(q, q, q, jnp.zeros((1,)), config=jax.tree_util.Partial(len))


def test_head_dims_padded_only_off_multiples_of_8():
    """The wrapper pads H and Hv to multiples of 8 inside (in the transpose's copy) and
    slices them back, forward and backward: no pad, no slice at multiples of 8 (T a whole
    chunk); shapes come back as given."""
    for h, hv, padded in ((64, 128, False), (40, 24, False), (12, 5, True)):
        q = jnp.zeros((1, 16, 2, h))
        v = jnp.zeros((1, 16, 2, hv))
        h0 = jnp.zeros((1, 2, h, hv))

        def loss(q, k, v, h0):
            o, s = _interpreted(q, k, v, jnp.zeros((2,)), initial_state=h0)
            return jnp.sum(o) + jnp.sum(s), (o, s)

        fn = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
        prims = primitives_around_kernels(fn, q, q, v, h0)
        assert ("pad" in prims) == padded and ("slice" in prims) == padded, (h, hv)
        grads, (o, s) = jax.eval_shape(fn, q, q, v, h0)
        assert o.shape == v.shape and s.shape == h0.shape
        assert [g.shape for g in grads] == [q.shape, q.shape, v.shape, h0.shape]
