"""MLA latent decode ``impl="pallas_mosaic_gpu"`` (the Pallas Mosaic GPU kernel for Hopper): in
JAX's Mosaic GPU interpreter on CPU against the reference, lowered for CUDA from CPU, compiled
on an H100 (``gpu``), its config and its refusals.

The interpreted kernel reads K^T tiles from a transposed copy of the cache and adds a fresh
PV product to the output (the interpreter has neither transposed refs nor in-place wgmma
accumulation); everything else (pipeline, barriers, the split of the output columns over two
warpgroups, masks, splits) is the code the GPU compiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import mla
from pallas_kernels.common.masks import MaskSpec
from pallas_kernels.gpu.mgpu_mla_decode import MosaicMlaDecodeConfig, decode_partials
from tests.helpers import HAS_CUDA
from tests.lowering import h100_mesh

IMPL = "pallas_mosaic_gpu"


def _check(b, t, n, s, d_c, d_r, lengths, window, config, key, dtype=jnp.bfloat16, jit=False):
    ks = jax.random.split(key, 2)
    q = jax.random.normal(ks[0], (b, t, n, d_c + d_r), dtype)
    cache = jax.random.normal(ks[1], (b, s, d_c + d_r), dtype)
    kw = dict(v_dim=d_c, kv_lengths=jnp.asarray(lengths, jnp.int32), local_window_size=window,
              scale=(d_c + d_r) ** -0.5, return_residuals=True)

    def run(impl, q, cache, config=None):
        f = lambda q, c: mla.latent_decode(q, c, impl=impl, config=config, **kw)  # noqa: E731
        return (jax.jit(f) if jit else f)(q, cache)

    got, lse = run(IMPL, q, cache, config)
    want, want_lse = run("reference", q.astype(jnp.float32), cache.astype(jnp.float32))
    assert got.shape == (b, t, n, d_c) and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=2e-2)
    fin = np.isfinite(np.asarray(want_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(want_lse)[fin], atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got, np.float32)[~fin], 0.0)


@pytest.mark.parametrize(
    "b, t, n, s, d_c, d_r, lengths, window, splits",
    [
        (1, 1, 4, 152, 128, 64, (150,), None, 2),  # kernel dims, a shifted last tile
        pytest.param(2, 3, 6, 152, 24, 8, (150, 0), 9, 3,  # padded dims, an empty sequence,
                     marks=pytest.mark.slow),  # a window
        (2, 1, 70, 104, 64, 32, (100, 37), None, None),  # two row blocks, automatic splits
        (1, 2, 16, 12, 128, 64, (12,), None, 1),  # a cache shorter than a tile
        (2, 2, 32, 304, 512, 64, (300, 130), 100, 2),  # DeepSeek's d_c + d_R, ragged, window
    ],
)
def test_interpreted_matches_reference(b, t, n, s, d_c, d_r, lengths, window, splits, key):
    _check(b, t, n, s, d_c, d_r, lengths, window, MosaicMlaDecodeConfig(num_splits=splits), key)


@pytest.mark.slow
def test_interpreted_float16_three_slots(key):
    _check(2, 1, 8, 400, 128, 64, (400, 199), None,
           MosaicMlaDecodeConfig(max_concurrent_steps=3, num_splits=2), key, dtype=jnp.float16)


@pytest.mark.slow
@pytest.mark.parametrize(
    "t, s, lengths, window, splits",
    [
        (1, 400, (400, 1), None, 2),  # several tiles; a split with one key; an empty split
        (3, 152, (150, 0), 9, 3),  # a window: masked tiles at both ends, an empty sequence
        (2, 12, (12,), None, 1),  # one tile
    ],
)
def test_interpreted_overlapped_logits(t, s, lengths, window, splits, key):
    """``overlap=True``: the next tile's logits are issued before this tile's softmax."""
    _check(len(lengths), t, 8, s, 128, 64, lengths, window,
           MosaicMlaDecodeConfig(num_splits=splits, overlap=True), key)


def test_lowers_for_hopper():
    """Under an abstract H100 mesh the op dispatches to the kernel with the interpreter off and
    Pallas's Mosaic GPU lowering accepts it (transposed K views, in-place accumulation, the
    shared memory budget) at DeepSeek-V2 sizes and at padded ones."""
    for b, t, n, s, d_c, d_r, window in [(32, 1, 128, 8192, 512, 64, None),
                                         (2, 3, 16, 1000, 96, 32, 100)]:
        args = (jax.ShapeDtypeStruct((b, t, n, d_c + d_r), jnp.bfloat16),
                jax.ShapeDtypeStruct((b, s, d_c + d_r), jnp.bfloat16),
                jax.ShapeDtypeStruct((b,), jnp.int32))

        def f(q, c, lengths, d_c=d_c, window=window):
            return mla.latent_decode(q, c, v_dim=d_c, kv_lengths=lengths,
                                     local_window_size=window, impl=IMPL)

        with jax.sharding.use_abstract_mesh(h100_mesh()):
            text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("stablehlo.custom_call @mosaic_gpu_v2(") == 1
        assert "mgpu_mla_latent_decode" in text


def test_shared_memory_estimate_is_what_mosaic_allocates():
    """The DeepSeek tiles (two 64-key slots) fit the H100's 227 KiB with 2 KiB to spare; a
    third slot does not, and the wrapper says so before Mosaic GPU would."""
    from pallas_kernels.gpu.mgpu_common import SMEM_BYTES

    assert MosaicMlaDecodeConfig().smem_bytes(256, 64) <= SMEM_BYTES
    with pytest.raises(ValueError, match=r"KiB of shared memory at d_c 512 and d_R 64"):
        decode_partials(jnp.zeros((1, 1, 128, 576), jnp.bfloat16),
                        jnp.zeros((1, 256, 576), jnp.bfloat16), jnp.array([256], jnp.int32),
                        v_dim=512, spec=MaskSpec(causal=True), scale=0.1,
                        config=MosaicMlaDecodeConfig(max_concurrent_steps=3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_kv=32), "block_kv must be a positive multiple of 64"),
        (dict(max_concurrent_steps=1), "max_concurrent_steps must be an int >= 2"),
        (dict(num_splits=0), "num_splits must be a positive int"),
        (dict(approx_math=1), "approx_math must be a bool"),
        (dict(overlap=None), "overlap must be a bool"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MosaicMlaDecodeConfig(**kwargs)


def test_automatic_splits_fill_one_wave():
    cfg = MosaicMlaDecodeConfig()
    assert cfg.num_splits_for(32, 2, 8192) == 2  # 128 blocks on 132 SMs
    assert cfg.num_splits_for(1, 2, 8192) == 64
    assert cfg.num_splits_for(1, 2, 200) == 1  # at least two tiles per split
    assert MosaicMlaDecodeConfig(num_splits=5).num_splits_for(32, 2, 8192) == 5


@pytest.mark.parametrize(
    "q_shape, dtype, kwargs, match",
    [
        ((1, 1, 4, 640), jnp.bfloat16, dict(v_dim=576),
         "takes a latent rank \\(v_dim\\) up to 512, got 576"),
        ((1, 1, 4, 96), jnp.float32, dict(v_dim=64), "takes bfloat16 or float16 inputs"),
        ((1, 1, 4, 64), jnp.bfloat16, dict(v_dim=64), "need a RoPE part"),
        ((1, 1, 4, 96), jnp.bfloat16, dict(v_dim=64, cache_len=4099),
         "need the cache length to be a multiple of 8, got 4099; allocate the cache"),
    ],
)
def test_unsupported_calls_say_why(q_shape, dtype, kwargs, match):
    q = jnp.zeros(q_shape, dtype)
    cache = jnp.zeros((1, kwargs.pop("cache_len", 16), q_shape[-1]), dtype)
    with pytest.raises(NotImplementedError, match=match):
        mla.latent_decode(q, cache, impl=IMPL, **kwargs)


def test_wrapper_rejects_bad_inputs():
    q = jnp.zeros((1, 1, 4, 640), jnp.bfloat16)
    with pytest.raises(ValueError, match="takes d_c \\(v_dim\\) up to 512, got 576"):
        decode_partials(q, jnp.zeros((1, 16, 640), jnp.bfloat16), jnp.array([16]), v_dim=576,
                        spec=MaskSpec(causal=True), scale=0.1)
    with pytest.raises(ValueError, match="config must be a MosaicMlaDecodeConfig"):
        decode_partials(q[..., :96], jnp.zeros((1, 16, 96), jnp.bfloat16), jnp.array([16]),
                        v_dim=64, spec=MaskSpec(causal=True), scale=0.1, config=object())
    with pytest.raises(ValueError, match="multiple of 8, got 100"):
        decode_partials(q[..., :96], jnp.zeros((1, 100, 96), jnp.bfloat16), jnp.array([16]),
                        v_dim=64, spec=MaskSpec(causal=True), scale=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a Hopper GPU; run scripts/gpu_check.sh on the device")
@pytest.mark.parametrize(
    "b, t, n, s, d_c, d_r, lengths, window, config",
    [
        (4, 1, 128, 8192, 512, 64, (8192, 1, 2731, 0), None, MosaicMlaDecodeConfig()),
        (4, 4, 128, 4104, 512, 64, (4099, 4, 1366, 0), None, MosaicMlaDecodeConfig()),
        (4, 1, 128, 8192, 512, 64, (8192, 77, 5000, 8192), 1000,
         MosaicMlaDecodeConfig(num_splits=3, approx_math=True)),
        (2, 2, 40, 3000, 96, 32, (3000, 1500), None, MosaicMlaDecodeConfig(num_splits=1)),
        (2, 1, 16, 2048, 256, 64, (2048, 2000), None,
         MosaicMlaDecodeConfig(max_concurrent_steps=3)),
        (4, 1, 128, 8192, 512, 64, (8192, 1, 2731, 0), None, MosaicMlaDecodeConfig(overlap=True)),
        (4, 3, 128, 4104, 512, 64, (4099, 77, 1366, 8), 500,
         MosaicMlaDecodeConfig(overlap=True, num_splits=5)),
    ],
)
def test_compiled(b, t, n, s, d_c, d_r, lengths, window, config, key):
    """Compiled by Mosaic GPU: DeepSeek-V2 sizes (ragged lengths, T = 4 queries, a window,
    approximate math), padded dims, three slots."""
    _check(b, t, n, s, d_c, d_r, lengths, window, config, key, jit=True)


def test_auto_prefers_it_on_hopper_where_it_applies():
    """``impl="auto"`` on an H100 picks this kernel (it measured 2.7-3.1x the Triton kernel
    there), and the Triton kernel where this one refuses (float32, a cache length that is not a
    multiple of 8)."""
    q = jnp.zeros((1, 1, 4, 96), jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(h100_mesh()):
        for cache, want in [(jnp.zeros((1, 64, 96), jnp.bfloat16), IMPL),
                            (jnp.zeros((1, 100, 96), jnp.bfloat16), "pallas_triton"),
                            (jnp.zeros((1, 64, 96), jnp.float32), "pallas_triton")]:
            got = mla.auto_choice(q.astype(cache.dtype), cache, cache, v_dim=64, plat="gpu")
            assert got == want, (cache.shape, cache.dtype)
