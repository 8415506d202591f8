"""Every Mosaic TPU kernel lowered for real TPUs (v4, v5e, v5p, v6e) from this CPU, through the
public ops: ``attention`` and its gradient, ``attention_bwd``, ``decode_attention``,
``lightning_attention`` and its gradient, ``impl="pallas_tpu"``.

Interpret mode (``test_flash_tpu.py``, ``test_decode_tpu.py``, ``test_lightning_tpu.py``)
checks the kernels' arithmetic; it never asks Mosaic about them. Here each op is traced under
an abstract TPU mesh (``attnlab.ops.platform()`` reads "tpu": kernels, not interpret mode) and
lowered for TPU, which runs Pallas's Mosaic lowering for that generation: block shapes against
the (8, 128) tiling, every primitive in the kernel bodies, scalar prefetch, memory spaces.
Each module must hold exactly the expected kernels (``tpu_custom_call``, counted by kernel
name), no other custom call (no interpret-mode callbacks) and no ``dot_general`` (all the
attention math is in the kernels: nothing fell back to XLA). Lowering does not compile, so
it is fast; Mosaic's own passes (layouts, VMEM) run only when a TPU compiles the module.

Two grids: the interpret-mode tests' small shapes and tiles, and realistic ones (sequences of
8K-32K, head dims 64 / 128 / 256, bfloat16, causal or not, GQA and MQA) with default configs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnlab import ops
from attnlab.testing import ATTENTION_CASES
from pallas_kernels.tpu.decode import TpuDecodeConfig
from pallas_kernels.tpu.flash import TpuFlashConfig
from pallas_kernels.tpu.lightning_chunk import TpuLightningConfig
from tests.lowering import TPU_KINDS, custom_calls, kernels, lower_for_tpu, tpu_mesh
from tests.ops.decode_base import DECODE_CASES
from tests.ops.lightning_base import LIGHTNING_CASES

KINDS = pytest.mark.parametrize("kind", list(TPU_KINDS.values()), ids=list(TPU_KINDS))
BF16 = jnp.bfloat16

FLASH_FWD = {"attnlab_tpu_flash_fwd": 1}
FLASH_BWD = {"attnlab_tpu_flash_dq": 1, "attnlab_tpu_flash_dkv": 1}
FLASH_GRAD = {**FLASH_FWD, **FLASH_BWD}
DECODE = {"attnlab_tpu_decode_splitk": 1}
LIGHTNING_FWD = {"lightning_tpu_fwd": 1}
LIGHTNING_GRAD = {**LIGHTNING_FWD, "lightning_tpu_bwd": 1}

# The interpret-mode tests' tiles (tests/pallas_kernels/test_*_tpu.py): the small shapes span
# several, ragged, blocks.
FLASH_TEST_CONFIG = TpuFlashConfig(
    block_q=24, block_kv=128, block_q_dq=128, block_kv_dq=128, block_q_dkv=128, block_kv_dkv=24
)
DECODE_TEST_CONFIG = TpuDecodeConfig(block_kv=16, keys_per_split=32)
LIGHTNING_TEST_CONFIG = TpuLightningConfig(chunk=16)
# Cases lowered in bfloat16 too (the interpret tests' bfloat16 and entropy cases); the others
# in float32 only, which keeps the module near a minute on two cores.
FLASH_16BIT_CASES = ("causal_mqa", "segments", "softcap", "all_masked_rows")
LIGHTNING_16BIT_CASES = ("plain_t24", "state_segments")


def sds(*shape: int, dtype: Any = BF16) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def grad_program(fwd: Callable[..., Any], argnums: tuple[int, ...] = (0, 1, 2)
                 ) -> Callable[..., Any]:
    """The gradient of the sum of every output of ``fwd`` in the arguments ``argnums``."""

    def loss(*args):
        return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(fwd(*args)))

    return jax.grad(loss, argnums=argnums)


def assert_lowers(kind: str, fn: Callable[..., Any], args: tuple[Any, ...],
                  expected: dict[str, int]) -> None:
    """``fn(*args)`` lowers for a TPU of ``kind`` to exactly the ``expected`` kernels."""
    text = lower_for_tpu(fn, *args, mesh=tpu_mesh(kind))
    assert kernels(text) == expected
    assert custom_calls(text) == {"tpu_custom_call": sum(expected.values())}
    assert "stablehlo.dot_general" not in text, "an XLA matmul: some attention fell back"


def skip_if_refused(kind: str, qkv: tuple[Any, ...], kwargs: Any,
                    explain: Callable[..., Any] = ops.explain) -> None:
    """Skips a case the TPU kernel refuses (``unsupported``: nothing to lower), with the
    reason; it lowers here once the kernel takes it. ``explain``: the op's."""
    with jax.sharding.use_abstract_mesh(tpu_mesh(kind)):
        why = explain(*qkv, impl_names=("pallas_tpu",), **kwargs)["pallas_tpu"]
    if why is not None:
        pytest.skip(f"pallas_tpu refuses it: {why}")


