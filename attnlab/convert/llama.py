"""Llama-architecture checkpoints in the Hugging Face layout: write, load into attnlab, convert.

A checkpoint is a directory with ``config.json`` (``LlamaConfig`` field names) and
``model.safetensors`` (or shards named by ``model.safetensors.index.json``) holding, in torch's
``[out, in]`` Linear layout::

    model.embed_tokens.weight                       [V, D]
    model.layers.{i}.input_layernorm.weight         [D]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight [N H, D], [K H, D], [K H, D], [D, N H]
    model.layers.{i}.post_attention_layernorm.weight [D]
    model.layers.{i}.mlp.{gate,up,down}_proj.weight [F, D], [F, D], [D, F]
    model.norm.weight                               [D]
    lm_head.weight                                  [V, D]   (absent when tied)

It maps one to one onto attnlab's :class:`~attnlab.nn.Transformer` of ``"S"`` layers
(kernels transposed to ``[in, out]``): HF Llama's q/k are already in the rotate-half RoPE
layout attnlab uses (dim i pairs with i + H/2, f_i = theta^(-2i/H)); HF's RMSNorm
``x * rsqrt(mean(x^2) + eps) * w`` is :class:`~attnlab.nn.RMSNorm`; ``down(silu(gate x) * up x)``
is :class:`~attnlab.nn.SwiGLU`; an untied ``lm_head`` is ``tie_embeddings=False``.
:mod:`attnlab.convert.llama_reference` is an independent NumPy forward to check against.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from attnlab.convert._params import build_model
from attnlab.convert.gqa_to_mla import gqa_to_mla
from attnlab.convert.transmla import transmla
from attnlab.nn import Config, Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
REQUIRED_FIELDS = ("hidden_size", "num_attention_heads", "intermediate_size",
                   "num_hidden_layers", "vocab_size")
# Fields that would change the function, and the only values attnlab's Llama reads.
_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
          "rope_scaling": None, "partial_rotary_factor": 1.0, "sliding_window": None}
_MODEL_TYPES = ("llama", "mistral")


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of the checkpoint directory ``path``, checked.

    Raises:
      ValueError: no such directory or file; a required field missing (the message names
        it); a model_type other than llama / mistral; a field value attnlab's Llama does not
        compute (rope_scaling, biases, a sliding window, another activation); heads that do
        not divide.
    """
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"checkpoint directory {str(path)!r} has no {CONFIG_FILE}; give the "
                         "directory of a Llama-layout checkpoint")
    hf = json.loads(file.read_text())
    missing = [f for f in REQUIRED_FIELDS if f not in hf]
    if missing:
        raise ValueError(f"{file} lacks the field(s) {missing}; a Llama config needs "
                         f"{list(REQUIRED_FIELDS)}")
    if hf.get("model_type", "llama") not in _MODEL_TYPES:
        raise ValueError(f"{file}: model_type={hf['model_type']!r} is not a Llama-layout "
                         f"architecture attnlab loads; expected one of {list(_MODEL_TYPES)}")
    for field, allowed in _FIXED.items():
        if hf.get(field, allowed) != allowed:
            raise ValueError(f"{file}: {field}={hf[field]!r} is not supported; attnlab's Llama "
                             f"computes {field}={allowed!r}")
    n = hf["num_attention_heads"]
    k = hf.get("num_key_value_heads") or n
    if n % k:
        raise ValueError(f"{file}: num_attention_heads={n} is not a multiple of "
                         f"num_key_value_heads={k}")
    if not hf.get("head_dim") and hf["hidden_size"] % n:
        raise ValueError(f"{file}: hidden_size={hf['hidden_size']} is not divisible by "
                         f"num_attention_heads={n} and no head_dim is given")
    return hf


