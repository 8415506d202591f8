"""``decode_attention(impl="pallas_triton")``: the shared decode cases of
``tests/ops/decode_base.py`` interpreted on CPU and compiled on a GPU, plus the kernel's own
tests (tiling, split-K partials merged by LSE, lowering to Triton IR, block-size rules)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import MaskSpec, decode_attention, merge_n
from attnlab.ops.decode import auto_choice
from pallas_kernels.gpu import decode as gpu_decode
from pallas_kernels.gpu.decode import DecodeConfig
from tests.ops.decode_base import (
    DECODE_CASES,
    LOWERING_SHAPES,
    DecodeCase,
    DecodeTestBase,
    assert_matches,
    lowering_call,
    run,
    zeros_qkv,
)

# Tiles of 16 keys, splits of 32 keys and row blocks of 16 rows, so S <= 77 spans several.
SMALL = DecodeConfig(block_kv=16, keys_per_split=32, block_rows=16)


class TestPallasTritonInterpreted(DecodeTestBase):
    IMPL = "pallas_triton"
    CONFIG = SMALL
    INTERPRET = True


@pytest.mark.gpu
class TestPallasTritonCompiled(DecodeTestBase):
    """The kernel compiled (default config) at realistic decode sizes; float32 is compared
    with the TF32 row of the tolerance table (long sums, reference at default precision)."""

    IMPL = "pallas_triton"
    CASES = (
        DecodeCase("h100_target_ragged", b=4, t=1, s=32768, n=32, kh=4,
                   lengths=(32768, 1, 20001, 0)),
        DecodeCase("speculative_window_softcap", b=4, t=4, s=8192, n=32, kh=4,
                   lengths=(8192, 4000, 3, 5000), window=1000, soft_cap=30.0),
        DecodeCase("float32_many_rows", b=2, t=16, s=4099, n=32, kh=4, h=64,
                   lengths=(4099, 2048)),
    )
    DTYPES = {
        "bfloat16": ("h100_target_ragged", "speculative_window_softcap"),
        "float32": ("float32_many_rows",),
    }
    GRAD_CASES = ("speculative_window_softcap",)

    def test_auto_picks_triton(self):
        q = jax.ShapeDtypeStruct((4, 1, 32, 128), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((4, 32768, 4, 128), jnp.bfloat16)
        assert auto_choice(q, kv, kv) == "pallas_triton"


def test_pallas_maps_to_platform_kernel(key):
    """impl="pallas" is the Triton kernel on CPU (interpreted) and GPU."""
    case = DECODE_CASES[3]
    q, k, v = case.inputs(key)
    out, _ = run("pallas", q, k, v, case.kwargs(), SMALL)
    want, _ = run("reference", q, k, v, case.kwargs())
    np.testing.assert_allclose(out, want, atol=2e-5)


def test_partials_are_split_and_merge_exactly(key):
    """The kernels return P > 1 partials; merge_n of them is the whole answer."""
    case = DECODE_CASES[0]
    q, k, v = case.inputs(key)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    til = gpu_decode.tiling(SMALL, case.b, case.t, case.n, case.kh, case.s)
    assert (til.num_splits, til.block_kv, til.keys_per_split) == (3, 16, 32)
    o_parts, lse_parts = gpu_decode.decode_partials(
        q, k, v, lengths, spec=MaskSpec(causal=True), scale=case.h**-0.5, config=SMALL,
        interpret=True,
    )
    assert o_parts.shape == (3, *q.shape) and lse_parts.shape == (3, *q.shape[:3])
    # Sequence 2 has length 1: splits 1 and 2 saw nothing.
    assert np.isneginf(np.asarray(lse_parts[1:, 2])).all()
    out, lse = merge_n(o_parts, lse_parts)
    want_out, want_lse = run("reference", q, k, v, case.kwargs())
    assert_matches(out, lse, want_out, want_lse, jnp.float32, TestPallasTritonInterpreted().tol())


def test_split_size_heuristic():
    cfg = DecodeConfig()
    # B=4, K=4, S=32K, one row block: ~512 programs -> 1024 keys per split, 32 splits.
    til = gpu_decode.tiling(cfg, 4, 1, 32, 4, 32768)
    assert (til.block_rows, til.row_blocks, til.keys_per_split, til.num_splits) == (16, 1, 1024, 32)
    til = gpu_decode.tiling(cfg, 1, 1, 8, 8, 4096)  # small work: at least MIN_SPLIT keys
    assert til.keys_per_split == gpu_decode.MIN_SPLIT
    til = gpu_decode.tiling(cfg, 1, 16, 32, 4, 1000)  # 128 rows -> 2 row blocks of 64
    assert (til.block_rows, til.row_blocks) == (64, 2)


@pytest.mark.parametrize("shape", LOWERING_SHAPES)
def test_triton_kernel_lowers_for_cuda(shape):
    """The kernel lowers to Triton IR for CUDA (no GPU needed), plain and under vmap."""
    f, args = lowering_call(gpu_decode.decode_partials, shape)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert 'name = "decode_attention_splitk"' in text
    vargs = [jax.ShapeDtypeStruct((2, *a.shape), a.dtype) for a in args]
    jax.jit(jax.vmap(f)).trace(*vargs).lower(lowering_platforms=("cuda",))


def test_unsupported_head_dim():
    with pytest.raises(NotImplementedError, match="head dims up to 256, got q/k 320 and v 320"):
        decode_attention(*zeros_qkv(h=320), impl="pallas_triton")
