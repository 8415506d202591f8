"""The Mosaic TPU lightning-attention kernels against the float64 oracle and a jnp recurrence.

Everything here runs in TPU interpret mode on CPU: no TPU is available to the project, so
this file is the kernels' only verification. Interpret mode is slow (about 40 s for one case
with gradients on the shared CPU), so the grid is two cases; the case helpers and tolerances
come from ``test_lightning_triton.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tpu.lightning_chunk import TpuLightningConfig, lightning_attention
from tests.pallas_kernels.test_lightning_triton import (
    LightningCase,
    check_case,
)

INTERPRET = pltpu.InterpretParams()
# A sublane-sized chunk so the tiny sequences still span several chunks, the last ragged.
CPU_CONFIG = TpuLightningConfig(chunk=16)

TPU_CASES = [
    # lambda in {0.05, 0.9, 1.0}, initial state, three packed documents, T = 40 (ragged).
    LightningCase("f32_state_segments_ragged", t=40, b=2, initial_state=True, segments=3),
    # bfloat16, no state, no segments, T = 24 (ragged), two heads.
    LightningCase("bf16_plain", t=24, decays=(0.8, 1.0), h=16, hv=16, dtype=jnp.bfloat16),
]


def _interpreted(q, k, v, ld, **kw):
    return lightning_attention(q, k, v, ld, interpret=INTERPRET, **kw)


@pytest.mark.parametrize("case", TPU_CASES, ids=repr)
def test_matches_oracle(case, key):
    """Values and final state vs the float64 oracle, dq/dk/dv/dh0 vs the jnp recurrence."""
    check_case(_interpreted, case, key, CPU_CONFIG)


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
    b, t, n = 1, 16, 3
    h = change.get("h", 16)
    dtype = change.get("dtype", jnp.float32)
    q = jnp.full((b, t, n, h), 0.5).astype(dtype)
    k = jnp.full((b, t, n, h), 0.25).astype(change.get("dtype_k", dtype))
    v = jnp.full((b, t, n, 16), 0.75).astype(dtype)
    ld = jnp.full(change.get("log_decay_shape", (n,)), -0.1)
    h0 = jnp.zeros(change["state_shape"]) if "state_shape" in change else None
    seg = jnp.zeros(change["seg_shape"], jnp.int32) if "seg_shape" in change else None
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
