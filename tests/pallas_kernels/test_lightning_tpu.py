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
from tests.ops.lightning_base import LightningTestBase, kernel_bad_args

INTERPRET = pltpu.InterpretParams()


class TestPallasTpuInterpreted(LightningTestBase):
    IMPL = "pallas_tpu"
    # A sublane-sized chunk so the tiny sequences still span several chunks, the last ragged.
    CONFIG = TpuLightningConfig(chunk=16)
    INTERPRET = True
    # lambda in {0.05, 0.9, 1.0}, state, three documents, T = 40; bf16 without either, T = 24.
    DTYPES = {"float32": ("state_segments",), "bfloat16": ("plain_t24",)}


def _interpreted(q, k, v, ld, **kw):
    return lightning_attention(q, k, v, ld, interpret=INTERPRET, **kw)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(h=12), "head_dim H is 12; the TPU lightning kernels take multiples of 8"),
        (dict(h=264), "head_dim H is 264"),
        (dict(dtype=jnp.float16), "must share one dtype out of float32, bfloat16"),
        (dict(dtype_k=jnp.bfloat16), "must share one dtype"),
        (dict(log_decay_shape=(3, 1)), r"log_decay must be a float array of shape \(3,\)"),
        (dict(state_shape=(1, 3, 8, 8)), r"initial_state must have shape"),
        (dict(seg_shape=(2, 16)), r"segment_ids must be an integer array of shape"),
    ],
)
def test_bad_inputs(change, match):
    q, k, v, ld, h0, seg = kernel_bad_args(change)
    with pytest.raises(ValueError, match=match):
        _interpreted(q, k, v, ld, initial_state=h0, segment_ids=seg)


@pytest.mark.parametrize("chunk", [0, 12, 100, True])
def test_bad_chunk(chunk):
    with pytest.raises(ValueError, match="chunk must be a positive multiple of 8"):
        TpuLightningConfig(chunk=chunk)


def test_wrong_config_type():
    q = jnp.full((1, 16, 1, 16), 0.5)
    with pytest.raises(ValueError, match="config must be a TpuLightningConfig"):
        _interpreted(q, q, q, jnp.zeros((1,)), config=jax.tree_util.Partial(len))
