"""A drop-in for ``jax.nn.dot_product_attention`` that runs attnlab's implementations.

Same signature, shapes and results as ``jax.nn.dot_product_attention`` (JAX 0.10): [B, T, N, H]
or [T, N, H] inputs, GQA, an additive ``bias``, a boolean ``mask``, ``is_causal``,
``query_seq_lengths``/``key_value_seq_lengths``, ``local_window_size``, ``return_residual``;
the call goes through :func:`attnlab.ops.attention` (the registry), so ``implementation=`` may
also name an attnlab implementation ("pallas_triton", "pallas_tpu", "reference", "auto").

How jax.nn's arguments become attnlab's (masks as values, never a [T, S] boolean in a kernel):

* ``is_causal`` and ``local_window_size`` are attnlab's own ``MaskSpec``;
* ``query_seq_lengths``, ``key_value_seq_lengths`` and a boolean mask that depends only on the
  key (shape [B|1, 1, 1, S]) or only on the query ([B|1, 1, T, 1]) become segment ids, which
  every kernel takes (a query past its length, or a masked one, gets an id no key has);
* any other boolean mask becomes a ``-inf`` bias (attnlab reads a ``-inf`` bias as a masked
  key), which the ``"xla"`` and ``"reference"`` implementations take and the kernels do not.
  ``implementation=None`` then falls back to one that takes it (``explain_dot_product_attention``
  says why); a kernel named explicitly raises ``NotImplementedError``.

Where jax.nn's own XLA path gives a particular value, so does this function:

* a row that sees no key (all keys masked, a zero key length, a window past the keys)
  gets the mean of all S values (jax.nn's softmax over equal masked logits is uniform), and
  its residual is jax.nn's masked logit ``-0.7 * finfo(float32).max`` (cast to the key dtype:
  ``-inf`` in float16, as in jax.nn);
* rows at or past ``query_seq_lengths`` are 0;
* the residual is the natural log-sum-exp [B, T, N] (or [T, N]) in the key dtype, with no
  gradient (``jax.lax.stop_gradient``, as jax.nn).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops.attention import attention, explain, implementations
from attnlab.ops.attention import platform as _platform
from pallas_kernels.common.masks import MaskSpec

# jax.nn's masked logit (jax._src.nn.functions._get_large_negative for float32 logits): the
# log-sum-exp of a row that sees no key is this value (log S is below its float32 ulp).
MASKED_LSE = -0.7 * float(np.finfo(np.float32).max)


class _Call(NamedTuple):
    """One jax.nn call translated into an attnlab call."""

    q: jax.Array  # [B, T, N, H]
    k: jax.Array  # [B, S, K, H]
    v: jax.Array  # [B, S, Kv, Hv]
    kwargs: dict[str, Any]  # attention()'s keywords (masks, bias, scale)
    impl: str  # attnlab impl name
    q_valid: jax.Array | None  # [B, T] rows before query_seq_lengths (others are zeroed)
    dead_rows: bool  # some row may see no key (it then gets jax.nn's value)
    mask_as_bias: tuple[int, ...] | None  # shape of a mask that had to become a bias
    unbatched: bool  # [T, N, H] inputs


def resolve_implementation(implementation: str | None) -> str:
    """attnlab's impl name for ``implementation`` (jax.nn's or attnlab's name; None is
    ``"auto"``); ValueError naming the choices if unknown."""
    if implementation is None:
        return "auto"
    known = {"auto", "pallas", *implementations()}
    if not isinstance(implementation, str) or implementation not in known:
        names = ", ".join(repr(n) for n in sorted(known - {"cudnn"}))
        raise ValueError(
            f"implementation must be None, 'xla' or 'cudnn' (jax.nn's names) or one of attnlab's "
            f"{names}; got {implementation!r}"
        )
    return implementation


def _as_4d(name: str, x: Any, layout: str) -> jax.Array:
    """A bias or mask of at most 4 dims, with leading 1s prepended as jax.nn does."""
    x = jnp.asarray(x)
    if x.ndim > 4:
        raise ValueError(f"{name} must have at most 4 dims ({layout}), got shape {x.shape}")
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _check_broadcastable(name: str, x: jax.Array, want: tuple[int, ...]) -> None:
    if any(d not in (1, w) for d, w in zip(x.shape, want, strict=True)):
        raise ValueError(
            f"{name} of shape {x.shape} is not broadcastable to [B, N, T, S] = {want}: each "
            "dim must be 1 or the full size"
        )


def _before_lengths(name: str, lengths: Any, b: int, size: int) -> jax.Array:
    """[B, size] bool: index < lengths[b]."""
    lengths = jnp.asarray(lengths)
    if lengths.shape != (b,):
        raise ValueError(f"{name} must have shape (B,) = ({b},), got {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers (int32 token counts), got dtype {lengths.dtype}")
    return jnp.arange(size, dtype=jnp.int32)[None, :] < lengths.astype(jnp.int32)[:, None]


def _and(a: jax.Array | None, b: jax.Array) -> jax.Array:
    return b if a is None else a & b


def _window_kills_rows(spec: MaskSpec, t: int, s: int) -> bool:
    """Whether causal/window alone leave some query row with no key (static)."""
    rows = np.arange(t)
    lo = rows - spec.window_left if spec.window_left is not None else np.zeros(t, np.int64)
    hi = np.full(t, s - 1)
    if spec.window_right is not None:
        hi = np.minimum(hi, rows + spec.window_right)
    if spec.causal:
        hi = np.minimum(hi, rows)
    return bool(np.any(np.maximum(lo, 0) > hi))


def _translate(
    query, key, value, bias, mask, scale, is_causal, query_seq_lengths, key_value_seq_lengths,
    local_window_size, implementation,
) -> _Call:
    impl = resolve_implementation(implementation)
    rank = jnp.ndim(query)
    if rank not in (3, 4):
        raise ValueError(
            f"query must have shape [B, T, N, H] or [T, N, H], got shape {jnp.shape(query)}"
        )
    for name, x in (("key", key), ("value", value)):
        if jnp.ndim(x) != rank:
            layout = "[B, S, K, H]" if rank == 4 else "[S, K, H]"
            raise ValueError(
                f"{name} must have query's rank {rank} ({layout}), got shape {jnp.shape(x)}"
            )
    q, k, v = (jnp.asarray(x) for x in (query, key, value))
    if rank == 3:
        q, k, v = q[None], k[None], v[None]
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if k.shape[0] != b or v.shape[:2] != (b, s):
        raise ValueError(
            f"query [B, T, N, H] {q.shape}, key [B, S, K, H] {k.shape} and value {v.shape} "
            "must share B, and key and value S"
        )
    if k.shape[3] != h:
        raise ValueError(f"query head dim {h} and key head dim {k.shape[3]} must be equal")
    if n % kh or n % v.shape[2]:
        raise ValueError(
            f"query has {n} heads but key has {kh} and value {v.shape[2]}; the number of query "
            "heads must be a multiple of the key/value heads (GQA)"
        )
    spec = MaskSpec.from_jax_nn(is_causal=is_causal, local_window_size=local_window_size)
    want = (b, n, t, s)
    layout = "[B, N, T, S]" if rank == 4 else "[N, T, S]"

    bias4 = None
    if bias is not None:
        bias4 = _as_4d("bias", bias, layout)
        _check_broadcastable("bias", bias4, want)
        if not jnp.issubdtype(bias4.dtype, jnp.floating):
            bias4 = bias4.astype(q.dtype)

    q_ok = kv_ok = q_valid = None
    mask_as_bias = None
    if mask is not None:
        m4 = _as_4d("mask", mask, layout)
        if m4.dtype != jnp.bool_:
            raise ValueError(
                f"mask must be boolean (True: attend), got dtype {m4.dtype}; pass an additive "
                "mask as bias"
            )
        _check_broadcastable("mask", m4, want)
        mb, mn, mt, _ = m4.shape
        if mn == 1 and mt == 1:  # depends on the key only: key padding
            kv_ok = jnp.broadcast_to(m4[:, 0, 0, :], (b, s))
        elif mn == 1 and m4.shape[3] == 1:  # depends on the query only
            q_ok = jnp.broadcast_to(m4[:, 0, :, 0], (b, t))
        else:  # a general mask: a -inf bias (xla and reference take it)
            mask_as_bias = m4.shape
            base = jnp.zeros((), q.dtype) if bias4 is None else bias4
            bias4 = jnp.where(m4, base, jnp.asarray(-jnp.inf, base.dtype))
    if query_seq_lengths is not None:
        q_valid = _before_lengths("query_seq_lengths", query_seq_lengths, b, t)
        q_ok = _and(q_ok, q_valid)
    if key_value_seq_lengths is not None:
        kv_ok = _and(kv_ok, _before_lengths("key_value_seq_lengths", key_value_seq_lengths, b, s))

    segment_ids = None
    if q_ok is not None or kv_ok is not None:
        # Valid queries (id 0) see valid keys (id 0); a masked query (1) sees nothing, a masked
        # key (2) is seen by nothing.
        zeros = jnp.zeros((b, t), jnp.int32)
        q_ids = zeros if q_ok is None else jnp.where(q_ok, 0, 1).astype(jnp.int32)
        kv_ids = (jnp.zeros((b, s), jnp.int32) if kv_ok is None
                  else jnp.where(kv_ok, 0, 2).astype(jnp.int32))
        segment_ids = (q_ids, kv_ids)

    if isinstance(scale, jax.core.Tracer):  # attnlab folds a static scale into its kernels
        q = q * scale.astype(q.dtype)
        scale = 1.0
    kwargs = dict(bias=bias4, is_causal=is_causal, local_window_size=local_window_size,
                  segment_ids=segment_ids, scale=scale)
    dead_rows = mask is not None or segment_ids is not None or _window_kills_rows(spec, t, s)
    return _Call(q, k, v, kwargs, impl, q_valid, dead_rows, mask_as_bias, rank == 3)


def _mean_values(v: jax.Array, n: int) -> jax.Array:
    """[B, 1, N, Hv] float32: each query head's mean value over all S keys."""
    mean = jnp.mean(v.astype(jnp.float32), axis=1)  # [B, Kv, Hv]
    return jnp.repeat(mean, n // v.shape[2], axis=1)[:, None]


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    return_residual: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``jax.nn.dot_product_attention``, computed by attnlab's implementations.

    Letters as in jax.nn: B batch, T queries, S keys, N query heads, K key/value heads, H head
    dim. Module docstring: how masks map onto attnlab's, and the values of masked rows.

    Args:
      query: [B, T, N, H] or [T, N, H].
      key: [B, S, K, H] or [S, K, H]; N must be a multiple of K (GQA/MQA).
      value: [B, S, K, H] or [S, K, H] (attnlab also takes other value head counts dividing N,
        and another head dim Hv).
      bias: optional additive logits bias, at most 4-D, broadcastable to [B, N, T, S] (or
        [N, T, S]); leading dims are prepended as in jax.nn.
      mask: optional boolean mask (True: attend), at most 4-D, broadcastable like ``bias``.
      scale: logits scale, default 1 / sqrt(H); a Python float (a traced scale is folded into
        the query).
      is_causal: query t sees keys s <= t.
      query_seq_lengths: [B] int32; rows t >= length are 0.
      key_value_seq_lengths: [B] int32; keys s >= length are masked.
      local_window_size: int w or (left, right): query t sees keys in [t - left, t + right].
      implementation: None (attnlab's ``"auto"``: the fastest implementation that takes the
        call), jax.nn's ``"xla"`` (attnlab's memory-linear XLA path) or ``"cudnn"``
        (``jax.nn.dot_product_attention(implementation="cudnn")`` itself, CUDA GPUs only), or
        an attnlab name: ``"reference"``, ``"pallas"``, ``"pallas_triton"``, ``"pallas_tpu"``,
        ``"auto"``.
      return_residual: also return the log-sum-exp of each row, [B, T, N] (or [T, N]) in the
        key dtype, without gradient, as jax.nn.

    Returns:
      out with query's shape and dtype; with ``return_residual``, (out, residual).

    Raises:
      ValueError: bad ranks or shapes (heads that do not divide, a mask or bias that does not
        broadcast, a non-boolean mask, lengths not of shape [B]), unknown implementation.
      NotImplementedError: the named implementation cannot compute the call (for example a
        Pallas kernel given a bias, or a mask that is not a key or query mask); the message
        says why and what to use instead.

    Example:
      >>> out = dot_product_attention(q, k, v, is_causal=True, implementation="pallas_triton")
    """
    if implementation == "cudnn":
        if _platform() != "gpu":
            raise NotImplementedError(
                f"implementation='cudnn' is jax.nn's cuDNN kernel and needs a CUDA GPU (platform "
                f"is {_platform()}); use implementation=None or 'xla'"
            )
        return jax.nn.dot_product_attention(
            query, key, value, bias, mask, scale=scale, is_causal=is_causal,
            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=local_window_size, implementation="cudnn",
            return_residual=return_residual,
        )
    c = _translate(query, key, value, bias, mask, scale, is_causal, query_seq_lengths,
                   key_value_seq_lengths, local_window_size, implementation)
    need_lse = bool(return_residual) or c.dead_rows
    try:
        res = attention(c.q, c.k, c.v, return_residuals=need_lse, impl=c.impl, **c.kwargs)
    except NotImplementedError as e:
        hint = ""
        if c.mask_as_bias is not None:
            hint = (
                f"; the boolean mask of shape {c.mask_as_bias} is passed as a -inf bias: only "
                "a key mask [B|1, 1, 1, S] or a query mask [B|1, 1, T, 1] maps onto the segment "
                "ids that the kernels take"
            )
        reason = str(e).split("does not support this call: ", 1)[-1]
        raise NotImplementedError(
            f"implementation={implementation!r} cannot compute this call: {reason}{hint}; use "
            "implementation=None or 'xla'"
        ) from e
    out, lse = res if need_lse else (res, None)
    if c.dead_rows:  # jax.nn's value for a row that sees no key: uniform weights
        seen = jnp.isfinite(lse)[..., None]
        out = jnp.where(seen, out, _mean_values(c.v, c.q.shape[2]).astype(out.dtype))
    if c.q_valid is not None:
        out = jnp.where(c.q_valid[:, :, None, None], out, jnp.zeros((), out.dtype))
    if c.unbatched:
        out = out[0]
    if not return_residual:
        return out
    residual = jnp.where(jnp.isfinite(lse), lse, MASKED_LSE)
    residual = jax.lax.stop_gradient(residual).astype(c.k.dtype)
    return out, residual[0] if c.unbatched else residual


def explain_dot_product_attention(
    query: Any, key: Any, value: Any, bias: Any = None, mask: Any = None, *,
    plat: str | None = None, **kwargs: Any,
) -> dict[str, str | None]:
    """Why each attnlab implementation does or does not take a ``dot_product_attention`` call.

    Args:
      query, key, value, bias, mask: as :func:`dot_product_attention`; arrays or
        ``jax.ShapeDtypeStruct``\\ s.
      plat: the platform to explain for ("cpu", "gpu", "tpu"; default: this one).
      **kwargs: the other keywords of :func:`dot_product_attention` (``implementation`` is
        ignored).

    Returns:
      attnlab impl name -> None if it computes the call, else the reason.

    Raises:
      ValueError: what :func:`dot_product_attention` raises for bad arguments.

    Example:
      >>> explain_dot_product_attention(q, k, v, mask=m)["pallas_triton"]
      "pallas_triton takes no bias; ..."
    """
    kwargs.pop("implementation", None)
    return_residual = bool(kwargs.pop("return_residual", False))
    lengths = {n: kwargs.pop(n, None) for n in ("query_seq_lengths", "key_value_seq_lengths")}
    static = {"scale": kwargs.pop("scale", None), "is_causal": kwargs.pop("is_causal", False),
              "local_window_size": kwargs.pop("local_window_size", None)}
    if kwargs:
        raise ValueError(f"unknown arguments {sorted(kwargs)}")
    found: dict[str, Any] = {}

    def build(q, k, v, bias, mask, lengths):
        c = _translate(q, k, v, bias, mask, static["scale"], static["is_causal"],
                       lengths["query_seq_lengths"], lengths["key_value_seq_lengths"],
                       static["local_window_size"], None)
        found["dead_rows"] = c.dead_rows
        found["scale"] = c.kwargs["scale"]
        return c.q, c.k, c.v, c.kwargs["bias"], c.kwargs["segment_ids"]

    q, k, v, b, seg = jax.eval_shape(build, query, key, value, bias, mask, lengths)
    if seg is not None:  # the registry reads segment ids as arrays; their values do not matter
        seg = tuple(jnp.zeros(x.shape, x.dtype) for x in seg)
    return explain(
        q, k, v, plat=plat, bias=b, segment_ids=seg, is_causal=static["is_causal"],
        local_window_size=static["local_window_size"], scale=found["scale"],
        return_residuals=return_residual or found["dead_rows"],
    )
