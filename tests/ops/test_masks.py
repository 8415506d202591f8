"""Masks as values: visibility and per-tile metadata agree with brute force."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.ops.masks import (
    EMPTY,
    FULL,
    MaskSpec,
    SegmentIds,
    block_metadata,
    visible,
)
from tests.helpers import random_segments


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    t=st.integers(1, 40),
    s=st.integers(1, 40),
    bq=st.sampled_from([1, 4, 8, 16]),
    bk=st.sampled_from([1, 5, 8, 16]),
    causal=st.booleans(),
    left=st.one_of(st.none(), st.integers(0, 12)),
    right=st.one_of(st.none(), st.integers(0, 12)),
    q_off=st.integers(0, 30),
    kv_off=st.integers(0, 30),
    segments=st.booleans(),
    permute=st.booleans(),
)
def test_block_metadata_is_conservative_and_tight(
    seed, t, s, bq, bk, causal, left, right, q_off, kv_off, segments, permute
):
    key = jax.random.key(seed)
    spec = MaskSpec(causal=causal, window_left=left, window_right=right)
    q_pos = q_off + jnp.arange(t, dtype=jnp.int32)
    kv_pos = kv_off + jnp.arange(s, dtype=jnp.int32)
    if permute:  # arbitrary layouts (striped/zigzag) must stay exact
        kv_pos = jax.random.permutation(key, kv_pos)
    seg = None
    if segments:
        k1, k2 = jax.random.split(key)
        seg = SegmentIds(random_segments(k1, 2, t, 3), random_segments(k2, 2, s, 3))
    meta = block_metadata(spec, q_pos, kv_pos, block_q=bq, block_kv=bk, segment_ids=seg)
    vis = visible(
        spec, q_pos[:, None], kv_pos[None, :],
        None if seg is None else seg.q[:, :, None], None if seg is None else seg.kv[:, None, :],
    )
    vis = np.broadcast_to(np.ones((t, s), bool) if vis is None else np.asarray(vis),
                          (2 if seg is not None else 1, t, s))
    kind = np.asarray(meta.kind)
    for bi in range(kind.shape[0]):
        for i in range(kind.shape[1]):
            for j in range(kind.shape[2]):
                tile = vis[bi, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                ragged = tile.shape != (bq, bk)
                if kind[bi, i, j] == EMPTY:
                    assert not tile.any()
                if kind[bi, i, j] == FULL:
                    assert tile.all() and not ragged
                if not tile.any():
                    continue
                assert meta.kv_start[bi, i] <= j < meta.kv_stop[bi, i]
                assert meta.q_start[bi, j] <= i < meta.q_stop[bi, j]
    # Tight for contiguous positions without segments: EMPTY iff no visible pair.
    if not permute and not segments:
        for i in range(kind.shape[1]):
            for j in range(kind.shape[2]):
                tile = vis[0, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                assert (kind[0, i, j] == EMPTY) == (not tile.any())


def test_visible_none_when_nothing_masked():
    assert visible(MaskSpec(), jnp.arange(3)[:, None], jnp.arange(3)[None]) is None


def test_mask_spec_from_jax_nn():
    assert MaskSpec.from_jax_nn(local_window_size=4) == MaskSpec(window_left=4, window_right=4)
    assert MaskSpec.from_jax_nn(is_causal=True, local_window_size=(3, None)) == MaskSpec(
        causal=True, window_left=3
    )


def test_mask_spec_bad_values():
    with pytest.raises(ValueError, match="window_right must be a non-negative int"):
        MaskSpec(window_right=-2)
    with pytest.raises(ValueError, match="block sizes must be positive"):
        block_metadata(MaskSpec(), jnp.arange(4), jnp.arange(4), block_q=0, block_kv=2)
