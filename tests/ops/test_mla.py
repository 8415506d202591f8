"""MLA: the training path equals the equations, absorbed decode equals materialized decode,
prefill-then-decode equals the full forward, bad shapes give clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import decode_attention, mla
from tests.helpers import HAS_CUDA, random_segments

DIMS = dict(n=4, d_n=16, d_r=8, d_c=24, d_v=12)


def _inputs(key, b=2, t=5, s=37, n=4, d_n=16, d_r=8, d_c=24, d_v=12, dtype=jnp.float32):
    ks = jax.random.split(key, 6)
    q_nope = jax.random.normal(ks[0], (b, t, n, d_n), dtype)
    q_rope = jax.random.normal(ks[1], (b, t, n, d_r), dtype)
    c = jax.random.normal(ks[2], (b, s, d_c), dtype)
    k_rope = jax.random.normal(ks[3], (b, s, d_r), dtype)
    w_uk = (jax.random.normal(ks[4], (d_c, n, d_n)) / np.sqrt(d_c)).astype(dtype)
    w_uv = (jax.random.normal(ks[5], (d_c, n, d_v)) / np.sqrt(d_c)).astype(dtype)
    return q_nope, q_rope, c, k_rope, w_uk, w_uv


def _numpy_mla(q_nope, q_rope, c, k_rope, w_uk, w_uv):
    """Causal MLA in float64 NumPy from the equations (T == S)."""
    qn, qr, c, kr, wuk, wuv = (np.asarray(x, np.float64) for x in
                               (q_nope, q_rope, c, k_rope, w_uk, w_uv))
    b, t, n, d_n = qn.shape
    out = np.zeros((b, t, n, wuv.shape[2]))
    scale = 1.0 / np.sqrt(d_n + qr.shape[3])
    for bi in range(b):
        for i in range(n):
            k = np.concatenate([c[bi] @ wuk[:, i], kr[bi]], -1)  # [S, d_n + d_R]
            v = c[bi] @ wuv[:, i]
            q = np.concatenate([qn[bi, :, i], qr[bi, :, i]], -1)
            z = q @ k.T * scale
            z = np.where(np.tril(np.ones((t, t), bool)), z, -np.inf)
            p = np.exp(z - z.max(-1, keepdims=True))
            out[bi, :, i] = (p / p.sum(-1, keepdims=True)) @ v
    return out


def test_training_path_matches_equations(key):
    args = _inputs(key, t=20, s=20)
    want = _numpy_mla(*args)
    for impl in ("reference", "xla"):
        got = mla.mla_attention(*args, is_causal=True, impl=impl)
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=impl)
    np.testing.assert_allclose(mla.reference(*args, is_causal=True), want, atol=2e-5)


def test_training_path_gradients_match_reference(key):
    k1, k2 = jax.random.split(key)
    args = _inputs(k1, t=24, s=24)
    seg = random_segments(k2, 2, 24, 3)

    def loss(fn, **kw):
        def f(*a):
            out = fn(*a, is_causal=True, segment_ids=seg, **kw)
            return jnp.sum(jnp.sin(out))
        return jax.grad(f, argnums=tuple(range(6)))

    got = jax.jit(loss(mla.mla_attention, impl="xla"))(*args)
    want = jax.jit(loss(mla.reference))(*args)
    for name, g, w in zip(("q_nope", "q_rope", "c", "k_rope", "w_uk", "w_uv"), got, want):
        np.testing.assert_allclose(g, w, atol=5e-5, err_msg=name)


@pytest.mark.parametrize("t, window", [(1, None), (3, None), (2, 9)])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_absorbed_decode_equals_materialized(t, window, impl, key):
    q_nope, q_rope, c, k_rope, w_uk, w_uv = _inputs(key, t=t)
    lengths = jnp.array([37, 11], jnp.int32)
    k, v = mla.materialize_kv(c, k_rope, w_uk, w_uv)
    want, want_lse = decode_attention(
        jnp.concatenate([q_nope, q_rope], -1), k, v, kv_lengths=lengths, scale=24 ** -0.5,
        local_window_size=window, return_residuals=True, impl="reference")
    got, lse = mla.mla_decode(q_nope, q_rope, mla.latent_cache(c, k_rope), w_uk, w_uv,
                              kv_lengths=lengths, local_window_size=window,
                              return_residuals=True, impl=impl)
    assert got.shape == want.shape == (2, t, 4, 12)
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, atol=2e-6)


def test_prefill_then_decode_equals_full_forward(key):
    """The last T rows of causal MLA over the whole sequence == absorbed decode of them."""
    q_nope, q_rope, c, k_rope, w_uk, w_uv = _inputs(key, t=30, s=30)
    full = mla.mla_attention(q_nope, q_rope, c, k_rope, w_uk, w_uv, is_causal=True)
    t = 3
    got = jax.jit(lambda *a: mla.mla_decode(*a))(
        q_nope[:, -t:], q_rope[:, -t:], mla.latent_cache(c, k_rope), w_uk, w_uv)
    np.testing.assert_allclose(got, full[:, -t:], atol=2e-6)


def test_absorbed_decode_bfloat16_close_to_float32(key):
    args32 = _inputs(key, t=1)
    args16 = [x.astype(jnp.bfloat16) for x in args32]
    q_nope, q_rope, c, k_rope, w_uk, w_uv = args16
    got = mla.mla_decode(q_nope, q_rope, mla.latent_cache(c, k_rope), w_uk, w_uv)
    q_nope, q_rope, c, k_rope, w_uk, w_uv = (x.astype(jnp.float32) for x in args16)
    want = mla.mla_decode(q_nope, q_rope, mla.latent_cache(c, k_rope), w_uk, w_uv)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


BAD = [
    (lambda a: (a[0][0], *a[1:]), "q_nope must have shape"),
    (lambda a: (a[0], a[1][:, :, :2], *a[2:]), r"q_rope must share \[batch, seq, heads\]"),
    (lambda a: (*a[:3], a[3][..., :4], *a[4:]), "q_rope has d_R=8 but k_rope has 4"),
    (lambda a: (*a[:4], a[4][:, :3], a[5]), r"w_uk must have shape \[d_c, N, dim\] = \[24, 4"),
    (lambda a: (*a[:4], a[4], a[5][:10]), r"w_uv must have shape \[d_c, N, dim\] = \[24, 4"),
    (lambda a: (*a[:4], a[4][..., :8], a[5]), "w_uk's last dim 8 must equal q_nope's d_n=16"),
    (lambda a: (*a[:2], a[2][:1], *a[3:]), "must share batch 2"),
]


@pytest.mark.parametrize("mutate, match", BAD)
def test_bad_shapes(mutate, match, key):
    args = mutate(_inputs(key))
    with pytest.raises(ValueError, match=match):
        mla.mla_attention(*args)


def test_latent_decode_bad_arguments(key):
    q_nope, q_rope, c, k_rope, w_uk, _ = _inputs(key, t=1)
    q, cache = mla.absorb_query(q_nope, q_rope, w_uk), mla.latent_cache(c, k_rope)
    with pytest.raises(ValueError, match=r"v_dim must be an int in \[1, 32\]"):
        mla.latent_decode(q, cache, v_dim=40)
    with pytest.raises(ValueError, match=r"cache must have shape \[batch, seq, d_c \+ d_R\]"):
        mla.latent_decode(q, cache[:, :, None], v_dim=24)
    with pytest.raises(ValueError, match="q has head_dim 32 but k has 31"):
        mla.latent_decode(q, cache[..., :31], v_dim=24)
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        mla.latent_decode(q, cache, v_dim=24, impl="fast")


# ----------------------------------------------------------------------------- Triton kernel


@pytest.mark.parametrize(
    "b, t, n, s, d_c, d_r, lengths, window",
    [
        (2, 1, 4, 77, 32, 16, (77, 5), None),  # kernel dims as they are, two splits
        (2, 3, 6, 50, 24, 8, (50, 0), 9),  # padded dims, a row that sees no key, a window
        (1, 2, 16, 12, 64, 16, (12,), None),  # cache shorter than a tile, two row blocks
    ],
)
@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_tpu"])
def test_latent_kernels_interpreted(b, t, n, s, d_c, d_r, lengths, window, impl, key):
    from pallas_kernels.gpu.mla_decode import MlaDecodeConfig
    from pallas_kernels.tpu.mla_decode import TpuMlaDecodeConfig

    cfg = (MlaDecodeConfig(block_kv=16, block_rows=16, keys_per_split=32) if impl == "pallas_triton"
           else TpuMlaDecodeConfig(block_kv=16, keys_per_split=32))
    ks = jax.random.split(key, 2)
    q = jax.random.normal(ks[0], (b, t, n, d_c + d_r))
    cache = jax.random.normal(ks[1], (b, s, d_c + d_r))
    kw = dict(v_dim=d_c, kv_lengths=jnp.asarray(lengths, jnp.int32), local_window_size=window,
              scale=0.1, return_residuals=True)
    got, lse = mla.latent_decode(q, cache, impl=impl, config=cfg, **kw)
    want, want_lse = mla.latent_decode(q, cache, impl="reference", **kw)
    assert got.shape == (b, t, n, d_c)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
    fin = np.isfinite(np.asarray(want_lse))
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(want_lse)[fin], atol=2e-5)
    np.testing.assert_array_equal(np.asarray(got)[~fin], 0.0)


def _deepseek_lowering_call(decode_partials, b):
    """(f, abstract args) of a latent kernel at DeepSeek-V2 sizes: 128 heads, d_c 512 + d_R 64,
    an 8K bf16 cache, batch ``b``."""
    from pallas_kernels.common.masks import MaskSpec

    args = (jax.ShapeDtypeStruct((b, 1, 128, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, 8192, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((b,), jnp.int32))

    def f(q, cache, lengths):
        return decode_partials(q, cache, lengths, v_dim=512, spec=MaskSpec(causal=True),
                               scale=192 ** -0.5)

    return f, args


def test_tpu_latent_kernel_lowers_for_tpu():
    """The TPU kernel lowers through Mosaic for each TPU generation (no TPU needed)."""
    from pallas_kernels.tpu.mla_decode import decode_partials
    from tests.lowering import TPU_KINDS, kernels, lower_for_tpu, tpu_mesh

    f, args = _deepseek_lowering_call(decode_partials, 8)
    for kind in TPU_KINDS.values():
        text = lower_for_tpu(f, *args, mesh=tpu_mesh(kind))
        assert kernels(text) == {"attnlab_tpu_mla_latent_decode": 1}, kind


def test_triton_latent_kernel_lowers_for_cuda():
    """The Triton kernel lowers to Triton IR without a GPU."""
    from pallas_kernels.gpu.mla_decode import decode_partials

    f, args = _deepseek_lowering_call(decode_partials, 32)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert 'name = "mla_latent_decode"' in text


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; run scripts/gpu_check.sh on the device")
@pytest.mark.parametrize("s, t", [(8192, 1), (4099, 4)])
def test_triton_latent_kernel_compiled(s, t, key):
    """DeepSeek-V2 sizes compiled: 128 heads, d_c 512, d_R 64, bf16, ragged lengths."""
    ks = jax.random.split(key, 2)
    q = jax.random.normal(ks[0], (4, t, 128, 576), jnp.bfloat16)
    cache = jax.random.normal(ks[1], (4, s, 576), jnp.bfloat16)
    kw = dict(v_dim=512, kv_lengths=jnp.array([s, 1, s // 3, 0], jnp.int32), scale=192 ** -0.5,
              return_residuals=True)
    got, lse = jax.jit(lambda q, c: mla.latent_decode(q, c, impl="pallas_triton", **kw))(q, cache)
    want, want_lse = jax.jit(lambda q, c: mla.latent_decode(q, c, impl="xla", **kw))(q, cache)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-2)
    fin = np.isfinite(np.asarray(want_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(want_lse)[fin], atol=2e-2)
