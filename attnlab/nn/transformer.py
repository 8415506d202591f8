"""The decoder LM: one pre-norm block per ``cfg.layer_pattern`` letter, mixing mechanisms.

Shapes: B batch, T tokens, D model width, V vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.nn import registry
from attnlab.nn.attention import check_impl  # importing it registers "S"
from attnlab.nn.config import Config
from attnlab.nn.layers import Embed, Linear, RMSNorm, SwiGLU

if TYPE_CHECKING:
    from sharding.hybrid import HybridParallel


class Block(nnx.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``; the mechanism comes from the registry."""

    def __init__(self, cfg: Config, *, layer_idx: int, rngs: nnx.Rngs,
                 parallel: HybridParallel | None = None) -> None:
        letter = cfg.layer_pattern[layer_idx]
        mechanism = registry.get(letter)
        norm_kw = dict(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.letter = letter
        self.attn_norm = RMSNorm(cfg.d_model, **norm_kw)
        self.attn = mechanism(cfg, layer_idx=layer_idx, rngs=rngs, parallel=parallel)
        self.mlp_norm = RMSNorm(cfg.d_model, **norm_kw)
        self.mlp = SwiGLU(
            cfg.d_model, cfg.mlp_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )

    def __call__(
        self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
        cache: Any = None,
    ) -> tuple[jax.Array, Any]:
        """x [B, T, D] -> (x [B, T, D], the mechanism's updated cache or None)."""
        y, cache = self.attn(
            self.attn_norm(x), positions=positions, segment_ids=segment_ids, cache=cache
        )
        x = x + y.astype(x.dtype)
        x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
        return x, cache


class Transformer(nnx.Module):
    """Decoder-only LM over ``cfg.layer_pattern`` (e.g. ``"SSSS"``, ``"LLLLLLLS"``).

    Sequence parallelism: with ``parallel`` (a :class:`sharding.hybrid.HybridParallel` over
    the run's mesh) every attention module attends across ``parallel.seq_axis`` by its own
    rule, ``parallel.layer(mechanism_name)`` (LASP-2 for lightning, ring / zigzag / Ulysses for
    softmax); everything else is per token, so the model is called on global [B, T] arrays
    sharded ``P(batch_axis, seq_axis)`` and GSPMD splits the rest. ``parallel`` is a static
    attribute (part of the graph definition); ``parallel.impl`` is the per-block
    implementation, so give it ``cfg.attention_impl`` (:func:`attnlab.train.mesh.model_parallel`
    does). Such a model does not decode with caches (generation is single-device).

    Args:
      cfg: the model configuration.
      rngs: parameter initialisation.
      parallel: None (single device, or data parallelism only) or the sequence-parallel plan.

    Raises:
      ValueError: a bad ``cfg`` (see ``attnlab.nn.transformer.validate``); ``parallel`` without a
        sequence-parallel rule for one of the pattern's mechanisms.

    Example:
      >>> model = Transformer(Config(d_model=64, num_layers=2), rngs=nnx.Rngs(0))
      >>> logits, _ = model(tokens)             # [B, T] int32 -> [B, T, V] float32
      >>> hp = HybridParallel(mesh=mesh, batch_axis="data", softmax_strategy="zigzag")
      >>> sp_model = Transformer(cfg, rngs=nnx.Rngs(0), parallel=hp)  # same params, same math
    """

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs,
                 parallel: HybridParallel | None = None) -> None:
        validate(cfg)
        if parallel is not None:
            for letter in dict.fromkeys(cfg.layer_pattern):
                # fails now, not at the first call, without a rule
                parallel.layer(registry.get(letter).mechanism_name)
        self.cfg = cfg
        self.parallel = parallel
        self.embed = Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.blocks = nnx.List(
            [Block(cfg, layer_idx=i, rngs=rngs, parallel=parallel)
             for i in range(cfg.num_layers)]
        )
        self.final_norm = RMSNorm(
            cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        self.head = None if cfg.tie_embeddings else Linear(
            cfg.d_model, cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        caches: list[Any] | None = None,
    ) -> tuple[jax.Array, list[Any] | None]:
        """Logits of every token, and the updated caches when decoding.

        Args:
          tokens: [B, T] int32 ids in [0, vocab_size). Ids are not range-checked here (they
            may be traced): an id outside the range reads a wrong embedding row (-1: the
            last) or NaN. The data loaders (``attnlab.data``), ``generate`` and the CLI
            check them.
          positions: [B, T] int32 global positions; default ``arange(T)`` per row (with
            ``caches``: each softmax cache's ``length + arange(T)``).
          segment_ids: [B, T] int32 document ids of packed rows, or None (training only).
          caches: None (training / full forward) or the list from ``init_caches``.

        Returns:
          (logits [B, T, V] float32, caches): caches is None when None was given.

        Raises:
          ValueError: tokens not [B, T]; tokens, positions or segment_ids not integers;
            T > cfg.max_seq_len; positions/segment_ids of the wrong shape; a cache list of
            the wrong length; positions needed but not derivable; caches given to a model
            built with ``parallel``.
        """
        cfg = self.cfg
        if isinstance(tokens, (list, tuple)):
            tokens = np.asarray(tokens)
        if jnp.ndim(tokens) != 2:
            raise ValueError(f"tokens must have shape [batch, seq], got {jnp.shape(tokens)}")
        b, t = jnp.shape(tokens)
        for name, arr in (("tokens", tokens), ("positions", positions),
                          ("segment_ids", segment_ids)):
            if arr is not None and not jnp.issubdtype(jnp.result_type(arr), jnp.integer):
                raise ValueError(
                    f"{name} must be an integer array (int32), got dtype {jnp.result_type(arr)}"
                )
        if t > cfg.max_seq_len:
            raise ValueError(
                f"sequence of {t} tokens is longer than max_seq_len={cfg.max_seq_len}; raise "
                "Config.max_seq_len or shorten the input"
            )
        for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
            if arr is not None and jnp.shape(arr) != (b, t):
                raise ValueError(
                    f"{name} must have shape ({b}, {t}) like tokens, got {jnp.shape(arr)}"
                )
        registry.check_no_cache(self.parallel, caches, "this model's")
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(
                f"caches has {len(caches)} entries but the model has {len(self.blocks)} layers; "
                "build them with init_caches(model, batch_size, max_len)"
            )
        if positions is None:
            start = jnp.zeros((b,), jnp.int32) if caches is None else _cache_length(caches)
            positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        positions = jnp.asarray(positions, jnp.int32)
        x = self.embed(jnp.asarray(tokens))
        new_caches = None if caches is None else []
        for i, block in enumerate(self.blocks):
            x, c = block(
                x, positions=positions, segment_ids=segment_ids,
                cache=None if caches is None else caches[i],
            )
            if new_caches is not None:
                new_caches.append(c)
        x = self.final_norm(x)
        if self.head is None:
            logits = self.embed.attend(x)
        else:
            logits = jnp.einsum(
                "BTD,DV->BTV", x, self.head.kernel[...].astype(x.dtype),
                preferred_element_type=jnp.float32,
            )
        return logits.astype(jnp.float32), new_caches

    def num_params(self) -> int:
        """Number of parameters (the tied embedding counted once)."""
        return sum(int(p.size) for p in jax.tree.leaves(nnx.state(self, nnx.Param)))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token for MFU: 6 * N_matmul + the attention term of each layer.

        N_matmul counts the parameters used in matmuls (not the input embedding lookup; the
        output projection counts once, tied or not). The attention term of a layer comes from
        its mechanism's ``attention_flops_per_token(cfg, seq_len)`` (PaLM: 12 * N * H * S for
        softmax), 0 for a mechanism that does not define it.
        """
        cfg = self.cfg
        n = self.num_params()
        if not cfg.tie_embeddings:
            n -= cfg.vocab_size * cfg.d_model
        attn = 0.0
        for block in self.blocks:
            fn = getattr(type(block.attn), "attention_flops_per_token", None)
            if fn is not None:
                attn += float(fn(cfg, seq_len))
        return 6.0 * n + attn


def validate(cfg: Config) -> None:
    """Checks the model-level parts of ``cfg`` before any parameter is made or compiled.

    Raises:
      ValueError: unknown mechanism letters (the message lists the registered ones), a
        pattern whose length is not num_layers, an unknown attention_impl.
    """
    if not isinstance(cfg, Config):
        raise ValueError(f"cfg must be an attnlab.nn.Config, got {type(cfg).__name__}")
    if len(cfg.layer_pattern) != cfg.num_layers:
        raise ValueError(
            f"layer_pattern {cfg.layer_pattern!r} has {len(cfg.layer_pattern)} letters but "
            f"num_layers={cfg.num_layers}; give one letter per layer"
        )
    unknown = sorted({c for c in cfg.layer_pattern} - set(registry.mechanisms()))
    if unknown:
        known = ", ".join(f"{k}={v}" for k, v in registry.mechanisms().items())
        raise ValueError(
            f"layer_pattern {cfg.layer_pattern!r} uses unknown mechanism letter(s) "
            f"{', '.join(map(repr, unknown))}; known: {known}"
        )
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(
            f"num_heads={cfg.num_heads} is not a multiple of num_kv_heads={cfg.num_kv_heads}"
        )
    check_impl(cfg.attention_impl)


def _cache_length(caches: list[Any]) -> jax.Array:
    """[B] int32 tokens already in the caches, from the first cache that records a length."""
    for c in caches:
        if isinstance(c, dict) and "length" in c:
            return c["length"].astype(jnp.int32)
    raise ValueError(
        "no layer cache records its length (no softmax layer); pass positions explicitly "
        "when decoding with caches"
    )
