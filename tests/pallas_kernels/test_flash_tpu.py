"""The Mosaic TPU flash attention kernel (``impl="pallas_tpu"``) against the reference.

Everything here runs in TPU interpret mode on CPU: no TPU is available to the project, so
this file is the kernel's only verification. Interpret mode is slow (seconds per compile), so
shapes stay tiny and values and gradients come from one forward pass per case.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops.attention import attention, explain
from pallas_kernels.common.masks import EMPTY, FULL, MaskSpec, SegmentIds, block_metadata
from pallas_kernels.tpu.flash import TpuFlashConfig, flash_attention
from tests.helpers import (
    ATTENTION_CASES,
    case_inputs,
    fwd_tol,
    grad_tol,
    loss_with_lse,
    lse_tol,
    random_qkv,
    random_segments,
)

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


def _outputs_and_grads(impl, q, k, v, kwargs, config=None):
    """(out, lse, (dq, dk, dv)) under jit; the gradients are those of ``loss_with_lse``.

    One ``jax.vjp`` serves both: the cotangents of (out, lse) are taken from
    ``loss_with_lse`` itself, so the chain rule gives exactly its gradient.
    """

    def attn(q, k, v, **kw):
        return attention(q, k, v, impl=impl, config=config, **kw)

    @jax.jit
    def run(q, k, v):
        (out, lse), pullback = jax.vjp(
            lambda q, k, v: attn(q, k, v, return_residuals=True, **kwargs), q, k, v
        )
        cts = jax.grad(
            lambda o, s: loss_with_lse(lambda *_, **__: (o, s), q, k, v, {}), argnums=(0, 1)
        )(out, lse)
        return out, lse, pullback(cts)

    return run(q, k, v)


def _check(q, k, v, kwargs, config):
    out, lse, grads = _outputs_and_grads("pallas_tpu", q, k, v, kwargs, config)
    want_out, want_lse, want_grads = _outputs_and_grads("reference", q, k, v, kwargs)
    dtype = q.dtype
    out, want_out = np.asarray(out, np.float32), np.asarray(want_out, np.float32)
    np.testing.assert_allclose(out, want_out, atol=fwd_tol(dtype), rtol=0)

    lse, want_lse = np.asarray(lse), np.asarray(want_lse)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(want_lse))
    unseen = np.isneginf(want_lse)
    np.testing.assert_array_equal(lse[unseen], -np.inf)
    np.testing.assert_allclose(lse[~unseen], want_lse[~unseen], atol=lse_tol(dtype), rtol=0)
    # A row that sees no key gives exactly 0 output.
    np.testing.assert_array_equal(np.moveaxis(out, -1, 0)[:, unseen], 0.0)

    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
        got = np.asarray(got, np.float32)
        assert np.isfinite(got).all(), f"{name} has NaN/inf"
        np.testing.assert_allclose(
            got, np.asarray(want, np.float32), atol=grad_tol(dtype, name), rtol=0, err_msg=name
        )
    return want_lse


def _entropy_outputs_and_grads(impl, q, k, v, kwargs, config=None):
    """(out, lse, entropy, (dq, dk, dv)) under jit, for a loss weighting out, lse and H."""

    def loss(q, k, v):
        out, lse, ent = attention(
            q, k, v, impl=impl, config=config, return_residuals=True, return_entropy=True,
            **kwargs,
        )
        w = jnp.sin(jnp.arange(ent.size, dtype=jnp.float32).reshape(ent.shape))
        total = jnp.sum(out * jnp.cos(out)) + jnp.sum(ent * w)
        return total + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse, ent)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, (out, lse, ent)), grads = fn(q, k, v)
    return out, lse, ent, grads


@pytest.mark.parametrize(
    "case",
    [c for c in ATTENTION_CASES if c.name in ("all_masked_rows", "segments", "softcap",
                                               "causal_mqa")],
    ids=repr,
)
def test_entropy_matches_reference(case, key):
    """return_entropy: the entropy, and gradients through out, lse and entropy together."""
    q, k, v, kwargs = case_inputs(case, key)
    out, lse, ent, grads = _entropy_outputs_and_grads("pallas_tpu", q, k, v, kwargs, GRID_CONFIG)
    want_out, want_lse, want_ent, want_grads = _entropy_outputs_and_grads(
        "reference", q, k, v, kwargs
    )
    ent, want_lse = np.asarray(ent), np.asarray(want_lse)
    assert ent.dtype == np.float32 and ent.shape == want_lse.shape
    assert np.isfinite(ent).all() and (ent >= -1e-5).all()
    np.testing.assert_array_equal(ent[np.isneginf(want_lse)], 0.0)
    np.testing.assert_allclose(ent, want_ent, atol=2e-5, rtol=0)
    np.testing.assert_allclose(out, want_out, atol=fwd_tol(jnp.float32), rtol=0)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(want_lse))
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
        got = np.asarray(got)
        assert np.isfinite(got).all(), f"{name} has NaN/inf"
        np.testing.assert_allclose(
            got, want, atol=grad_tol(jnp.float32, name), rtol=0, err_msg=name
        )


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=repr)
def test_matches_reference_float32(case, key):
    q, k, v, kwargs = case_inputs(case, key)
    want_lse = _check(q, k, v, kwargs, GRID_CONFIG)
    if case.name == "all_masked_rows":
        assert np.isneginf(want_lse).any(), "the case must contain rows that see no key"


@pytest.mark.parametrize(
    "case", [c for c in ATTENTION_CASES if c.name in ("causal_mqa", "segments")], ids=repr
)
def test_matches_reference_bfloat16(case, key):
    q, k, v, kwargs = case_inputs(case, key, jnp.bfloat16)
    _check(q, k, v, kwargs, GRID_CONFIG)


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
    _check(q, k, v, kwargs, TILE_CONFIG)


def test_jit_and_vmap(key):
    """vmap over an extra leading axis (the pallas_call grows a grid axis) under jit."""
    q, k, v = random_qkv(key, 2, 24, 24, 2, 1, 32)
    q, k, v = (x.reshape(2, 1, *x.shape[1:]) for x in (q, k, v))

    def run(impl):
        config = GRID_CONFIG if impl == "pallas_tpu" else None  # the reference takes none
        fn = lambda q, k, v: attention(
            q, k, v, is_causal=True, impl=impl, config=config, return_residuals=True
        )
        return jax.jit(jax.vmap(fn))(q, k, v)

    (out, lse), (want_out, want_lse) = run("pallas_tpu"), run("reference")
    np.testing.assert_allclose(out, want_out, atol=fwd_tol(jnp.float32), rtol=0)
    np.testing.assert_allclose(lse, want_lse, atol=lse_tol(jnp.float32), rtol=0)


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


def test_kernel_value_head_dim_differs(key):
    """The kernel itself handles Hv != H (the registry still declines it)."""
    q, k, _ = random_qkv(key, 1, 24, 40, 2, 2, 32)
    v = jax.random.normal(jax.random.fold_in(key, 1), (1, 40, 2, 16))
    out, lse = jax.jit(
        lambda q, k, v: flash_attention(
            q, k, v, jnp.arange(24), jnp.arange(40), spec=MaskSpec(causal=True), scale=0.2,
            config=GRID_CONFIG, interpret=True,
        )
    )(q, k, v)
    want_out, want_lse = attention(
        q, k, v, is_causal=True, scale=0.2, impl="reference", return_residuals=True
    )
    np.testing.assert_allclose(out, want_out, atol=fwd_tol(jnp.float32), rtol=0)
    np.testing.assert_allclose(lse, want_lse, atol=lse_tol(jnp.float32), rtol=0)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("block_kv", 100, r"block_kv=100 is not legal on TPU: it must be a multiple of 128"),
        ("block_q_dkv", 64, r"block_q_dkv=64 .* multiple of 128 \(the lane width\)"),
        ("block_q", 12, r"block_q=12 .* multiple of 8 \(the sublane count\); try block_q=16"),
        ("block_kv_dkv", 0, r"block_kv_dkv must be a positive int, got 0"),
    ],
)
def test_config_rejects_blocks_illegal_on_tpu(field, value, match):
    with pytest.raises(ValueError, match=match):
        TpuFlashConfig(**{field: value})


def test_bias_is_unsupported(key):
    q, k, v = random_qkv(key, 1, 8, 8, 2, 2, 32)
    bias = jax.random.normal(jax.random.fold_in(key, 1), (1, 2, 8, 8))
    with pytest.raises(NotImplementedError, match=r"pallas_tpu.*takes no logits bias"):
        attention(q, k, v, bias=bias, impl="pallas_tpu")


def test_unsupported_calls_say_why(key):
    q, k, v = random_qkv(key, 1, 8, 8, 2, 2, 32)
    for plat in ("tpu", "cpu"):
        assert explain(q, k, v, impl_names=("pallas_tpu",), plat=plat)["pallas_tpu"] is None
    why = explain(q, k, v, impl_names=("pallas_tpu",), plat="gpu")["pallas_tpu"]
    assert "runs on TPU (or interpreted on CPU), not on gpu" in why
    with pytest.raises(NotImplementedError, match=r"float32 or bfloat16 inputs, got float16"):
        attention(*(x.astype(jnp.float16) for x in (q, k, v)), impl="pallas_tpu")
    v16 = v[..., :16]
    with pytest.raises(NotImplementedError, match=r"v head dim to equal the q head dim"):
        attention(q, k, v16, impl="pallas_tpu")
    with pytest.raises(ValueError, match=r"config must be a TpuFlashConfig"):
        flash_attention(
            q, k, v, jnp.arange(8), jnp.arange(8), spec=MaskSpec(), scale=1.0, config=object()
        )
