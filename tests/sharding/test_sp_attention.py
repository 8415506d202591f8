"""Sequence-parallel attention equals single-device reference attention (values, gradients).

A sampled grid: every strategy sees every mask kind (causal + packed documents, sliding
window, full + soft-cap) and the meshes (8,), (2, 4) data x sp and (4, 2) sp x tensor;
everything is jit-compiled and differentiated through; GQA everywhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from attnlab.ops import reference
from sharding.api import attention
from sharding.layouts import permute, unpermute
from sharding.ring import ring_attention
from tests.helpers import (
    assert_bf16_value_and_grads_close,
    check_sp_collectives,
    fwd_tol,
    grad_tol,
    random_qkv,
    random_segments,
)

MESHES = {
    "sp8": ((8,), ("sp",), {}),
    "data2_sp4": ((2, 4), ("data", "sp"), {"batch_axis": "data"}),
    "sp4_tp2": ((4, 2), ("sp", "tp"), {"head_axis": "tp"}),
    # replicated over "data", and shard_map without vma types (as with Pallas kernels)
    "data2rep_sp4": ((2, 4), ("data", "sp"), {"check_vma": False}),
}
MASKS = {
    "causal_segments": dict(is_causal=True, segments=3),
    "window": dict(local_window_size=(9, 4)),
    "full_softcap": dict(logits_soft_cap=2.0),
}
# (strategy, mask, mesh): each strategy x each mask once, meshes rotated.
GRID = [
    ("ring", "causal_segments", "sp8"),
    ("ring", "window", "data2rep_sp4"),
    ("ring", "full_softcap", "sp4_tp2"),
    ("striped", "causal_segments", "data2_sp4"),
    ("striped", "window", "sp4_tp2"),
    ("striped", "full_softcap", "sp8"),
    ("zigzag", "causal_segments", "sp4_tp2"),
    ("zigzag", "window", "sp8"),
    ("zigzag", "full_softcap", "data2_sp4"),
    ("ulysses", "causal_segments", "data2_sp4"),
    ("ulysses", "window", "sp8"),
    ("ulysses", "full_softcap", "sp4_tp2"),
]


def _mesh(name, axis_type=AxisType.Explicit):
    shape, names, extra = MESHES[name]
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape)), extra


def _inputs(key, mask, b=2, s=64, n=8, kh=2, h=16, hv=None, vh=None):
    k1, k2, k3 = jax.random.split(key, 3)
    q, k, v = random_qkv(k1, b, s, s, n, kh, h, hv=hv, vh=vh)
    kwargs = dict(MASKS[mask])
    segments = kwargs.pop("segments", 0)
    if segments:  # sorted random ids: documents cross shard boundaries
        kwargs["segment_ids"] = random_segments(k2, b, s, segments)
    w = jax.random.normal(k3, (*q.shape[:3], v.shape[-1]))
    return q, k, v, w, kwargs


def _check(got, want):
    (out, grads), (want_out, want_grads) = got, want
    np.testing.assert_allclose(out, want_out, atol=fwd_tol(jnp.float32))
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        np.testing.assert_allclose(g, w, atol=2 * grad_tol(jnp.float32, name), err_msg=name)


def _value_and_grad(fn, q, k, v, w):
    def loss(q, k, v):
        o = fn(q, k, v)
        return jnp.sum(o * w), o

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("strategy,mask,mesh_name", GRID, ids=["-".join(c) for c in GRID])
def test_strategy_matches_reference(strategy, mask, mesh_name, key):
    q, k, v, w, kwargs = _inputs(key, mask, b=2 if mesh_name.startswith("data") else 1)
    mesh, extra = _mesh(mesh_name)
    want = _value_and_grad(functools.partial(reference, **kwargs), q, k, v, w)
    fn = functools.partial(
        attention, mesh=mesh, strategy=strategy, impl="xla", **extra, **kwargs
    )
    with jax.set_mesh(mesh):
        compiled = jax.jit(lambda q, k, v: _value_and_grad(fn, q, k, v, w)).lower(q, k, v)
        compiled = compiled.compile()
        got = compiled(q, k, v)
    _check(got, want)
    check_sp_collectives(compiled.as_text(), strategy)


@pytest.mark.parametrize("strategy", ["ring", "striped", "zigzag", "ulysses"])
def test_separate_kv_heads_and_head_dims(strategy, key):
    """1 key head and 4 value heads (Ulysses repeats the key head per device), q/k head dim 40
    and value head dim 24, causal with packed documents, on an (8,) axis."""
    q, k, v, w, kwargs = _inputs(key, "causal_segments", b=1, n=8, kh=1, vh=4, h=40, hv=24)
    mesh, extra = _mesh("sp8")
    want = _value_and_grad(functools.partial(reference, **kwargs), q, k, v, w)
    fn = functools.partial(attention, mesh=mesh, strategy=strategy, impl="xla", **kwargs)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: _value_and_grad(fn, q, k, v, w))(q, k, v)
    _check(got, want)


def test_zigzag_inputs_already_permuted_auto_mesh(key):
    """inputs_permuted=True: data in zigzag order in, zigzag order out; an Auto-typed mesh."""
    q, k, v, w, kwargs = _inputs(key, "causal_segments", b=1, s=32)
    mesh, _ = _mesh("sp8", AxisType.Auto)
    want = _value_and_grad(functools.partial(reference, **kwargs), q, k, v, w)

    def perm(x):
        return permute(x, 1, "zigzag", 8)

    seg = perm(kwargs.pop("segment_ids"))

    def fn(q, k, v):
        o = attention(
            perm(q), perm(k), perm(v), mesh=mesh, strategy="zigzag", inputs_permuted=True,
            segment_ids=seg, impl="xla", **kwargs,
        )
        return unpermute(o, 1, "zigzag", 8)

    _check(jax.jit(lambda q, k, v: _value_and_grad(fn, q, k, v, w))(q, k, v), want)


def test_ring_inside_user_shard_map_with_lse(key):
    """Called by axis name in one's own shard_map (check_vma on), lse returned and exact."""
    q, k, v = random_qkv(key, 1, 32, 32, 4, 1, 16)  # MQA
    mesh = jax.make_mesh((4,), ("sp",), axis_types=(AxisType.Explicit,))
    spec = P(None, "sp")
    f = jax.jit(
        jax.shard_map(
            functools.partial(
                ring_attention, axis_name="sp", is_causal=True, return_residuals=True,
                layout="contiguous", impl="xla",
            ),
            mesh=mesh, in_specs=spec, out_specs=(spec, spec),
        )
    )
    out, lse = f(*(jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)))
    want_out, want_lse = reference(q, k, v, is_causal=True, return_residuals=True)
    np.testing.assert_allclose(out, want_out, atol=fwd_tol(jnp.float32))
    np.testing.assert_allclose(lse, want_lse, atol=fwd_tol(jnp.float32))


