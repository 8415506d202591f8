"""``decode_attention(impl="pallas_tpu")``: the shared decode cases of
``tests/ops/decode_base.py`` in TPU interpret mode, plus the kernel's own tests (Mosaic
lowering of the block shapes, TPU block-size rules)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnlab.ops import decode_attention
from pallas_kernels.tpu import decode as tpu_decode
from pallas_kernels.tpu.decode import TpuDecodeConfig
from tests.ops.decode_base import LOWERING_SHAPES, DecodeTestBase, lowering_call, zeros_qkv


class TestPallasTpuInterpreted(DecodeTestBase):
    IMPL = "pallas_tpu"
    CONFIG = TpuDecodeConfig(block_kv=16, keys_per_split=32)  # S <= 77 spans several
    INTERPRET = True


@pytest.mark.parametrize("shape", [p for p in LOWERING_SHAPES if p.values[0][6] != jnp.float16])
def test_tpu_kernel_lowers_for_mosaic(shape):
    """Mosaic lowering accepts the block shapes (the (8, 128) rule is checked there)."""
    b, _, _, kh, h, s, _ = shape
    h = 128 if tpu_decode.unsupported_shape((b, s, kh, h)) is not None else h
    f, args = lowering_call(tpu_decode.decode_partials, shape, h)
    jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",))


@pytest.mark.parametrize(
    "shape, match",
    [(dict(h=32), "H must be a multiple of 128"), (dict(dtype=jnp.float16), "float32 or bfloat16")],
)
def test_unsupported_calls_raise_not_implemented(shape, match):
    with pytest.raises(NotImplementedError, match=match):
        decode_attention(*zeros_qkv(**shape), impl="pallas_tpu")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_kv=12), "multiple of 8"),
        (dict(block_kv=16, keys_per_split=40), "multiple of block_kv=16"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TpuDecodeConfig(**kwargs)
