"""Lightning backend ``"xla"``: the chunked intra/inter-block form of Lightning Attention-2 in
pure JAX, with a parallel (associative) scan over the chunk states; differentiable by JAX."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnlab.ops._registry import Implementation
from attnlab.ops.lightning import LightningArgs, matmul_dtype, segment_starts
from pallas_kernels.common.checks import DefaultConfig
from pallas_kernels.common.lightning import decay_power, decayed_state_scan, scale_state
from pallas_kernels.common.masks import finite_or_zero, weighted_sum
from pallas_kernels.common.static_args import check_int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class XlaLightningConfig(DefaultConfig):
    """Chunk length of the ``"xla"`` path (tokens per intra-block; the T x C score tile)."""

    chunk_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunk_size", check_int("chunk_size", self.chunk_size))


# ----------------------------------------------------------------------------- decay slopes


def lightning_chunked_xla(q, k, v, a: LightningArgs, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Lightning Attention-2's chunked form in JAX: (o [B, T, N, Hv], final state f32).

    Intra-chunk: O_intra = [(Q_c K_c^T) * D] V_c over all chunks at once ([B, N, nc, C, C]).
    Inter-chunk: the state entering chunk c comes from a parallel (associative) scan of
    S <- A_c S + U_c, with A_c = lambda^C (0 if a document starts inside chunk c) and
    U_c = sum_j lambda^(C-1-j) k_j^T v_j over the chunk's last document; then
    O_inter = (lambda^(i+1) Q_c) S for queries still in the document the chunk started in.
    T is padded to a multiple of C with tokens of decay 1 and zero k, v (they change nothing).
    Memory O(B N T (C + H Hv / C)); differentiable by JAX.

    Masked tokens (later ones, other documents) never influence a row: q, k, v are read
    through finite_or_zero, the decay mask, a dropped state and a row's gate select instead
    of multiplying (0 * NaN is NaN), and the two sums over masked tokens are weighted_sums
    (their gradient reads dO through finite_or_zero). Decay powers are counts of real tokens
    (decay_power: decay 0 keeps the current token only). float16 inputs keep the score tile
    and the states in float32 (q.k = 86400 is out of float16's range, not of the result's).
    """
    b, t, n, h = q.shape
    hv = v.shape[-1]
    c = max(1, min(chunk, t))
    tp = -(-t // c) * c
    nc, pad = tp // c, tp - t
    dt = q.dtype
    f32 = jnp.float32
    wide = f32 if dt == jnp.float16 else dt  # the score tile's dtype

    def chunks(x):  # [B, Tp, ...] -> [B, nc, C, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, nc, c, *x.shape[2:])

    qc, kc, vc = (chunks(finite_or_zero(x)) for x in (q, k, v))
    # Number of resets so far at each token: two tokens share a document span iff equal.
    starts = segment_starts(a.segment_ids, b, t)
    rc = chunks(jnp.cumsum(starts.astype(jnp.int32), axis=1))
    if pad:  # padded tokens continue the last document
        last = jnp.cumsum(starts.astype(jnp.int32), axis=1)[:, -1]
        rc = rc.reshape(b, tp).at[:, t:].set(last[:, None]).reshape(b, nc, c)
    r_prev = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), rc[:, :-1, -1]], axis=1)  # [B, nc]

    # Real tokens from the chunk start up to each position (padding adds no decay).
    real = (jnp.arange(tp) < t).reshape(nc, c).astype(f32)
    e = jnp.cumsum(real, axis=1)  # [nc, C]
    e_last = e[:, -1]  # [nc]
    ld = a.log_decay[:, None, None]  # [N, 1, 1]

    # Intra-chunk scores with the decay mask D_ij = lambda^(e_i - e_j) (j <= i, same document).
    tri = jnp.tril(jnp.ones((c, c), bool))
    keep = tri[None, None] & (rc[:, :, :, None] == rc[:, :, None, :])  # [B, nc, C, C]
    age = jnp.maximum(e[:, :, None] - e[:, None, :], 0.0)  # [nc, C, C]
    dmask = decay_power(ld[..., None], age[None])  # [N, nc, C, C]
    scores = jnp.einsum("BCINH,BCJNH->BNCIJ", qc, kc, preferred_element_type=f32)
    p = jnp.where(keep[:, None], scores * a.scale * dmask[None], 0.0).astype(wide)
    o_intra = weighted_sum("BNCIJ,BCJNV->BCINV", p, vc.astype(wide), None, f32)

    # Chunk states: U_c over the chunk's last document, A_c the carry-through factor.
    in_last = rc == rc[:, :, -1:]  # [B, nc, C]
    w = jnp.moveaxis(decay_power(ld, (e_last[:, None] - e)[None]), 0, -1)  # [nc, C, N]
    wk = jnp.where(in_last[..., None, None], kc.astype(f32) * w[None, ..., None], 0.0)
    u = weighted_sum("BCJNH,BCJNV->BCNHV", wk.astype(dt), vc, None, f32)
    unbroken = (rc[:, :, -1] == r_prev).astype(f32)  # [B, nc]
    decay_c = decay_power(a.log_decay[:, None], e_last[None]).T[None] * unbroken[..., None]
    if a.initial_state is not None:
        u = u.at[:, 0].add(scale_state(decay_c[:, 0, :, None, None], a.initial_state))

    s_after = decayed_state_scan(decay_c, u, axis=1)  # [B, nc, N, H, Hv]
    s0 = a.initial_state if a.initial_state is not None else jnp.zeros((b, n, h, hv), f32)
    s_before = jnp.concatenate([s0[:, None], s_after[:, :-1]], axis=1)

    # Inter-chunk: queries that are still in the document the chunk started in read the state
    # (the others select 0: the state may hold an earlier document's NaN).
    sees = (rc == r_prev[..., None])[..., None, None]  # [B, nc, C, 1, 1]
    qw = jnp.moveaxis(decay_power(ld, e[None]), 0, -1) * a.scale  # [nc, C, N]
    qs = jnp.where(sees, qc.astype(f32) * qw[None, ..., None], 0.0)
    inter_dt = f32 if dt == jnp.float16 else matmul_dtype(dt)
    o_inter = jnp.einsum("BCINH,BCNHV->BCINV", qs.astype(inter_dt), s_before.astype(inter_dt),
                         preferred_element_type=f32)
    o = (o_intra + jnp.where(sees, o_inter, 0.0)).reshape(b, tp, n, hv)[:, :t].astype(dt)
    return o, s_after[:, -1]


def _fn(q, k, v, a: LightningArgs):
    cfg = a.config if a.config is not None else XlaLightningConfig()
    chunk = a.chunk_size if a.chunk_size is not None else cfg.chunk_size
    return lightning_chunked_xla(q, k, v, a, chunk)


IMPLEMENTATION = Implementation(
    name="xla", fn=_fn, config_cls=XlaLightningConfig, returns_lse=False,
    description="chunked intra/inter-block form (Lightning Attention-2) in JAX; state scan")
