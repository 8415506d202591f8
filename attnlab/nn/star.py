"""Generation with Star Attention (Acharya et al. 2024, arXiv 2411.17116): star_generate.

Shapes: B batch, T0 prompt length, C context length, V vocabulary.

The prompt is ``[context; query]``. Phase 1 encodes the context block by block, each block
seeing its anchor and itself (:mod:`attnlab.ops.star`); phase 2 encodes the query and
generates with exact attention over the whole cache. On one device phase 1 is one masked
prefill and phase 2 is :func:`attnlab.nn.generate`'s own decode path. With a ``mesh``, block
m of the context is encoded on device m of ``seq_axis`` and its K/V stay there; phase 2 merges
every device's partial attention by log-sum-exp (:mod:`attnlab.nn.star_cache`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attnlab.nn.attention import SoftmaxAttention
from attnlab.nn.generate import check_request, decode_loop
from attnlab.nn.star_cache import init_star_caches
from attnlab.nn.transformer import Transformer
from attnlab.ops.star import StarConfig
from pallas_kernels.common.static_args import is_int


def check_star_model(model: Transformer) -> None:
    """ValueError naming the first layer Star Attention generation cannot run: every layer
    must be softmax attention (``"S"``) without a sliding window."""
    cfg = model.cfg
    for i, block in enumerate(model.blocks):
        if not isinstance(block.attn, SoftmaxAttention):
            raise ValueError(
                f"layer {i} of layer_pattern {cfg.layer_pattern!r} is "
                f"{type(block.attn).mechanism_name} ({block.letter!r}); Star Attention "
                "generation supports softmax attention ('S') layers only (its two phases are "
                "built on their K/V cache); use a model whose layer_pattern is all 'S'"
            )
    if cfg.local_window_size is not None:
        raise ValueError(
            f"local_window_size={cfg.local_window_size}: Star Attention generation needs "
            "full (global) softmax attention layers; use a model without a sliding window"
        )


def _context_length(t0: int, star: StarConfig, context_length: Any) -> int:
    if context_length is None:
        context_length = (t0 - 1) // star.block_size * star.block_size
        if context_length == 0:
            raise ValueError(
                f"a prompt of {t0} tokens holds no whole block of block_size="
                f"{star.block_size} before its last token; give a longer prompt or a smaller "
                "block_size"
            )
    if not is_int(context_length) or not 0 < context_length < t0:
        raise ValueError(
            f"context_length must be an int in [1, {t0 - 1}] (the prompt has {t0} tokens and "
            f"the query at least one), got {context_length!r}"
        )
    star.num_blocks(int(context_length))
    return int(context_length)


def star_generate(
    model: Transformer,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    star: StarConfig,
    context_length: int | None = None,
    mesh: Mesh | None = None,
    seq_axis: str = "sp",
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
    return_logits: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Continues each prompt by ``max_new_tokens`` tokens, its context encoded by Star
    Attention (one ``jax.jit``, as :func:`attnlab.nn.generate`).

    Args:
      model: a Transformer whose layers are all softmax attention without a window.
      prompt: [B, T0] int32: the context (first ``context_length`` tokens), then the query.
      max_new_tokens: tokens to add (>= 0); T0 + max_new_tokens <= cfg.max_seq_len.
      star: block size and anchor of the context phase (:class:`attnlab.ops.star.StarConfig`).
      context_length: C, a multiple of ``star.block_size`` below T0; default the longest
        such prefix (the rest of the prompt, at least its last token, is the query).
      mesh: None (one device) or a mesh whose ``seq_axis`` has C / block_size devices, one
        block each.
      seq_axis: the mesh axis the context is split over.
      temperature, top_k, rng: as :func:`attnlab.nn.generate`.
      return_logits: also return the logits [B, max_new_tokens, V] float32 each new token was
        chosen from.

    Returns:
      [B, T0 + max_new_tokens] int32 (and the logits). With one block (C = block_size) and
      any anchor this is full attention, :func:`attnlab.nn.generate`'s result.

    Raises:
      ValueError: what :func:`attnlab.nn.generate` rejects; a layer that is not softmax
        attention (named) or has a window; a context length that block_size does not divide
        or that leaves no query token; a mesh whose ``seq_axis`` is missing or does not have
        one device per block.

    Example:
      >>> out = star_generate(model, prompt, 8, star=StarConfig(block_size=256),
      ...                     context_length=1024)
    """
    if not isinstance(star, StarConfig):
        raise ValueError(f"star must be an attnlab.ops.star.StarConfig, got "
                         f"{type(star).__name__}")
    prompt, temperature = check_request(model, prompt, max_new_tokens, temperature, top_k)
    check_star_model(model)
    b, t0 = prompt.shape
    c = _context_length(t0, star, context_length)
    if mesh is not None:
        if not isinstance(mesh, Mesh) or seq_axis not in mesh.axis_names:
            raise ValueError(f"mesh must be a jax.sharding.Mesh with an axis {seq_axis!r} "
                             f"(seq_axis), got {mesh!r}")
        if mesh.shape[seq_axis] != c // star.block_size:
            raise ValueError(
                f"the context of {c} tokens has {c // star.block_size} blocks of "
                f"{star.block_size} but mesh axis {seq_axis!r} has {mesh.shape[seq_axis]} "
                f"devices; use block_size = {c // mesh.shape[seq_axis]} (one block per device)"
            )
    if max_new_tokens == 0:
        if return_logits:
            return prompt, jnp.zeros((b, 0, model.cfg.vocab_size), jnp.float32)
        return prompt
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    if mesh is not None:
        # GSPMD lays out everything but the attention from the context's sharding, so the
        # model needs no sharding annotations of its own: the mesh's axes become Auto.
        auto = (AxisType.Auto,) * len(mesh.axis_names)
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
    tokens, logits = _star_generate(
        graphdef, state, prompt, rng, jnp.float32(temperature),
        jnp.int32(model.cfg.vocab_size if top_k is None else top_k),
        max_new_tokens=max_new_tokens, context_length=c, star=star, mesh=mesh,
        seq_axis=seq_axis, keep_logits=bool(return_logits),
    )
    return (tokens, logits) if return_logits else tokens


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "context_length", "star", "mesh", "seq_axis", "keep_logits"))
def _star_generate(graphdef, state, prompt, rng, temperature, top_k, *, max_new_tokens: int,
                   context_length: int, star: StarConfig, mesh: Mesh | None, seq_axis: str,
                   keep_logits: bool):
    model = nnx.merge(graphdef, state)
    b, t0 = prompt.shape
    c = context_length
    # One device: one cache for everything. Mesh: the context's K/V stay sharded where they
    # were encoded; the slots hold only what follows.
    slots = t0 + max_new_tokens - (0 if mesh is None else c)
    caches = init_star_caches([blk.attn for blk in model.blocks], b, slots, star, mesh,
                              seq_axis, model.cfg.dtype)
    context = prompt[:, :c]
    if mesh is not None:
        context = jax.lax.with_sharding_constraint(context, NamedSharding(mesh, P(None, seq_axis)))
    positions = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
    _, caches = model(context, positions=positions, caches=caches)
    query = prompt[:, c:]
    positions = c + jnp.broadcast_to(jnp.arange(t0 - c, dtype=jnp.int32), query.shape)
    logits, caches = model(query, positions=positions, caches=caches)
    return decode_loop(model, prompt, logits[:, -1], caches, rng, temperature, top_k,
                       max_new_tokens=max_new_tokens, keep_logits=keep_logits)


__all__ = ["StarConfig", "check_star_model", "star_generate"]
