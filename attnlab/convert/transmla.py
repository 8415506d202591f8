"""TransMLA's compression: GQA -> absorbable decoupled-RoPE MLA of latent rank d_c (arXiv
2502.07864, following fxmeng/TransMLA's RoRoPE + FreqFold + BKV-PCA pipeline).

Per layer, with N query heads, K KV heads of H dims (head i reads group g(i) = i // (N/K)),
RoPE on the first R dims of each head ("rotate half": dim j pairs with j + R/2 and turns at
frequency w_j = theta^(-2j/R)), and calibration inputs h (the layer's normed inputs, through
their second moment G = sum_t h_t^T h_t, so every covariance below is W^T G W):

**1. RoRoPE.** Write head g's j-th RoPE pair as one complex number
z_{g,j} = k_g[j] + i k_g[j + R/2]; RoPE multiplies it by e^{i s w_j}, the same phase for every
KV head. A real orthogonal U that mixes the K heads' pairs of one frequency (the same U on the
real and the imaginary parts) therefore commutes with RoPE, and the query side absorbs it:
q_i . k_g(i) summed over the pair's heads is unchanged when k -> U k and head i's query pair
is read through column g(i) of U. Choose U from the PCA of the pairs across heads, C_j = E[Re
z Re z^T + Im z Im z^T] (K x K), so component 0 carries the most key energy. Keep RoPE on
component 0 only: it becomes pair j of the shared decoupled key k_R; components 1..K-1 lose
their rotation and join the NoPE dims (the rest of each head beyond R). Folding
(``qk_rope_head_dim`` d_R < R, FreqFold): the c = R / d_R adjacent frequencies
j in [c m, c m + c) share one PCA over their K c pairs, and k_R's pair m turns at w_{c m},
which is exactly the frequency attnlab's RoPE gives pair m of a d_R-dim key.
As one matrix: Q_rot [K H, K H] orthogonal, its first d_R columns the k_R layout, so

    k_R = x W_K Q_rot[:, :d_R],          q^R_i = x W_Q,i Q_rot[rows of g(i), :d_R]
    k^N = x W_K Q_rot[:, d_R:],          head i's NoPE key = k^N Q_rot[rows of g(i), d_R:]^T

Exact when every component keeps RoPE (K = 1 and d_R = R); otherwise the first approximation.

**2. BKV-PCA.** Keys usually have a larger norm than values, so a joint PCA would spend the
rank on keys: scale k^N by 1/a (and its up-projection by a) with a = rms(k^N) / rms(v).
Then the latent z = [k^N / a ; v] (2 K H - d_R values) gets PCA: P = its top d_c
eigenvectors, c = z P (the cached latent), z ~ c P^T. Exact at d_c = 2 K H - d_R.

**3. Absorption.** W_DKV = [W_K Q_rot[:, d_R:] / a | W_V] P, W_KR = W_K Q_rot[:, :d_R];
W_UK,i = a P_k^T Q_rot[rows of g(i), d_R:]^T, W_UV,i = P_v[rows of g(i)]^T (P_k, P_v: P's
key and value rows); q^C_i = x W_Q,i, q^R_i as above. attnlab's MLA scales logits by
1 / sqrt(d_n + d_R) = 1 / sqrt(H + d_R), GQA by 1 / sqrt(H): W_Q absorbs sqrt((H + d_R) / H).
The result is a standard decoupled-RoPE MLA (``mla_rope="decoupled"``, d_n = d_v = H) whose
decoding is attnlab's absorbed latent decode over d_c + d_R values per token.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.convert._params import build_model, model_params
from attnlab.convert.gqa_to_mla import check_gqa
from attnlab.nn import Config, Transformer


def _check_tokens(tokens, cfg: Config, name: str) -> jax.Array:
    arr = np.asarray(tokens)
    if arr.ndim != 2 or arr.shape[1] < 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids of shape [batch, seq], got "
                         f"{arr.dtype} {arr.shape}")
    if arr.shape[1] > cfg.max_seq_len:
        raise ValueError(f"{name} has {arr.shape[1]} tokens per row, more than max_seq_len="
                         f"{cfg.max_seq_len}; use shorter rows")
    if arr.min() < 0 or arr.max() >= cfg.vocab_size:
        raise ValueError(f"{name} ids must lie in [0, vocab_size={cfg.vocab_size}), got "
                         f"[{arr.min()}, {arr.max()}]")
    return jnp.asarray(arr, jnp.int32)


def calibrate(model: Transformer, tokens: jax.Array) -> list[np.ndarray]:
    """Second moments of every layer's attention input on calibration tokens.

    Args:
      model: the (GQA) Transformer.
      tokens: [B, T] int calibration tokens (a few batches of real text are best).

    Returns:
      one float64 [D, D] matrix G = sum_t h_t^T h_t per layer, h the layer's normed input.

    Raises:
      ValueError: tokens not [B, T] integers in the vocabulary, or longer than max_seq_len.

    Example:
      >>> grams = calibrate(model, tokens)
    """
    tokens = _check_tokens(tokens, model.cfg, "tokens")
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = model.embed(tokens)
    grams = []
    for block in model.blocks:
        h = np.asarray(block.attn_norm(x), np.float64).reshape(b * t, -1)
        grams.append(h.T @ h)
        x, _ = block(x, positions=positions)
    return grams


def rorope_basis(cov_k: np.ndarray, *, num_kv_heads: int, head_dim: int, rope_dim: int,
                 qk_rope_head_dim: int, pca: bool = True) -> np.ndarray:
    """RoRoPE's orthogonal change of basis of the key latent (with FreqFold when d_R < R).

    Args:
      cov_k: [K H, K H] second moment of the (un-rotated) keys, heads flattened as g H + d.
      num_kv_heads, head_dim: K, H.
      rope_dim: R, the rotated dims at the front of each head (even).
      qk_rope_head_dim: d_R, the decoupled RoPE dims kept; even, R / d_R an integer fold.
      pca: False keeps RoPE on the first KV head's pairs instead of the principal components
        (the ablation RoRoPE improves on).

    Returns:
      Q_rot [K H, K H] orthogonal: column m < d_R / 2 (m + d_R / 2) is the real (imaginary)
      part of the principal component of frequency group m, the k_R layout; the remaining
      columns are the other components' parts and the heads' NoPE dims.

    Example:
      >>> q_rot = rorope_basis(w_k.T @ gram @ w_k, num_kv_heads=2, head_dim=64, rope_dim=64,
      ...                      qk_rope_head_dim=64)
    """
    k, h, r, d_r = num_kv_heads, head_dim, rope_dim, qk_rope_head_dim
    half, fold = r // 2, r // d_r
    rope_re, rope_im, nope = [], [], []
    for m in range(d_r // 2):
        re = np.array([g * h + j for g in range(k) for j in range(fold * m, fold * (m + 1))])
        im = re + half
        if pca:
            cov = cov_k[np.ix_(re, re)] + cov_k[np.ix_(im, im)]
            w, u = np.linalg.eigh(cov)
            u = u[:, np.argsort(-w, kind="stable")]
        else:
            u = np.eye(len(re))
        for comp in range(len(re)):
            e_re, e_im = np.zeros(k * h), np.zeros(k * h)
            e_re[re], e_im[im] = u[:, comp], u[:, comp]
            if comp == 0:
                rope_re.append(e_re)
                rope_im.append(e_im)
            else:
                nope += [e_re, e_im]
    nope += [np.eye(k * h)[g * h + d] for g in range(k) for d in range(r, h)]
    return np.stack(rope_re + rope_im + nope, axis=1)


def _check_ranks(cfg: Config, kv_lora_rank, qk_rope_head_dim) -> tuple[int, int]:
    k, h, r = cfg.num_kv_heads, cfg.head_dim, cfg.rope_dim
    if r == 0:
        raise ValueError(
            f"the model rotates no dims (rope_fraction={cfg.rope_fraction}); a decoupled MLA "
            "needs RoPE dims to keep: use gqa_to_mla (exact) for a NoPE model"
        )
    d_r = r if qk_rope_head_dim is None else qk_rope_head_dim
    if (not isinstance(d_r, int) or isinstance(d_r, bool) or d_r < 2 or d_r % 2
            or d_r > r or (r // 2) % (d_r // 2)):
        folds = [r // f for f in range(1, r // 2 + 1) if (r // 2) % f == 0]
        raise ValueError(
            f"qk_rope_head_dim={d_r!r} must be an even number of RoPE dims that folds the "
            f"model's rope_dim={r} (head_dim={h}) evenly: one of {folds}"
        )
    most = 2 * k * h - d_r
    if not isinstance(kv_lora_rank, int) or isinstance(kv_lora_rank, bool) or not (
            1 <= kv_lora_rank <= most):
        raise ValueError(
            f"kv_lora_rank={kv_lora_rank!r} must be an int in [1, {most}]: the GQA latent "
            f"holds 2*K*H = 2*{k}*{h} = {2 * k * h} values per token and {d_r} of them "
            "become the decoupled RoPE key"
        )
    return kv_lora_rank, d_r


def _convert_layer(p: dict[str, np.ndarray], gram: np.ndarray, cfg: Config, d_c: int,
                   d_r: int, balance_kv: bool, rorope: bool) -> dict[str, np.ndarray]:
    """One layer's MLA weights (float64 math) from its GQA ``q_proj``/``k_proj``/``v_proj``."""
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    group = np.arange(n) // (n // k)
    w_q = p["q_proj"].astype(np.float64).reshape(-1, n, h)
    w_k, w_v = p["k_proj"].astype(np.float64), p["v_proj"].astype(np.float64)
    q_rot = rorope_basis(w_k.T @ gram @ w_k, num_kv_heads=k, head_dim=h, rope_dim=cfg.rope_dim,
                         qk_rope_head_dim=d_r, pca=rorope)
    w_kr, w_kn = w_k @ q_rot[:, :d_r], w_k @ q_rot[:, d_r:]
    per_head = q_rot.reshape(k, h, k * h)[group]  # [N, H, K H]: head i's rows of Q_rot
    w_qr = np.einsum("DnH,nHr->Dnr", w_q, per_head[..., :d_r])
    a = 1.0
    if balance_kv and w_kn.shape[1]:  # K = 1, d_R = R = H leaves no NoPE key to balance
        ms_k = np.trace(w_kn.T @ gram @ w_kn) / w_kn.shape[1]
        ms_v = np.trace(w_v.T @ gram @ w_v) / w_v.shape[1]
        if ms_k > 0 and ms_v > 0:
            a = float(np.sqrt(ms_k / ms_v))
    w_z = np.concatenate([w_kn / a, w_v], axis=1)  # [D, 2 K H - d_R]
    w, vecs = np.linalg.eigh(w_z.T @ gram @ w_z)
    pca = vecs[:, np.argsort(-w, kind="stable")[:d_c]]  # [2 K H - d_R, d_c]
    p_k, p_v = pca[:k * h - d_r], pca[k * h - d_r:]
    w_uk = a * np.einsum("ac,nHa->cnH", p_k, per_head[..., d_r:])
    w_uv = p_v.reshape(k, h, d_c)[group].transpose(2, 0, 1)
    q = np.concatenate([w_q, w_qr], axis=-1) * np.sqrt((h + d_r) / h)
    return {"q_proj.kernel": q.reshape(q.shape[0], -1),
            "kv_down.kernel": np.concatenate([w_z @ pca, w_kr], axis=1),
            "w_uk": w_uk, "w_uv": w_uv, "o_proj.kernel": p["o_proj"]}


