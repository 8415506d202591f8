"""Star Attention on simulated CPU devices: the context phase equals its definition
(:func:`attnlab.ops.star.reference`, values and gradients) and moves only the anchor; the query
phase equals exact attention over the whole cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.bench.hlo_comm import comm_volume
from attnlab.ops import reference as attention_reference
from attnlab.ops import star
from sharding.star import star_attention, star_query

F32_TOL = 2e-5  # float32 both ways; only the merge's sum order differs
# The per-block attention: "reference" compiles fastest on CPU; the gradient test also runs
# the flash-style "xla" path (its custom VJP meets the anchor's psum there).
IMPL = "reference"


def _close(got, want, what, rtol=F32_TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert np.isfinite(got).all(), f"{what} has NaN/inf"
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:.0e} * {scale:.3g}"


def _qkv(key, b=1, t=32, n=4, kh=2, h=16):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (b, t, n, h)), jax.random.normal(kk, (b, t, kh, h)),
            jax.random.normal(kv, (b, t, kh, h)))


def _rows(mask):
    """A boolean [T, T] mask as one string: a row of 0/1 per query, rows split by spaces."""
    return " ".join("".join("01"[int(x)] for x in row) for row in np.asarray(mask))


def _mesh(shape, names):
    return jax.make_mesh(shape, names, devices=jax.devices()[: int(np.prod(shape))])


def test_context_mask_is_the_paper_window():
    """Block 1 alone; later blocks see the anchor and their own earlier tokens."""
    assert _rows(star.context_mask(6, 2, 1)) == "100000 110000 101000 101100 100010 100011"
    # One block: ordinary causal attention.
    assert (star.context_mask(4, 4) == np.tril(np.ones((4, 4), bool))).all()


def test_previous_and_no_anchor_masks():
    """"previous": the anchor_size tokens right before the block; "none": the block alone."""
    assert _rows(star.context_mask(6, 2, 1, anchor="previous")) == (
        "100000 110000 011000 011100 000110 000111")
    none = star.context_mask(6, 2, anchor="none")
    assert (none == (np.tril(np.ones((6, 6), bool))
                     & (np.arange(6)[:, None] // 2 == np.arange(6) // 2))).all()
    # A whole previous block as the anchor of block 1 is the first block: the same mask.
    assert (star.context_mask(4, 2, anchor="previous") == star.context_mask(4, 2)).all()


ANCHOR_CASES = [("first", None), ("first", 3), ("previous", None), ("previous", 3),
                ("none", None)]


@pytest.mark.parametrize("anchor, anchor_size", ANCHOR_CASES)
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_one_device_context_attention_matches_reference(anchor, anchor_size, impl, key):
    """The blocks-as-batch context phase equals the masked definition (GQA 4:2, B=2)."""
    q, k, v = _qkv(key, b=2)
    cfg = star.StarConfig(block_size=8, anchor=anchor, anchor_size=anchor_size)
    got = star.context_attention(q, k, v, star=cfg, impl=impl)
    _close(got, star.reference(q, k, v, block_size=8, anchor_size=anchor_size, anchor=anchor),
           "o")


@pytest.mark.parametrize("anchor, anchor_size", [("previous", None), ("previous", 3),
                                                 ("none", None)])
def test_context_phase_other_anchors_match_reference(anchor, anchor_size, key):
    """4 devices: the previous-block anchor (one ppermute) and no anchor, against the mask."""
    q, k, v = _qkv(key)
    mesh = _mesh((4,), ("sp",))
    got = jax.jit(lambda q, k, v: star_attention(q, k, v, mesh=mesh, anchor=anchor,
                                                 anchor_size=anchor_size, impl=IMPL))(q, k, v)
    want = star.reference(q, k, v, block_size=8, anchor_size=anchor_size, anchor=anchor)
    _close(got, want, "o")


@pytest.mark.parametrize("anchor, impl", [(None, "xla"), (3, IMPL)],
                         ids=["anchor_block_xla", "anchor3"])
def test_context_phase_matches_reference(anchor, impl, key):
    """4 devices (GQA 4:2): values and gradients against the masked reference."""
    q, k, v = _qkv(key)
    mesh = _mesh((4,), ("sp",))

    def loss(fn):
        def f(q, k, v):
            o = fn(q, k, v)
            w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape))
            return jnp.sum(o * w), o
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, got), dgot = loss(lambda q, k, v: star_attention(q, k, v, mesh=mesh, anchor_size=anchor,
                                                         impl=impl))(q, k, v)
    (_, want), dwant = loss(lambda q, k, v: star.reference(q, k, v, block_size=8,
                                                           anchor_size=anchor))(q, k, v)
    _close(got, want, "o")
    for name, g, w in zip("qkv", dgot, dwant, strict=True):
        _close(g, w, f"d{name}")


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
def test_context_phase_on_a_data_by_sequence_mesh(is_causal, key):
    """(data 2, sp 4): each batch row is its own star over 4 blocks; without a causal mask a
    block sees all of itself and the anchor."""
    q, k, v = _qkv(key, b=2)
    mesh = _mesh((2, 4), ("data", "sp"))
    got = jax.jit(lambda q, k, v: star_attention(q, k, v, mesh=mesh, batch_axis="data",
                                                 is_causal=is_causal, impl=IMPL))(q, k, v)
    _close(got, star.reference(q, k, v, block_size=8, is_causal=is_causal), "o")


def test_one_device_is_causal_attention(key):
    q, k, v = _qkv(key)
    mesh = _mesh((1,), ("sp",))
    got = jax.jit(lambda q, k, v: star_attention(q, k, v, mesh=mesh, impl=IMPL))(q, k, v)
    _close(got, attention_reference(q, k, v, is_causal=True), "o")


def test_context_phase_moves_only_the_anchor(key):
    """The compiled program's only collectives broadcast the anchor's K and V (an all-reduce
    of anchor_size tokens each), whatever the context length."""
    mesh = _mesh((4,), ("sp",))
    volumes = []
    for t in (32, 64):
        q, k, v = _qkv(key, t=t)
        hlo = jax.jit(lambda q, k, v: star_attention(q, k, v, mesh=mesh, anchor_size=4,
                                                     impl=IMPL)).lower(q, k, v).compile()
        volumes.append(comm_volume(hlo.as_text(), num_devices=4))
    anchor_bytes = 2 * (1 * 4 * 2 * 16 * 4)  # K and V: B=1, 4 tokens, 2 kv heads, H=16, f32
    for vol in volumes:
        assert set(vol["by_op"]) == {"all-reduce"}, vol
        assert vol["total_bytes"] == anchor_bytes, vol


@pytest.mark.parametrize("q_offset", [None, 13], ids=["after_cache", "inside_cache"])
def test_query_phase_is_exact_attention(q_offset, key):
    """A 4-token query over a 32-token cache on 4 devices equals attention over the whole
    cache, output and lse (a query inside the cache sees fewer shards: some see no key)."""
    q, _, _ = _qkv(key, t=4)
    _, k, v = _qkv(jax.random.fold_in(key, 1), t=32)
    mesh = _mesh((4,), ("sp",))
    got, lse = jax.jit(lambda q, k, v: star_query(
        q, k, v, mesh=mesh, q_offset=q_offset, return_residuals=True, impl=IMPL))(q, k, v)
    want, want_lse = attention_reference(q, k, v, is_causal=True,
                                         q_offset=32 if q_offset is None else q_offset,
                                         return_residuals=True)
    _close(got, want, "o")
    _close(lse, want_lse, "lse")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(anchor_size=9), r"anchor_size must be in \[1, block_size = 8\]"),
        (dict(t=30), "sequence length T=30 is not divisible by the 'sp' mesh axis of size 4"),
        (dict(seq_axis="cp"), "seq_axis='cp' is not an axis of the mesh"),
        (dict(kv_len=16), "context phase is self-attention"),
        (dict(batch_axis="sp"), r"mesh axes of \['seq_axis', 'batch_axis', 'head_axis'\] must be "
                                "distinct"),
        (dict(anchor="last"), "anchor must be one of"),
    ],
)
def test_bad_inputs(kwargs, match, key):
    q, k, v = _qkv(key, t=kwargs.pop("t", 32))
    if "kv_len" in kwargs:
        k, v = k[:, : kwargs.pop("kv_len")], v[:, :16]
    with pytest.raises(ValueError, match=match):
        star_attention(q, k, v, mesh=_mesh((4,), ("sp",)), impl=IMPL, **kwargs)


def test_query_phase_bad_cache_length(key):
    q, k, v = _qkv(key, t=30)
    with pytest.raises(ValueError, match="cache length S=30 is not divisible by the 'sp'"):
        star_query(q[:, :2], k, v, mesh=_mesh((4,), ("sp",)), impl=IMPL)


def _grad_mesh(name):
    return {"sp4": ((4,), ("sp",), None), "sp8": ((8,), ("sp",), None),
            "data2_sp4": ((2, 4), ("data", "sp"), "data")}[name]


@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "no_vma"])
@pytest.mark.parametrize("mesh_name", ["sp4", "sp8", "data2_sp4"])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_query_phase_gradients_are_exact(impl, mesh_name, check_vma, key):
    """d(q, k, v) of the query phase equal those of attention over the whole cache, with and
    without shard_map's vma checks (without them each device holds a 1/P share of the
    replicated output's cotangent; the result must not depend on it)."""
    shape, names, batch_axis = _grad_mesh(mesh_name)
    b = 2 if batch_axis else 1
    q, _, _ = _qkv(key, b=b, t=4)
    _, k, v = _qkv(jax.random.fold_in(key, 1), b=b, t=32)
    w = jax.random.normal(jax.random.fold_in(key, 2), q.shape)
    mesh = _mesh(shape, names)

    def loss(fn):
        def f(q, k, v):
            o, lse = fn(q, k, v)
            return jnp.sum(o * w) + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    got = loss(lambda q, k, v: star_query(
        q, k, v, mesh=mesh, batch_axis=batch_axis, q_offset=20, return_residuals=True,
        impl=impl, check_vma=check_vma))(q, k, v)
    want = loss(lambda q, k, v: attention_reference(
        q, k, v, is_causal=True, q_offset=20, return_residuals=True))(q, k, v)
    for name, g, r in zip(("dq", "dk", "dv"), got, want):
        _close(g, r, name, rtol=1e-4)


@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "no_vma"])
@pytest.mark.parametrize("mesh_name", ["sp4", "sp8", "data2_sp4"])
def test_context_phase_gradients_with_and_without_vma(mesh_name, check_vma, key):
    shape, names, batch_axis = _grad_mesh(mesh_name)
    b = 2 if batch_axis else 1
    q, k, v = _qkv(key, b=b, t=32)
    w = jax.random.normal(jax.random.fold_in(key, 2), q.shape)
    mesh = _mesh(shape, names)
    block = 32 // shape[-1]

    def loss(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))

    got = loss(lambda q, k, v: star_attention(q, k, v, mesh=mesh, batch_axis=batch_axis,
                                              anchor_size=3, impl="xla",
                                              check_vma=check_vma))(q, k, v)
    want = loss(lambda q, k, v: star.reference(q, k, v, block_size=block, anchor_size=3))(
        q, k, v)
    for name, g, r in zip(("dq", "dk", "dv"), got, want):
        _close(g, r, name, rtol=1e-4)
