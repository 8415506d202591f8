"""Decode backend ``"pallas_triton"``: the Pallas split-K decode kernel lowered to Triton
(compiled on a CUDA GPU; Pallas interpret mode on CPU). Forward only: its per-split partials
are merged by LSE in :func:`attnlab.ops.decode.forward_only`."""

from __future__ import annotations

from attnlab.ops._registry import Implementation
from attnlab.ops.backends import head_dims_over, triton_interpret
from attnlab.ops.decode import DecodeArgs, forward_only
from pallas_kernels.gpu._common import MAX_HEAD_DIM
from pallas_kernels.gpu.decode import SUPPORTED_DTYPES, DecodeConfig, decode_partials


def unsupported(q, k, v, a: DecodeArgs, plat: str) -> str | None:
    """None if the Triton decode kernel computes the call on ``plat``, else why not."""
    return head_dims_over("pallas_triton", q, v, MAX_HEAD_DIM)


IMPLEMENTATION = Implementation(
    name="pallas_triton", fn=forward_only(decode_partials, triton_interpret),
    unsupported=unsupported, platforms=("gpu", "cpu"), dtypes=SUPPORTED_DTYPES,
    config_cls=DecodeConfig, description="Pallas split-K decode kernel lowered to Triton (GPU), "
    "GQA rows packed per tile, ragged lengths bound the key loop; forward only")
