"""TransMLA's exact step: a GQA layer *is* an MLA layer with the same cache (arXiv 2502.07864).

A GQA layer with N query heads, K key/value heads of H dims (G = N / K heads per group,
head i reads group g(i) = i // G) and RoPE on the first R dims of each head computes

    k_g = x W_K,g,   v_g = x W_V,g,   q_i = x W_Q,i,
    o_i = softmax_s( RoPE_t(q_i) . RoPE_s(k_g(i)) / sqrt(H) ) v_g(i).

Stack the K heads' projections into one latent of d_c = 2 K H values per token,

    c = x W_DKV,   W_DKV = [W_K | W_V]                          [D, 2 K H]

and let the up-projections be 0/1 "repeat" matrices that pick head i's group out of it:
W_UK,i = [E_g(i) ; 0] and W_UV,i = [0 ; E_g(i)] ([2 K H, H], E_g the H x K H selector of
block g). Then c W_UK,i = k_g(i) and c W_UV,i = v_g(i) exactly, so

    k_i = RoPE(c W_UK,i),   v_i = c W_UV,i,   q_i = RoPE(x W_Q,i)

is MLA with the *same* outputs and the *same* cache (c holds the 2 K H values GQA caches).
RoPE sits between the factors (it rotates the up-projected key), so W_UK cannot be absorbed
into the query: this is :class:`attnlab.nn.MultiHeadLatentAttention` with
``mla_rope="per_head"`` (no decoupled k_R). Dense, trainable W_UK / W_UV make the MLA layer
strictly more expressive than the GQA one it starts from; :func:`attnlab.convert.transmla`
compresses it to an absorbable decoupled-RoPE MLA.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attnlab.convert._params import build_model, model_params
from attnlab.nn import Config, Transformer
from attnlab.nn import registry as _registry


def check_gqa(cfg: Config) -> None:
    """ValueError unless every layer of ``cfg`` is a softmax GQA layer MLA can express.

    Raises:
      ValueError: a layer letter other than ``"S"`` (the message names the layer and its
        mechanism), or a softmax option MLA has no counterpart for (``logits_soft_cap``).
    """
    if not isinstance(cfg, Config):
        raise ValueError(f"expected an attnlab.nn.Config, got {type(cfg).__name__}")
    for i, letter in enumerate(cfg.layer_pattern):
        if letter != "S":
            name = _registry.mechanisms().get(letter, "unknown")
            raise ValueError(
                f"layer {i} of layer_pattern={cfg.layer_pattern!r} is {letter!r} ({name}); "
                "TransMLA converts GQA softmax layers ('S') only: give a model whose "
                "layer_pattern is all 'S'"
            )
    if cfg.logits_soft_cap is not None:
        raise ValueError(
            f"logits_soft_cap={cfg.logits_soft_cap} has no MLA counterpart; convert a model "
            "without a soft-cap"
        )


def exact_config(cfg: Config) -> Config:
    """The per-head-RoPE MLA config equal to the GQA ``cfg``: d_c = 2 K H, d_n = d_v = H."""
    check_gqa(cfg)
    return dataclasses.replace(
        cfg, layer_pattern="M" * cfg.num_layers, mla_rope="per_head",
        kv_lora_rank=2 * cfg.num_kv_heads * cfg.head_dim, qk_rope_head_dim=0,
        qk_nope_head_dim=cfg.head_dim, v_head_dim=cfg.head_dim, q_lora_rank=None,
    )


def repeat_matrices(num_heads: int, num_kv_heads: int, head_dim: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The 0/1 up-projections (W_UK, W_UV), each [2 K H, N, H]: head i reads group i // G.

    Example:
      >>> w_uk, w_uv = repeat_matrices(8, 2, 64)     # [256, 8, 64] each
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads="
                         f"{num_kv_heads}")
    n, k, h = num_heads, num_kv_heads, head_dim
    group = np.arange(n) // (n // k)
    w_uk = np.zeros((2 * k * h, n, h), np.float32)
    w_uv = np.zeros((2 * k * h, n, h), np.float32)
    eye = np.eye(h, dtype=np.float32)
    for i, g in enumerate(group):
        w_uk[g * h:(g + 1) * h, i] = eye
        w_uv[k * h + g * h:k * h + (g + 1) * h, i] = eye
    return w_uk, w_uv


def gqa_to_mla(model: Transformer) -> Transformer:
    """The exact MLA form of a GQA model: every ``"S"`` layer becomes ``"M"`` (per-head RoPE).

    Logits, caches' information and generations are those of ``model`` (float32: equal up to
    rounding); the latent cache holds 2 K H values per token, as GQA's K/V cache.

    Args:
      model: a Transformer whose layers are all ``"S"``.

    Returns:
      a new Transformer with ``exact_config(model.cfg)``; embeddings, norms, MLPs, the head,
      W_Q and W_O are copied, W_DKV = [W_K | W_V], W_UK / W_UV the repeat matrices.

    Raises:
      ValueError: a layer that is not ``"S"``, a soft-capped model (see :func:`check_gqa`).

    Example:
      >>> mla_model = gqa_to_mla(model)
    """
    cfg = model.cfg
    new_cfg = exact_config(cfg)
    params = model_params(model)
    w_uk, w_uv = repeat_matrices(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    out = {}
    for name, value in params.items():
        block, _, rest = name.partition(".attn.")
        if not rest:
            out[name] = value
        elif rest == "k_proj.kernel":
            out[f"{block}.attn.kv_down.kernel"] = np.concatenate(
                [value, params[f"{block}.attn.v_proj.kernel"]], axis=1)
            out[f"{block}.attn.w_uk"] = w_uk
            out[f"{block}.attn.w_uv"] = w_uv
        elif rest in ("q_proj.kernel", "o_proj.kernel"):
            out[name] = value
    return build_model(new_cfg, out)
