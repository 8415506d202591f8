"""``impl="pallas_tpu"`` (the Mosaic TPU flash attention kernel): the shared cases of
``tests/ops/attention_base.py`` in TPU interpret mode, plus the kernel's own tests (EMPTY /
FULL tile skipping, the kernel's entropy flag, key and value head counts that do not divide
each other, TPU block-size rules, Mosaic lowering at the grid's head dims).

Everything here runs in TPU interpret mode on CPU: no TPU is available to the project, so
this file is the only check of the kernels' arithmetic (``test_tpu_lowering.py`` lowers them
for TPU). Interpret mode is slow (seconds per compile), so shapes stay tiny and values and
gradients come from one program per case.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import attention, explain
from attnlab.ops.masks import EMPTY, FULL, MaskSpec, SegmentIds, block_metadata
from attnlab.testing import cases
from pallas_kernels.tpu.flash import TpuFlashConfig, flash_attention
from tests.helpers import random_qkv, random_segments
from tests.lowering import TPU_KINDS, kernels, lower_for_tpu, tpu_mesh
from tests.ops.attention_base import (
    FAST_COMPILE,
    INTERPRETED_SLOW_CASES,
    AttentionTestBase,
    check_against_reference,
)
from tests.ops.attention_grad_base import AttentionBwdTestBase

# Sublane-sized query blocks (forward) and key blocks (dK/dV) so the grid's short sequences
# still span several, ragged, blocks; lane-axis blocks are 128, the smallest TPUs accept.
GRID_CONFIG = TpuFlashConfig(
    block_q=24, block_kv=128, block_q_dq=128, block_kv_dq=128, block_q_dkv=128, block_kv_dkv=24
)
# Square 128 tiles everywhere: with a few hundred tokens every kernel sees EMPTY, PARTIAL and
# FULL tiles.
TILE_CONFIG = TpuFlashConfig(
    block_q=128, block_kv=128, block_q_dq=128, block_kv_dq=128, block_q_dkv=128,
    block_kv_dkv=128,
)


class TestPallasTpuInterpreted(AttentionTestBase):
    """The shared grid in TPU interpret mode: every case in float32; bfloat16 and the entropy
    on a few cases (interpret mode is slow), among them separate key / value head counts and
    head dims (H 192 over Hv 128). The kernel takes no float16."""

    IMPL = "pallas_tpu"
    CONFIG = GRID_CONFIG
    INTERPRET = True
    SLOW_CASES = INTERPRETED_SLOW_CASES
    DTYPES = {
        "float32": None,
        "bfloat16": ("causal_mqa", "segments", "kv_heads_differ", "mla_dims"),
    }
    ENTROPY = {
        "float32": ("causal_mqa", "segments", "softcap", "all_masked_rows", "kv_heads_differ"),
    }


class TestPallasTpuBwdInterpreted(AttentionBwdTestBase):
    """attention_bwd (one key block's share of the gradient, as the ring backward uses it)
    through the backward kernels, on a causal, a packed-documents and a no-key-rows case, and
    with head dims and head counts of their own (H 80; H 192 over Hv 128; 1 key head and 2
    value heads)."""

    IMPL = "pallas_tpu"
    CONFIG = GRID_CONFIG
    INTERPRET = True
    CASES = cases(
        "causal", "segments", "all_masked_rows", "head_dim_80", "mla_dims", "kv_heads_differ"
    )
    SLOW_CASES = tuple(c.name for c in CASES[1:])  # the first in `make test`


@pytest.mark.parametrize(
    "length, kwargs, segments",
    [
        (256, dict(is_causal=True), 0),
        (320, dict(is_causal=True, local_window_size=(100, 0)), 2),
    ],
    ids=["causal", "window_segments"],
)
def test_skips_empty_and_unmasks_full_tiles(length, kwargs, segments, key):
    """Several 128-blocks per axis: EMPTY tiles are skipped (index maps clamped into the
    non-empty range), FULL tiles run unmasked; results must not change."""
    k1, k2 = jax.random.split(key)
    q, k, v = random_qkv(k1, 1, length, length, 2, 1, 32)
    kwargs = dict(kwargs)
    seg = None
    if segments:
        ids = random_segments(k2, 1, length, segments)
        kwargs["segment_ids"], seg = ids, SegmentIds(ids, ids)
    pos = jnp.arange(length)
    spec = MaskSpec.from_jax_nn(
        is_causal=True, local_window_size=kwargs.get("local_window_size")
    )
    md = block_metadata(spec, pos, pos, block_q=128, block_kv=128, segment_ids=seg)
    assert (md.kind == EMPTY).any()
    if not segments:
        assert (md.kind == FULL).any()
    else:
        assert (md.kv_start > 0).any() and (md.q_start > 0).any()
    check_against_reference("pallas_tpu", q, k, v, kwargs, TILE_CONFIG, FAST_COMPILE)


def test_kernel_entropy_flag(key):
    """The kernel returns (out, lse, entropy) with the flag, (out, lse) without; out and lse
    agree; rows that see no key have entropy 0."""
    q, k, v = random_qkv(key, 1, 24, 40, 2, 1, 32)
    run = jax.jit(
        lambda q, k, v, flag: flash_attention(
            q, k, v, jnp.arange(24), jnp.arange(40) + 8, spec=MaskSpec(causal=True), scale=0.2,
            config=GRID_CONFIG, interpret=True, return_entropy=flag,
        ),
        static_argnums=3,
    )
    out, lse = run(q, k, v, False)
    out2, lse2, ent = run(q, k, v, True)
    np.testing.assert_allclose(out2, out, atol=1e-6, rtol=0)
    np.testing.assert_allclose(lse2, lse, atol=1e-6, rtol=0)
    assert ent.shape == lse.shape
    np.testing.assert_array_equal(ent[:, :8], 0.0)  # rows 0-7 see no key
    np.testing.assert_allclose(ent[:, 8], 0.0, atol=1e-6)  # row 8 sees one key
    assert (np.asarray(ent[:, 9:]) > 0).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_key_and_value_head_counts_not_dividing_each_other(dtype, key):
    """6 query heads over 2 key heads and 3 value heads: each of the lcm = 6 query groups
    reads its own (key, value) head pair, and the dK/dV kernel's per-group float32 results are
    summed per head (3 groups per key head, 2 per value head). Odd head dims (H 20, Hv 3),
    values and gradients against the reference."""
    k1, k2 = jax.random.split(key)
    q, k, _ = random_qkv(k1, 1, 24, 40, 6, 2, 20, dtype)
    v = jax.random.normal(k2, (1, 40, 3, 3)).astype(dtype)
    check_against_reference("pallas_tpu", q, k, v, {"is_causal": True, "kv_offset": -8},
                            GRID_CONFIG, FAST_COMPILE)


# ----------------------------------------------------------------------------- bad input


def test_unsupported_calls_say_why(key):
    q, k, v = random_qkv(key, 1, 8, 8, 2, 2, 32)
    for plat in ("tpu", "cpu"):
        assert explain(q, k, v, impl_names=("pallas_tpu",), plat=plat)["pallas_tpu"] is None
    # Value head dims, key / value head counts and head dims of their own are taken.
    q40, k40, v24 = random_qkv(key, 1, 8, 8, 4, 1, 40, hv=24, vh=2)
    assert explain(q40, k40, v24, impl_names=("pallas_tpu",), plat="tpu")["pallas_tpu"] is None
    why = explain(q, k, v, impl_names=("pallas_tpu",), plat="gpu")["pallas_tpu"]
    assert "runs on TPU (or interpreted on CPU), not on gpu" in why
    with pytest.raises(NotImplementedError, match=r"float32 or bfloat16 inputs, got float16"):
        attention(*(x.astype(jnp.float16) for x in (q, k, v)), impl="pallas_tpu")
    with pytest.raises(NotImplementedError, match=r"the TPU kernel takes no logits bias"):
        attention(q, k, v, bias=jnp.zeros((1, 2, 8, 8)), impl="pallas_tpu")
    with pytest.raises(ValueError, match=r"config must be a TpuFlashConfig"):
        flash_attention(
            q, k, v, jnp.arange(8), jnp.arange(8), spec=MaskSpec(), scale=1.0, config=object()
        )


# ----------------------------------------------------------------------------- TPU lowering

# (H, Hv, Kk, Kv): the head dims the TPU tiling rule might refuse (80, 96; 192 over 128; 40
# over 80; 1) and key / value head counts of their own.
LOWERING_DIMS = [
    pytest.param((80, 80, 2, 2), id="H80"),
    pytest.param((96, 96, 2, 2), id="H96"),
    pytest.param((192, 128, 2, 2), id="H192-Hv128"),
    pytest.param((40, 80, 2, 4), id="H40-Hv80-Kk2-Kv4"),
    pytest.param((128, 128, 3, 2), id="H128-Kk3-Kv2"),
    pytest.param((1, 1, 1, 2), id="H1-Kk1-Kv2"),
]


@pytest.mark.parametrize("dims", LOWERING_DIMS)
def test_kernels_lower_for_tpu_at_new_head_dims(dims):
    """Forward, dQ and dK/dV kernels (interpret off) lowered for TPU v5e from CPU, bfloat16,
    at dims and head counts beyond the grid's (``test_tpu_lowering.py`` lowers the grid on
    every generation): Pallas's Mosaic lowering checks every block shape against the (8, 128)
    tiling rule (head dims are whole blocks, so no padding). Lowering does not compile:
    Mosaic's own layout passes run only where a TPU compiles the module."""
    h, hv, kk, kv = dims
    b, t, s, n = 2, 256, 1024, 12
    args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16)
            for shape in ((b, t, n, h), (b, s, kk, h), (b, s, kv, hv))]

    def loss(q, k, v):
        out, lse = flash_attention(q, k, v, jnp.arange(t) + s - t, jnp.arange(s),
                                   spec=MaskSpec(causal=True), scale=0.1, interpret=False)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    text = lower_for_tpu(jax.grad(loss, argnums=(0, 1, 2)), *args,
                         mesh=tpu_mesh(TPU_KINDS["v5e"]))
    assert kernels(text) == {
        "attnlab_tpu_flash_fwd": 1, "attnlab_tpu_flash_dq": 1, "attnlab_tpu_flash_dkv": 1
    }
