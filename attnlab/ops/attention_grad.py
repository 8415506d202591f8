"""One block's share of the attention gradient, given the *global* output and log-sum-exp.

When attention over a long key sequence is split into key blocks (ring attention, split-K)
and the partial results are merged by their log-sum-exp, the gradient of the merged result
with respect to one (query block, key block) pair is the flash-attention backward of that
pair evaluated with the merged (global) ``out`` and ``lse``:

    p_ij  = exp(z_ij - lse_i)                       (global lse: p is the global probability)
    delta_i = sum_h dout_ih * out_ih - dlse_i       (global out)
    dv_j  = sum_i p_ij dout_i
    dz_ij = p_ij * (dout_i . v_j - delta_i)
    dq_i  = scale * sum_j dz_ij cap'(z_ij) k_j,     dk_j = scale * sum_i dz_ij cap'(z_ij) q_i

Summing the pairs' (dq, dk, dv) over all key blocks gives exactly the gradient of the whole
attention. :func:`attention_bwd` computes one pair's share; the ring backward in
``sharding.ring`` calls it once per ring step.

Implementations: every attention implementation with a ``bwd`` (see
``attnlab.ops.attention.REGISTRY``): ``"reference"`` (the definition: ``jax.vjp`` of the
block's forward with the cotangents the merge passes to it), ``"xla"`` (the blockwise
backward of ``backends/attention_xla.py``), ``"pallas_triton"`` and ``"pallas_tpu"`` (the
kernels' own backward passes).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attnlab.ops.attention import REGISTRY, AttentionArgs, args_from_kwargs


def implementations() -> dict:
    """The attention implementations that have a block backward (name -> Implementation)."""
    return REGISTRY.implementations(need="bwd")


def attention_bwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    dlse: jax.Array | None = None,
    *,
    impl: str = "auto",
    **kwargs: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradient share (dq, dk, dv) of one (query block, key block) pair.

    Args:
      q: [B, T, N, H] queries of the block; k: [B, S, K, H], v: [B, S, K, Hv] one key block.
      out: [B, T, N, Hv] the *global* attention output of these queries (all key blocks
        merged); lse: [B, T, N] float32 their global log-sum-exp (-inf: row sees no key).
      dout: [B, T, N, Hv] cotangent of ``out``; dlse: [B, T, N] cotangent of ``lse`` or None.
      impl: "auto", "reference", "xla", "pallas", "pallas_triton", "pallas_tpu".
      **kwargs: the block's mask and logits, exactly as :func:`attnlab.ops.attention` takes
        them (``is_causal``, ``local_window_size``, ``segment_ids``, global ``q_offset`` /
        ``kv_offset`` or ``q_positions`` / ``kv_positions``, ``logits_soft_cap``, ``scale``)
        and the chosen implementation's ``config``; no ``bias``.

    Returns:
      (dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, Hv]) in the input dtypes. With a single
      key block (out, lse the block's own), this is the gradient of attention itself.

    Raises:
      ValueError: bad shapes or arguments, unknown impl.
      NotImplementedError: the named impl cannot compute this call.

    Example:
      >>> dq, dk, dv = attention_bwd(q, k_blk, v_blk, out, lse, dout, is_causal=True,
      ...                            q_offset=q0, kv_offset=k0)
    """
    taken = sorted({"bias", "return_residuals", "return_entropy"} & set(kwargs))
    if taken:
        raise ValueError(f"attention_bwd takes no {', '.join(taken)}")
    a = args_from_kwargs(q, k, v, **kwargs)
    b, t, n, _ = q.shape
    want = {"out": (b, t, n, v.shape[-1]), "lse": (b, t, n), "dout": (b, t, n, v.shape[-1])}
    got = {"out": out, "lse": lse, "dout": dout, **({"dlse": dlse} if dlse is not None else {})}
    want["dlse"] = want["lse"]
    for name, x in got.items():
        if jnp.shape(x) != want[name]:
            raise ValueError(f"{name} must have shape {want[name]}, got {jnp.shape(x)}")
    if dlse is None:
        dlse = jnp.zeros(lse.shape, jnp.float32)
    return attention_bwd_block(q, k, v, out, lse, dout, dlse, a, impl)


def attention_bwd_block(q, k, v, out, lse, dout, dlse, a: AttentionArgs, impl: str = "auto"
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`attention_bwd` with normalized arguments (from
    :func:`attnlab.ops.attention.block_args`) and a given ``dlse``; for ring callers."""
    chosen = REGISTRY.choose(q, k, v, a, impl, need="bwd")
    return chosen.bwd(q, k, v, out, lse.astype(jnp.float32), dout, dlse, a)
