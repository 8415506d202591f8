"""One test base for softmax attention: every case that every implementation must pass.

An implementation's test file subclasses :class:`AttentionTestBase` in a few lines (a class
named ``Test...`` that sets ``IMPL`` and, for kernels, a small-tile ``CONFIG``) and adds only
its own kernel-specific tests. The base is not collected itself (no ``Test`` prefix).

Everything goes through the public ``attnlab.ops.attention(..., impl=IMPL)``; values, LSE and
gradients are compared with ``impl="reference"`` using the one tolerance table of
``attnlab.testing``, for the platform the test runs on.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import attention, implementations, platform
from attnlab.testing import ATTENTION_CASES, FAST_COMPILE_CPU, Case, Tolerance, tolerance
from tests.helpers import case_inputs, loss_with_lse, random_qkv, random_segments
from tests.ops.masked_garbage import (
    FILLS,
    SOFTMAX_SCENARIOS,
    check_softmax_garbage,
    garbage_grid,
    softmax_scenario,
)

# Interpreted kernels are big XLA programs whose compile time is mostly backend optimization,
# which is worthless at test sizes.
FAST_COMPILE = FAST_COMPILE_CPU
GRADS = ("dq", "dk", "dv")


def values_and_grads(impl, q, k, v, kwargs, config=None, compiler_options=None, jit=True):
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


def entropy_values_and_grads(impl, q, k, v, kwargs, config=None, compiler_options=None):
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


def assert_lse_close(lse, want, tol: float) -> None:
    """Same -inf rows (rows that see no key), no NaN, finite entries within ``tol``."""
    lse, want = np.asarray(lse, np.float64), np.asarray(want, np.float64)
    assert not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(want))
    np.testing.assert_array_equal(lse[np.isneginf(want)], -np.inf)
    fin = np.isfinite(want)
    np.testing.assert_allclose(lse[fin], want[fin], atol=tol, rtol=0)


def assert_grads_close(grads, want, tol: Tolerance, dtype, names=GRADS) -> None:
    """Each gradient: q's dtype and shape, finite, within the table's absolute + relative."""
    for name, g, r in zip(names, grads, want, strict=True):
        assert g.dtype == dtype and g.shape == r.shape, name
        g32 = np.asarray(g, np.float32)
        assert np.isfinite(g32).all(), f"{name} has NaN/inf"
        np.testing.assert_allclose(
            g32, np.asarray(r, np.float32), atol=tol.get(name), rtol=tol.grad_rtol, err_msg=name
        )


def assert_out_close(out, want, tol: Tolerance, want_lse=None) -> None:
    """Output close to the reference's, finite; exactly 0 on rows that see no key."""
    out32 = np.asarray(out, np.float32)
    assert np.isfinite(out32).all()
    np.testing.assert_allclose(out32, np.asarray(want, np.float32), atol=tol.out, rtol=0)
    if want_lse is not None:
        dead = np.isneginf(np.asarray(want_lse))
        np.testing.assert_array_equal(np.moveaxis(out32, -1, 0)[:, dead], 0.0)


def check_against_reference(impl, q, k, v, kwargs, config=None, compiler_options=None,
                            plat: str = "cpu") -> None:
    """``impl`` vs the reference on (q, k, v, kwargs): out, lse and (dq, dk, dv)."""
    dtype, tol = q.dtype, tolerance(q.dtype, plat)
    out, lse, grads = values_and_grads(impl, q, k, v, kwargs, config, compiler_options)
    ref_out, ref_lse, ref_grads = values_and_grads("reference", q, k, v, kwargs)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert lse.dtype == jnp.float32 and lse.shape == ref_lse.shape
    assert_out_close(out, ref_out, tol, ref_lse)
    assert_lse_close(lse, ref_lse, tol.lse)
    assert_grads_close(grads, ref_grads, tol, dtype)