def transmla(model: Transformer, calibration_tokens: jax.Array, *, kv_lora_rank: int,
             qk_rope_head_dim: int | None = None, balance_kv: bool = True,
             rorope: bool = True) -> Transformer:
    """Converts a GQA model into a decoupled-RoPE MLA model of latent rank ``kv_lora_rank``.

    RoRoPE (+ FreqFold) moves the keys' RoPE into a shared d_R-dim k_R, BKV-PCA compresses the
    NoPE keys and the values into a d_c-dim latent, and the changes of basis are absorbed into
    W_Q / W_UK / W_UV (see the module docstring for the equations). The cache shrinks from
    2 K H to d_c + d_R values per token per layer; decoding is attnlab's absorbed latent decode.

    Approximate: the NoPE'd RoPE components (unless K = 1 and d_R = R), the frequency folding
    (d_R < R) and the rank (d_c < 2 K H - d_R) each change the function; with K = 1,
    d_R = R and the full rank the logits are unchanged. Fine-tune afterwards to recover.

    Args:
      model: a Transformer whose layers are all ``"S"`` (GQA softmax with RoPE).
      calibration_tokens: [B, T] int tokens whose activations define the PCAs.
      kv_lora_rank: d_c, in [1, 2 K H - d_R].
      qk_rope_head_dim: d_R (default: the model's rope_dim R); even, with R / d_R an integer.
      balance_kv: scale keys and values to equal RMS before their joint PCA (BKV).
      rorope: False keeps RoPE on the first KV head's pairs (ablation).

    Returns:
      a Transformer of ``"M"`` layers, ``mla_rope="decoupled"``, d_n = d_v = H.

    Raises:
      ValueError: a layer that is not ``"S"``; a rank outside its range (the message gives
        the range); a model without RoPE dims; bad calibration tokens.

    Example:
      >>> mla = transmla(model, tokens, kv_lora_rank=64)
    """
    cfg = model.cfg
    check_gqa(cfg)
    d_c, d_r = _check_ranks(cfg, kv_lora_rank, qk_rope_head_dim)
    grams = calibrate(model, calibration_tokens)
    new_cfg = dataclasses.replace(
        cfg, layer_pattern="M" * cfg.num_layers, mla_rope="decoupled", kv_lora_rank=d_c,
        qk_rope_head_dim=d_r, qk_nope_head_dim=cfg.head_dim, v_head_dim=cfg.head_dim,
        q_lora_rank=None,
    )
    params = model_params(model)
    out = {name: v for name, v in params.items() if ".attn." not in name}
    for i, gram in enumerate(grams):
        prefix = f"blocks.{i}.attn."
        p = {name[len(prefix):].removesuffix(".kernel"): v for name, v in params.items()
             if name.startswith(prefix)}
        for name, v in _convert_layer(p, gram, cfg, d_c, d_r, balance_kv, rorope).items():
            out[prefix + name] = v
    return build_model(new_cfg, out)