def config_from_llama(hf: Mapping[str, Any], **overrides: Any) -> Config:
    """The attnlab :class:`~attnlab.nn.Config` of a Llama ``config.json`` dict.

    ``overrides`` set attnlab-only fields (``attention_impl``, ``dtype``, ``max_seq_len``...).

    Example:
      >>> cfg = config_from_llama(read_config("ckpt/"), attention_impl="xla")
    """
    n = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=n,
        num_kv_heads=hf.get("num_key_value_heads") or n,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n,
        mlp_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=hf.get("rope_theta", 10_000.0),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_seq_len=hf.get("max_position_embeddings", 2048),
    )
    return Config(**{**fields, **overrides})


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint (one ``model.safetensors`` or the index's shards).

    Raises:
      ValueError: neither file present, or a shard the index names missing.
    """
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return load_file(path / WEIGHTS_FILE)
    if (path / INDEX_FILE).is_file():
        shards = sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            if not (path / shard).is_file():
                raise ValueError(f"{INDEX_FILE} in {str(path)!r} names the shard {shard!r}, "
                                 "which is missing")
            out.update(load_file(path / shard))
        return out
    raise ValueError(f"checkpoint directory {str(path)!r} has neither {WEIGHTS_FILE} nor "
                     f"{INDEX_FILE}")


def params_from_llama(hf: Mapping[str, Any], weights: Mapping[str, np.ndarray]
                      ) -> dict[str, np.ndarray]:
    """attnlab parameter names (see :func:`attnlab.convert.model_params`) of Llama tensors.

    Raises:
      ValueError: a tensor missing (the message names it); bias tensors (Qwen-style layers
        would load silently wrong without them).
    """
    biases = sorted(name for name in weights if name.endswith(".bias"))
    if biases:
        raise ValueError(f"the checkpoint has bias tensors ({biases[:3]}, ...), which a Llama "
                         "layer does not have; convert a bias-free checkpoint")

    def get(name: str) -> np.ndarray:
        if name not in weights:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        return np.asarray(weights[name], np.float32)

    out = {"embed.embedding": get("model.embed_tokens.weight"),
           "final_norm.scale": get("model.norm.weight")}
    if not hf.get("tie_word_embeddings", False):
        out["head.kernel"] = get("lm_head.weight").T
    for i in range(hf["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "attn_norm.scale"] = get(src + "input_layernorm.weight")
        out[dst + "mlp_norm.scale"] = get(src + "post_attention_layernorm.weight")
        for proj in "qkvo":
            out[f"{dst}attn.{proj}_proj.kernel"] = get(f"{src}self_attn.{proj}_proj.weight").T
        for a, b in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            out[f"{dst}mlp.{a}.kernel"] = get(f"{src}mlp.{b}.weight").T
    return out


def load_llama(path: str | Path, **overrides: Any) -> Transformer:
    """A Llama-layout checkpoint as an attnlab Transformer of ``"S"`` (GQA) layers.

    Args:
      path: the checkpoint directory.
      **overrides: attnlab Config fields (``attention_impl``, ``dtype``, ``max_seq_len``...).

    Raises:
      ValueError: a missing file, field or tensor, an unsupported config, a tensor of the
        wrong shape.

    Example:
      >>> model = load_llama("ckpt/", attention_impl="xla")
    """
    hf = read_config(path)
    params = params_from_llama(hf, read_weights(path))
    return build_model(config_from_llama(hf, **overrides), params)


def write_random_llama(path: str | Path, *, vocab_size: int = 64, hidden_size: int = 64,
                       intermediate_size: int = 128, num_hidden_layers: int = 2,
                       num_attention_heads: int = 4, num_key_value_heads: int = 2,
                       head_dim: int | None = None, rms_norm_eps: float = 1e-6,
                       rope_theta: float = 10_000.0, tie_word_embeddings: bool = False,
                       max_position_embeddings: int = 128, seed: int = 0,
                       dtype: str = "float32") -> dict[str, Any]:
    """Writes a Llama-architecture checkpoint with random weights (for tests and demos).

    Weights are normal with variance 1 / fan_in (embeddings 1 / hidden_size), norm scales
    1 + N(0, 0.1^2), so attention and norms all matter.

    Returns:
      the config dict written to ``config.json``.

    Example:
      >>> write_random_llama("tiny/", hidden_size=64, num_key_value_heads=2)
    """
    h = head_dim or hidden_size // num_attention_heads
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
              attention_bias=False, mlp_bias=False, rope_scaling=None,
              vocab_size=vocab_size, hidden_size=hidden_size,
              intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
              num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
              head_dim=h, rms_norm_eps=rms_norm_eps, rope_theta=rope_theta,
              tie_word_embeddings=tie_word_embeddings,
              max_position_embeddings=max_position_embeddings, torch_dtype=dtype)
    rng = np.random.default_rng(seed)

    def linear(out: int, inp: int) -> np.ndarray:
        return rng.normal(size=(out, inp)) / np.sqrt(inp)

    def norm() -> np.ndarray:
        return 1 + 0.1 * rng.normal(size=hidden_size)

    d, f, n, k = hidden_size, intermediate_size, num_attention_heads, num_key_value_heads
    w = {"model.embed_tokens.weight": rng.normal(size=(vocab_size, d)) / np.sqrt(d),
         "model.norm.weight": norm()}
    if not tie_word_embeddings:
        w["lm_head.weight"] = linear(vocab_size, d)
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
              p + "self_attn.q_proj.weight": linear(n * h, d),
              p + "self_attn.k_proj.weight": linear(k * h, d),
              p + "self_attn.v_proj.weight": linear(k * h, d),
              p + "self_attn.o_proj.weight": linear(d, n * h),
              p + "mlp.gate_proj.weight": linear(f, d), p + "mlp.up_proj.weight": linear(f, d),
              p + "mlp.down_proj.weight": linear(d, f)}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    save_file({name: np.ascontiguousarray(v.astype(dtype)) for name, v in w.items()},
              path / WEIGHTS_FILE, metadata={"format": "pt"})
    return hf


def convert_llama(path: str | Path, *, kv_lora_rank: int | None = None,
                  qk_rope_head_dim: int | None = None,
                  calibration_tokens: jax.Array | None = None,
                  **overrides: Any) -> Transformer:
    """A Llama-layout checkpoint converted to MLA.

    Args:
      path: the checkpoint directory.
      kv_lora_rank: None for TransMLA's exact step (per-head-RoPE MLA, d_c = 2 K H, the same
        logits); an int d_c for the compressed, absorbable MLA (:func:`transmla`).
      qk_rope_head_dim: d_R of the compressed form (default: head_dim).
      calibration_tokens: [B, T] token ids for the compressed form (required with a rank).
      **overrides: attnlab Config fields, as :func:`load_llama`.

    Raises:
      ValueError: as :func:`load_llama`, :func:`gqa_to_mla`, :func:`transmla`; a rank without
        calibration tokens.

    Example:
      >>> mla = convert_llama("ckpt/", kv_lora_rank=256, calibration_tokens=tokens)
    """
    model = load_llama(path, **overrides)
    if kv_lora_rank is None:
        return gqa_to_mla(model)
    if calibration_tokens is None:
        raise ValueError(f"kv_lora_rank={kv_lora_rank} needs calibration_tokens ([batch, seq] "
                         "token ids) for its PCAs; pass some, or kv_lora_rank=None for the "
                         "exact conversion")
    return transmla(model, jnp.asarray(calibration_tokens), kv_lora_rank=kv_lora_rank,
                    qk_rope_head_dim=qk_rope_head_dim)
