"""Multi-head latent attention module (letter ``"M"``): DeepSeek-V2/V3 MLA with a compact cache.

Shapes: B batch, T new tokens, D model width, N heads, d_c latent rank (``kv_lora_rank``),
d_R decoupled RoPE dim, d_n per-head no-RoPE query/key dim, d_v per-head value dim, L cache
length. The math is :mod:`attnlab.ops.mla`; this module owns the projections::

    c, k_R      = x W_DKV, RoPE(x W_KR)           [B, T, d_c], [B, T, d_R]   (cached)
    q^C, q^R    = split(x W_Q)  (or through a rank-``q_lora_rank`` bottleneck)
    y           = W_O mla(q^C, RoPE(q^R), c, k_R; W_UK, W_UV)

The cache holds only ``[c ; k_R]``: d_c + d_R values per token per layer (a GQA layer holds
2 K H). Training and prefill materialize per-head K/V and run softmax attention (sequence
parallel through the ``"mla"`` rule of ``sharding/mla.py``); decoding (T <= 64 new tokens)
attends in latent space with the up-projections absorbed (:func:`attnlab.ops.mla.mla_decode`).

``cfg.mla_rope == "per_head"`` is TransMLA's exact form of GQA (``attnlab.convert``): no
k_R (d_R = 0), and RoPE rotates the first ``cfg.rope_dim`` dims of each head's query and
*up-projected* key::

    c = x W_DKV,   k_i = RoPE(c W_UK,i),   v_i = c W_UV,i,   q_i = RoPE(x W_Q,i)

RoPE between the factors means W_UK cannot be absorbed into the query, so this mode
materializes per-head K/V from the latent cache at every step (cache slot l holds the token
at position l): the cache is as compact (d_c values per token), the decode is not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.nn.attention import keys_seen
from attnlab.nn.config import Config
from attnlab.nn.layers import Linear
from attnlab.nn.registry import Mechanism, check_inputs, check_no_cache, register
from attnlab.ops import mla
from attnlab.ops.attention import attention
from attnlab.ops.attention import implementations as attention_implementations
from attnlab.ops.decode import MAX_QUERIES, decode_attention
from attnlab.ops.decode import implementations as decode_implementations
from attnlab.ops.rope import rope
from pallas_kernels.common.static_args import check_int

if TYPE_CHECKING:
    from sharding.hybrid import HybridParallel

# A cache is {"latent": [B, L, d_c + d_R], "length": [B] int32}.
Cache = dict[str, jax.Array]


def _latent_impl(impl: str) -> str:
    """The latent decode op's impl for a model's ``attention_impl`` (others: auto)."""
    return impl if impl in {"auto", "pallas", *mla.implementations()} else "auto"


def _write_latent(cache: Cache, latent: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes the T new latents [B, T, W] at each row's length: (cache [B, L, W], length,
    length + T). Raises ValueError when T > L."""
    t, max_len = latent.shape[1], cache["latent"].shape[1]
    if t > max_len:
        raise ValueError(
            f"{t} new tokens do not fit a cache of max_len={max_len}; make the cache "
            "longer (init_caches(model, batch_size, max_len))"
        )
    length = cache["length"]
    write = jax.vmap(lambda c, new, at: jax.lax.dynamic_update_slice_in_dim(c, new, at, 0))
    lat = write(cache["latent"], latent.astype(cache["latent"].dtype), length)
    return lat, length, length + t


def _softmax_decode_impl(impl: str) -> str:
    """The decode op's impl for a model's ``attention_impl`` (per_head mode; others: auto)."""
    return impl if impl in {"auto", "pallas", *decode_implementations()} else "auto"


