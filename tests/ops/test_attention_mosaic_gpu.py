"""``impl="pallas_mosaic_gpu"`` (the Pallas Mosaic GPU forward for Hopper, Triton backward): the
shared cases of ``tests/ops/attention_base.py`` in JAX's Mosaic GPU interpreter on CPU, the
same compiled on an H100 (``gpu``), lowering for CUDA from CPU, and the refusals.

The interpreter runs every warpgroup of every block as a thread and every SMEM/GMEM access,
TMA copy, barrier and wgmma as a host callback: about a second per block here, so the
interpreted grid is a few bfloat16 and float16 cases with one compute warpgroup (64 queries,
64 keys per step); the rest of the grid runs compiled in ``TestPallasMosaicGpuCompiled``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import MaskSpec, attention, auto_choice, explain
from attnlab.testing import ATTENTION_CASES, Case
from pallas_kernels.gpu.flash_common import FlashConfig
from pallas_kernels.gpu.mgpu_common import MosaicFlashConfig, interpret_params
from pallas_kernels.gpu.mgpu_flash_fwd import mgpu_flash_attention_fwd
from tests.helpers import random_qkv
from tests.lowering import h100_mesh
from tests.ops.attention_base import AttentionTestBase, assert_lse_close
from tests.ops.masked_garbage import FILLS, check_softmax_garbage, softmax_scenario

IMPL = "pallas_mosaic_gpu"
ONE_WG = MosaicFlashConfig(compute_wgs=1)


class MosaicGpuTestBase(AttentionTestBase):
    """The shared base for the 16-bit-only, entropy-free Mosaic GPU implementation."""

    IMPL = IMPL
    DTYPE = jnp.bfloat16

    def test_entropy_matches_reference(self, key):
        """No entropy output: a named call says so (``"auto"`` never picks it anyway)."""
        q, k, v = random_qkv(key, 1, 16, 16, 2, 1, 64, jnp.bfloat16)
        with pytest.raises(NotImplementedError, match="does not compute the attention entropy"):
            attention(q, k, v, return_entropy=True, impl=IMPL)

    # Interpreted, each scenario takes ~25 s (twice the forward, the Triton backward, the
    # reference): one runs on CPU, both run compiled on a GPU.
    @pytest.mark.parametrize("scenario", ["segments_padding",
                                          pytest.param("causal_future", marks=pytest.mark.gpu)])
    def test_masked_garbage_never_reaches_a_row(self, scenario, key):
        """NaN planted where rows cannot see (bfloat16: the kernel takes no float32)."""
        extra = {} if self.CONFIG is None else {"config": self.CONFIG}

        def fn(q, k, v, **kw):
            return attention(q, k, v, impl=IMPL, return_residuals=True, **extra, **kw)

        check_softmax_garbage(fn, softmax_scenario(scenario, key, self.HEAD_DIM, jnp.bfloat16),
                              FILLS["nan"], entropy=False, compiler_options=self.options,
                              plat=self.plat)


class TestPallasMosaicGpuInterpreted(MosaicGpuTestBase):
    """The shared grid in the Mosaic GPU interpreter, on the cases that cross key tiles,
    pad head dims, share heads and see no key; one compute warpgroup per block."""

    CONFIG = ONE_WG
    INTERPRET = True
    # ~20-30 s each interpreted (forward, Triton backward, reference); every other case (and
    # these) runs compiled in TestPallasMosaicGpuCompiled.
    DTYPES = {"bfloat16": ("segments", "all_masked_rows"), "float16": ("offsets",)}
    SLOW_DTYPES = ("float16",)

    @pytest.mark.gpu
    def test_jit_vmap_grad_traced_offsets(self, key):
        """Marked gpu: interpreted it takes ~70 s on two CPU cores (2 x 2 x 4 blocks, three
        offsets); it passed interpreted when the kernel was written, and runs compiled in
        TestPallasMosaicGpuCompiled."""
        super().test_jit_vmap_grad_traced_offsets(key)


@pytest.mark.slow
class TestPallasMosaicGpuOverlapInterpreted(MosaicGpuTestBase):
    """The next tile's logits issued before this tile's softmax (``overlap=True``), on the
    case whose blocks see no key (the pipeline then walks one fully masked tile)."""

    CONFIG = MosaicFlashConfig(compute_wgs=1, overlap=True)
    INTERPRET = True
    DTYPES = {"bfloat16": ("all_masked_rows",)}
    test_masked_garbage_never_reaches_a_row = None
    test_jit_vmap_grad_traced_offsets = TestPallasMosaicGpuInterpreted.test_jit_vmap_grad_traced_offsets
    # Runs without a config, so the same call as TestPallasMosaicGpuInterpreted's.
    test_default_config_short_ragged_sequences = None


@pytest.mark.slow
class TestPallasMosaicGpuBackwardInterpreted(MosaicGpuTestBase):
    """The gradients from the Mosaic GPU backward (``mosaic_backward=True``): GQA with
    rows that see no key, and packed documents with padding under the forward's NaN-free
    contract (the planted-NaN scenario)."""

    CONFIG = MosaicFlashConfig(compute_wgs=1, mosaic_backward=True)
    INTERPRET = True
    # Segments and soft-cap: test_backward_two_warpgroups_window_softcap_segments below.
    DTYPES = {"bfloat16": ("all_masked_rows",)}
    test_jit_vmap_grad_traced_offsets = TestPallasMosaicGpuInterpreted.test_jit_vmap_grad_traced_offsets
    # Runs without a config, so the same call as TestPallasMosaicGpuInterpreted's.
    test_default_config_short_ragged_sequences = None


@pytest.mark.slow
def test_backward_two_warpgroups_window_softcap_segments(key):
    """The Mosaic GPU backward with two compute warpgroups, a three-slot ring, a two-sided
    window, soft-cap, packed documents and a query offset, against the reference's VJP."""
    from attnlab.ops.attention import SegmentIds

    q, k, v = random_qkv(key, 1, 70, 90, 4, 2, 96, jnp.bfloat16)
    seg = jnp.asarray(np.sort(np.random.RandomState(0).randint(0, 3, (1, 90)), -1), jnp.int32)
    kw = dict(local_window_size=(30, 8), logits_soft_cap=5.0, q_offset=20,
              segment_ids=SegmentIds(seg[:, 20:], seg))
    dout = jax.random.normal(jax.random.fold_in(key, 1), (1, 70, 4, 96), jnp.float32)

    def grads(impl, config=None, dtype=jnp.bfloat16):
        def loss(q, k, v):
            out = attention(q, k, v, impl=impl, config=config, **kw)
            return jnp.sum(out.astype(jnp.float32) * dout)
        return jax.grad(loss, argnums=(0, 1, 2))(*(x.astype(dtype) for x in (q, k, v)))

    got = grads(IMPL, MosaicFlashConfig(mosaic_backward=True, max_concurrent_steps=3))
    want = grads("reference", dtype=jnp.float32)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=6e-2, rtol=5e-2,
                                   err_msg=name)


