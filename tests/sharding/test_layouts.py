"""Token layouts: permutation invariants, positions, in-shard_map collectives = global permute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sharding import attention as sp_attention
from sharding.layouts import (
    LAYOUTS,
    layout_positions,
    length_multiple,
    permute,
    shard_permute,
    shard_positions,
    shard_unpermute,
    unpermute,
)
from tests.helpers import random_segments


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_shards", [2, 8])
def test_unpermute_inverts_permute(layout, num_shards, key):
    x = jax.random.normal(key, (2, 64, 3))
    y = permute(x, 1, layout, num_shards)
    np.testing.assert_array_equal(unpermute(y, 1, layout, num_shards), x)
    # a permutation: nothing lost or duplicated
    np.testing.assert_array_equal(np.sort(layout_positions(64, layout, num_shards)), np.arange(64))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_positions_travel_with_tokens(layout, key):
    n = 4
    pos = layout_positions(32, layout, n)
    seg = random_segments(key, 2, 32, 3)
    seg_p = np.asarray(permute(seg, 1, layout, n))
    # token at layout slot m is original token pos[m]: its segment id came along with it
    np.testing.assert_array_equal(seg_p, np.asarray(seg)[:, pos])
    for d in range(n):
        np.testing.assert_array_equal(shard_positions(8, layout, d, n), pos[8 * d : 8 * d + 8])


def test_known_layouts():
    np.testing.assert_array_equal(layout_positions(8, "striped", 2), [0, 2, 4, 6, 1, 3, 5, 7])
    np.testing.assert_array_equal(layout_positions(8, "zigzag", 2), [0, 1, 6, 7, 2, 3, 4, 5])


@pytest.mark.parametrize("layout", ["striped", "zigzag"])
def test_shard_permute_matches_global_permute(layout, key):
    mesh = jax.make_mesh((4,), ("sp",), axis_types=(jax.sharding.AxisType.Explicit,))
    x = jax.random.normal(key, (2, 32, 3))
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "sp")))

    def run(fn):
        return jax.jit(
            jax.shard_map(
                lambda a: fn(a, 1, layout, "sp"), mesh=mesh, in_specs=P(None, "sp"),
                out_specs=P(None, "sp"),
            )
        )

    y = run(shard_permute)(xs)
    np.testing.assert_array_equal(y, permute(x, 1, layout, 4))
    np.testing.assert_array_equal(run(shard_unpermute)(y), x)


def test_bad_layout_arguments():
    x = jnp.arange(24.0).reshape(1, 24)
    with pytest.raises(ValueError, match="not divisible by 16"):
        permute(x, 1, "zigzag", 8)
    with pytest.raises(ValueError, match="unknown layout"):
        permute(x, 1, "spiral", 4)


@pytest.mark.parametrize(
    "layout, permute_in_shards, want",
    [("contiguous", False, 8), ("contiguous", True, 8), ("striped", False, 8),
     ("striped", True, 64), ("zigzag", False, 16), ("zigzag", True, 16)],
)
def test_length_multiple(layout, permute_in_shards, want):
    assert length_multiple(layout, 8, permute_in_shards=permute_in_shards) == want


def _sp8():
    return jax.make_mesh((8,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,))


def _qkv(t, s=None):
    s = t if s is None else s
    return (jax.ShapeDtypeStruct((1, t, 8, 16), jnp.float32),
            *(jax.ShapeDtypeStruct((1, s, 8, 16), jnp.float32),) * 2)


@pytest.mark.parametrize(
    "strategy, t, s, match",
    [
        # T = 80 is divisible by P = 8, but each device's 10 tokens cannot be dealt out over 8.
        ("striped", 80, 80, r"q sequence length 80 is not divisible by 64 \(P² for P = 8 shards: "
         r"the striped layout is made inside shard_map .*; pad the q sequence to a multiple of "
         r"64 or put the inputs in striped order beforehand .*inputs_permuted=True.* which "
         r"needs a multiple of P = 8 only"),
        ("striped", 64, 72, r"kv sequence length 72 is not divisible by 64 \(P² for P = 8"),
        ("zigzag", 72, 72, r"q sequence length 72 is not divisible by 16 \(zigzag cuts it into "
         r"2 x axis size chunks, two per shard, for P = 8 shards\); pad the q sequence to a "
         r"multiple of 16"),
        ("zigzag", 80, 88, r"kv sequence length 88 is not divisible by 16 \(zigzag"),
        ("ring", 36, 36, r"q sequence length 36 is not divisible by 8 \(P: each of the P = 8 "
         r"shards holds an equal block\)"),
    ],
)
def test_attention_states_the_length_rule_before_shard_map(strategy, t, s, match):
    """Abstract inputs: shard_map would refuse them, so the message comes from the up-front
    check."""
    with pytest.raises(ValueError, match=match):
        sp_attention(*_qkv(t, s), mesh=_sp8(), strategy=strategy, is_causal=True)


@pytest.mark.parametrize("strategy, t", [("striped", 64), ("zigzag", 80)])
def test_attention_takes_lengths_that_fit_the_rule(strategy, t):
    mesh = _sp8()
    out = jax.eval_shape(
        lambda q, k, v: sp_attention(q, k, v, mesh=mesh, strategy=strategy, is_causal=True),
        *_qkv(t))
    assert out.shape == (1, t, 8, 16)


def test_striped_inputs_permuted_needs_p_only():
    """T = 80 in striped order: no in-shard re-layout, so T divisible by P is enough."""
    mesh = _sp8()
    out = jax.eval_shape(
        lambda q, k, v: sp_attention(q, k, v, mesh=mesh, strategy="striped", is_causal=True,
                                     inputs_permuted=True),
        *_qkv(80))
    assert out.shape == (1, 80, 8, 16)


def test_shard_permute_states_the_per_shard_rule():
    mesh = _sp8()
    fn = jax.shard_map(lambda x: shard_permute(x, 1, "striped", "sp"), mesh=mesh,
                       in_specs=P(None, "sp"), out_specs=P(None, "sp"))
    with pytest.raises(ValueError, match=r"to the striped layout: the per-shard sequence length "
                       r"10 is not divisible by 8, as its tokens are dealt out over the 8 shards "
                       r"of 'sp' \(a global length divisible by P² = 64\)"):
        jax.eval_shape(fn, jax.ShapeDtypeStruct((1, 80), jnp.float32))
