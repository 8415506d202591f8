"""``impl="pallas_triton"`` (Pallas flash attention lowered to Triton): the shared cases of
``tests/ops/attention_base.py`` interpreted on CPU and compiled on a GPU, plus the kernel's own
tests (entropy outputs of the kernel wrapper, lowering to Triton IR, supported head dims, config
validation).

On CPU the kernels run in the Pallas interpreter, at the shared grid's tiny shapes with tiles
of 16/32 so that every path runs (edge tiles, FULL runs, EMPTY skips, padding, GQA folding in
dK/dV). ``TestPallasTritonCompiled`` runs the same checks compiled at realistic shapes, and
``test_lowers_to_triton`` checks on any machine that the kernels lower to Triton IR.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

from attnlab.ops import MaskSpec, explain
from attnlab.testing import Case, cases
from pallas_kernels.gpu.flash_common import FlashConfig
from pallas_kernels.gpu.flash_fwd import flash_attention
from tests.helpers import HAS_CUDA, random_qkv, random_segments
from tests.ops.attention_base import INTERPRETED_SLOW_CASES, AttentionTestBase, assert_lse_close
from tests.ops.attention_grad_base import AttentionBwdTestBase

IMPL = "pallas_triton"
# Small tiles, different for each kernel, so T, S <= 72 span several tiles of every kind.
SMALL_TILES = FlashConfig(
    block_q=32, block_kv=16, block_q_dkv=16, block_kv_dkv=32, block_q_dq=32, block_kv_dq=16
)


class TestPallasTritonInterpreted(AttentionTestBase):
    """The shared grid in the Pallas interpreter: every case in float32, bf16 and the
    entropy on the cases that stress rounding and masking (interpretation is slow)."""

    IMPL = IMPL
    CONFIG = SMALL_TILES
    INTERPRET = True
    SLOW_CASES = INTERPRETED_SLOW_CASES
    DTYPES = {"float32": None, "bfloat16": ("causal_mqa", "segments", "softcap", "ragged")}
    ENTROPY = {"float32": ("segments", "softcap", "all_masked_rows", "ragged")}


class TestPallasTritonBwdInterpreted(AttentionBwdTestBase):
    """attention_bwd (one key block's share of the gradient, as the ring backward uses it)
    through the backward kernels, on a causal, a packed-documents and a no-key-rows case."""

    IMPL = IMPL
    CONFIG = SMALL_TILES
    INTERPRET = True
    CASES = cases("causal", "segments", "all_masked_rows", "mla_dims", "kv_heads_differ")
    SLOW_CASES = tuple(c.name for c in CASES[1:])  # the first in `make test`


@pytest.mark.gpu
class TestPallasTritonCompiled(AttentionTestBase):
    """The same checks compiled with Triton at realistic shapes (default tiles); float32 is
    compared with the TF32 row of the tolerance table (the reference runs at default
    precision on the GPU)."""

    IMPL = IMPL
    HEAD_DIM = 64
    CASES = tuple(
        Case(f"gqa_h{h}_t{t}_{'causal' if c else 'full'}", b=2, t=t, s=t, n=8, kh=2, h=h,
             kwargs={"is_causal": c})
        for h in (64, 128) for t in (1024, 1000) for c in (True, False)
    ) + (
        Case("masks_softcap_segments", b=2, t=1000, s=1000, n=8, kh=2, h=128, segments=4,
             kwargs={"is_causal": True, "local_window_size": (300, 0),
                     "logits_soft_cap": 30.0}),
        Case("h256_cross_offsets", b=1, t=500, s=1024, n=4, kh=1, h=256,
             kwargs={"is_causal": True, "q_offset": 524}),
        Case("masked_rows_h128", b=1, t=256, s=512, n=4, kh=2, h=128,
             kwargs={"is_causal": True, "kv_offset": 128}),
        # Head dims padded inside the kernels; value dims and head counts of their own.
        Case("h80_t1000_causal", b=2, t=1000, s=1000, n=8, kh=2, h=80,
             kwargs={"is_causal": True}),
        Case("h96_segments_window", b=2, t=1000, s=1000, n=8, kh=4, h=96, segments=3,
             kwargs={"is_causal": True, "local_window_size": (200, 0)}),
        Case("mla_h192_hv128", b=1, t=1000, s=1000, n=8, kh=8, h=192, hv=128,
             kwargs={"is_causal": True}),
        Case("k1_v4_heads_hv128", b=2, t=512, s=512, n=8, kh=1, vh=4, h=64, hv=128,
             kwargs={"is_causal": True}),
    )
    DTYPES = {
        "bfloat16": None,
        "float16": ("masks_softcap_segments",),
        "float32": ("masks_softcap_segments",),
    }
    ENTROPY = {"bfloat16": ("gqa_h128_t1000_causal",)}


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
    assert_lse_close(lse2, lse, 1e-6)
    assert ent.shape == lse.shape and ent.dtype == jnp.float32
    np.testing.assert_array_equal(ent[:, :8], 0.0)  # rows 0-7 see no key
    np.testing.assert_allclose(ent[:, 8], 0.0, atol=1e-6)  # row 8 sees one key
    assert (np.asarray(ent[:, 9:]) > 0).all()


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


@pytest.mark.parametrize("h, hv", [(1, 1), (24, 24), (40, 40), (64, 64), (80, 80), (96, 96),
                                   (128, 128), (192, 128), (256, 256), (64, 200)])
@pytest.mark.parametrize("plat", ["gpu", "cpu"])
def test_supported_head_dims(h, hv, plat):
    """Any head dims up to 256 (padded to a power of two inside), q/k and v apart."""
    why = explain(*_shapes(h, hv=hv), plat=plat, is_causal=True, impl_names=(IMPL,))[IMPL]
    assert why is None


@pytest.mark.parametrize(
    "spec_kw, plat, kwargs, match",
    [
        (dict(h=512), "cpu", {}, "head dims up to 256, got q/k 512 and v 512"),
        (dict(h=64, hv=320), "gpu", {}, "head dims up to 256, got q/k 64 and v 320"),
        (dict(h=64), "tpu", {}, "runs on GPU \\(or interpreted on CPU\\), not on tpu"),
        (dict(h=64), "gpu", dict(bias=jnp.zeros((1, 4, 128, 128))), "takes no bias"),
    ],
)
def test_unsupported_calls_say_why(spec_kw, plat, kwargs, match):
    why = explain(*_shapes(**spec_kw), plat=plat, impl_names=(IMPL,), **kwargs)[IMPL]
    assert why is not None
    assert re.search(match, why), why


def test_auto_on_gpu_takes_pallas_triton_where_cudnn_cannot():
    # cuDNN is measured faster where it applies (experiments/results), so auto picks it first;
    # the Triton kernel takes the calls cuDNN cannot compute.
    from attnlab.ops import auto_choice

    bf16 = _shapes(128)  # bfloat16 by default
    assert auto_choice(*bf16, plat="gpu", is_causal=True) == "cudnn"
    for extra in (dict(return_residuals=True), dict(return_entropy=True), dict(q_offset=4),
                  dict(logits_soft_cap=30.0)):
        assert auto_choice(*bf16, plat="gpu", is_causal=True, **extra) == IMPL, extra
    assert auto_choice(*_shapes(96), plat="gpu", is_causal=True, return_residuals=True) == IMPL
    assert auto_choice(*_shapes(320), plat="gpu", is_causal=True, return_residuals=True) == "xla"


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
