"""Softmax attention module (letter ``"S"``): projections, RoPE, KV cache; math in attnlab.ops.

Shapes: B batch, T new tokens, D model width, N query heads, K kv heads, H head dim,
L cache length (``max_len``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.nn.config import Config
from attnlab.nn.layers import Linear
from attnlab.nn.registry import Mechanism, check_inputs, check_no_cache, register
from attnlab.nn.registry import check_impl as _check_impl
from attnlab.nn.star_cache import StarCache
from attnlab.ops.attention import attention
from attnlab.ops.attention import implementations as attention_implementations
from attnlab.ops.decode import MAX_QUERIES, decode_attention
from attnlab.ops.decode import implementations as decode_implementations
from attnlab.ops.rope import rope
from pallas_kernels.common.static_args import check_int

if TYPE_CHECKING:
    from sharding.hybrid import HybridParallel

# A cache is {"k": [B, L, K, H], "v": [B, L, K, H], "length": [B] int32}.
Cache = dict[str, jax.Array]


def check_impl(impl: str) -> None:
    """ValueError unless ``impl`` names a softmax attention implementation (or auto/pallas)."""
    _check_impl(impl, attention_implementations(), "an attention")


def keys_seen(cfg: Config, seq_len: int) -> int:
    """Keys a query sees in a sequence of ``seq_len``: all of them, or its window."""
    w = cfg.local_window_size
    return seq_len if w is None else min(seq_len, w + 1)


@register("S", "softmax", ops=("attention", "decode"), experiment=None)
class SoftmaxAttention(Mechanism):
    """Causal softmax attention with GQA/MQA, (partial) RoPE, sliding window and soft-cap.

    Reads ``cfg.num_heads``, ``num_kv_heads``, ``head_dim``, ``rope_theta``, ``rope_fraction``,
    ``local_window_size``, ``logits_soft_cap``, ``attention_impl``, ``dtype``, ``param_dtype``.

    Without a cache the forward is ``attnlab.ops.attention(..., is_causal=True)`` over the T
    tokens (the mask follows token order; ``positions`` only set the RoPE angles, so packed
    documents may restart their positions at 0). With a cache, the T new tokens are written at
    cache slots ``length .. length + T - 1`` of each row, and must sit at those positions;
    T <= 64 goes through ``attnlab.ops.decode_attention`` (ragged per-row lengths), longer
    chunks (prefill) through ``attention`` with a per-row ``q_offset``. ``T > max_len`` raises
    before tracing; a row whose traced ``length + T`` exceeds ``max_len`` cannot be detected
    under jit, so callers size the cache for the whole sequence (``generate`` does).

    With ``parallel`` (a :class:`sharding.hybrid.HybridParallel`) the same causal attention,
    with the same segment ids, window, soft-cap and GQA heads, runs sequence-parallel over
    the global arrays by ``parallel.layer("softmax")`` (ring, striped, zigzag or Ulysses, as the
    ``HybridParallel`` says; its ``impl`` is the per-block implementation). Giving a cache
    then raises: generation is single-device.

    A ``attnlab.nn.star_cache.StarCache`` in place of the dict runs one of Star
    Attention's phases (blockwise context on one device or a mesh, exact query over a
    sharded cache) on the same projected q, k, v: :func:`attnlab.nn.star_generate`.

    Example:
      >>> attn = SoftmaxAttention(cfg, layer_idx=0, rngs=nnx.Rngs(0))
      >>> y, _ = attn(x, positions=jnp.broadcast_to(jnp.arange(T), (B, T)))
    """

    _implementations = staticmethod(attention_implementations)
    impl_kind = "an attention"

    def __init__(self, cfg: Config, *, layer_idx: int, rngs: nnx.Rngs,
                 parallel: HybridParallel | None = None) -> None:
        super().__init__(cfg, layer_idx=layer_idx, parallel=parallel)
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q_proj = Linear(d, n * h, **kw)
        self.k_proj = Linear(d, k * h, **kw)
        self.v_proj = Linear(d, k * h, **kw)
        self.o_proj = Linear(n * h, d, **kw)

    @staticmethod
    def cache_bytes_per_token(cfg: Config, dtype_bytes: int = 2) -> float:
        """Bytes of K/V cache per token per layer: 2 * K * H * dtype_bytes."""
        return float(2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes)

    @staticmethod
    def attention_flops_per_token(cfg: Config, seq_len: int) -> float:
        """Training FLOPs per token of the score and value matmuls (forward + backward).

        PaLM convention: 12 * N * H * S with S the keys a query sees (seq_len, or the window),
        not halved for causality.
        """
        return float(12 * cfg.num_heads * cfg.head_dim * keys_seen(cfg, seq_len))

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> Cache:
        """Empty cache: zero K/V [B, max_len, K, H] in ``dtype`` (default cfg.dtype), length 0."""
        batch_size, max_len = check_int("batch_size", batch_size), check_int("max_len", max_len)
        cfg = self.cfg
        shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
        dtype = cfg.dtype if dtype is None else dtype
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "length": jnp.zeros((batch_size,), jnp.int32),
        }

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """x [B, T, D], positions [B, T] int32, segment_ids [B, T] or None -> (y [B, T, D], cache).

        Raises:
          ValueError: x not [B, T, D]; positions not [B, T]; segment_ids given with a cache;
            T larger than the cache; a cache given to a module built with ``parallel``.
        """
        cfg = self.cfg
        check_no_cache(self.parallel, cache, "softmax")
        if positions is None:
            raise ValueError("positions are required: [B, T] int32 global token positions")
        b, t = check_inputs(x, cfg.d_model, positions, segment_ids)
        n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = self.q_proj(x).reshape(b, t, n, h)
        kk = self.k_proj(x).reshape(b, t, k, h)
        v = self.v_proj(x).reshape(b, t, k, h)
        q = rope(q, positions, theta=cfg.rope_theta, rope_dim=cfg.rope_dim)
        kk = rope(kk, positions, theta=cfg.rope_theta, rope_dim=cfg.rope_dim)
        w = cfg.local_window_size
        if cache is None:
            mask = dict(local_window_size=None if w is None else (w, 0), segment_ids=segment_ids,
                        logits_soft_cap=cfg.logits_soft_cap)
            if self.parallel is None:
                out = attention(q, kk, v, is_causal=True, impl=cfg.attention_impl, **mask)
            else:
                sharded = self.parallel.layer(self.mechanism_name)
                out = sharded(q, kk, v, is_causal=True, **mask)
        else:
            if segment_ids is not None:
                raise ValueError(
                    "segment_ids are for packed training batches; pass segment_ids=None "
                    "when decoding with a cache (one sequence per row)"
                )
            if isinstance(cache, StarCache):  # a Star Attention phase (attnlab.nn.star)
                out, cache = cache.attend(q, kk, v, logits_soft_cap=cfg.logits_soft_cap,
                                          impl=cfg.attention_impl)
            else:
                out, cache = self._cached(q, kk, v, cache)
        y = self.o_proj(out.astype(cfg.dtype).reshape(b, t, n * h))
        return y, cache

    def _cached(self, q, k, v, cache: Cache) -> tuple[jax.Array, Cache]:
        cfg = self.cfg
        b, t = q.shape[:2]
        max_len = cache["k"].shape[1]
        if t > max_len:
            raise ValueError(
                f"{t} new tokens do not fit a cache of max_len={max_len}; make the cache "
                "longer (init_caches(model, batch_size, max_len))"
            )
        dt = cache["k"].dtype
        q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
        length = cache["length"]
        write = jax.vmap(lambda c, new, at: jax.lax.dynamic_update_slice_in_dim(c, new, at, 0))
        ck, cv = write(cache["k"], k, length), write(cache["v"], v, length)
        new_len = length + t
        w = cfg.local_window_size
        if t <= MAX_QUERIES:
            out = decode_attention(
                q, ck, cv, kv_lengths=new_len, local_window_size=w,
                logits_soft_cap=cfg.logits_soft_cap, impl=_decode_impl(cfg.attention_impl),
            )
        else:
            # Prefill of a long chunk: one attention call per row, so each row gets its own
            # q_offset; cache slots past a row's length lie in its queries' future (causal).
            def one_row(qr, kr, vr, offset):
                return attention(
                    qr[None], kr[None], vr[None], is_causal=True, q_offset=offset,
                    local_window_size=None if w is None else (w, 0),
                    logits_soft_cap=cfg.logits_soft_cap, impl=cfg.attention_impl,
                )[0]

            out = jax.vmap(one_row)(q, ck, cv, length)
        return out, {"k": ck, "v": cv, "length": new_len}


def _decode_impl(impl: str) -> str:
    """The decode op's impl for a model's ``attention_impl`` (cuDNN has no decode: auto)."""
    return impl if impl in {"auto", "pallas", *decode_implementations()} else "auto"
