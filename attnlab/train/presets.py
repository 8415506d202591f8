"""Named run configurations (``tiny``, ``small``, ``350m``), attention patterns, and loading a
run configuration from a ``.py`` or ``.yaml`` file.

A run configuration is a pair ``(model: attnlab.nn.Config, train: TrainConfig)``.
"""

from __future__ import annotations

import dataclasses
import runpy
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from attnlab.nn.config import Config
from attnlab.train.config import TrainConfig

# The 7:1 lightning:softmax period of MiniMax-01.
HYBRID_PERIOD = "LLLLLLLS"
ATTENTION_KINDS = ("softmax", "lightning", "hybrid")

PRESETS: dict[str, tuple[Config, TrainConfig]] = {
    # CPU, well under a minute: MQAR with 4 pairs, float32 compute (bf16 is emulated on CPU).
    "tiny": (
        Config(d_model=64, num_layers=2, num_heads=4, max_seq_len=128),
        TrainConfig(steps=200, batch_size=16, seq_len=64, lr=1e-2, warmup_steps=20,
                    checkpoint_every=50, log_every=10, task="mqar",
                    task_options={"num_kv_pairs": 4}, dtype="float32", fast_compile=True),
    ),
    # One GPU, minutes: byte-level Python source.
    "small": (
        Config(d_model=512, num_layers=8, num_heads=8, max_seq_len=1024),
        TrainConfig(steps=5000, batch_size=32, seq_len=1024, lr=1e-3, warmup_steps=200,
                    checkpoint_every=500, log_every=20, eval_every=500, task="stdlib"),
    ),
    # ~350M parameters (24 x 14.4M + the embedding), seq 4096, bf16 compute.
    "350m": (
        Config(d_model=1024, num_layers=24, num_heads=16, mlp_dim=3328, max_seq_len=4096),
        TrainConfig(steps=20000, batch_size=8, seq_len=4096, lr=3e-4, warmup_steps=1000,
                    checkpoint_every=1000, log_every=10, eval_every=1000, task="stdlib"),
    ),
}


def describe_preset(name: str) -> str:
    """One line saying what preset ``name`` trains, read from :data:`PRESETS` (so help texts
    and the README cannot drift from it). Example: ``describe_preset("tiny")`` starts with
    ``"tiny: 2 softmax layers, d_model 64, 4 heads; task mqar (num_kv_pairs=4)"``."""
    model, train = PRESETS[name]
    pattern = model.layer_pattern or "S" * model.num_layers
    kinds = {"S": "softmax", "L": "lightning", "M": "MLA"}
    layers = (f"{model.num_layers} {kinds.get(pattern[0], pattern[0])} layers"
              if len(set(pattern)) == 1 else f"{model.num_layers} layers ({pattern})")
    opts = ", ".join(f"{k}={v}" for k, v in train.task_options.items())
    return (f"{name}: {layers}, d_model {model.d_model}, "
            f"{model.num_heads} heads; task {train.task}{f' ({opts})' if opts else ''}, "
            f"{train.steps} steps of {train.batch_size} x {train.seq_len} tokens, "
            f"{train.dtype} compute")