class ConversionError(NamedTuple):
    """How far a converted model's logits are from the original's on some tokens."""

    relative_logit_error: float  # ||converted - original|| / ||original|| (Frobenius)
    max_abs_logit_error: float
    loss_original: float  # next-token cross-entropy (nats)
    loss_converted: float
    kl: float  # mean KL(original || converted) of the next-token distributions


def conversion_error(original: Transformer, converted: Transformer,
                     tokens: jax.Array) -> ConversionError:
    """Logit error, next-token losses and KL of ``converted`` against ``original``.

    Example:
      >>> conversion_error(model, transmla(model, calib, kv_lora_rank=32), heldout)
    """
    tokens = _check_tokens(tokens, original.cfg, "tokens")
    a = np.asarray(original(tokens)[0], np.float64)
    b = np.asarray(converted(tokens)[0], np.float64)
    la, lb = (x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
              - x.max(-1, keepdims=True) for x in (a, b))
    nxt = np.asarray(tokens)[:, 1:, None]

    def loss(lp):
        return float(-np.take_along_axis(lp[:, :-1], nxt, -1).mean())

    return ConversionError(
        relative_logit_error=float(np.linalg.norm(b - a) / np.linalg.norm(a)),
        max_abs_logit_error=float(np.abs(b - a).max()),
        loss_original=loss(la), loss_converted=loss(lb),
        kl=float((np.exp(la) * (la - lb)).sum(-1).mean()),
    )