# ----------------------------------------------------------------------------- the harness


@pytest.mark.parametrize("generation, kind", TPU_KINDS.items(), ids=list(TPU_KINDS))
def test_device_kinds_name_their_generation(generation, kind):
    """Pallas reads the abstract device's kind as that TPU generation (an unknown string
    would raise here rather than lower for some other chip)."""
    with jax.sharding.use_abstract_mesh(tpu_mesh(kind)):
        assert pltpu.get_tpu_info().chip_version == pltpu.ChipVersion[f"TPU_{generation.upper()}"]
        assert ops.platform() == "tpu"


def test_lowering_runs_the_mosaic_checks():
    """The harness is not vacuous: a block shape Mosaic cannot tile fails to lower."""

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    def fn(x):
        spec = pl.BlockSpec((8, 100), lambda i: (0, i))
        return pl.pallas_call(copy, grid=(2,), in_specs=[spec], out_specs=spec,
                              out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        lower_for_tpu(fn, sds(8, 200, dtype=jnp.float32), mesh=tpu_mesh(TPU_KINDS["v5e"]))


@pytest.mark.parametrize("op", ["attention", "decode", "lightning"])
def test_auto_lowers_to_the_kernels_on_tpu(op):
    """impl="auto" under a TPU mesh is the Mosaic kernel (what a TPU user gets by default)."""
    q = sds(1, 1024, 8, 128)
    if op == "attention":
        fn, args, expected = (lambda q, k, v: ops.attention(q, k, v, is_causal=True)), (
            q, sds(1, 1024, 2, 128), sds(1, 1024, 2, 128)), FLASH_FWD
    elif op == "decode":
        kv = sds(2, 4096, 2, 128)
        fn, args, expected = ops.decode_attention, (sds(2, 1, 8, 128), kv, kv), DECODE
    else:
        def fn(q, k, v):
            return ops.lightning_attention(q, k, v, decay=ops.minimax_decay(8, 0, 4))
        args, expected = (q, q, q), LIGHTNING_FWD
    assert_lowers(TPU_KINDS["v5e"], fn, args, expected)


# ----------------------------------------------------------------------------- flash attention


def attention_fwd(**kwargs: Any) -> Callable[..., Any]:
    def fwd(q, k, v):
        return ops.attention(q, k, v, impl="pallas_tpu", return_residuals=True, **kwargs)

    return fwd


@KINDS
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=repr)
def test_attention_test_shapes(case, kind):
    """The shared case grid with the interpret tests' tiles, float32, with its gradient; and
    where the interpret tests run bfloat16 or the entropy, bfloat16 with the entropy."""
    segs = ()
    if case.segments:  # one array when T == S, else a (q, kv) pair, as case_inputs makes
        segs = ((sds(case.b, case.t, dtype=jnp.int32),) if case.t == case.s else
                (sds(case.b, case.t, dtype=jnp.int32), sds(case.b, case.s, dtype=jnp.int32)))
    runs = [(jnp.float32, False)] + [(BF16, True)] * (case.name in FLASH_16BIT_CASES)
    for dtype, entropy in runs:
        args = (sds(case.b, case.t, case.n, case.h, dtype=dtype),
                sds(case.b, case.s, case.kh, case.h, dtype=dtype),
                sds(case.b, case.s, case.vh or case.kh, case.hv or case.h, dtype=dtype), *segs)
        skip_if_refused(kind, args[:3], case.kwargs)

        def fwd(q, k, v, *seg, entropy=entropy):
            kwargs = dict(case.kwargs)
            if seg:
                kwargs["segment_ids"] = seg[0] if len(seg) == 1 else seg
            return attention_fwd(config=FLASH_TEST_CONFIG, return_entropy=entropy,
                                 **kwargs)(q, k, v)

        assert_lowers(kind, grad_program(fwd), args, FLASH_GRAD)