def attention_pattern(kind: str, num_layers: int) -> str:
    """The ``layer_pattern`` for ``--attention``: ``softmax`` ("S" * n), ``lightning``
    ("L" * n) or ``hybrid`` ("LLLLLLLS" repeated and cut to n layers, the last layer made
    softmax when the cut leaves none). Example: ``attention_pattern("hybrid", 3) == "LLS"``.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention {kind!r}; choose one of {', '.join(ATTENTION_KINDS)}")
    if num_layers <= 0:
        raise ValueError(f"num_layers={num_layers} must be positive")
    if kind == "softmax":
        return "S" * num_layers
    if kind == "lightning":
        return "L" * num_layers
    pattern = (HYBRID_PERIOD * (num_layers // len(HYBRID_PERIOD) + 1))[:num_layers]
    return pattern if "S" in pattern else pattern[:-1] + "S"


def _load_file(path: Path) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    if path.suffix == ".py":
        try:
            ns = runpy.run_path(str(path))
        except ValueError:  # e.g. a Config(...) in the file refused its fields: already clear
            raise
        except Exception as e:  # the user's code: any error is a bad config, said in one line
            raise ValueError(f"config file {path} failed to run: {type(e).__name__}: {e}") from e
        model, train, base = ns.get("MODEL", {}), ns.get("TRAIN", {}), ns.get("BASE")
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ValueError(f"{path} is YAML but PyYAML is not installed; pip install pyyaml "
                             "or write the config as a .py file") from e
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            where = " ".join(str(e).split())  # one line: the CLI prints it as one
            raise ValueError(f"config file {path} is not valid YAML: {where}") from e
        if not isinstance(doc, dict):
            raise ValueError(f"{path} must hold a mapping with keys base, model, train")
        model, train, base = doc.get("model", {}), doc.get("train", {}), doc.get("base")
    else:
        raise ValueError(f"config file {path} must end in .py, .yaml or .yml")
    if isinstance(model, Config):
        model = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    if isinstance(train, TrainConfig):
        train = train.to_json()
    for name, value, cls in (("MODEL/model", model, "Config"), ("TRAIN/train", train,
                                                                  "TrainConfig")):
        if not isinstance(value, dict):
            raise ValueError(f"{name} in {path} must be a {cls} or a dict of its fields, got "
                             f"{value!r}")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"BASE/base in {path} must be a preset name, got {base!r}")
    return base, dict(model), dict(train)


def load_run_config(
    name_or_path: str, *, attention: str | None = None, **train_overrides: Any
) -> tuple[Config, TrainConfig]:
    """The (model, train) configuration of a preset name or a config file.

    A ``.py`` file defines ``MODEL`` and ``TRAIN`` (a Config / TrainConfig or dicts of their
    fields) and optionally ``BASE`` (a preset whose fields the dicts override). A ``.yaml``
    file (needs PyYAML) holds ``base:``, ``model:`` and ``train:`` mappings.

    Args:
      name_or_path: ``tiny``, ``small``, ``350m`` or a path.
      attention: ``softmax``, ``lightning``, ``hybrid`` or None (keep the pattern).
      **train_overrides: TrainConfig fields to replace (None values are ignored).

    Raises:
      ValueError: unknown preset, unreadable file, bad fields (the dataclasses' own checks).
    """
    if name_or_path in PRESETS:
        model, train = PRESETS[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"--config {name_or_path!r} is neither a preset "
                             f"({', '.join(PRESETS)}) nor a file")
        base, mfields, tfields = _load_file(path)
        if base is not None and base not in PRESETS:
            raise ValueError(f"BASE/base {base!r} in {path} is not a preset; choose one of "
                             f"{', '.join(PRESETS)}")
        bm, bt = PRESETS[base] if base else (Config(), TrainConfig())
        _check_fields(Config, mfields, "model field(s)", f" in {path}")
        _check_fields(TrainConfig, tfields, "train field(s)", f" in {path}")
        model = replace_model(bm, **mfields)
        train = dataclasses.replace(bt, **tfields)
    if attention is not None:
        model = replace_model(model, layer_pattern=attention_pattern(attention, model.num_layers))
    overrides = {k: v for k, v in train_overrides.items() if v is not None}
    _check_fields(TrainConfig, overrides, "train override(s)")
    return model, dataclasses.replace(train, **overrides)


def _check_fields(cls: type, fields: dict[str, Any], what: str, where: str = "") -> None:
    """ValueError naming the keys of ``fields`` that are not fields of ``cls``, and the
    fields that are (a typo in a config file was a TypeError from ``dataclasses.replace``)."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}{where}; {cls.__name__} has "
                         f"{', '.join(known)}")


def replace_model(cfg: Config, **fields: Any) -> Config:
    """``cfg`` with ``fields`` replaced, re-deriving what depends on them (head_dim, mlp_dim
    and num_kv_heads after d_model/num_heads change, layer_pattern after num_layers), which
    ``dataclasses.replace`` would keep stale. Example:
    ``replace_model(cfg, d_model=128, num_heads=2).head_dim == 64``."""
    current = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if "d_model" in fields or "num_heads" in fields:
        current.update(head_dim=None, mlp_dim=None)
    if "num_heads" in fields:
        current["num_kv_heads"] = None
    if "num_layers" in fields:
        current["layer_pattern"] = None
    current.update(fields)
    return Config(**current)


def model_config_to_json(cfg: Config) -> dict[str, Any]:
    """A JSON-ready dict of a model Config (dtypes by name)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = jnp.dtype(v).name if f.name in ("dtype", "param_dtype") else v
    return out


def model_config_from_json(d: dict[str, Any]) -> Config:
    """Inverse of :func:`model_config_to_json`."""
    d = dict(d)
    for name in ("dtype", "param_dtype"):
        if name in d:
            d[name] = jnp.dtype(d[name])
    return Config(**d)