@register("M", "mla", ops=("attention", "mla_decode"), experiment="transmla")
class MultiHeadLatentAttention(Mechanism):
    """Causal MLA: low-rank joint KV latent, decoupled RoPE key, absorbed latent decoding.

    Reads ``cfg.num_heads``, ``kv_lora_rank``, ``qk_rope_head_dim``, ``qk_nope_head_dim``,
    ``v_head_dim``, ``q_lora_rank``, ``mla_rope`` (and ``rope_dim`` when it is
    ``"per_head"``), ``rope_theta``, ``local_window_size``,
    ``attention_impl``, ``dtype``, ``param_dtype``. Parameters: ``q_proj`` (or ``q_down`` and
    ``q_up``), ``kv_down`` [D, d_c + d_R], ``w_uk`` [d_c, N, d_n], ``w_uv`` [d_c, N, d_v],
    ``o_proj`` [N d_v, D].

    Example:
      >>> attn = MultiHeadLatentAttention(cfg, layer_idx=0, rngs=nnx.Rngs(0))
      >>> cache = attn.init_cache(B, max_len=L)  # {"latent": [B, L, d_c + d_R], "length"}
      >>> y, cache = attn(x, positions=jnp.broadcast_to(jnp.arange(T), (B, T)), cache=cache)
    """

    _implementations = staticmethod(attention_implementations)
    impl_kind = "an attention"

    def __init__(self, cfg: Config, *, layer_idx: int, rngs: nnx.Rngs,
                 parallel: HybridParallel | None = None) -> None:
        super().__init__(cfg, layer_idx=layer_idx, parallel=parallel)
        if cfg.mla_rope == "per_head" and cfg.rope_dim > cfg.qk_nope_head_dim:
            raise ValueError(
                f"mla_rope='per_head' rotates rope_dim={cfg.rope_dim} dims of each head but "
                f"qk_nope_head_dim={cfg.qk_nope_head_dim}; lower rope_fraction or raise "
                "qk_nope_head_dim"
            )
        d, n = cfg.d_model, cfg.num_heads
        d_c, d_r, d_n, d_v = (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim,
                              cfg.v_head_dim)
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(d, n * (d_n + d_r), **kw)
        else:
            self.q_down = Linear(d, cfg.q_lora_rank, **kw)
            self.q_up = Linear(cfg.q_lora_rank, n * (d_n + d_r), **kw)
        self.kv_down = Linear(d, d_c + d_r, **kw)
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        self.w_uk = nnx.Param(init(rngs.params(), (d_c, n, d_n), cfg.param_dtype))
        self.w_uv = nnx.Param(init(rngs.params(), (d_c, n, d_v), cfg.param_dtype))
        self.o_proj = Linear(n * d_v, d, **kw)

    @staticmethod
    def cache_bytes_per_token(cfg: Config, dtype_bytes: int = 2) -> float:
        """Bytes of latent cache per token per layer: (d_c + d_R) * dtype_bytes."""
        return float((cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes)

    @staticmethod
    def attention_flops_per_token(cfg: Config, seq_len: int) -> float:
        """Training FLOPs per token of the score and value matmuls (forward + backward), as
        softmax's (PaLM convention): 6 N (d_n + d_R + d_v) S."""
        dims = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
        return float(6 * cfg.num_heads * dims * keys_seen(cfg, seq_len))

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> Cache:
        """Empty cache: zero latents [B, max_len, d_c + d_R] in ``dtype``, length 0."""
        batch_size, max_len = check_int("batch_size", batch_size), check_int("max_len", max_len)
        cfg = self.cfg
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        return {"latent": jnp.zeros((batch_size, max_len, width), cfg.dtype if dtype is None
                                    else dtype),
                "length": jnp.zeros((batch_size,), jnp.int32)}

    def _project(self, x, positions):
        """(q_nope [B,T,N,d_n], q_rope [B,T,N,d_R] rotated, latent [B,T,d_c + d_R] rotated)."""
        cfg = self.cfg
        b, t, _ = x.shape
        n, d_r, d_n = cfg.num_heads, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_up(self.q_down(x))
        q = q.reshape(b, t, n, d_n + d_r)
        if cfg.mla_rope == "per_head":  # the whole head is "q_nope"; RoPE on its first dims
            q = rope(q, positions, theta=cfg.rope_theta, rope_dim=cfg.rope_dim)
        q_nope = q[..., :d_n]
        q_rope = rope(q[..., d_n:], positions, theta=cfg.rope_theta)
        latent = self.kv_down(x)
        c, k_r = latent[..., :cfg.kv_lora_rank], latent[..., cfg.kv_lora_rank:]
        k_r = rope(k_r[:, :, None, :], positions, theta=cfg.rope_theta)[:, :, 0]
        return q_nope, q_rope, mla.latent_cache(c, k_r)

    def __call__(
        self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """x [B, T, D], positions [B, T] -> (y [B, T, D], cache), as every mechanism.

        Raises:
          ValueError: x, positions or segment_ids of the wrong shape or dtype; segment_ids
            with a cache; more new
            tokens than the cache holds; a cache given to a module built with ``parallel``.
        """
        cfg = self.cfg
        check_no_cache(self.parallel, cache, "mla")
        if positions is None:
            raise ValueError("positions are required: [B, T] int32 global token positions")
        b, t = check_inputs(x, cfg.d_model, positions, segment_ids)
        q_nope, q_rope, latent = self._project(x, positions)
        w_uk, w_uv = self.w_uk[...].astype(cfg.dtype), self.w_uv[...].astype(cfg.dtype)
        w = cfg.local_window_size
        window = None if w is None else (w, 0)
        if cache is not None and segment_ids is not None:
            raise ValueError(
                "segment_ids are for packed training batches; pass segment_ids=None "
                "when decoding with a cache (one sequence per row)"
            )
        if cfg.mla_rope == "per_head":
            out, cache = self._per_head(q_nope, latent, w_uk, w_uv, positions, window,
                                        segment_ids, cache)
        elif cache is None:
            out = self._full(q_nope, q_rope, latent, w_uk, w_uv, window, segment_ids)
        else:
            out, cache = self._cached(q_nope, q_rope, latent, w_uk, w_uv, cache)
        y = self.o_proj(out.astype(cfg.dtype).reshape(b, t, cfg.num_heads * cfg.v_head_dim))
        return y, cache

    def _full(self, q_nope, q_rope, latent, w_uk, w_uv, window, segment_ids):
        d_c = self.cfg.kv_lora_rank
        c, k_r = latent[..., :d_c], latent[..., d_c:]
        mask = dict(local_window_size=window, segment_ids=segment_ids)
        if self.parallel is None:
            return mla.mla_attention(q_nope, q_rope, c, k_r, w_uk, w_uv, is_causal=True,
                                     impl=self.cfg.attention_impl, **mask)
        k, v = mla.materialize_kv(c, k_r, w_uk, w_uv)
        q = jnp.concatenate([q_nope, q_rope], -1)
        scale = (q_nope.shape[-1] + q_rope.shape[-1]) ** -0.5
        return self.parallel.layer(self.mechanism_name)(q, k, v, is_causal=True, scale=scale,
                                                        **mask)

    def _cached(self, q_nope, q_rope, latent, w_uk, w_uv, cache: Cache):
        cfg = self.cfg
        t = q_nope.shape[1]
        lat, length, new_len = _write_latent(cache, latent)
        w = cfg.local_window_size
        dt = lat.dtype
        if t <= MAX_QUERIES:
            out = mla.mla_decode(q_nope.astype(dt), q_rope.astype(dt), lat, w_uk.astype(dt),
                                 w_uv.astype(dt), kv_lengths=new_len, local_window_size=w,
                                 impl=_latent_impl(cfg.attention_impl))
        else:  # a long prefill chunk: materialized, one attention call per row (its q_offset)
            d_c = cfg.kv_lora_rank
            k, v = mla.materialize_kv(lat[..., :d_c], lat[..., d_c:], w_uk.astype(dt),
                                      w_uv.astype(dt))
            q = jnp.concatenate([q_nope, q_rope], -1).astype(dt)
            scale = (q_nope.shape[-1] + q_rope.shape[-1]) ** -0.5

            def one_row(qr, kr, vr, offset):
                return attention(qr[None], kr[None], vr[None], is_causal=True, q_offset=offset,
                                 local_window_size=None if w is None else (w, 0), scale=scale,
                                 impl=cfg.attention_impl)[0]

            out = jax.vmap(one_row)(q, k, v, length)
        return out, {"latent": lat, "length": new_len}

    def _per_head_kv(self, c, positions, w_uk, w_uv):
        """Per-head K = RoPE(c W_UK) [B, S, N, d_n] and V = c W_UV [B, S, N, d_v]."""
        empty = c[..., :0]  # no decoupled k_R in this mode
        k, v = mla.materialize_kv(c, empty, w_uk, w_uv)
        cfg = self.cfg
        return rope(k, positions, theta=cfg.rope_theta, rope_dim=cfg.rope_dim), v

    def _per_head(self, q, c, w_uk, w_uv, positions, window, segment_ids, cache):
        """TransMLA's exact GQA form: materialized per-head K/V with RoPE after W_UK."""
        cfg = self.cfg
        scale = q.shape[-1] ** -0.5
        if cache is None:
            k, v = self._per_head_kv(c, positions, w_uk, w_uv)
            mask = dict(local_window_size=window, segment_ids=segment_ids)
            if self.parallel is None:
                return attention(q, k, v, is_causal=True, scale=scale,
                                 impl=cfg.attention_impl, **mask), None
            return self.parallel.layer(self.mechanism_name)(q, k, v, is_causal=True,
                                                            scale=scale, **mask), None
        b, t = q.shape[:2]
        lat, length, new_len = _write_latent(cache, c)
        dt, max_len = lat.dtype, lat.shape[1]
        slots = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (b, max_len))
        k, v = self._per_head_kv(lat, slots, w_uk.astype(dt), w_uv.astype(dt))
        q = q.astype(dt)
        w = cfg.local_window_size
        if t <= MAX_QUERIES:
            out = decode_attention(q, k, v, kv_lengths=new_len, local_window_size=w,
                                   scale=scale, impl=_softmax_decode_impl(cfg.attention_impl))
        else:  # a long prefill chunk: one attention call per row (its q_offset)
            def one_row(qr, kr, vr, offset):
                return attention(qr[None], kr[None], vr[None], is_causal=True, q_offset=offset,
                                 local_window_size=window, scale=scale,
                                 impl=cfg.attention_impl)[0]

            out = jax.vmap(one_row)(q, k, v, length)
        return out, {"latent": lat, "length": new_len}
