"""attnlab: attention as pure JAX functions, Pallas kernels, sharding and Flax modules."""

from attnlab.ops import (
    MaskSpec,
    SegmentIds,
    attention,
    dot_product_attention,
    lightning_attention,
    merge,
    merge_n,
)

__version__ = "0.1.0"
__all__ = ["MaskSpec", "SegmentIds", "__version__", "attention", "dot_product_attention",
           "lightning_attention", "merge", "merge_n"]
