"""An independent NumPy forward of a Llama-architecture checkpoint (the test oracle).

Written from the Llama definition (HF ``LlamaForCausalLM``), not from attnlab: it reads
``config.json`` and ``model.safetensors`` itself and computes in float64::

    x = E[tokens]
    per layer:  h = rms(x) * w_in;   q, k, v = h Wq^T, h Wk^T, h Wv^T   (torch [out, in])
                q, k = rope(q), rope(k)     cos/sin of cat(f, f), f_i = theta^(-2i/H) * pos,
                                            q * cos + rotate_half(q) * sin
                a = softmax(q k^T / sqrt(H) + causal) v   (KV head i // (N/K) per query head)
                x = x + a Wo^T
                h = rms(x) * w_post;  x = x + (silu(h Wg^T) * (h Wu^T)) Wd^T
    logits = (rms(x) * w_norm) W_lm^T      (W_lm = E when tie_word_embeddings)

with rms(x) = x / sqrt(mean(x^2) + eps) and rotate_half([x1, x2]) = [-x2, x1].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """x [B, T, heads, H] in the rotate-half layout."""
    h = x.shape[-1]
    freqs = pos[..., None].astype(np.float64) * theta ** (-np.arange(0, h, 2) / h)  # [B, T, H/2]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    rot = np.concatenate([-x[..., h // 2:], x[..., :h // 2]], axis=-1)
    return x * np.cos(emb) + rot * np.sin(emb)


def llama_forward(path: str | Path, tokens: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] float64 of the Llama checkpoint in directory ``path`` on ``tokens``.

    Example:
      >>> logits = llama_forward("ckpt/", np.array([[1, 2, 3]]))
    """
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(path / "model.safetensors").items()}
    d, n = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or n
    h = cfg.get("head_dim") or d // n
    eps, theta = cfg.get("rms_norm_eps", 1e-6), cfg.get("rope_theta", 10_000.0)
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    pos = np.broadcast_to(np.arange(t), (b, t))
    causal = np.tril(np.ones((t, t), bool))
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        hs = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = (hs @ w[p + "self_attn.q_proj.weight"].T).reshape(b, t, n, h)
        k = (hs @ w[p + "self_attn.k_proj.weight"].T).reshape(b, t, kv, h)
        v = (hs @ w[p + "self_attn.v_proj.weight"].T).reshape(b, t, kv, h)
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)
        k, v = np.repeat(k, n // kv, axis=2), np.repeat(v, n // kv, axis=2)
        s = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(h)
        s = np.where(causal, s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        a = np.einsum("bnqk,bknh->bqnh", pr, v).reshape(b, t, n * h)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        hs = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        g = hs @ w[p + "mlp.gate_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (hs @ w[p + "mlp.up_proj.weight"].T)) @ \
            w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], eps)
    tied = cfg.get("tie_word_embeddings", False)
    return x @ (w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]).T
