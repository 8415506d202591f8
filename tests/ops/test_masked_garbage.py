"""Masked positions never influence a row: the references, the LSE merge, lightning's float16
and zero-decay corners, and the sequence-parallel strategies, with NaN or +inf planted where
rows cannot see (``tests/ops/masked_garbage.py``). Every implementation runs the same checks
through its test base (``test_masked_garbage_*`` in ``attention_base``, ``attention_grad_base``,
``decode_base`` and ``lightning_base``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from attnlab.ops import attention, decode_attention, lightning_attention, merge, merge_n, mla
from attnlab.testing import random_qkv
from pallas_kernels.gpu.flash_common import FlashConfig
from sharding.api import attention as sp_attention
from sharding.lasp import lasp_attention
from sharding.lasp2 import lasp2_attention
from sharding.star import star_attention, star_query
from tests.ops.attention_base import FAST_COMPILE
from tests.ops.masked_garbage import (
    DECODE_SCENARIOS,
    FILL_PARAMS,
    FILLS,
    LIGHTNING_SCENARIOS,
    SOFTMAX_SCENARIOS,
    Planted,
    check_lightning_garbage,
    check_softmax_garbage,
    decode_scenario,
    lightning_scenario,
    plant,
    softmax_scenario,
    softmax_visible,
)
from tests.pallas_kernels.test_lightning_triton import FUSED_CPU_CONFIG

# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("fill", FILL_PARAMS)
@pytest.mark.parametrize("scenario", SOFTMAX_SCENARIOS)
def test_attention_reference(scenario, fill, key):
    def fn(q, k, v, **kw):
        return attention(q, k, v, impl="reference", return_residuals=True, return_entropy=True,
                         **kw)

    check_softmax_garbage(fn, softmax_scenario(scenario, key), FILLS[fill], entropy=True)


@pytest.mark.parametrize("fill", FILL_PARAMS)
@pytest.mark.parametrize("scenario", sorted(DECODE_SCENARIOS))
def test_decode_reference(scenario, fill, key):
    def fn(q, k, v, **kw):
        return decode_attention(q, k, v, impl="reference", return_residuals=True, **kw)

    check_softmax_garbage(fn, decode_scenario(scenario, key), FILLS[fill])


@pytest.mark.parametrize("fill", FILL_PARAMS)
@pytest.mark.parametrize("scenario", LIGHTNING_SCENARIOS)
def test_lightning_reference(scenario, fill, key):
    def fn(q, k, v, **kw):
        return lightning_attention(q, k, v, impl="reference", return_state=True, **kw)

    check_lightning_garbage(fn, lightning_scenario(scenario, key), FILLS[fill])


# ----------------------------------------------------------------------------- LSE merge


def test_merge_never_reads_a_part_that_saw_nothing(key):
    """A part with lse -inf (it saw no key) merged with clean parts: its output is never read,
    even NaN or inf, in the value or the gradients; every part -inf gives 0 and -inf."""
    k1, k2 = jax.random.split(key)
    outs = jax.random.normal(k1, (3, 2, 4, 2, 8))
    lses = jax.random.normal(k2, (3, 2, 4, 2)).at[1].set(-jnp.inf).at[:, 0, 0].set(-jnp.inf)

    def total(outs, lses):
        o, lse = merge_n(outs, lses)
        return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (o, lse)

    grad = jax.jit(jax.grad(total, argnums=(0, 1), has_aux=True))
    (d_outs0, d_lses0), (o0, lse0) = grad(outs, lses)
    for fill in FILLS.values():
        (d_outs, d_lses), (o, lse) = grad(outs.at[1].set(fill), lses)
        np.testing.assert_array_equal(o, o0)
        np.testing.assert_array_equal(lse, lse0)
        np.testing.assert_array_equal(d_lses, d_lses0)
        np.testing.assert_array_equal(np.asarray(d_outs)[[0, 2]], np.asarray(d_outs0)[[0, 2]])
    assert (np.asarray(o0[0, 0]) == 0).all() and np.isneginf(np.asarray(lse0[0, 0])).all()
    o2, lse2 = merge(outs[0].at[0, 0].set(jnp.nan), lses[0], outs[2], lses[2])
    assert (np.asarray(o2[0, 0]) == 0).all() and np.isfinite(np.asarray(o2)).all()


# ----------------------------------------------------------------------------- sharding

MESH_DEVICES = 8


def _mesh():
    return jax.make_mesh((MESH_DEVICES,), ("sp",), axis_types=(AxisType.Auto,))


def _padded_documents(key, t=64) -> Planted:
    """Causal packed documents with padding documents (id 9: right in b0, left in b1) that
    hold garbage, crossing shard boundaries (8 shards of 8 tokens); GQA 8 over 2 heads."""
    seg = np.array([[0] * 20 + [1] * 28 + [9] * 16, [9] * 10 + [2] * 30 + [3] * 24], np.int32)
    kw = {"is_causal": True, "segment_ids": jnp.asarray(seg)}
    q, k, v = random_qkv(key, 2, t, t, 8, 2, 16)
    bad = seg == 9
    return Planted(q, k, v, kw, bad, bad, softmax_visible(kw, 2, t, t))


@pytest.mark.parametrize("strategy", ["ring", "striped", "zigzag", "ulysses"])
def test_sequence_parallel_strategies(strategy, key):
    """Ring, striped, zigzag and Ulysses on 8 simulated devices, garbage in the padding
    documents: the real documents' out, LSE and gradients equal those with zeros there
    (blocks that see nothing merge as lse -inf, out 0)."""
    mesh = _mesh()

    def fn(q, k, v, **kw):
        return sp_attention(q, k, v, mesh=mesh, strategy=strategy, impl="xla",
                            return_residuals=True, **kw)

    check_softmax_garbage(fn, _padded_documents(key), FILLS["nan"])


def test_ring_over_the_triton_kernel(key):
    """The ring's blocks and block backward through the interpreted Triton kernel."""
    mesh = _mesh()
    config = FlashConfig(block_q=16, block_kv=16, block_q_dkv=16, block_kv_dkv=16,
                         block_q_dq=16, block_kv_dq=16)

    def fn(q, k, v, **kw):
        return sp_attention(q, k, v, mesh=mesh, strategy="ring", impl="pallas_triton",
                            config=config, return_residuals=True, **kw)

    check_softmax_garbage(fn, _padded_documents(key), FILLS["inf"],
                          compiler_options=FAST_COMPILE)


