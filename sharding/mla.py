"""Sequence-parallel rule of multi-head latent attention (MLA).

MLA's training path is softmax attention over per-head K/V materialized from the latent
(:func:`attnlab.ops.mla.mla_attention`), so a model layer shards exactly as a softmax layer
does: the module materializes K [B, T, N, d_n + d_R] and V [B, T, N, d_v] on its sequence
shard and the softmax rule runs the plan's strategy (ring, striped, zigzag or Ulysses) over
them. Decoding from the latent cache is single-device.
"""

from __future__ import annotations

from sharding.api import softmax_rule
from sharding.hybrid import register_rule

register_rule("mla")(softmax_rule)
