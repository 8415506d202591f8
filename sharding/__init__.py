"""Sequence parallelism over named mesh axes.

Softmax attention: ring, striped, zigzag (``sharding.ring``) and Ulysses (``sharding.ulysses``)
behind one front door, :func:`sharding.attention`. Linear (lightning) attention: LASP
(``sharding.lasp``, state ring) and LASP-2 (``sharding.lasp2``, one all-gather of states).
Star Attention (``sharding.star``): blockwise context encoding with an anchor block, and exact
query attention over a sharded cache.
Every ``*_attention(..., mesh=...)`` wrapper has an inside-``shard_map`` form that takes an
axis name instead (``ring_attention``, ``ulysses_attention``, ``lasp_shard``, ``lasp2_shard``).
"""

from sharding import mla as _mla  # noqa: F401 (registers the MLA rule)
from sharding._common import default_check_vma
from sharding.api import STRATEGIES, attention
from sharding.lasp import lasp_attention, lasp_shard
from sharding.lasp2 import lasp2_attention, lasp2_shard
from sharding.layouts import (
    LAYOUTS,
    layout_positions,
    permute,
    shard_permute,
    shard_positions,
    shard_unpermute,
    unpermute,
)
from sharding.ring import ring_attention, striped_attention, zigzag_attention
from sharding.star import star_attention, star_context_shard, star_query, star_query_shard
from sharding.ulysses import ulysses_attention

__all__ = [
    "LAYOUTS", "STRATEGIES", "attention", "default_check_vma", "lasp2_attention",
    "lasp2_shard", "lasp_attention", "lasp_shard", "layout_positions", "permute",
    "ring_attention", "shard_permute", "shard_positions", "shard_unpermute", "star_attention",
    "star_context_shard", "star_query", "star_query_shard", "striped_attention",
    "ulysses_attention", "unpermute", "zigzag_attention",
]