# ----------------------------------------------------------------------------- bad input


def _small(key, s=24, n=4, kh=2):
    """Shapes only: validation fails before any compute."""
    del key
    return (
        jax.ShapeDtypeStruct((1, s, n, 16), jnp.float32),
        jax.ShapeDtypeStruct((1, s, kh, 16), jnp.float32),
        jax.ShapeDtypeStruct((1, s, kh, 16), jnp.float32),
    )


def test_sequence_not_divisible(key):
    mesh, _ = _mesh("sp8")
    q, k, v = _small(key, s=36)
    with pytest.raises(ValueError, match="q sequence length 36 is not divisible by 8"):
        attention(q, k, v, mesh=mesh)


def test_zigzag_needs_twice_the_axis(key):
    mesh, _ = _mesh("sp8")
    q, k, v = _small(key, s=24)  # divisible by 8, not by 16
    with pytest.raises(ValueError, match="not divisible by 16 .zigzag"):
        attention(q, k, v, mesh=mesh, strategy="zigzag")


def test_unknown_axis_and_strategy(key):
    mesh, _ = _mesh("sp8")
    q, k, v = _small(key, s=32)
    with pytest.raises(ValueError, match="seq_axis='seq' is not an axis of the mesh"):
        attention(q, k, v, mesh=mesh, seq_axis="seq")
    with pytest.raises(ValueError, match="batch_axis='data' is not an axis"):
        attention(q, k, v, mesh=mesh, batch_axis="data")
    with pytest.raises(ValueError, match="unknown strategy 'star'"):
        attention(q, k, v, mesh=mesh, strategy="star")
    with pytest.raises(ValueError, match="inputs_permuted=True applies to the striped"):
        attention(q, k, v, mesh=mesh, strategy="ring", inputs_permuted=True)


