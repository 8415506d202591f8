"""Lightning backend ``"xla"``: the chunked intra/inter-block form of Lightning Attention-2 in
pure JAX, with a parallel (associative) scan over the chunk states; differentiable by JAX."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnlab.ops._registry import Implementation
from attnlab.ops.lightning import LightningArgs, matmul_dtype, segment_starts
from pallas_kernels.common.lightning import decayed_state_scan
from pallas_kernels.common.static_args import check_int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class XlaLightningConfig:
    """Chunk length of the ``"xla"`` path (tokens per intra-block; the T x C score tile)."""

    chunk_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunk_size", check_int("chunk_size", self.chunk_size))

    @classmethod
    def get_default(cls) -> XlaLightningConfig:
        return cls()


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
    """
    b, t, n, h = q.shape
    hv = v.shape[-1]
    c = max(1, min(chunk, t))
    tp = -(-t // c) * c
    nc, pad = tp // c, tp - t
    dt = q.dtype

    def chunks(x):  # [B, Tp, ...] -> [B, nc, C, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, nc, c, *x.shape[2:])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    # Number of resets so far at each token: two tokens share a document span iff equal.
    starts = segment_starts(a.segment_ids, b, t)
    rc = chunks(jnp.cumsum(starts.astype(jnp.int32), axis=1))
    if pad:  # padded tokens continue the last document
        last = jnp.cumsum(starts.astype(jnp.int32), axis=1)[:, -1]
        rc = rc.reshape(b, tp).at[:, t:].set(last[:, None]).reshape(b, nc, c)
    r_prev = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), rc[:, :-1, -1]], axis=1)  # [B, nc]

    # Per-token log decay: log lambda for real tokens, 0 for padding; chunk-local cumsum.
    real = (jnp.arange(tp) < t).reshape(nc, c).astype(jnp.float32)
    g = a.log_decay[:, None, None] * jnp.cumsum(real, axis=1)[None]  # [N, nc, C], G_i
    g_last = g[..., -1]  # [N, nc]

    # Intra-chunk scores with the decay mask D_ij = exp(G_i - G_j) (j <= i, same document).
    tri = jnp.tril(jnp.ones((c, c), bool))
    diff = jnp.where(tri, g[..., :, None] - g[..., None, :], 0.0)
    dmask = jnp.where(tri, jnp.exp(jnp.minimum(diff, 0.0)), 0.0)  # [N, nc, C, C]
    same = rc[:, :, :, None] == rc[:, :, None, :]  # [B, nc, C, C]
    m = dmask[None] * same[:, None].astype(jnp.float32)  # [B, N, nc, C, C]
    scores = jnp.einsum("BCINH,BCJNH->BNCIJ", qc, kc, preferred_element_type=jnp.float32)
    p = (scores * a.scale * m).astype(dt)
    o_intra = jnp.einsum("BNCIJ,BCJNV->BCINV", p, vc, preferred_element_type=jnp.float32)

    # Chunk states: U_c over the chunk's last document, A_c the carry-through factor.
    in_last = (rc == rc[:, :, -1:]).astype(jnp.float32)  # [B, nc, C]
    w = jnp.exp(g_last[..., None] - g)  # [N, nc, C], <= 1
    wk = (kc.astype(jnp.float32) * (jnp.moveaxis(w, 0, -1)[None] * in_last[..., None])[..., None])
    u = jnp.einsum("BCJNH,BCJNV->BCNHV", wk.astype(dt), vc, preferred_element_type=jnp.float32)
    unbroken = (rc[:, :, -1] == r_prev).astype(jnp.float32)  # [B, nc]
    decay_c = jnp.exp(g_last).T[None] * unbroken[..., None]  # [B, nc, N]
    if a.initial_state is not None:
        u = u.at[:, 0].add(decay_c[:, 0, :, None, None] * a.initial_state)

    s_after = decayed_state_scan(decay_c, u, axis=1)  # [B, nc, N, H, Hv]
    s0 = a.initial_state if a.initial_state is not None else jnp.zeros((b, n, h, hv), jnp.float32)
    s_before = jnp.concatenate([s0[:, None], s_after[:, :-1]], axis=1)

    # Inter-chunk: queries that are still in the document the chunk started in read the state.
    sees = (rc == r_prev[..., None]).astype(jnp.float32)  # [B, nc, C]
    qw = jnp.exp(jnp.moveaxis(g, 0, -1))[None] * sees[..., None] * a.scale  # [B, nc, C, N]
    qs = qc.astype(jnp.float32) * qw[..., None]
    inter_dt = matmul_dtype(dt)
    o_inter = jnp.einsum("BCINH,BCNHV->BCINV", qs.astype(inter_dt), s_before.astype(inter_dt),
                         preferred_element_type=jnp.float32)
    o = (o_intra + o_inter).reshape(b, tp, n, hv)[:, :t].astype(dt)
    return o, s_after[:, -1]


def _fn(q, k, v, a: LightningArgs):
    cfg = a.config if a.config is not None else XlaLightningConfig()
    chunk = a.chunk_size if a.chunk_size is not None else cfg.chunk_size
    return lightning_chunked_xla(q, k, v, a, chunk)


IMPLEMENTATION = Implementation(
    name="xla", fn=_fn, config_cls=XlaLightningConfig, returns_lse=False,
    description="chunked intra/inter-block form (Lightning Attention-2) in JAX; state scan")
