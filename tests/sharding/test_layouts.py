"""Token layouts: permutation invariants, positions, in-shard_map collectives = global permute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.layouts import (
    LAYOUTS,
    layout_positions,
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