def test_ulysses_heads_not_divisible(key):
    mesh, _ = _mesh("sp8")
    q, k, v = _small(key, s=32, n=4, kh=2)
    with pytest.raises(ValueError, match="q has 4 heads; the number of heads must be divisible"):
        attention(q, k, v, mesh=mesh, strategy="ulysses")
    mesh4, _ = _mesh("data2_sp4")
    q, k, v = _small(key, s=32, n=12, kh=3)
    with pytest.raises(ValueError, match="needs the 3 kv heads to be divisible"):
        attention(q, k, v, mesh=mesh4, strategy="ulysses")


def test_ring_with_triton_kernel_interpreted(key):
    """The per-block work on the Pallas/Triton kernels (interpreted on CPU), fwd and bwd."""
    q, k, v = random_qkv(key, 1, 32, 32, 2, 1, 16)
    w = jax.random.normal(jax.random.fold_in(key, 1), q.shape)
    mesh = jax.make_mesh((2,), ("sp",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:2])
    want = _value_and_grad(functools.partial(reference, is_causal=True), q, k, v, w)
    fn = functools.partial(attention, mesh=mesh, is_causal=True, impl="pallas_triton")
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: _value_and_grad(fn, q, k, v, w))(q, k, v)
    _check(got, want)


def test_zigzag_bfloat16(key):
    """bf16 inputs, bf16 dQ/dK/dV accumulation (the low-memory setting): within the bf16 table."""
    q, k, v, w, kwargs = _inputs(key, "causal_segments", b=1, s=128)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    mesh, _ = _mesh("sp8")
    want = _value_and_grad(functools.partial(reference, **kwargs), q, k, v, w)
    fn = functools.partial(
        attention, mesh=mesh, strategy="zigzag", impl="xla", grad_accum_dtype=None, **kwargs
    )
    with jax.set_mesh(mesh):
        got = jax.jit(lambda q, k, v: _value_and_grad(fn, q, k, v, w))(q, k, v)
    assert_bf16_value_and_grads_close(got, want)


def test_unrolled_ring_as_on_accelerators(key, monkeypatch):
    """On GPU/TPU the ring loop is unrolled (scheduler overlap): same values and gradients."""
    import sharding.ring

    q, k, v, w, kwargs = _inputs(key, "causal_segments", b=1, s=32)
    mesh = jax.make_mesh((4,), ("sp",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:4])
    want = _value_and_grad(functools.partial(reference, **kwargs), q, k, v, w)
    fn = functools.partial(attention, mesh=mesh, strategy="zigzag", impl="xla", **kwargs)

    def lower():
        with jax.set_mesh(mesh):
            return jax.jit(lambda q, k, v: _value_and_grad(fn, q, k, v, w)).lower(q, k, v)

    loops_cpu = lower().as_text().count("stablehlo.while")
    monkeypatch.setattr(sharding.ring, "platform", lambda: "gpu")
    lowered = lower()
    # the forward and backward ring loops are gone (the XLA block op keeps its own scans)
    assert lowered.as_text().count("stablehlo.while") == loops_cpu - 2
    _check(lowered.compile()(q, k, v), want)
