"""attention_bwd: summing per-key-block shares (with the global out/lse) gives the gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import reference
from attnlab.ops.attention_grad import attention_bwd
from tests.helpers import grad_tol, random_qkv, random_segments

CASES = {
    "full": dict(),
    "causal_gqa": dict(is_causal=True),
    "window_softcap": dict(local_window_size=(9, 3), logits_soft_cap=2.5),
    "segments_causal": dict(is_causal=True, segments=3),
}


def _split_grads(q, k, v, dout, dlse, kwargs, impl, n_blocks):
    """Sum of attention_bwd over n_blocks key blocks, positions passed as offsets."""
    out, lse = reference(q, k, v, return_residuals=True, **kwargs)
    seg = kwargs.pop("segment_ids", None)
    s = k.shape[1]
    bs = s // n_blocks
    dq = jnp.zeros(q.shape, jnp.float32)
    dks, dvs = [], []
    for i in range(n_blocks):
        sl = slice(i * bs, (i + 1) * bs)
        extra = {} if seg is None else {"segment_ids": (seg, seg[:, sl])}
        dq_i, dk_i, dv_i = attention_bwd(
            q, k[:, sl], v[:, sl], out, lse, dout, dlse, kv_offset=i * bs, impl=impl,
            **kwargs, **extra,
        )
        dq = dq + dq_i
        dks.append(dk_i)
        dvs.append(dv_i)
    return dq, jnp.concatenate(dks, 1), jnp.concatenate(dvs, 1)


# xla on every case; the reference (jax.vjp with the merge's cotangents) on two. The Triton
# backward with a global lse is exercised by the ring test in tests/sharding.
GRID = [(name, "xla") for name in CASES] + [
    ("causal_gqa", "reference"), ("window_softcap", "reference")
]


@pytest.mark.parametrize("name,impl", GRID, ids=["-".join(c) for c in GRID])
def test_block_shares_sum_to_gradient(name, impl, key):
    kwargs = dict(CASES[name])
    segments = kwargs.pop("segments", 0)
    k1, k2, k3 = jax.random.split(key, 3)
    q, k, v = random_qkv(k1, 2, 32, 32, 4, 2, 16)
    if segments:
        kwargs["segment_ids"] = random_segments(k3, 2, 32, segments)
    dout = jax.random.normal(k2, q.shape)
    dlse = jax.random.normal(jax.random.fold_in(k2, 1), q.shape[:3])

    def f(q, k, v):
        return reference(q, k, v, return_residuals=True, **kwargs)

    out, vjp = jax.vjp(f, q, k, v)
    dlse_ct = jnp.where(jnp.isfinite(out[1]), dlse, 0.0)
    want = vjp((dout, dlse_ct))
    got = _split_grads(q, k, v, dout, dlse_ct, dict(kwargs), impl, n_blocks=4)
    for name_, g, w in zip(("dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, atol=grad_tol(jnp.float32, name_) * 2, err_msg=name_)


def test_bad_shapes_and_impl(key):
    q, k, v = random_qkv(key, 1, 16, 16, 2, 1, 16)
    out, lse = reference(q, k, v, return_residuals=True)
    with pytest.raises(ValueError, match="lse must have shape"):
        attention_bwd(q, k, v, out, lse[:, :8], out)
    with pytest.raises(ValueError, match="unknown impl"):
        attention_bwd(q, k, v, out, lse, out, impl="nope")