def test_star_query_over_an_uninitialized_cache_tail(key):
    """Star Attention's query phase: a query block at positions 30..37 over a 64-slot cache
    split 8 ways, slots 38.. uninitialized (NaN): shards past the queries see nothing and
    merge as lse -inf; values and gradients equal those with zeros there."""
    mesh = _mesh()
    b, t, s = 2, 8, 64
    kw = {"is_causal": True, "q_offset": 30}
    q, k, v = random_qkv(key, b, t, s, 4, 2, 16)
    bad_kv = np.broadcast_to(np.arange(s) >= 38, (b, s)).copy()
    p = Planted(q, k, v, kw, np.zeros((b, t), bool), bad_kv, softmax_visible(kw, b, t, s))

    def fn(q, k, v, **kw):
        return star_query(q, k, v, mesh=mesh, impl="xla", return_residuals=True, **kw)

    check_softmax_garbage(fn, p, FILLS["nan"])


def test_star_context_phase_skips_the_blocks_between(key):
    """Star Attention's context phase (8 blocks of 8, block 0 the anchor): garbage in block 3
    reaches only block 3's rows; later blocks, which see the anchor and themselves, are
    clean (values and gradients)."""
    mesh = _mesh()
    b, t, bs = 2, 64, 8
    q, k, v = random_qkv(key, b, t, t, 4, 2, 16)
    blk = np.arange(t) // bs
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    vis = (blk[None, :] == 0) | ((blk[:, None] == blk[None, :]) & (j <= i))
    bad = np.broadcast_to(blk == 3, (b, t)).copy()
    p = Planted(q, k, v, {}, bad, bad, np.broadcast_to(vis, (b, t, t)))

    def fn(q, k, v):
        return (star_attention(q, k, v, mesh=mesh, impl="xla"),)

    check_softmax_garbage(fn, p, FILLS["nan"])


