"""Lightning attention module (letter ``"L"``), MiniMax-01 form; math in attnlab.ops.lightning.

Shapes: B batch, T new tokens, D model width, N heads, H head dim.

    q, k, v = SiLU(x W_qkv)                       [B, T, N, H] each
    o = lightning_attention(q, k, v, decay = minimax_decay(N, layer, L))
    y = (RMSNorm(o over the N*H concatenated heads) * sigmoid(x W_g)) W_O

No RoPE (positions are ignored): the decay is the position signal. The generation cache is the
constant [B, N, H, H] float32 state, so the per-token cache is 0 bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.nn.config import Config
from attnlab.nn.registry import Mechanism, check_inputs, check_no_cache, register
from attnlab.ops import lightning as _L
from pallas_kernels.common.static_args import check_int

if TYPE_CHECKING:
    from sharding.hybrid import HybridParallel

# A cache is {"state": [B, N, H, H] float32}.
Cache = dict[str, jax.Array]


@register("L", "lightning", ops=("lightning_attention",), experiment="minimax_hybrid")
class LightningAttention(Mechanism):
    """MiniMax-01 lightning attention layer with a recurrent-state cache.

    Reads ``cfg.d_model``, ``num_heads``, ``head_dim``, ``num_layers``, ``norm_eps``,
    ``attention_impl``, ``dtype``, ``param_dtype``. Every head has its own k and v (``num_kv_heads``
    does not apply to linear attention). ``cfg.attention_impl`` is passed as ``impl`` to
    :func:`attnlab.ops.lightning_attention` (``"auto"`` picks per platform).

    With a cache, the T new tokens continue the cached state (one token: the recurrence
    :func:`attnlab.ops.lightning_decode`; more: the chunked op with ``initial_state``).
    ``segment_ids`` reset the state at document boundaries inside the T tokens.

    With ``parallel`` (a :class:`sharding.hybrid.HybridParallel`) the forward without a cache
    runs sequence-parallel by ``parallel.layer("lightning")`` (LASP-2: one all-gather of the memory
    states per layer) with the same decay and segment ids; its ``impl`` is the per-block
    implementation. Giving a cache then raises: generation is single-device.

    Example:
      >>> attn = LightningAttention(cfg, layer_idx=0, rngs=nnx.Rngs(0))
      >>> y, _ = attn(x, positions=jnp.broadcast_to(jnp.arange(T), (B, T)))
      >>> attn.init_cache(B)["state"].shape  # (B, N, H, H) at any length: no KV cache
    """

    _implementations = staticmethod(_L.implementations)
    impl_kind = "a lightning attention"

    def __init__(self, cfg: Config, *, layer_idx: int, rngs: nnx.Rngs,
                 parallel: HybridParallel | None = None) -> None:
        super().__init__(cfg, layer_idx=layer_idx, parallel=parallel)
        n, h, d = cfg.num_heads, cfg.head_dim, cfg.d_model
        lin = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * n * h, **lin)
        self.gate = nnx.Linear(d, n * h, **lin)
        self.out = nnx.Linear(n * h, d, **lin)
        self.norm = nnx.RMSNorm(
            n * h, epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )
        # A static tuple, not an array attribute: the decay is a constant of the layer.
        self.decay = tuple(float(x) for x in _L.minimax_decay(n, layer_idx, cfg.num_layers))
        self.num_heads, self.head_dim, self.d_model = n, h, d
        self.impl = cfg.attention_impl
        self.dtype = cfg.dtype

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """x [B, T, D] -> (y [B, T, D], updated cache or None). ``positions`` are unused.

        Raises:
          ValueError: x not [B, T, D]; positions or segment_ids not [B, T] integers; a cache
            given to a module built with ``parallel``.
        """
        check_no_cache(self.parallel, cache, "lightning")
        b, t = check_inputs(x, self.d_model, positions, segment_ids)
        n, h = self.num_heads, self.head_dim
        qkv = jax.nn.silu(self.qkv(x.astype(self.dtype))).reshape(b, t, 3, n, h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        decay = np.asarray(self.decay, np.float32)
        if cache is None:
            if self.parallel is None:
                o = _L.lightning_attention(q, k, v, decay=decay, segment_ids=segment_ids,
                                           impl=self.impl)
            else:
                sharded = self.parallel.layer(self.mechanism_name)
                o = sharded(q, k, v, decay=decay, segment_ids=segment_ids)
            new_cache = None
        else:
            state = cache["state"]
            if t == 1:
                o, state = _L.lightning_decode(q, k, v, state, decay)
            else:
                o, state = _L.lightning_attention(
                    q, k, v, decay=decay, initial_state=state, return_state=True,
                    segment_ids=segment_ids, impl=self.impl,
                )
            new_cache = {"state": state}
        y = self.norm(o.reshape(b, t, n * h)) * jax.nn.sigmoid(self.gate(x.astype(self.dtype)))
        return self.out(y), new_cache

    def init_cache(self, batch_size: int, max_len: int = 0, dtype: jnp.dtype = jnp.float32
                   ) -> Cache:
        """An empty cache: the zero state [B, N, H, H] float32 (``max_len`` and ``dtype`` do
        not apply: the state is constant-size and kept in float32)."""
        batch_size = check_int("batch_size", batch_size)
        return {"state": jnp.zeros((batch_size, self.num_heads, self.head_dim, self.head_dim),
                                   jnp.float32)}

    @staticmethod
    def cache_bytes_per_token(cfg: Config, dtype_bytes: int = 2) -> float:
        """0: the cache does not grow with the sequence (see :meth:`state_bytes`)."""
        return 0.0

    @staticmethod
    def attention_flops_per_token(cfg: Config, seq_len: int) -> float:
        """Training FLOPs per token of the linear-attention core (forward + backward).

        Counted on the recurrent form, which is what the mechanism needs: per head a state
        update k^T v and a read q S, 2 * H * H each, times 3 for training: 12 * N * H * H,
        independent of ``seq_len``. The chunked kernels spend more (intra-chunk tiles), which
        is implementation cost, not model FLOPs, as for softmax's causal half.
        """
        del seq_len
        return float(12 * cfg.num_heads * cfg.head_dim * cfg.head_dim)

    @staticmethod
    def state_bytes(cfg: Config) -> int:
        """Bytes of one sequence's fixed cache in this layer: N * H * H float32 values."""
        return cfg.num_heads * cfg.head_dim * cfg.head_dim * 4