def test_backward_refuses_what_it_cannot_take():
    """Head dims over 128 and separate key/value head counts: the kernel says so (the op
    then runs the Triton backward)."""
    from pallas_kernels.gpu.mgpu_flash_bwd import mgpu_flash_attention_bwd, unsupported_reason

    q, k, v = random_qkv(jax.random.key(0), 1, 16, 16, 2, 2, 192, jnp.bfloat16)
    assert unsupported_reason(q, k, v) == "head dims over 128"
    assert unsupported_reason(q[..., :64], k[..., :64], v[:, :, :1, :64]) == (
        "separate key and value head counts")
    pos = np.arange(16, dtype=np.int32)
    with pytest.raises(ValueError, match="does not take head dims over 128; use the Triton"):
        mgpu_flash_attention_bwd(q, k, v, q, jnp.zeros((1, 16, 2)), q, jnp.zeros((1, 16, 2)),
                                 pos, pos, spec=MaskSpec(), scale=0.1)


def test_backward_lowers_for_hopper():
    """With ``mosaic_backward`` the gradient program holds three Mosaic GPU kernels (forward,
    dQ, dK/dV) and no Triton backward; the forward here with K through transposed views and
    the overlapped logits."""
    q = jax.ShapeDtypeStruct((2, 1000, 8, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16)
    cfg = MosaicFlashConfig(mosaic_backward=True, k_view=True, overlap=True)

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, impl=IMPL, config=cfg, is_causal=True,
                                 logits_soft_cap=20.0).astype(jnp.float32))

    with jax.sharding.use_abstract_mesh(h100_mesh()):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu_v2(") == 3
    for name in ("mgpu_flash_attention_bwd_dq", "mgpu_flash_attention_bwd_dkv"):
        assert name in text, name
    assert "flash_attention_bwd_dq\"" not in text


@pytest.mark.parametrize("cfg", [
    MosaicFlashConfig(),
    MosaicFlashConfig(block_kv=128),
    pytest.param(MosaicFlashConfig(pingpong=True), marks=pytest.mark.slow),
    pytest.param(MosaicFlashConfig(compute_wgs=1, max_concurrent_steps=3),
                 marks=pytest.mark.slow),
    pytest.param(MosaicFlashConfig(overlap=True, max_concurrent_steps=3),
                 marks=pytest.mark.slow),
], ids=["default", "block_kv_128", "pingpong", "one_wg_three_slots", "overlap"])
def test_two_compute_warpgroups_and_deep_pipeline(cfg, key):
    """The default shape (two consumer warpgroups sharing one producer), 128-key tiles, and
    (in `make test-all`) the warpgroups taking turns on the tensor cores, one warpgroup with a
    3-slot ring over more key tiles than slots and the overlapped logits, with a causal window
    and GQA: out and LSE."""
    q, k, v = random_qkv(key, 1, 40, 256, 2, 1, 64, jnp.bfloat16)
    kw = dict(is_causal=True, q_offset=200, local_window_size=(220, None),
              return_residuals=True)
    want, want_lse = attention(q, k, v, impl="reference", **kw)
    out, lse = jax.jit(lambda q, k, v: attention(q, k, v, impl=IMPL, config=cfg, **kw))(q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                               atol=3e-2, rtol=0)
    assert_lse_close(lse, want_lse, 2e-2)


@pytest.mark.gpu
class TestPallasMosaicGpuCompiled(MosaicGpuTestBase):
    """Every case of the grid compiled by Mosaic GPU on an H100, and realistic shapes."""

    HEAD_DIM = 64
    CASES = ATTENTION_CASES + tuple(
        Case(f"gqa_h{h}_t{t}_{'causal' if c else 'full'}", b=2, t=t, s=t, n=8, kh=2, h=h,
             kwargs={"is_causal": c})
        for h in (64, 128, 256) for t in (1024, 1000) for c in (True, False)
    )
    DTYPES = {"bfloat16": None, "float16": None}


@pytest.mark.gpu
class TestPallasMosaicGpuPingPongCompiled(TestPallasMosaicGpuCompiled):
    """The grid compiled with the two compute warpgroups taking turns on the tensor cores
    (``pingpong=True``; off by default: 5-17 % slower than without it on an H100,
    ``experiments/results/mosaic_sweep_h100_2026-12-07*.json``), bfloat16. Head dim 256 is
    left out: two compute warpgroups do not fit its tiles in shared memory (such a config
    raises: :func:`test_config_defaults_fit_shared_memory`)."""

    CONFIG = MosaicFlashConfig(pingpong=True)
    CASES = tuple(c for c in TestPallasMosaicGpuCompiled.CASES if c.h <= 128)
    DTYPES = {"bfloat16": None}


@pytest.mark.gpu
class TestPallasMosaicGpuOverlapCompiled(TestPallasMosaicGpuCompiled):
    """The grid compiled with each warpgroup's next ``Q K^T`` issued before its softmax
    (``overlap=True``), K read through transposed SMEM views and approximate math,
    bfloat16."""

    CONFIG = MosaicFlashConfig(overlap=True, approx_math=True, k_view=True)
    DTYPES = {"bfloat16": None}


@pytest.mark.gpu
class TestPallasMosaicGpuBackwardCompiled(TestPallasMosaicGpuCompiled):
    """The grid's gradients from the Mosaic GPU backward (``mosaic_backward=True``; head dims
    over 128 and separate key/value head counts fall back to the Triton backward), bfloat16."""

    CONFIG = MosaicFlashConfig(mosaic_backward=True)
    DTYPES = {"bfloat16": None}


@pytest.mark.gpu
class TestPallasMosaicGpuWideTilesCompiled(TestPallasMosaicGpuCompiled):
    """The grid compiled with 128-key tiles and approximate math (the shape of JAX's own Mosaic
    GPU attention), bfloat16; head dim 256 left out (its tiles do not fit)."""

    CONFIG = MosaicFlashConfig(block_kv=128, approx_math=True)
    CASES = tuple(c for c in TestPallasMosaicGpuCompiled.CASES if c.h <= 128)
    DTYPES = {"bfloat16": None}


@pytest.mark.gpu
class TestPallasMosaicGpuPInSmemCompiled(TestPallasMosaicGpuCompiled):
    """The grid compiled with P staged in SMEM (``p_in_registers=False``, the path the CPU
    interpreter runs), bfloat16."""

    CONFIG = MosaicFlashConfig(p_in_registers=False)
    DTYPES = {"bfloat16": None}


# ----------------------------------------------------------------------------- lowering


@pytest.mark.parametrize(
    "dtype, h, hv, n, kh, t, kwargs",
    [
        (jnp.bfloat16, 128, 128, 8, 2, 1000, dict(is_causal=True)),
        (jnp.float16, 64, 64, 4, 4, 600, dict(local_window_size=(64, 32), logits_soft_cap=30.0,
                                              segment_ids=True)),
        (jnp.bfloat16, 256, 256, 4, 1, 300, dict(is_causal=True, q_offset=100)),
        (jnp.bfloat16, 192, 128, 2, 2, 256, dict(is_causal=True)),
        (jnp.bfloat16, 128, 128, 8, 2, 1000, dict(
            is_causal=True, config=MosaicFlashConfig(block_kv=128, pingpong=True,
                                                     approx_math=True))),
    ],
    ids=["bf16-h128-gqa-causal", "f16-h64-window-softcap-segments", "bf16-h256-mqa-offset",
         "bf16-mla-192-128", "bf16-h128-wide-tiles-pingpong"],
)
def test_lowers_for_hopper(dtype, h, hv, n, kh, t, kwargs, key):
    """Under an abstract H100 mesh the op dispatches to the Mosaic GPU kernel with the
    interpreter off, and forward (Mosaic GPU) and backward (Triton) lower for CUDA from CPU:
    Pallas's Mosaic GPU lowering (TMA, barriers, wgmma operand swizzles, register layouts)
    accepts the kernel. PTX is made when a GPU compiles the module, not here."""
    kwargs = dict(kwargs)
    if kwargs.pop("segment_ids", False):
        kwargs["segment_ids"] = jnp.sort(jax.random.randint(key, (2, t), 0, 5), axis=-1)
    q = jax.ShapeDtypeStruct((2, t, n, h), dtype)
    k = jax.ShapeDtypeStruct((2, t, kh, h), dtype)
    v = jax.ShapeDtypeStruct((2, t, kh, hv), dtype)

    def loss(q, k, v):
        out, lse = attention(q, k, v, impl=IMPL, return_residuals=True, **kwargs)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

    with jax.sharding.use_abstract_mesh(h100_mesh()):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu_v2(") == 1
    assert "mgpu_flash_attention_fwd" in text
    for name in ("flash_attention_bwd_dq", "flash_attention_bwd_dkv"):
        assert f'name = "{name}"' in text, name


# ----------------------------------------------------------------------------- refusals


def _shapes(h=64, dtype=jnp.bfloat16, hv=None, t=128):
    return (
        jax.ShapeDtypeStruct((1, t, 4, h), dtype),
        jax.ShapeDtypeStruct((1, t, 2, h), dtype),
        jax.ShapeDtypeStruct((1, t, 2, hv or h), dtype),
    )


@pytest.mark.parametrize("h, hv", [(16, 16), (64, 64), (80, 80), (128, 128), (192, 128),
                                   (256, 256), (64, 200)])
def test_supported_head_dims(h, hv):
    """Any head dims up to 256 (padded inside to a multiple of 64), on CPU and on an H100."""
    assert explain(*_shapes(h, hv=hv), impl_names=(IMPL,))[IMPL] is None
    with jax.sharding.use_abstract_mesh(h100_mesh()):
        assert explain(*_shapes(h, hv=hv), impl_names=(IMPL,))[IMPL] is None


@pytest.mark.parametrize(
    "shape_kw, kwargs, match",
    [
        (dict(dtype=jnp.float32), {}, "takes bfloat16 or float16 inputs, got float32: wgmma "
         "multiplies float32 inputs as TF32"),
        (dict(h=512), {}, "head dims up to 256, got q/k 512 and v 512"),
        (dict(h=64, hv=320), {}, "head dims up to 256, got q/k 64 and v 320"),
        ({}, dict(bias=jnp.zeros((1, 4, 128, 128))), "pallas_mosaic_gpu takes no bias"),
        ({}, dict(return_entropy=True), "does not compute the attention entropy"),
        ({}, dict(config=FlashConfig()),
         "config must be a MosaicFlashConfig for pallas_mosaic_gpu, got FlashConfig"),
    ],
)
def test_unsupported_calls_say_why(shape_kw, kwargs, match):
    why = explain(*_shapes(**shape_kw), impl_names=(IMPL,), **kwargs)[IMPL]
    assert why is not None and re.search(match, why), why
    q, k, v = (jnp.zeros(s.shape, s.dtype) for s in _shapes(**shape_kw))
    with pytest.raises(NotImplementedError, match=match):
        attention(q, k, v, impl=IMPL, **kwargs)


@pytest.mark.parametrize("kind", ["NVIDIA A100-SXM4-80GB", "NVIDIA L4"])
def test_refuses_gpus_before_hopper(kind):
    with jax.sharding.use_abstract_mesh(h100_mesh(kind)):
        why = explain(*_shapes(), impl_names=(IMPL,))[IMPL]
    assert why == (f"pallas_mosaic_gpu needs a Hopper GPU (sm_90: wgmma, TMA), got {kind}; "
                   "use impl='pallas_triton'")


def test_auto_never_picks_it():
    """No H100 timings exist: "auto" keeps choosing cuDNN / Triton / XLA on a GPU and CPU."""
    bf16 = _shapes(128)
    with jax.sharding.use_abstract_mesh(h100_mesh()):
        assert auto_choice(*bf16, is_causal=True) == "cudnn"
        assert auto_choice(*bf16, is_causal=True, return_residuals=True) == "pallas_triton"
    assert auto_choice(*bf16, is_causal=True) == "xla"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_kv=32), r"block_kv must be .*multiple of 64.* \(the K\^T tile must share"),
        (dict(block_kv=100), "block_kv must be"),
        (dict(compute_wgs=3), "compute_wgs must be"),
        (dict(max_concurrent_steps=1), "max_concurrent_steps must be"),
        (dict(pingpong=1), "pingpong must be a bool, got 1"),
        (dict(p_in_registers="yes"), "p_in_registers must be a bool"),
        (dict(overlap=0), "overlap must be a bool"),
        (dict(pingpong=True, overlap=True), "pingpong and overlap are two schedules"),
        (dict(mosaic_backward=1), "mosaic_backward must be a bool"),
        (dict(k_view="no"), "k_view must be a bool"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MosaicFlashConfig(**kwargs)


def test_config_defaults_fit_shared_memory():
    for h in (64, 128, 192, 256):
        cfg = MosaicFlashConfig.get_default(head_dim=h)
        cfg.check_fits(h, h)
    with pytest.raises(ValueError, match="KiB of shared memory at head dims 256/256"):
        MosaicFlashConfig(block_kv=128, compute_wgs=2, max_concurrent_steps=3).check_fits(256, 256)
    # P kept in registers frees each compute warpgroup's [64, block_kv] bf16 SMEM tile.
    regs, smem = MosaicFlashConfig(), MosaicFlashConfig(p_in_registers=False)
    assert smem.smem_bytes(128, 128) - regs.smem_bytes(128, 128) == 2 * 64 * 64 * 2


def test_kernel_wrapper_rejects_bad_inputs():
    q, k, v = random_qkv(jax.random.key(0), 1, 16, 16, 4, 2, 64, jnp.bfloat16)
    pos = np.arange(16, dtype=np.int32)
    common = dict(spec=MaskSpec(), scale=0.125, interpret=interpret_params())
    with pytest.raises(ValueError, match="takes bfloat16 or float16, not float32: wgmma"):
        mgpu_flash_attention_fwd(*(x.astype(jnp.float32) for x in (q, k, v)), pos, pos, **common)
    with pytest.raises(ValueError, match=r"kv_positions \(16,\)"):
        mgpu_flash_attention_fwd(q, k, v, pos, pos[:8], **common)
    with pytest.raises(ValueError, match="head dims must be at most 256"):
        mgpu_flash_attention_fwd(q, k, jnp.zeros((1, 16, 2, 320), jnp.bfloat16), pos, pos,
                                 **common)
    with pytest.raises(ValueError, match="config must be a MosaicFlashConfig"):
        mgpu_flash_attention_fwd(q, k, v, pos, pos, config=object(), **common)


def test_cases_script_counts_the_pairs_each_mask_keeps():
    """``scripts/mosaic_cases.py`` (timed on an H100 by ``gpu_check.sh mosaic-cases``) counts
    TFLOP/s over the (query, key) pairs its masks keep."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "mosaic_cases.py"
    spec = importlib.util.spec_from_file_location("mosaic_cases", path)
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    assert mc.kept_pairs(8, None, 1) == 36  # causal: 1 + 2 + ... + 8
    assert mc.kept_pairs(8, 2, 1) == 1 + 2 + 3 * 6  # a window of 2 keys back
    assert mc.kept_pairs(8, None, 2) == 2 * 10  # two documents of 4, each causal
    names = [c["name"] for c in mc.cases(32768, 16)]
    assert names == ["gqa", "window", "segments", "soft_cap"]
    assert mc.cases(32768, 16)[1]["kw"]["local_window_size"] == (4096, 0)
