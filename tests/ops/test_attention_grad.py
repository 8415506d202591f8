"""attention_bwd, for ``impl="xla"`` and the reference, through the shared base
(``attention_grad_base.py``). The kernels' subclasses live in ``tests/pallas_kernels``; the ring
backward (tests/sharding) exercises them at larger shapes."""

from __future__ import annotations

from attnlab.ops import XlaConfig
from attnlab.testing import cases
from tests.ops.attention_grad_base import WINDOW_SOFTCAP, AttentionBwdTestBase


class TestXla(AttentionBwdTestBase):
    IMPL = "xla"
    CONFIG = XlaConfig(block_kv=8)  # several blocks in every key block share


class TestReference(AttentionBwdTestBase):
    """jax.vjp of the reference with the merge's cotangents, on two cases."""

    IMPL = "reference"
    CASES = (*cases("causal"), WINDOW_SOFTCAP)