def check_entropy_against_reference(impl, q, k, v, kwargs, config=None, compiler_options=None,
                                    plat: str = "cpu") -> None:
    """return_entropy: entropy, out, lse and the gradients of a loss weighting all three.

    The entropy is compared with the LSE's tolerance (both are log-scale row statistics)."""
    dtype, tol = q.dtype, tolerance(q.dtype, plat)
    out, lse, ent, grads = entropy_values_and_grads(
        impl, q, k, v, kwargs, config, compiler_options
    )
    ref_out, ref_lse, ref_ent, ref_grads = entropy_values_and_grads(
        "reference", q, k, v, kwargs
    )
    assert ent.dtype == jnp.float32 and ent.shape == ref_ent.shape == lse.shape
    ent = np.asarray(ent)
    assert np.isfinite(ent).all()
    assert (ent >= -1e-4).all()
    np.testing.assert_array_equal(ent[np.isneginf(np.asarray(ref_lse))], 0.0)
    np.testing.assert_allclose(ent, np.asarray(ref_ent), atol=tol.lse, rtol=0)
    assert_out_close(out, ref_out, tol)
    assert_lse_close(lse, ref_lse, tol.lse)
    assert_grads_close(grads, ref_grads, tol, dtype)


def check_fully_masked_rows(impl, key, h: int, config=None, compiler_options=None,
                            dtype=jnp.float32) -> None:
    """Rows that see no key: output 0, LSE -inf, finite zero gradients (partly and wholly)."""
    q, k, v = random_qkv(key, 1, 16, 40, 2, 1, h, dtype)

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def run(q, k, v, q_offset):
        kwargs = dict(is_causal=True, q_offset=q_offset, kv_offset=8)
        return values_and_grads(impl, q, k, v, kwargs, config, jit=False)

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


# The grid cases an interpreted kernel's class leaves to `make test-all` (SLOW_CASES): plain
# full and cross attention, windows, offsets, packed full, head dims 40 and 96.
INTERPRETED_SLOW_CASES = ("full", "mha_cross", "window", "causal_window", "offsets",
                          "segments_full", "head_dim_40", "head_dim_96")


def grid(cases: tuple[Case, ...], dtypes: Mapping[str, tuple[str, ...] | None],
         slow_dtypes: tuple[str, ...] = (), slow_cases: tuple[str, ...] = ()) -> list:
    """pytest params (case, dtype) with ids ``name-dtype``: for each dtype, the named cases
    (None: all of ``cases``); marked ``slow`` in ``slow_dtypes`` and for ``slow_cases``."""
    params = []
    for dtype, names in dtypes.items():
        short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[dtype]
        for case in cases:
            if names is None or case.name in names:
                slow = dtype in slow_dtypes or case.name in slow_cases
                params.append(pytest.param(case, jnp.dtype(dtype), id=f"{case.name}-{short}",
                                           marks=pytest.mark.slow if slow else ()))
    return params


def _qkv(b=1, t=8, s=8, n=4, kh=2, h=16, dtype=jnp.float32):
    return random_qkv(jax.random.key(0), b, t, s, n, kh, h, dtype)


# Argument checks every implementation inherits (they run before the implementation does).
BAD_INPUTS = [
    (lambda q, k, v: (q[0], k, v), {}, ValueError, r"q must have shape \[batch, seq"),
    (lambda q, k, v: (q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2)), {},
     ValueError, "q has 4 heads but k has 3"),
    (lambda q, k, v: (q, k[..., :8], v), {}, ValueError, "q has head_dim 16 but k has 8"),
    (lambda q, k, v: (q, k, v[:, :4]), {}, ValueError, "k and v must have the same number of keys"),
    (lambda q, k, v: (q, k.astype(jnp.bfloat16), v), {}, ValueError, "dtypes must match"),
    (lambda q, k, v: (q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32)), {},
     ValueError, "unsupported dtype int32"),
    (None, dict(impl="flash9000"), ValueError, "unknown impl 'flash9000'"),
    (None, dict(impl="cudnn"), NotImplementedError,
     "needs a CUDA GPU|needs bfloat16 or float16 inputs"),  # float32 inputs, on a GPU
    (None, dict(local_window_size=(-1, 2)), ValueError,
     r"local_window_size must be None, a non-negative int .* got \(-1, 2\)"),
    (None, dict(local_window_size=(1, 2, 3)), ValueError, "local_window_size must be"),
    (None, dict(q_offset=2, q_positions=jnp.arange(8), kv_positions=jnp.arange(8)),
     ValueError, "either q_offset/kv_offset or q_positions"),
    (None, dict(q_positions=jnp.arange(8)), ValueError, "must be given together"),
    (None, dict(q_positions=jnp.arange(7), kv_positions=jnp.arange(8)), ValueError,
     r"q_positions must have shape \(8,\)"),
    (None, dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), ValueError,
     "segment ids must have shapes"),
    (None, dict(segment_ids=jnp.zeros((1, 8), jnp.float32) + 0.5), ValueError,
     "q segment ids must be integers .* got dtype float32; casting would merge documents"),
    (None, dict(bias=jnp.ones((1, 3, 8, 8))), ValueError, "bias must be broadcastable"),
    (None, dict(logits_soft_cap=-1.0), ValueError, "logits_soft_cap must be positive"),
    (None, dict(q_offset=jnp.arange(2)), ValueError, "q_offset must be a scalar"),
]