# (B, T, S, N, K, H): GQA 4, MHA at H 64, H 256, MQA at 32K, 1K queries over a 32K cache.
ATTENTION_SHAPES = [
    pytest.param((1, 8192, 8192, 16, 4, 128), id="T8K-N16K4-H128"),
    pytest.param((1, 8192, 8192, 8, 8, 64), id="T8K-N8K8-H64"),
    pytest.param((1, 8192, 8192, 8, 2, 256), id="T8K-N8K2-H256"),
    pytest.param((1, 32768, 32768, 8, 1, 128), id="T32K-N8K1-H128"),
    pytest.param((2, 1024, 32768, 32, 8, 128), id="T1K-S32K-N32K8-H128"),
]


@pytest.mark.slow
@KINDS
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_realistic(shape, causal, kind):
    """Default blocks, bfloat16: the forward alone (inference) and with its gradient."""
    b, t, s, n, kh, h = shape
    args = (sds(b, t, n, h), sds(b, s, kh, h), sds(b, s, kh, h))
    # Queries at the end of the keys, as a prefill chunk over its cache.
    fwd = attention_fwd(is_causal=causal, q_offset=s - t)
    assert_lowers(kind, fwd, args, FLASH_FWD)
    assert_lowers(kind, grad_program(fwd), args, FLASH_GRAD)


@pytest.mark.slow
@KINDS
def test_attention_realistic_masks(kind):
    """16K packed documents, a causal 4K window, soft-cap and entropy, GQA: every optional
    kernel input and output at once."""
    t = 16384
    args = (sds(1, t, 16, 128), sds(1, t, 4, 128), sds(1, t, 4, 128), sds(1, t, dtype=jnp.int32))

    def fwd(q, k, v, seg):
        return attention_fwd(is_causal=True, local_window_size=(4096, 0), segment_ids=seg,
                             logits_soft_cap=50.0, return_entropy=True)(q, k, v)

    assert_lowers(kind, fwd, args, FLASH_FWD)
    assert_lowers(kind, grad_program(fwd), args, FLASH_GRAD)


@pytest.mark.slow
@KINDS
def test_attention_bwd_realistic(kind):
    """attention_bwd (one key block's share, as ring attention calls it): the two backward
    kernels and no forward."""
    t, n, kh, h = 8192, 16, 4, 128
    q, kv = sds(1, t, n, h), sds(1, t, kh, h)
    lse = sds(1, t, n, dtype=jnp.float32)

    def bwd(q, k, v, out, lse, dout, dlse):
        return ops.attention_bwd(q, k, v, out, lse, dout, dlse, impl="pallas_tpu",
                                 is_causal=True)

    assert_lowers(kind, bwd, (q, kv, kv, q, lse, q, lse), FLASH_BWD)


# ----------------------------------------------------------------------------- decode


def decode_fwd(config: Any = None, **kwargs: Any) -> Callable[..., Any]:
    def fwd(q, k, v, lengths):
        return ops.decode_attention(q, k, v, kv_lengths=lengths, impl="pallas_tpu",
                                    config=config, return_residuals=True, **kwargs)

    return fwd


@KINDS
@pytest.mark.parametrize("case", DECODE_CASES, ids=repr)
def test_decode_test_shapes(case, kind):
    """The shared decode cases, float32 with the interpret tests' tiles and bfloat16 with the
    default ones."""
    kwargs = {k: v for k, v in case.kwargs().items() if k != "kv_lengths"}
    for dtype, config in ((jnp.float32, DECODE_TEST_CONFIG), (BF16, None)):
        args = (sds(case.b, case.t, case.n, case.h, dtype=dtype),
                sds(case.b, case.s, case.kh, case.h, dtype=dtype),
                sds(case.b, case.s, case.vh or case.kh, case.hv or case.h, dtype=dtype),
                sds(case.b, dtype=jnp.int32))
        skip_if_refused(kind, args[:3], kwargs, ops.decode.explain)
        assert_lowers(kind, decode_fwd(config, **kwargs), args, DECODE)


# (B, T, S, N, K, H, kwargs): GQA 4 over 32K, speculative T = 8 at H 256, MQA at H 64, a
# windowed soft-capped MHA cache.
DECODE_SHAPES = [
    pytest.param((8, 1, 32768, 32, 8, 128, {}), id="T1-S32K-N32K8-H128"),
    pytest.param((4, 8, 8192, 16, 2, 256, {}), id="T8-S8K-N16K2-H256"),
    pytest.param((8, 1, 16384, 8, 1, 64, {}), id="T1-S16K-N8K1-H64"),
    pytest.param((2, 1, 32768, 8, 8, 128, dict(local_window_size=4096, logits_soft_cap=30.0)),
                 id="T1-S32K-N8K8-H128-window-softcap"),
]


