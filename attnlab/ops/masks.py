"""Masks as values (re-exported from :mod:`pallas_kernels.common.masks`, where kernels use them)."""

from pallas_kernels.common.masks import (
    EMPTY,
    FULL,
    MASK_VALUE,
    PARTIAL,
    BlockMetadata,
    MaskSpec,
    SegmentIds,
    block_metadata,
    positions_from_offset,
    tile_kind,
    visible,
)

__all__ = [
    "EMPTY", "FULL", "MASK_VALUE", "PARTIAL", "BlockMetadata", "MaskSpec", "SegmentIds",
    "block_metadata", "positions_from_offset", "tile_kind", "visible",
]
