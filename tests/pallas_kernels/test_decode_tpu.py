"""``decode_attention(impl="pallas_tpu")``: the shared decode cases of
``tests/ops/decode_base.py`` in TPU interpret mode, plus the kernel's own tests (Mosaic
lowering of the block shapes, caches padded only where the TPU tiling rule needs it, TPU
block-size rules)."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import pytest

from attnlab.ops import MaskSpec, decode_attention
from pallas_kernels.tpu import decode as tpu_decode
from pallas_kernels.tpu.decode import TpuDecodeConfig, cache_head_dim
from tests.ops.decode_base import (
    LOWERING_SHAPES,
    DecodeTestBase,
    check_against_reference,
    lowering_call,
    zeros_qkv,
)


class TestPallasTpuInterpreted(DecodeTestBase):
    """The shared decode grid; bfloat16 also with a padded value cache (2 heads of dim 80)."""

    IMPL = "pallas_tpu"
    CONFIG = TpuDecodeConfig(block_kv=16, keys_per_split=32)  # S <= 77 spans several
    INTERPRET = True
    DTYPES = {
        "float32": None, "bfloat16": ("gqa_t1_ragged", "gqa_t4_window", "kv_heads_differ_h40"),
    }


@pytest.mark.parametrize("shape", [p for p in LOWERING_SHAPES if p.values[0][6] != jnp.float16])
def test_tpu_kernel_lowers_for_mosaic(shape):
    """Mosaic lowering accepts the block shapes (the (8, 128) rule is checked there), H 64
    with K 4 through the padded cache."""
    f, args = lowering_call(tpu_decode.decode_partials, shape)
    jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",))


# (H, Hv, Kk, Kv): head dims the [B, S, K*H] view cannot tile (80, 96, 192, 40 over 80, 1)
# and key / value head counts of their own.
@pytest.mark.parametrize(
    "dims", [(80, 80, 2, 2), (96, 96, 2, 2), (192, 128, 2, 2), (40, 80, 2, 4), (128, 128, 3, 2),
             (1, 1, 1, 2)],
    ids=["H80", "H96", "H192-Hv128", "H40-Hv80-Kk2-Kv4", "H128-Kk3-Kv2", "H1-Kk1-Kv2"],
)
def test_tpu_kernel_lowers_at_new_head_dims(dims):
    h, hv, kk, kv = dims
    b, t, n, s = 2, 4, 12, 1000
    args = (jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, s, kk, h), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, s, kv, hv), jnp.bfloat16),
            jax.ShapeDtypeStruct((b,), jnp.int32))

    def f(q, k, v, lengths):
        return tpu_decode.decode_partials(q, k, v, lengths, spec=MaskSpec(causal=True),
                                          scale=0.1, interpret=False)

    jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",))


def test_cache_padded_only_where_tiling_needs_it(key):
    """A cache is read in place where its [B, S, K*H] view tiles (one head, or H a multiple of
    128: no pad of it in the program), else zero-padded to a multiple of 128, and the result
    still agrees with the reference (K 2 at H 32, the shape once refused)."""
    assert [cache_head_dim(1, 40), cache_head_dim(4, 128), cache_head_dim(2, 256)] == [40, 128, 256]
    assert [cache_head_dim(2, 32), cache_head_dim(4, 192), cache_head_dim(2, 1)] == [128, 256, 128]

    def padded_shapes(q, k, v):
        """Input shapes of every pad in decode_partials' program (nested jaxprs included)."""
        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                if eqn.primitive.name == "pad":
                    yield eqn.invars[0].aval.shape
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    yield from walk(sub)

        jaxpr = jax.make_jaxpr(lambda q, k, v: tpu_decode.decode_partials(
            q, k, v, None, scale=0.1, interpret=True))(q, k, v)
        return list(walk(jaxpr.jaxpr))

    for kh, h in ((2, 128), (1, 32)):  # in place: only q's rows are padded
        q, k, v = zeros_qkv(kh=kh, h=h)
        assert k.shape not in padded_shapes(q, k, v)
    q, k, v = zeros_qkv(kh=2, h=32)
    assert k.shape in padded_shapes(q, k, v)
    k1, k2 = jax.random.split(key)
    q, k, v = (jax.random.normal(kx, x.shape) for kx, x in zip(jax.random.split(k1, 3), (q, k, v)))
    lengths = jax.random.randint(k2, (2,), 1, 65)
    check_against_reference("pallas_tpu", q, k, v, {"kv_lengths": lengths},
                            TpuDecodeConfig(block_kv=16, keys_per_split=32))


def test_unsupported_calls_raise_not_implemented():
    with pytest.raises(NotImplementedError, match="float32 or bfloat16"):
        decode_attention(*zeros_qkv(dtype=jnp.float16), impl="pallas_tpu")
