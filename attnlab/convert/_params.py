"""A Transformer's parameters as a flat ``{"blocks.0.attn.q_proj.kernel": array}`` dict, and back.

The names are the NNX attribute paths joined by dots (``embed.embedding``,
``blocks.{i}.attn_norm.scale``, ``blocks.{i}.attn.<projection>.kernel``,
``blocks.{i}.mlp.{gate,up,down}.kernel``, ``final_norm.scale``, ``head.kernel``); kernels are
``[in, out]`` (``x @ W``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.nn import Config, Transformer


def model_params(model: Transformer) -> dict[str, np.ndarray]:
    """Every parameter of ``model`` as a NumPy array, keyed by its dotted path."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, path)): np.asarray(var[...]) for path, var in flat}


def build_model(cfg: Config, params: Mapping[str, np.ndarray]) -> Transformer:
    """A Transformer of ``cfg`` holding exactly ``params`` (no random initialisation).

    Args:
      cfg: the model configuration.
      params: dotted path -> array of the parameter's shape, one entry per parameter.

    Returns:
      the model, parameters cast to ``cfg.param_dtype``.

    Raises:
      ValueError: a parameter missing, one too many, or one of the wrong shape.

    Example:
      >>> model = build_model(cfg, model_params(other))
    """
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    wanted = {".".join(map(str, path)) for path, _ in flat}
    extra = sorted(set(params) - wanted)
    if extra:
        raise ValueError(f"parameters {extra} are not in a model of this config")
    leaves = []
    for path, var in flat:
        name = ".".join(map(str, path))
        if name not in params:
            raise ValueError(f"parameter {name!r} {var.shape} is missing")
        value = np.asarray(params[name])
        if value.shape != var.shape:
            raise ValueError(f"parameter {name!r} has shape {value.shape}, the model wants "
                             f"{var.shape}")
        leaves.append((path, var.replace(value=jnp.asarray(value, var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
