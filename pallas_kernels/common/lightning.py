"""Input checks and segment bookkeeping shared by the lightning-attention kernels (GPU and TPU).

Lightning attention (MiniMax-01, Lightning Attention-2) is decayed causal linear attention:
``S_t = g_t * lambda * S_{t-1} + k_t^T v_t``, ``o_t = (scale * q_t) S_t``, with ``g_t = 0``
where a new packed document starts and 1 elsewhere. The chunked kernels never read segment
ids directly: :func:`chunk_run_ids` turns them into one small integer per token that answers
every question a chunk asks (does this row still see the carried state? do rows i and j lie
in one run? which keys reach the chunk's final state?).

Masked tokens (later ones, other documents) never influence a row: factors that are 0 there
(the decay mask, a dropped state, a row's gate) *select* rather than multiply
(:func:`scale_state`, ``jnp.where``), and the other operand of a matmul summed over masked
tokens is read through :func:`~pallas_kernels.common.masks.finite_or_zero`, since 0 * NaN is
NaN. :func:`decay_power` keeps decay 0 exact (only the current token) where m * log(0) is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def check_lightning_inputs(
    q: Any, k: Any, v: Any, log_decay: Any, initial_state: Any, segment_ids: Any, *,
    dtypes: Sequence[Any],
) -> tuple[int, int, int, int, int]:
    """Validates lightning-attention inputs; returns (B, T, N, H, Hv).

    q, k [B, T, N, H] and v [B, T, N, Hv] of one dtype from ``dtypes``; log_decay [N] float;
    initial_state None or [B, N, H, Hv]; segment_ids None or [B, T] integer.

    Raises:
      ValueError: naming the argument, what was given and what was expected.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name} must have shape [batch, seq, heads, head_dim], got {jnp.shape(x)}"
            )
    b, t, n, h = q.shape
    hv = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"k must have q's shape {q.shape} and v [B, T, N, Hv] = {(b, t, n)} + (Hv,); got "
            f"k {k.shape}, v {v.shape} (GQA is not supported: repeat k/v heads first)"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        names = ", ".join(jnp.dtype(d).name for d in dtypes)
        raise ValueError(
            f"q, k, v must share one dtype out of {names}; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if jnp.shape(log_decay) != (n,) or not jnp.issubdtype(jnp.result_type(log_decay),
                                                           jnp.floating):
        raise ValueError(
            f"log_decay must be a float array of shape ({n},) (log lambda per head), got "
            f"shape {jnp.shape(log_decay)} and dtype {jnp.result_type(log_decay)}"
        )
    if initial_state is not None and jnp.shape(initial_state) != (b, n, h, hv):
        raise ValueError(
            f"initial_state must have shape [B, N, H, Hv] = {(b, n, h, hv)}, got "
            f"{jnp.shape(initial_state)}; pass None to start from zeros"
        )
    if segment_ids is not None and (
        jnp.shape(segment_ids) != (b, t)
        or not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer)
    ):
        raise ValueError(
            f"segment_ids must be an integer array of shape [B, T] = {(b, t)}, got shape "
            f"{jnp.shape(segment_ids)} and dtype {jnp.result_type(segment_ids)}"
        )
    return b, t, n, h, hv


def check_lightning_kernel_inputs(
    q: Any, k: Any, v: Any, log_decay: Any, initial_state: Any, segment_ids: Any, *,
    dtypes: Sequence[Any], max_head_dim: int, kernels: str, padding: str,
) -> tuple[int, int, int, int, int]:
    """:func:`check_lightning_inputs` plus the head dims a kernel family takes, 1 to
    ``max_head_dim``; returns (B, T, N, H, Hv).

    ``kernels`` names the family and ``padding`` says how it pads head dims inside, for the
    message (e.g. ``"TPU lightning kernels"``, ``"padded inside to multiples of 8"``).

    Raises:
      ValueError: what :func:`check_lightning_inputs` raises, or H or Hv outside
        [1, max_head_dim] (naming the fallback implementations).
    """
    b, t, n, h, hv = check_lightning_inputs(
        q, k, v, log_decay, initial_state, segment_ids, dtypes=dtypes
    )
    for name, dim in (("head_dim H", h), ("value head_dim Hv", hv)):
        if not 1 <= dim <= max_head_dim:
            raise ValueError(
                f"{name} is {dim}; the {kernels} take head dims from 1 to {max_head_dim} "
                f"({padding}); use impl='xla' or 'reference' for larger ones"
            )
    return b, t, n, h, hv


