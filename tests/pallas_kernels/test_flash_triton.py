"""``impl="pallas_triton"`` (Pallas flash attention lowered to Triton) against the reference.

On CPU the kernels run in the Pallas interpreter, at the shared grid's tiny shapes with tiles
of 16/32 so that every path runs (edge tiles, FULL runs, EMPTY skips, padding, GQA folding in
dK/dV). ``TestCompiledOnGpu`` runs the same checks compiled at realistic shapes, and
``test_lowers_to_triton`` checks on any machine that the kernels lower to Triton IR.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

from attnlab.ops import attention, explain, reference
from pallas_kernels.common.masks import MaskSpec
from pallas_kernels.gpu.flash_common import FlashConfig
from pallas_kernels.gpu.flash_fwd import flash_attention
from tests.helpers import (
    ATTENTION_CASES,
    HAS_CUDA,
    case_inputs,
    fwd_tol,
    grad_rtol,
    grad_tol,
    loss_with_lse,
    lse_tol,
    random_qkv,
    random_segments,
)

IMPL = "pallas_triton"
# Small tiles, different for each kernel, so T, S <= 72 span several tiles of every kind.
SMALL_TILES = FlashConfig(
    block_q=32, block_kv=16, block_q_dkv=16, block_kv_dkv=32, block_q_dq=32, block_kv_dq=16
)
# Interpreted kernels are big XLA programs whose compile time is mostly backend optimization,
# which is worthless at these sizes; numerics are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
BF16_CASES = ("causal_mqa", "segments", "softcap", "ragged")


def _values_and_grads(impl, q, k, v, kwargs, config=None, compiler_options=None, jit=True):
    """(out, lse, (dq, dk, dv)) of ``loss_with_lse``, all from one compiled program."""
    extra = {} if config is None else {"config": config}
    seen = {}

    def attn(q, k, v, **kw):
        seen["out"] = attention(q, k, v, impl=impl, **extra, **kw)
        return seen["out"]

    def loss(q, k, v):
        return loss_with_lse(attn, q, k, v, kwargs), seen["out"]

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    if jit:
        fn = jax.jit(fn, compiler_options=compiler_options)
    (_, (out, lse)), grads = fn(q, k, v)
    return out, lse, grads


def _assert_lse_close(lse, want, tol):
    lse, want = np.asarray(lse, np.float64), np.asarray(want, np.float64)
    assert not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(want))
    np.testing.assert_array_equal(lse[np.isneginf(want)], -np.inf)
    fin = np.isfinite(want)
    np.testing.assert_allclose(lse[fin], want[fin], atol=tol, rtol=0)


def _check_against_reference(q, k, v, kwargs, config=None, compiler_options=None):
    dtype = q.dtype
    out, lse, grads = _values_and_grads(IMPL, q, k, v, kwargs, config, compiler_options)
    ref_out, ref_lse, ref_grads = _values_and_grads("reference", q, k, v, kwargs)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert lse.dtype == jnp.float32 and lse.shape == ref_lse.shape
    out32 = np.asarray(out, np.float32)
    assert np.isfinite(out32).all()
    np.testing.assert_allclose(out32, np.asarray(ref_out, np.float32), atol=fwd_tol(dtype))
    _assert_lse_close(lse, ref_lse, lse_tol(dtype))
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert g.dtype == dtype and g.shape == r.shape, name
        g32 = np.asarray(g, np.float32)
        assert np.isfinite(g32).all(), name
        np.testing.assert_allclose(
            g32, np.asarray(r, np.float32), atol=grad_tol(dtype, name), rtol=grad_rtol(dtype),
            err_msg=name,
        )


def _entropy_values_and_grads(impl, q, k, v, kwargs, config=None, compiler_options=None):
    """(out, lse, entropy, (dq, dk, dv)) of a loss that weights out, lse and the entropy."""
    extra = {} if config is None else {"config": config}

    def loss(q, k, v):
        out, lse, ent = attention(
            q, k, v, impl=impl, return_residuals=True, return_entropy=True, **extra, **kwargs
        )
        w = jnp.sin(jnp.arange(ent.size, dtype=jnp.float32).reshape(ent.shape))
        out32 = out.astype(jnp.float32)
        total = jnp.sum(out32 * jnp.cos(out32)) + jnp.sum(ent * w)
        return total + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse, ent)

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, (out, lse, ent)), grads = jax.jit(fn, compiler_options=compiler_options)(q, k, v)
    return out, lse, ent, grads


def _check_entropy_against_reference(q, k, v, kwargs, config=None, compiler_options=None,
                                     ent_tol=2e-5):
    dtype = q.dtype
    out, lse, ent, grads = _entropy_values_and_grads(
        IMPL, q, k, v, kwargs, config, compiler_options
    )
    ref_out, ref_lse, ref_ent, ref_grads = _entropy_values_and_grads(
        "reference", q, k, v, kwargs
    )
    assert ent.dtype == jnp.float32 and ent.shape == ref_ent.shape == lse.shape
    ent = np.asarray(ent)
    assert np.isfinite(ent).all()
    assert (ent >= -1e-4).all()
    np.testing.assert_array_equal(ent[np.isneginf(np.asarray(ref_lse))], 0.0)
    np.testing.assert_allclose(ent, np.asarray(ref_ent), atol=ent_tol, rtol=0)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=fwd_tol(dtype)
    )
    _assert_lse_close(lse, ref_lse, lse_tol(dtype))
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert g.dtype == dtype and g.shape == r.shape, name
        g32 = np.asarray(g, np.float32)
        assert np.isfinite(g32).all(), name
        np.testing.assert_allclose(
            g32, np.asarray(r, np.float32), atol=grad_tol(dtype, name), rtol=grad_rtol(dtype),
            err_msg=name,
        )


# ----------------------------------------------------------------------------- interpreted


_GRID = [
    pytest.param(case, jnp.float32, id=f"{case.name}-f32") for case in ATTENTION_CASES
] + [
    pytest.param(case, jnp.bfloat16, id=f"{case.name}-bf16")
    for case in ATTENTION_CASES
    if case.name in BF16_CASES
]


@pytest.mark.parametrize("case, dtype", _GRID)
def test_matches_reference(case, dtype, key):
    q, k, v, kwargs = case_inputs(case, key, dtype)
    _check_against_reference(q, k, v, kwargs, SMALL_TILES, FAST_COMPILE)


_ENTROPY_CASES = ("all_masked_rows", "segments", "softcap", "ragged")


@pytest.mark.parametrize(
    "case", [c for c in ATTENTION_CASES if c.name in _ENTROPY_CASES], ids=repr
)
def test_entropy_matches_reference(case, key):
    """return_entropy: values and gradients of a loss weighting out, lse and the entropy."""
    q, k, v, kwargs = case_inputs(case, key)
    _check_entropy_against_reference(q, k, v, kwargs, SMALL_TILES, FAST_COMPILE)


def test_entropy_kernel_outputs(key):
    """The kernel wrapper returns (out, lse, entropy) with the flag and (out, lse) without;
    out and lse agree either way (to rounding); rows that see no key have entropy 0."""
    q, k, v = random_qkv(key, 1, 24, 40, 2, 1, 16)
    pos = np.arange(24, dtype=np.int32)
    kv_pos = np.arange(40, dtype=np.int32) + 8
    common = dict(spec=MaskSpec(causal=True), scale=0.25, config=SMALL_TILES, interpret=True)
    out, lse = flash_attention(q, k, v, pos, kv_pos, **common)
    out2, lse2, ent = flash_attention(q, k, v, pos, kv_pos, return_entropy=True, **common)
    np.testing.assert_allclose(out, out2, atol=1e-6, rtol=0)
    _assert_lse_close(lse2, lse, 1e-6)
    assert ent.shape == lse.shape and ent.dtype == jnp.float32
    np.testing.assert_array_equal(ent[:, :8], 0.0)  # rows 0-7 see no key
    np.testing.assert_allclose(ent[:, 8], 0.0, atol=1e-6)  # row 8 sees one key
    assert (np.asarray(ent[:, 9:]) > 0).all()


def test_default_config_short_ragged_sequences(key):
    """Default tiles are shrunk to fit short sequences (one tile each, padded)."""
    q, k, v = random_qkv(key, 1, 20, 50, 4, 2, 32)
    kwargs = dict(is_causal=True, q_offset=30, local_window_size=(40, None))
    _check_against_reference(q, k, v, kwargs, None, FAST_COMPILE)


def test_fully_masked_rows_are_zero_and_finite(key):
    q, k, v = random_qkv(key, 1, 16, 40, 2, 1, 16)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(q, k, v, q_offset):
        kwargs = dict(is_causal=True, q_offset=q_offset, kv_offset=8)
        return _values_and_grads(IMPL, q, k, v, kwargs, SMALL_TILES, jit=False)

    # Rows 0-7 see no key (every key comes later); rows 8-15 see keys 0-7, no row sees the rest.
    out, lse, (dq, dk, dv) = run(q, k, v, 0)
    np.testing.assert_array_equal(out[:, :8], 0.0)
    assert np.isneginf(np.asarray(lse[:, :8])).all()
    assert np.isfinite(np.asarray(lse[:, 8:])).all()
    for g in (dq, dk, dv):
        assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(dq[:, :8], 0.0)
    np.testing.assert_array_equal(dk[:, 8:], 0.0)
    np.testing.assert_array_equal(dv[:, 8:], 0.0)
    # Every row masked: zeros everywhere, -inf LSE, zero gradients.
    out, lse, grads = run(q, k, v, -100)
    np.testing.assert_array_equal(out, 0.0)
    assert np.isneginf(np.asarray(lse)).all()
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


def test_jit_vmap_grad_traced_offsets(key):
    k1, k2 = jax.random.split(key)
    q, k, v = random_qkv(k1, 2, 24, 40, 4, 2, 16)
    # vmap over an extra leading axis, through the custom VJP, with a traced q_offset.
    qs, ks, vs = (jnp.stack([x, jax.random.normal(k2, x.shape)]) for x in (q, k, v))

    def loss(impl, **extra):
        def fn(q, k, v, off):
            def one(q, k, v):
                return attention(q, k, v, is_causal=True, q_offset=off, local_window_size=(9, 5),
                                 impl=impl, **extra)

            return jnp.sum(jnp.sin(jax.vmap(one)(q, k, v)))

        return jax.value_and_grad(fn, argnums=(0, 1, 2))

    got_fn = jax.jit(loss(IMPL, config=SMALL_TILES), compiler_options=FAST_COMPILE)
    want_fn = jax.jit(loss("reference"))
    for off in (0, 21, 100):
        got, want = got_fn(qs, ks, vs, off), want_fn(qs, ks, vs, off)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
        for g, r in zip(got[1], want[1], strict=True):
            np.testing.assert_allclose(g, r, atol=1e-4)


def test_position_arrays_and_permuted_keys(key):
    """Global positions give exact masks for any layout (striped / zigzag sharding)."""
    k1, k2, k3 = jax.random.split(key, 3)
    q, k, v = random_qkv(k1, 1, 24, 48, 2, 1, 16)
    q_pos = 24 + jnp.arange(24, dtype=jnp.int32)
    perm = jax.random.permutation(k2, 48)
    kv_pos = jnp.arange(48, dtype=jnp.int32)[perm]
    seg = random_segments(k3, 1, 48, 3)
    w = jax.random.normal(k3, (1, 24, 2, 16))

    def loss_kernel(q, k, v):
        out, lse = flash_attention(
            q, k, v, q_pos, kv_pos, seg[:, 24:], seg[:, perm],
            spec=MaskSpec(causal=True, window_left=30), scale=0.25, soft_cap=4.0,
            config=SMALL_TILES, interpret=True,
        )
        return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

    def loss_ref(q, k, v):
        out, lse = reference(
            q, k, v, is_causal=True, local_window_size=(30, None), q_offset=24,
            segment_ids=(seg[:, 24:], seg), scale=0.25, logits_soft_cap=4.0,
            return_residuals=True,
        )
        return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2), has_aux=True)
    (_, (out, lse)), (dq, dk, dv) = jax.jit(grad(loss_kernel), compiler_options=FAST_COMPILE)(
        q, k[:, perm], v[:, perm]
    )
    (_, (want_out, want_lse)), (rq, rk, rv) = jax.jit(grad(loss_ref))(q, k, v)
    np.testing.assert_allclose(out, want_out, atol=2e-5)
    _assert_lse_close(lse, want_lse, 2e-5)
    np.testing.assert_allclose(dq, rq, atol=1e-4)
    np.testing.assert_allclose(dk, rk[:, perm], atol=1e-4)
    np.testing.assert_allclose(dv, rv[:, perm], atol=1e-4)


# ----------------------------------------------------------------------------- lowering


_JAXLIB_LOWERS_WITHOUT_GPU = tuple(int(x) for x in jaxlib.__version__.split(".")[:3]) <= (
    0, 10, 2,
)


@pytest.mark.skipif(
    not (HAS_CUDA or _JAXLIB_LOWERS_WITHOUT_GPU),
    reason="this jaxlib compiles Triton while lowering, which needs a GPU",
)
@pytest.mark.parametrize(
    "dtype, h, n, kh, t, kwargs",
    [
        (jnp.bfloat16, 128, 8, 2, 1000, dict(spec=MaskSpec(causal=True))),
        (jnp.float16, 64, 4, 4, 600, dict(spec=MaskSpec(window_left=64, window_right=32),
                                           soft_cap=30.0, segments=True)),
        (jnp.float32, 256, 4, 1, 300, dict(spec=MaskSpec(causal=True), q_offset=100)),
    ],
    ids=["bf16-h128-gqa-causal", "f16-h64-window-softcap-segments", "f32-h256-mqa-offset"],
)
def test_lowers_to_triton(dtype, h, n, kh, t, kwargs, key):
    """Forward and both backward kernels lower to Triton IR for CUDA (also under vmap)."""
    kwargs = dict(kwargs)
    x = jax.ShapeDtypeStruct((2, t, n, h), dtype)
    kv = jax.ShapeDtypeStruct((2, t, kh, h), dtype)
    seg = random_segments(key, 2, t, 5) if kwargs.pop("segments", False) else None
    q_pos = kwargs.pop("q_offset", 0) + jnp.arange(t, dtype=jnp.int32)
    kv_pos = jnp.arange(t, dtype=jnp.int32)

    def loss(q, k, v):
        out, lse = flash_attention(
            q, k, v, q_pos, kv_pos, seg, seg, scale=0.1, interpret=False, **kwargs
        )
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    for fn, args in ((grad, (x, kv, kv)), (jax.vmap(grad), (_stack(x), _stack(kv), _stack(kv)))):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        for name in ("flash_attention_fwd", "flash_attention_bwd_dq", "flash_attention_bwd_dkv"):
            assert f'name = "{name}"' in text, name


@pytest.mark.skipif(
    not (HAS_CUDA or _JAXLIB_LOWERS_WITHOUT_GPU),
    reason="this jaxlib compiles Triton while lowering, which needs a GPU",
)
def test_entropy_lowers_to_triton(key):
    """With return_entropy the three kernels (entropy forward, entropy backward terms) lower."""
    x = jax.ShapeDtypeStruct((2, 512, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 512, 2, 128), jnp.bfloat16)
    seg = random_segments(key, 2, 512, 3)
    pos = jnp.arange(512, dtype=jnp.int32)

    def loss(q, k, v):
        out, lse, ent = flash_attention(
            q, k, v, pos, pos, seg, seg, spec=MaskSpec(causal=True), scale=0.1,
            soft_cap=30.0, interpret=False, return_entropy=True,
        )
        lse = jnp.where(jnp.isfinite(lse), lse, 0)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse) + jnp.sum(ent)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, kv, kv).lower(
        lowering_platforms=("cuda",)
    ).as_text()
    for name in ("flash_attention_fwd", "flash_attention_bwd_dq", "flash_attention_bwd_dkv"):
        assert f'name = "{name}"' in text, name


def _stack(s: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((2, *s.shape), s.dtype)


# ----------------------------------------------------------------------------- bad inputs


def _shapes(h=64, dtype=jnp.bfloat16, hv=None, t=128):
    return (
        jax.ShapeDtypeStruct((1, t, 4, h), dtype),
        jax.ShapeDtypeStruct((1, t, 2, h), dtype),
        jax.ShapeDtypeStruct((1, t, 2, hv or h), dtype),
    )


@pytest.mark.parametrize("h", [64, 128, 256])
def test_supported_head_dims_on_gpu(h):
    assert explain(*_shapes(h), plat="gpu", is_causal=True, impl_names=(IMPL,))[IMPL] is None


@pytest.mark.parametrize(
    "spec_kw, plat, kwargs, match",
    [
        (dict(h=32), "gpu", {}, r"head dims \(64, 128, 256\) on GPU, got 32"),
        (dict(h=96), "gpu", {}, r"head dims \(64, 128, 256\) on GPU, got 96"),
        (dict(h=24), "cpu", {}, "multiple of 16 and at most 256, got 24"),
        (dict(h=512), "cpu", {}, "multiple of 16 and at most 256, got 512"),
        (dict(h=64, hv=128), "gpu", {}, r"v head dim \(128\) to equal the q head dim \(64\)"),
        (dict(h=64), "tpu", {}, "runs on CUDA GPUs"),
        (dict(h=64), "gpu", dict(bias=jnp.zeros((1, 4, 128, 128))), "takes no bias"),
    ],
)
def test_unsupported_calls_say_why(spec_kw, plat, kwargs, match):
    why = explain(*_shapes(**spec_kw), plat=plat, impl_names=(IMPL,), **kwargs)[IMPL]
    assert why is not None
    assert re.search(match, why), why


def test_bias_is_refused():
    q, k, v = random_qkv(jax.random.key(0), 1, 16, 16, 2, 2, 16)
    with pytest.raises(NotImplementedError, match="pallas_triton takes no bias"):
        attention(q, k, v, bias=jnp.zeros((1, 2, 16, 16)), impl=IMPL)


def test_auto_on_gpu_takes_pallas_triton_where_cudnn_cannot():
    # cuDNN is measured faster where it applies (experiments/results), so auto picks it first;
    # the Triton kernel takes the calls cuDNN cannot compute.
    from attnlab.ops import auto_choice

    bf16 = _shapes(128)  # bfloat16 by default
    assert auto_choice(*bf16, plat="gpu", is_causal=True) == "cudnn"
    for extra in (dict(return_residuals=True), dict(return_entropy=True), dict(q_offset=4),
                  dict(logits_soft_cap=30.0)):
        assert auto_choice(*bf16, plat="gpu", is_causal=True, **extra) == IMPL, extra
    assert auto_choice(*_shapes(96), plat="gpu", is_causal=True, return_residuals=True) != IMPL


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_q=0), "block_q must be a positive int, got 0"),
        (dict(block_kv=-16), "block_kv must be a positive int, got -16"),
        (dict(block_kv=48), "block_kv must be a power of two .* got 48; try 32 or 64"),
        (dict(block_q_dq=100), "block_q_dq must be a power of two"),
        (dict(block_kv_dkv=8), "block_kv_dkv must be at least 16"),
        (dict(num_warps=3), "num_warps must be a power of two"),
        (dict(num_stages_bwd=0), "num_stages_bwd must be a positive int"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlashConfig(**kwargs)


def test_config_defaults_are_valid():
    for h in (None, 64, 128, 256):
        cfg = FlashConfig.get_default(head_dim=h)
        assert isinstance(cfg, FlashConfig)
    assert FlashConfig.get_default() == FlashConfig()


def test_kernel_wrapper_rejects_bad_shapes():
    q, k, v = random_qkv(jax.random.key(0), 1, 16, 16, 4, 2, 16)
    pos = jnp.arange(16, dtype=jnp.int32)
    common = dict(spec=MaskSpec(), scale=0.25, interpret=True)
    with pytest.raises(ValueError, match=r"kv_positions \(16,\)"):
        flash_attention(q, k, v, pos, pos[:8], **common)
    with pytest.raises(ValueError, match="q has 4 heads but k has 3"):
        flash_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), pos, pos, **common)
    with pytest.raises(ValueError, match="must be given together"):
        flash_attention(q, k, v, pos, pos, jnp.zeros((1, 16), jnp.int32), None, **common)
    with pytest.raises(ValueError, match="must share one of float32, bfloat16, float16"):
        flash_attention(q, k.astype(jnp.bfloat16), v, pos, pos, **common)


# ----------------------------------------------------------------------------- compiled (GPU)


@pytest.mark.gpu
class TestCompiledOnGpu:
    """The same comparisons, compiled with Triton at realistic shapes (default tiles)."""

    @pytest.mark.parametrize("h", [64, 128])
    @pytest.mark.parametrize("t", [1024, 1000])
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
    def test_bf16_gqa(self, h, t, causal, key):
        q, k, v = random_qkv(key, 2, t, t, 8, 2, h, jnp.bfloat16)
        _check_against_reference(q, k, v, dict(is_causal=causal))

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
    def test_masks_softcap_segments(self, dtype, key):
        k1, k2 = jax.random.split(key)
        q, k, v = random_qkv(k1, 2, 1000, 1000, 8, 2, 128, dtype)
        kwargs = dict(
            is_causal=True, local_window_size=(300, 0), logits_soft_cap=30.0,
            segment_ids=random_segments(k2, 2, 1000, 4),
        )
        _check_against_reference(q, k, v, kwargs)

    def test_h256_cross_attention_with_offsets(self, key):
        q, k, v = random_qkv(key, 1, 500, 1024, 4, 1, 256, jnp.bfloat16)
        _check_against_reference(q, k, v, dict(is_causal=True, q_offset=524))

    def test_entropy_bf16_gqa_causal(self, key):
        q, k, v = random_qkv(key, 2, 1000, 1000, 8, 2, 128, jnp.bfloat16)
        _check_entropy_against_reference(q, k, v, dict(is_causal=True), ent_tol=2e-2)

    def test_fully_masked_rows(self, key):
        q, k, v = random_qkv(key, 1, 256, 512, 4, 2, 128, jnp.bfloat16)
        out, lse, grads = _values_and_grads(IMPL, q, k, v, dict(is_causal=True, kv_offset=128))
        np.testing.assert_array_equal(np.asarray(out[:, :128], np.float32), 0.0)
        assert np.isneginf(np.asarray(lse[:, :128])).all()
        for g in grads:
            assert np.isfinite(np.asarray(g, np.float32)).all()
