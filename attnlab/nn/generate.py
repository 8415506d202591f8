"""Autoregressive generation with per-layer caches: init_caches, prefill, decode_step, generate.

Shapes: B batch, T0 prompt length, V vocabulary.

``generate`` compiles once per (model structure, batch, prompt length, max_new_tokens);
temperature, top_k and the key are traced, so changing them does not recompile. The prompt is
prefilled in one call and the new tokens come from a ``lax.fori_loop`` of single-token decode
steps inside the same ``jax.jit`` (no Python loop of jit calls, so no per-token dispatch; the
price is no progress bar).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.nn.transformer import Transformer
from pallas_kernels.common.static_args import check_static_float, is_int


def init_caches(
    model: Transformer, batch_size: int, max_len: int, dtype: Any = None
) -> list[Any]:
    """Empty per-layer caches for ``batch_size`` sequences of up to ``max_len`` tokens.

    Args:
      model: the Transformer.
      batch_size: B.
      max_len: cache length L (softmax layers hold K/V [B, L, K, H]); at most cfg.max_seq_len.
      dtype: cache dtype, default ``cfg.dtype``.

    Returns:
      list with one cache pytree per layer (each mechanism's ``init_cache``).

    Raises:
      ValueError: batch_size or max_len not positive, max_len > cfg.max_seq_len.

    Example:
      >>> caches = init_caches(model, 4, 128)
    """
    cfg = model.cfg
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
        if not is_int(value):
            raise ValueError(f"{name} must be an int, got {value!r} of type "
                             f"{type(value).__name__}")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if not 0 < max_len <= cfg.max_seq_len:
        raise ValueError(
            f"max_len={max_len} must lie in [1, max_seq_len={cfg.max_seq_len}]; raise "
            "Config.max_seq_len or ask for fewer tokens"
        )
    dtype = cfg.dtype if dtype is None else dtype
    return [block.attn.init_cache(batch_size, max_len, dtype) for block in model.blocks]


def _prefill(
    model: Transformer, tokens: jax.Array, caches: list[Any], positions: jax.Array | None = None
) -> tuple[jax.Array, list[Any]]:
    if positions is None:
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return model(tokens, positions=positions, caches=caches)


def _decode_step(
    model: Transformer, token: jax.Array, caches: list[Any], position: jax.Array
) -> tuple[jax.Array, list[Any]]:
    logits, caches = model(token[:, None], positions=position[:, None], caches=caches)
    return logits[:, 0], caches


prefill = nnx.jit(_prefill)
prefill.__doc__ = """Runs the prompt through the model, filling the caches (jitted).

Args:
  model: the Transformer.
  tokens: [B, T0] int32 prompt.
  caches: from ``init_caches`` (empty: positions default to ``arange(T0)``).
  positions: [B, T0] int32, default ``arange(T0)`` per row.

Returns:
  (logits [B, T0, V] float32, caches holding the T0 tokens).

Example:
  >>> logits, caches = prefill(model, prompt, init_caches(model, B, 128))
"""

decode_step = nnx.jit(_decode_step)
decode_step.__doc__ = """One decoding step: feeds one token per row at ``position`` (jitted).

Args:
  model: the Transformer.
  token: [B] int32, the last token of each row.
  caches: the caches holding every earlier token of each row.
  position: [B] int32 position of ``token`` (the number of tokens already in the caches).

Returns:
  (logits [B, V] float32 for the next token, updated caches).

Example:
  >>> logits, caches = decode_step(model, tokens[:, -1], caches, jnp.full((B,), T0))
"""


def _sample(logits: jax.Array, key: jax.Array, temperature: jax.Array,
            top_k: jax.Array) -> jax.Array:
    """logits [B, V] float32 -> tokens [B] int32; argmax where temperature == 0.

    temperature and top_k are traced, so changing them does not recompile.
    """
    v = logits.shape[-1]
    kth = jax.lax.dynamic_index_in_dim(jnp.sort(logits, axis=-1), v - top_k, axis=-1)
    scaled = jnp.where(logits < kth, -jnp.inf, logits) / jnp.maximum(temperature, 1e-6)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate(graphdef, state, prompt, rng, temperature, top_k, *,
              max_new_tokens: int) -> jax.Array:
    model = nnx.merge(graphdef, state)
    b, t0 = prompt.shape
    caches = init_caches(model, b, t0 + max_new_tokens)
    logits, caches = _prefill(model, prompt, caches)
    return decode_loop(model, prompt, logits[:, -1], caches, rng, temperature, top_k,
                       max_new_tokens=max_new_tokens)[0]


def decode_loop(model: Transformer, prompt: jax.Array, logits: jax.Array, caches: list[Any],
                rng: jax.Array, temperature: jax.Array, top_k: jax.Array, *,
                max_new_tokens: int, keep_logits: bool = False
                ) -> tuple[jax.Array, jax.Array | None]:
    """Samples ``max_new_tokens`` tokens after ``prompt`` [B, T0], whose caches are filled and
    whose last logits [B, V] are given: a ``lax.fori_loop`` of one-token decode steps.

    Returns (tokens [B, T0 + max_new_tokens], and with ``keep_logits`` the logits [B,
    max_new_tokens, V] each new token was drawn from, else None).
    """
    b, t0 = prompt.shape
    tokens = jnp.zeros((b, t0 + max_new_tokens), jnp.int32).at[:, :t0].set(prompt)
    first = _sample(logits, jax.random.fold_in(rng, 0), temperature, top_k)
    tokens = tokens.at[:, t0].set(first)
    seen = None
    if keep_logits:
        seen = jnp.zeros((b, max_new_tokens, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)

    def body(i, carry):
        tokens, caches, seen = carry
        pos = t0 + i - 1  # position of the token fed in; its successor goes to pos + 1
        token = jax.lax.dynamic_index_in_dim(tokens, pos, axis=1, keepdims=False)
        logits, caches = _decode_step(model, token, caches, jnp.full((b,), pos, jnp.int32))
        nxt = _sample(logits, jax.random.fold_in(rng, i), temperature, top_k)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, pos + 1, axis=1)
        if seen is not None:
            seen = jax.lax.dynamic_update_index_in_dim(seen, logits, i, axis=1)
        return tokens, caches, seen

    tokens, _, seen = jax.lax.fori_loop(1, max_new_tokens, body, (tokens, caches, seen))
    return tokens, seen


def _check_token_range(tokens: jax.Array, vocab_size: int) -> None:
    """ValueError for a concrete token id outside [0, vocab_size) (traced ids cannot be read):
    an embedding lookup would read a wrong row (-1: the last) or NaN instead of failing."""
    try:
        ids = np.asarray(tokens)
    except jax.errors.TracerArrayConversionError:
        return
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"prompt token ids must lie in [0, vocab_size={vocab_size}), got values in "
            f"[{ids.min()}, {ids.max()}]"
        )


def generate(
    model: Transformer,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Continues each prompt by ``max_new_tokens`` tokens (greedy, or sampled).

    One ``jax.jit``: prefill, then a ``lax.fori_loop`` of one-token decode steps over caches
    of ``T0 + max_new_tokens`` slots.

    Args:
      model: the Transformer.
      prompt: [B, T0] int32 tokens, T0 >= 1.
      max_new_tokens: number of tokens to add (>= 0); T0 + max_new_tokens <= cfg.max_seq_len.
      temperature: 0 for greedy (argmax); > 0 samples from softmax(logits / temperature).
      top_k: sample only among the k most likely tokens (None: all).
      rng: PRNG key for sampling (default ``jax.random.key(0)``; unused when greedy).

    Returns:
      [B, T0 + max_new_tokens] int32: the prompt followed by the new tokens.

    Raises:
      ValueError: prompt not [B, T0] with T0 >= 1, negative max_new_tokens, the total
        longer than cfg.max_seq_len, negative temperature, top_k outside [1, vocab_size].

    Example:
      >>> out = generate(model, prompt, 32, temperature=0.8, top_k=40, rng=jax.random.key(1))
    """
    prompt, temperature = check_request(model, prompt, max_new_tokens, temperature, top_k)
    if max_new_tokens == 0:
        return prompt
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef, state, prompt, rng, jnp.float32(temperature),
        jnp.int32(model.cfg.vocab_size if top_k is None else top_k),
        max_new_tokens=max_new_tokens,
    )


def check_request(model: Transformer, prompt: Any, max_new_tokens: Any, temperature: Any,
                  top_k: Any) -> tuple[jax.Array, float]:
    """(prompt as int32 [B, T0], temperature as float) after :func:`generate`'s checks."""
    cfg = model.cfg
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must have shape [batch, T0] with T0 >= 1, got {prompt.shape}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    _check_token_range(prompt, cfg.vocab_size)
    if not is_int(max_new_tokens):
        raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r} of type "
                         f"{type(max_new_tokens).__name__}")
    if top_k is not None and not is_int(top_k):
        raise ValueError(f"top_k must be an int or None, got {top_k!r} of type "
                         f"{type(top_k).__name__}")
    temperature = check_static_float("temperature", temperature)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    total = prompt.shape[1] + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(
            f"prompt of {prompt.shape[1]} tokens + max_new_tokens={max_new_tokens} = {total} "
            f"exceeds max_seq_len={cfg.max_seq_len} (the cache length); shorten the prompt, "
            "ask for fewer tokens or raise Config.max_seq_len"
        )
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k={top_k} must lie in [1, vocab_size={cfg.vocab_size}] or be None")
    return prompt.astype(jnp.int32), temperature