@pytest.mark.parametrize("algo", ["lasp", "lasp2"])
def test_lasp_documents(algo, key):
    """LASP (state ring) and LASP-2 (one all-gather) on 8 simulated devices, garbage in a
    document mid-row and in padding documents: every other document's o, the final state,
    the initial state's gradient and dq, dk, dv equal those with zeros there (a dropped
    state is selected away in the exchange, not multiplied by 0)."""
    mesh = _mesh()
    fn_algo = {"lasp": lasp_attention, "lasp2": lasp2_attention}[algo]

    def fn(q, k, v, **kw):
        return fn_algo(q, k, v, mesh=mesh, impl="xla", chunk_size=4, return_state=True, **kw)

    for scenario in ("documents", "padding_tail"):
        check_lightning_garbage(fn, lightning_scenario(scenario, key), FILLS["nan"])


def test_lasp2_over_the_fused_triton_kernels(key):
    """LASP-2 through the Triton kernels' own block phases (fused forward), interpreted."""
    mesh = _mesh()

    def fn(q, k, v, **kw):
        return lasp2_attention(q, k, v, mesh=mesh, impl="pallas_triton",
                               config=FUSED_CPU_CONFIG, return_state=True, **kw)

    check_lightning_garbage(fn, lightning_scenario("documents", key), FILLS["nan"],
                            compiler_options=FAST_COMPILE)


# ----------------------------------------------------------------------------- MLA decode


@pytest.mark.parametrize("fill", FILL_PARAMS)
@pytest.mark.parametrize("impl", ["reference", "xla", "pallas_triton", "pallas_tpu",
                                  "pallas_mosaic_gpu"])
def test_mla_latent_decode_uninitialized_cache(impl, fill, key):
    """MLA's latent decode (one cache that is keys and values): NaN or +inf in every slot no
    query sees (past the length, before the window) changes no output or LSE, nor (xla,
    reference) the gradients of q and of the slots seen."""
    from pallas_kernels.gpu.mla_decode import MlaDecodeConfig
    from pallas_kernels.tpu.mla_decode import TpuMlaDecodeConfig

    b, t, n, s, d_c, d_r, window = 2, 3, 6, 50, 24, 8, 9
    lengths = np.array([50, 13])
    config = {"pallas_triton": MlaDecodeConfig(block_kv=16, block_rows=16, keys_per_split=32),
              "pallas_tpu": TpuMlaDecodeConfig(block_kv=16, keys_per_split=32)}.get(impl)
    k1, k2, k3 = jax.random.split(key, 3)
    dtype = jnp.bfloat16 if impl == "pallas_mosaic_gpu" else jnp.float32  # wgmma: 16-bit
    q = jax.random.normal(k1, (b, t, n, d_c + d_r), dtype)
    cache = jax.random.normal(k2, (b, s, d_c + d_r), dtype)
    slot = np.arange(s)[None, :]
    bad = (slot >= lengths[:, None]) | (slot < lengths[:, None] - t - window)
    grads = impl in ("reference", "xla")
    dout = jax.random.normal(k3, (b, t, n, d_c))

    def f(q, cache):
        return mla.latent_decode(q, cache, v_dim=d_c, kv_lengths=jnp.asarray(lengths, jnp.int32),
                                 local_window_size=window, scale=0.1, impl=impl, config=config,
                                 return_residuals=True)

    def run(q, cache):
        if not grads:
            return f(q, cache), ()
        (out, lse), vjp = jax.vjp(f, q, cache)
        return (out, lse), vjp((dout, jnp.zeros_like(lse)))

    run = jax.jit(run, compiler_options=None if grads else FAST_COMPILE)
    ((out, lse), g), ((out0, lse0), g0) = (run(q, plant(cache, bad, x))
                                           for x in (FILLS[fill], 0.0))
    np.testing.assert_allclose(out, out0, atol=2e-5)
    np.testing.assert_array_equal(lse, lse0)  # all finite: every row sees a slot
    for name, x, x0, rows in zip(("dq", "dcache"), g, g0, (np.ones((b, t), bool), ~bad)):
        assert np.isfinite(np.asarray(x)[rows]).all(), name
        np.testing.assert_allclose(np.asarray(x)[rows], np.asarray(x0)[rows], atol=1e-4,
                                   err_msg=name)