class ImplTestBase:
    """What every op's test base shares: the implementation under test and how it runs.

    Class attributes a subclass sets:
      IMPL: the ``impl=`` name under test.
      CONFIG: its block config for the grid (small tiles, so the tiny test shapes span
        several).
      INTERPRET: the kernel runs interpreted here (Pallas interpreter or TPU interpret mode),
        so programs are compiled with ``FAST_COMPILE``; False where it is compiled (GPU).
      SLOW_CASES: names of grid cases marked ``slow`` (`make test-all` runs them).
    """

    IMPL: ClassVar[str]
    CONFIG: ClassVar[Any] = None
    INTERPRET: ClassVar[bool] = False
    SLOW_CASES: ClassVar[tuple[str, ...]] = ()  # grid cases run in `make test-all` only

    @property
    def options(self) -> dict[str, Any] | None:
        return FAST_COMPILE if self.INTERPRET else None

    @property
    def plat(self) -> str:
        return platform()

    def tol(self, dtype=jnp.float32) -> Tolerance:
        """The tolerance table's row for ``dtype`` on this platform."""
        return tolerance(dtype, self.plat)


class AttentionTestBase(ImplTestBase):
    """Every shared attention case, for the implementation named by ``IMPL``.

    Class attributes a subclass sets, besides those of :class:`ImplTestBase`:
      CASES: the case grid (``attnlab.testing.ATTENTION_CASES`` or a grid of larger shapes).
      DTYPES: dtype name -> names of the cases run in that dtype (None: all of ``CASES``);
        interpreted kernels run the 16-bit dtypes on a few cases only.
      ENTROPY: the same for ``return_entropy``.
      SUPPORTS_BIAS: values and gradients with a logits bias; else it must refuse a bias.
      HEAD_DIM: head dim of the tests outside the grid (one the implementation supports).
      DTYPE: input dtype of the tests outside the grid (float32; an implementation that
        takes 16-bit inputs only, such as pallas_mosaic_gpu, sets bfloat16).
    """

    CASES: ClassVar[tuple[Case, ...]] = ATTENTION_CASES
    DTYPES: ClassVar[Mapping[str, tuple[str, ...] | None]] = {"float32": None, "bfloat16": None}
    ENTROPY: ClassVar[Mapping[str, tuple[str, ...] | None]] = {"float32": None}
    SLOW_DTYPES: ClassVar[tuple[str, ...]] = ()  # their grid cases run in `make test-all`
    SUPPORTS_BIAS: ClassVar[bool] = False
    HEAD_DIM: ClassVar[int] = 16
    DTYPE: ClassVar[Any] = jnp.float32

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrizes ``case, dtype`` from this class's grid (the entropy test from its own)."""
        if {"case", "dtype"} <= set(metafunc.fixturenames):
            dtypes = self.ENTROPY if "entropy" in metafunc.function.__name__ else self.DTYPES
            metafunc.parametrize("case, dtype",
                                 grid(self.CASES, dtypes, self.SLOW_DTYPES, self.SLOW_CASES))

    # --------------------------------------------------------------------------- the grid

    def test_matches_reference(self, case, dtype, key):
        """Values, LSE and gradients of ``loss_with_lse`` against the reference."""
        q, k, v, kwargs = case_inputs(case, key, dtype)
        check_against_reference(self.IMPL, q, k, v, kwargs, self.CONFIG, self.options,
                                self.plat)

    def test_entropy_matches_reference(self, case, dtype, key):
        """return_entropy: values and gradients of a loss weighting out, lse and entropy."""
        q, k, v, kwargs = case_inputs(case, key, dtype)
        check_entropy_against_reference(self.IMPL, q, k, v, kwargs, self.CONFIG, self.options,
                                        self.plat)

    # --------------------------------------------------------------------------- behaviour

    def test_default_config_short_ragged_sequences(self, key):
        """No config: default tiles fit short, ragged sequences (one tile each, padded)."""
        q, k, v = random_qkv(key, 1, 20, 50, 4, 2, self.HEAD_DIM, self.DTYPE)
        kwargs = dict(is_causal=True, q_offset=30, local_window_size=(40, None))
        check_against_reference(self.IMPL, q, k, v, kwargs, None, self.options, self.plat)

    def test_fully_masked_rows_are_zero_and_finite(self, key):
        check_fully_masked_rows(self.IMPL, key, self.HEAD_DIM, self.CONFIG, self.options,
                                self.DTYPE)

    def test_jit_vmap_grad_traced_offsets(self, key):
        """vmap over an extra leading axis, through the custom VJP, with a traced q_offset."""
        k1, k2 = jax.random.split(key)
        q, k, v = random_qkv(k1, 2, 24, 40, 4, 2, self.HEAD_DIM, self.DTYPE)
        qs, ks, vs = (jnp.stack([x, jax.random.normal(k2, x.shape, x.dtype)]) for x in (q, k, v))

        def run(impl, **extra):
            def fn(q, k, v, off):
                def one(q, k, v):
                    return attention(q, k, v, is_causal=True, q_offset=off,
                                     local_window_size=(9, 5), impl=impl, **extra)

                out = jax.vmap(one)(q, k, v)
                return jnp.sum(jnp.sin(out)), out

            return jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)

        got_fn = jax.jit(run(self.IMPL, config=self.CONFIG), compiler_options=self.options)
        want_fn = jax.jit(run("reference"))
        tol = self.tol(self.DTYPE)
        for off in (0, 21, 100):
            (_, out), grads = got_fn(qs, ks, vs, off)
            (_, want), want_grads = want_fn(qs, ks, vs, off)
            assert_out_close(out, want, tol)
            assert_grads_close(grads, want_grads, tol, self.DTYPE)

    def test_position_arrays_equal_offsets(self, key):
        """Global positions give exact masks for any layout: position arrays equal offsets,
        and permuting keys with their positions (striped / zigzag sharding) changes nothing,
        with segments, a window and a soft-cap; values, LSE and gradients."""
        k1, k2, k3, k4 = jax.random.split(key, 4)
        q, k, v = random_qkv(k1, 1, 24, 48, 2, 1, self.HEAD_DIM, self.DTYPE)
        perm = jax.random.permutation(k2, 48)
        seg = random_segments(k3, 1, 48, 3)
        w = jax.random.normal(k4, (1, 24, 2, self.HEAD_DIM))
        common = dict(is_causal=True, local_window_size=(30, None), logits_soft_cap=4.0,
                      scale=0.25, return_residuals=True)
        q_pos = 24 + jnp.arange(24, dtype=jnp.int32)
        kv_pos = jnp.arange(48, dtype=jnp.int32)

        def loss(impl, extra, **kw):
            def fn(q, k, v):
                out, lse = attention(q, k, v, impl=impl, **common, **extra, **kw)
                lse_part = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
                return jnp.sum(out.astype(jnp.float32) * w) + lse_part, (out, lse)

            return jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)

        extra = {} if self.CONFIG is None else {"config": self.CONFIG}
        by_offset = loss(self.IMPL, extra, q_offset=24, segment_ids=(seg[:, 24:], seg))
        by_position = loss(self.IMPL, extra, q_positions=q_pos, kv_positions=kv_pos[perm],
                           segment_ids=(seg[:, 24:], seg[:, perm]))

        @functools.partial(jax.jit, compiler_options=self.options)
        def run(q, k, v):
            return by_offset(q, k, v), by_position(q, k[:, perm], v[:, perm])

        got_offset, got_position = run(q, k, v)
        (_, (want, want_lse)), want_grads = jax.jit(
            loss("reference", {}, q_offset=24, segment_ids=(seg[:, 24:], seg))
        )(q, k, v)
        tol = self.tol(self.DTYPE)
        for (_, (out, lse)), grads, unperm in (
            (*got_offset, lambda g: g),
            (*got_position, lambda g: jnp.zeros_like(g).at[:, perm].set(g)),
        ):
            assert_out_close(out, want, tol, want_lse)
            assert_lse_close(lse, want_lse, tol.lse)
            dq, dk, dv = grads
            assert_grads_close((dq, unperm(dk), unperm(dv)), want_grads, tol, self.DTYPE)

    def test_bias(self, key):
        """A logits bias of every broadcast shape (values and gradients, dbias included), or a
        refusal that names the implementation."""
        k1, k2 = jax.random.split(key)
        q, k, v = random_qkv(k1, 2, 20, 36, 4, 2, self.HEAD_DIM, self.DTYPE)
        if not self.SUPPORTS_BIAS:
            with pytest.raises(NotImplementedError, match=f"{self.IMPL}.*bias"):
                attention(q, k, v, bias=jax.random.normal(k2, (2, 4, 20, 36)), impl=self.IMPL)
            return
        for bias_shape in [(2, 4, 20, 36), (1, 1, 20, 36), (2, 1, 1, 36), (1, 4, 20, 1)]:
            bias = jax.random.normal(k2, bias_shape)

            def loss(impl, q, k, v, bias, config=None):
                out = attention(q, k, v, bias=bias, is_causal=True, impl=impl, config=config)
                return jnp.sum(out * jnp.sin(out))

            g = jax.jit(jax.grad(functools.partial(loss, self.IMPL, config=self.CONFIG),
                                 argnums=(0, 1, 2, 3)),
                        compiler_options=self.options)(q, k, v, bias)
            r = jax.grad(functools.partial(loss, "reference"), argnums=(0, 1, 2, 3))(
                q, k, v, bias)
            for a_, b_, name in zip(g, r, ("dq", "dk", "dv", "dbias")):
                assert a_.shape == b_.shape, name
                np.testing.assert_allclose(a_, b_, atol=1e-4, err_msg=f"{name} {bias_shape}")

    @pytest.mark.parametrize("scenario, fill, dtype",
                             garbage_grid(SOFTMAX_SCENARIOS, "segments_padding"))
    def test_masked_garbage_never_reaches_a_row(self, scenario, fill, dtype, key):
        """NaN or +inf in queries, keys, values and cotangents where rows cannot see (every
        kind of mask): the other rows' out, LSE, entropy and gradients are finite and equal
        those with zeros there (tests/ops/masked_garbage.py)."""
        if scenario == "bias_minus_inf" and not self.SUPPORTS_BIAS:
            pytest.skip(f"{self.IMPL} takes no bias")
        entropy = implementations()[self.IMPL].returns_entropy
        extra = {} if self.CONFIG is None else {"config": self.CONFIG}

        def fn(q, k, v, **kw):
            return attention(q, k, v, impl=self.IMPL, return_residuals=True,
                             return_entropy=entropy, **extra, **kw)

        check_softmax_garbage(fn, softmax_scenario(scenario, key, self.HEAD_DIM, dtype),
                              FILLS[fill], entropy=entropy, compiler_options=self.options,
                              plat=self.plat)

    # --------------------------------------------------------------------------- bad inputs

    @pytest.mark.parametrize("mutate, kwargs, exc, match", BAD_INPUTS)
    def test_bad_inputs(self, mutate, kwargs, exc, match):
        q, k, v = _qkv()
        if mutate is not None:
            q, k, v = mutate(q, k, v)
        with pytest.raises(exc, match=match):
            attention(q, k, v, **{"impl": self.IMPL, **kwargs})

    def test_single_segment_array_needs_equal_lengths(self):
        q, k, v = _qkv(t=8, s=12)
        with pytest.raises(ValueError, match="a single segment_ids array needs T == S"):
            attention(q, k, v, segment_ids=jnp.zeros((1, 8), jnp.int32), impl=self.IMPL)
