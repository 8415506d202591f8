"""attnlab models as files: ``attnlab_config.json`` (the Config's fields) + ``model.safetensors``
(parameters under their dotted attnlab names, see :func:`attnlab.convert.model_params`).

The format a conversion writes (``attnlab convert --out``) and reads back with
:func:`load_model`; any Transformer round-trips, MLA or not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from attnlab.convert._params import build_model, model_params
from attnlab.nn import Config, Transformer

CONFIG_FILE = "attnlab_config.json"
WEIGHTS_FILE = "model.safetensors"
_DTYPE_FIELDS = ("dtype", "param_dtype")


def save_model(model: Transformer, path: str | Path) -> None:
    """Writes ``model``'s config and parameters into the directory ``path`` (made if absent).

    Example:
      >>> save_model(gqa_to_mla(model), "out/")
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fields: dict[str, Any] = dataclasses.asdict(model.cfg)
    for name in _DTYPE_FIELDS:
        fields[name] = jnp.dtype(fields[name]).name
    (path / CONFIG_FILE).write_text(json.dumps(fields, indent=2) + "\n")
    save_file({k: np.ascontiguousarray(v) for k, v in model_params(model).items()},
              path / WEIGHTS_FILE)


def load_model(path: str | Path, **overrides: Any) -> Transformer:
    """The Transformer :func:`save_model` wrote into ``path`` (``overrides``: Config fields).

    Raises:
      ValueError: a file missing, or parameters that do not fit the config.

    Example:
      >>> mla = load_model("out/", attention_impl="xla")
    """
    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise ValueError(f"{str(path)!r} has no {name}; give a directory written by "
                             "attnlab.convert.save_model (attnlab convert --out)")
    fields = json.loads((path / CONFIG_FILE).read_text())
    for name in _DTYPE_FIELDS:
        fields[name] = jnp.dtype(fields[name])
    return build_model(Config(**{**fields, **overrides}), load_file(path / WEIGHTS_FILE))