@pytest.mark.slow
@KINDS
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_realistic(shape, kind):
    b, t, s, n, kh, h, kwargs = shape
    args = (sds(b, t, n, h), sds(b, s, kh, h), sds(b, s, kh, h), sds(b, dtype=jnp.int32))
    assert_lowers(kind, decode_fwd(**kwargs), args, DECODE)


def test_decode_h64_gqa_lowers_through_the_padded_cache():
    """H < 128 with K > 1 (a [block_kv, H] tile of the [B, S, K*H] cache is not lane-aligned):
    the wrapper zero-pads the cache to H = 128, so "auto" takes the kernel and it lowers."""
    q, kv = sds(8, 1, 8, 64), sds(8, 16384, 2, 64)
    with jax.sharding.use_abstract_mesh(tpu_mesh(TPU_KINDS["v5e"])):
        assert ops.decode.auto_choice(q, kv, kv) == "pallas_tpu"
    assert_lowers(TPU_KINDS["v5e"], decode_fwd(), (q, kv, kv, sds(8, dtype=jnp.int32)), DECODE)


# ----------------------------------------------------------------------------- lightning


def lightning_fwd(decay: Any, config: Any = None) -> Callable[..., Any]:
    def fwd(q, k, v, h0, seg):
        return ops.lightning_attention(q, k, v, decay=decay, initial_state=h0, segment_ids=seg,
                                       return_state=True, impl="pallas_tpu", config=config)

    return fwd


@KINDS
@pytest.mark.parametrize("case", LIGHTNING_CASES, ids=repr)
def test_lightning_test_shapes(case, kind):
    """The shared lightning cases (states, documents, ragged chunks) with the interpret tests'
    chunk, float32 (and bfloat16 on two): the gradient, whose forward is the kernel with the
    per-chunk states output (the forward alone is lowered at the realistic shapes)."""
    h0 = sds(case.b, case.n, case.h, case.hv, dtype=jnp.float32) if case.initial_state else None
    seg = sds(case.b, case.t, dtype=jnp.int32) if case.segments else None
    fwd = lightning_fwd(case.decay(), LIGHTNING_TEST_CONFIG)
    argnums = (0, 1, 2, 3) if case.initial_state else (0, 1, 2)
    for dtype in (jnp.float32, BF16)[: 1 + (case.name in LIGHTNING_16BIT_CASES)]:
        qk = sds(case.b, case.t, case.n, case.h, dtype=dtype)
        args = (qk, qk, sds(case.b, case.t, case.n, case.hv, dtype=dtype), h0, seg)
        assert_lowers(kind, grad_program(fwd, argnums), args, LIGHTNING_GRAD)


# (B, T, N, H, Hv, with state and documents)
LIGHTNING_SHAPES = [
    pytest.param((1, 8192, 16, 128, 128, False), id="T8K-N16-H128"),
    pytest.param((1, 8192, 8, 64, 64, False), id="T8K-N8-H64"),
    pytest.param((1, 8192, 8, 256, 256, False), id="T8K-N8-H256"),
    pytest.param((1, 8192, 8, 128, 256, False), id="T8K-N8-H128-Hv256"),
    pytest.param((1, 32768, 8, 128, 128, False), id="T32K-N8-H128"),
    pytest.param((2, 16384, 8, 128, 128, True), id="T16K-N8-H128-state-documents"),
]


@pytest.mark.slow
@KINDS
@pytest.mark.parametrize("shape", LIGHTNING_SHAPES)
def test_lightning_realistic(shape, kind):
    b, t, n, h, hv, extras = shape
    q, v = sds(b, t, n, h), sds(b, t, n, hv)
    h0 = sds(b, n, h, hv, dtype=jnp.float32) if extras else None
    seg = sds(b, t, dtype=jnp.int32) if extras else None
    fwd = lightning_fwd(ops.minimax_decay(n, 0, 4))
    assert_lowers(kind, fwd, (q, q, v, h0, seg), LIGHTNING_FWD)
    argnums = (0, 1, 2, 3) if extras else (0, 1, 2)
    assert_lowers(kind, grad_program(fwd, argnums), (q, q, v, h0, seg), LIGHTNING_GRAD)