def chunk_run_ids(segment_ids: jax.Array, t_pad: int, chunk: int) -> jax.Array:
    """Per-token run index relative to the run that enters its chunk: [B, t_pad] int32.

    A run is a maximal stretch of tokens without a segment change (the state is reset where a
    run starts; token 0 never resets, so it continues ``initial_state``). ``r_t`` counts the
    resets from the start of t's chunk up to and including t, so inside a chunk:

    * row i sees the carried state iff ``r_i == 0``;
    * key j reaches query i (j <= i) iff ``r_i == r_j``;
    * key j reaches the chunk's final state iff ``r_j == r_last``, and the carried state
      survives the chunk iff ``r_last == 0``, where ``r_last = max_i r_i`` (r is monotone).

    Padding (up to ``t_pad``) repeats the last id, so padded tokens never reset.
    """
    b, t = segment_ids.shape
    seg = segment_ids.astype(jnp.int32)
    if t_pad > t:
        seg = jnp.pad(seg, ((0, 0), (0, t_pad - t)), mode="edge")
    change = (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)
    runs = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(change, axis=1)], axis=1)
    runs = runs.reshape(b, t_pad // chunk, chunk)
    before = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), runs[:, :-1, -1]], axis=1)
    return (runs - before[..., None]).reshape(b, t_pad).astype(jnp.int32)


def decay_power(log_decay: jax.Array, m: jax.Array) -> jax.Array:
    """lambda^m = exp(m log lambda) for token counts m >= 0, with lambda^0 = 1 also at decay 0
    (log lambda = -inf, where 0 * -inf would be NaN): decay 0 keeps the current token only."""
    return jnp.exp(jnp.where(m == 0, 0.0, log_decay * m))


def scale_state(factor: jax.Array, state: jax.Array) -> jax.Array:
    """``factor * state``, exactly 0 where ``factor`` is 0: a state dropped at a document
    start (or decayed to nothing) must not bring its NaN or inf along (0 * NaN is NaN).
    ``factor`` broadcasts against ``state``."""
    return jnp.where(factor == 0, jnp.zeros_like(state), factor * state)


def decayed_state_scan(carry: jax.Array, local: jax.Array, axis: int) -> jax.Array:
    """The state after each step of ``S_out = carry * S_in + local``, from a zero start.

    The state passing of chunked lightning attention: chunks (the ``xla`` path) or segments
    (the fused Triton forward) each leave their own state ``local`` and a factor ``carry`` on
    the state entering them (lambda^tokens, or 0 across a document start); an inclusive
    associative scan composes them. Seed an initial state by adding ``carry_0 * S_init`` to
    the first ``local`` (or prepending it with carry 1).

    Args:
      carry: [..., P, ...] float32, ``local``'s shape without its two trailing state dims.
      local: [..., P, ..., H, Hv] float32.
      axis: the step axis P (counted in ``carry``, non-negative).

    Returns:
      [..., P, ..., H, Hv] float32: the state leaving each step.
    """

    def compose(first, second):  # apply ``first`` then ``second``
        (a1, x1), (a2, x2) = first, second
        return a1 * a2, scale_state(a2[..., None, None], x1) + x2

    return jax.lax.associative_scan(compose, (carry, local), axis=axis)[1]
