"""Building blocks of the decoder LM: RMSNorm, SwiGLU MLP, token embedding.

Parameters live in ``param_dtype`` (float32 by default); activations are computed in ``dtype``
(``Config.dtype``, e.g. bfloat16), with normalization statistics in float32.
Shapes: B batch, T tokens, D model width, F MLP hidden width, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.common.static_args import check_int, check_static_float

# LeCun normal (variance 1/fan_in), untruncated: the truncated form compiles several times
# slower on CPU, once per weight shape, which dominates building a small model.
_default_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned per-feature scale (ones at init).

    ``y = x / sqrt(mean(x^2) + eps) * scale``, statistics in float32, output in ``dtype``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-6,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        num_features = check_int("num_features", num_features)
        self.eps = check_static_float("eps", eps, minimum=0.0)
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> [..., D] in ``dtype``."""
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        return (y * scale.reshape((1,) * (y.ndim - 1) + scale.shape)).astype(self.dtype)


class Linear(nnx.Module):
    """Bias-free dense layer ``x @ W``, W [in, out] in ``param_dtype``, computed in ``dtype``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: nnx.Initializer = _default_init,
        rngs: nnx.Rngs,
    ) -> None:
        self.dtype = dtype
        shape = (check_int("in_features", in_features), check_int("out_features", out_features))
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out] in ``dtype``."""
        return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class SwiGLU(nnx.Module):
    """Gated MLP ``W_down(silu(W_gate x) * W_up x)`` (Shazeer 2020), D -> F -> D."""

    def __init__(
        self,
        d_model: int,
        hidden_dim: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        d_model, hidden_dim = check_int("d_model", d_model), check_int("hidden_dim", hidden_dim)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = Linear(d_model, hidden_dim, **kw)
        self.up = Linear(d_model, hidden_dim, **kw)
        self.down = Linear(hidden_dim, d_model, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D] in ``dtype``."""
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Embed(nnx.Module):
    """Token embedding table [V, D]; ``attend`` reuses it as the (tied) output projection."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.vocab_size = vocab_size = check_int("vocab_size", vocab_size)
        d_model = check_int("d_model", d_model)
        self.dtype = dtype
        # std 1/sqrt(D): tied logits start O(1) (the final RMSNorm output has unit scale).
        init = nnx.initializers.normal(stddev=d_model**-0.5)
        self.embedding = nnx.Param(init(rngs.params(), (vocab_size, d_model), param_dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] int -> [B, T, D] in ``dtype``."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> logits [B, T, V] float32 (inputs in ``dtype``, f32 accumulation)."""
        w = self.embedding[...].astype(self.dtype)
        return jnp.einsum(
            "BTD,VD->BTV", x.astype(self.dtype), w, preferred_element_type=jnp.float32
        )
