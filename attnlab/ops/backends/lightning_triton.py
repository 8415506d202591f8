"""Lightning backend ``"pallas_triton"``: the chunked Pallas lightning kernels lowered to
Triton (compiled on a CUDA GPU; Pallas interpret mode on CPU), forward and backward, with
their own block phases for LASP / LASP-2 when the fused forward is configured. Head dims
from 1 to 256 (padded inside the kernels' entry points)."""

from __future__ import annotations

from attnlab.ops._registry import Implementation
from attnlab.ops.backends import head_dims_over, triton_interpret
from attnlab.ops.lightning import BlockPhases, LightningArgs
from pallas_kernels.gpu import lightning_chunk as kernels
from pallas_kernels.gpu import lightning_phases as phases
from pallas_kernels.gpu._common import MAX_HEAD_DIM
from pallas_kernels.gpu.lightning_common import SUPPORTED_DTYPES as DTYPES
from pallas_kernels.gpu.lightning_common import LightningConfig, kernel_config


def unsupported(q, k, v, a: LightningArgs, plat: str) -> str | None:
    """None if the Triton kernels compute the call, else why not (head dims above 256)."""
    return head_dims_over("pallas_triton", q, v, MAX_HEAD_DIM)


def _fn(q, k, v, a: LightningArgs):
    return kernels.lightning_attention(
        q, k, v, a.log_decay, initial_state=a.initial_state, segment_ids=a.segment_ids,
        scale=a.scale, config=a.config, interpret=triton_interpret(),
    )


def _phases(q, k, v, a: LightningArgs) -> BlockPhases | None:
    """The kernels' own block phases (``block_summarize`` ... ``block_backward``), bound to
    these arguments; None where the config has no fused forward (no segment states)."""
    cfg = kernel_config(a.config, q.shape[-1], q.dtype)
    if not cfg.fused_forward:
        return None
    t, dims = q.shape[1], (q.shape[-1], v.shape[-1])
    kw = dict(config=cfg, interpret=triton_interpret())
    ld, seg = a.log_decay, a.segment_ids
    return BlockPhases(
        lambda k, v: phases.block_summarize(k, v, ld, seg, **kw),
        lambda q, k, v, s_in, aux: phases.block_forward(q, k, v, ld, seg, s_in, aux,
                                                         scale=a.scale, **kw),
        lambda res, do: phases.block_state_grad(res, do, t=t, head_dims=dims, scale=a.scale,
                                                **kw),
        lambda res, ds_out: phases.block_backward(res, ds_out, t=t, head_dims=dims,
                                                  scale=a.scale, **kw),
    )


IMPLEMENTATION = Implementation(
    name="pallas_triton", fn=_fn, phases=_phases, unsupported=unsupported,
    platforms=("gpu", "cpu"), dtypes=DTYPES, config_cls=LightningConfig, returns_lse=False,
    description="Pallas chunked lightning kernels lowered to Triton (GPU), fwd + bwd; head "
    "dims 1 to 256")
