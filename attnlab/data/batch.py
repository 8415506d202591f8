"""The batch every dataset yields, and packing of variable-length documents into rows.

Shapes use the house letters: B batch, T sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from attnlab.data.tokenizer import check_token_ids
from pallas_kernels.common.static_args import check_int

# Segment id of padding; documents in a row are numbered 1, 2, ... in order.
PAD_SEGMENT = 0
# Data splits and the number each one mixes into its random streams.
SPLITS = {"train": 0, "validation": 1}


class Batch(NamedTuple):
    """One training batch (NumPy arrays; a NamedTuple, so also a JAX pytree).

    Attributes:
      inputs: [B, T] int32 token ids fed to the model.
      targets: [B, T] int32 next-token ids (``targets[:, t]`` is predicted at position t).
      mask: [B, T] float32, 1 where the target counts in the loss and the accuracy (answer
        tokens of a task, or every target inside the same document for text), else 0.
      segment_ids: [B, T] int32 document ids per row (1, 2, ...; 0 is padding).
      positions: [B, T] int32 position of each token inside its document piece (restarts at
        every document start and at every row start).
    """

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """Positions [..., T] that restart at 0 wherever the segment id changes (and at t=0)."""
    seg = np.asarray(segment_ids)
    t = np.arange(seg.shape[-1])
    start = np.ones(seg.shape, bool)
    start[..., 1:] = seg[..., 1:] != seg[..., :-1]
    first = np.maximum.accumulate(np.where(start, t, 0), axis=-1)
    return (t - first).astype(np.int32)


def rows_from_windows(
    tokens: np.ndarray, doc_ids: np.ndarray, loss: np.ndarray | None = None
) -> Batch:
    """A batch from windows of T+1 tokens of a packed stream.

    Args:
      tokens: [B, T+1] token ids.
      doc_ids: [B, T+1] which document each token came from (any integers; equal = same doc).
      loss: [B, T+1] optional 0/1 weight of each token *as a target* (default: every token).
        Padding documents must carry weight 0 here.

    Returns:
      A :class:`Batch` whose targets are ``tokens[:, 1:]``, masked where the target lies in a
      different document than its input (no prediction across a document boundary).
    """
    tokens = np.asarray(tokens)
    doc_ids = np.asarray(doc_ids)
    if tokens.ndim != 2 or tokens.shape != doc_ids.shape or tokens.shape[1] < 2:
        raise ValueError(
            f"tokens {tokens.shape} and doc_ids {doc_ids.shape} must both be [B, T+1] with "
            "T >= 1"
        )
    check_token_ids(tokens, "tokens")
    if loss is not None and np.shape(loss) != tokens.shape:
        raise ValueError(f"loss must have the tokens' shape {tokens.shape}, got "
                         f"{np.shape(loss)}")
    seg_in, seg_tg = doc_ids[:, :-1], doc_ids[:, 1:]
    change = np.ones(seg_in.shape, bool)
    change[:, 1:] = seg_in[:, 1:] != seg_in[:, :-1]
    segment_ids = np.cumsum(change, axis=1).astype(np.int32)
    mask = seg_in == seg_tg
    if loss is not None:
        mask &= np.asarray(loss)[:, 1:] > 0
    return Batch(
        inputs=tokens[:, :-1].astype(np.int32),
        targets=tokens[:, 1:].astype(np.int32),
        mask=mask.astype(np.float32),
        segment_ids=segment_ids,
        positions=positions_from_segments(segment_ids),
    )


def pack_documents(
    docs: Sequence[tuple[np.ndarray, np.ndarray]], rows: int, seq_len: int
) -> Batch:
    """Packs whole documents greedily, in order, into ``rows`` rows of ``seq_len`` targets.

    Documents that do not fit in what is left of a row start the next row; documents longer
    than a row are cut. Leftover documents are dropped, and the tail of a row is padding
    (segment id 0, mask 0).

    Args:
      docs: (tokens [L] int, loss [L] 0/1 weight of each token as a target) per document.
      rows: B.
      seq_len: T (each row holds T+1 tokens before the shift).

    Returns:
      A :class:`Batch` of shape [rows, seq_len].

    Raises:
      ValueError: rows or seq_len not a positive int; a document whose tokens are not
        integer ids in [0, VOCAB_SIZE) or whose loss is not one weight per token.
    """
    rows, seq_len = check_int("rows", rows), check_int("seq_len", seq_len)
    for i, (tokens, loss) in enumerate(docs):
        check_token_ids(tokens, f"tokens of document {i}")
        if np.ndim(tokens) != 1 or np.shape(loss) != np.shape(tokens):
            raise ValueError(f"document {i} must be (tokens [L], loss [L]), got shapes "
                             f"{np.shape(tokens)} and {np.shape(loss)}")
    width = seq_len + 1
    tok = np.zeros((rows, width), np.int32)
    doc = np.full((rows, width), -1, np.int64)
    wt = np.zeros((rows, width), np.float32)
    r, col, d = 0, 0, 0
    for tokens, loss in docs:
        n = min(len(tokens), width)
        if col + n > width:
            r, col = r + 1, 0
        if r >= rows:
            break
        tok[r, col : col + n] = tokens[:n]
        wt[r, col : col + n] = loss[:n]
        doc[r, col : col + n] = d
        col, d = col + n, d + 1
    batch = rows_from_windows(tok, doc, wt)
    # Padding gets segment id 0 so that it is recognisable (documents are 1, 2, ...).
    seg = np.where(doc[:, :-1] < 0, PAD_SEGMENT, batch.segment_ids).astype(np.int32)
    return batch._replace(segment_ids=seg, positions=positions_from_segments(seg))


def rng_for(seed: int, step: int, split: str) -> np.random.Generator:
    """The NumPy generator of batch ``step`` of ``split``: a pure function of its arguments,
    identical on every machine (PCG64 seeded through SeedSequence)."""
    check_int("seed", seed, minimum=0)
    check_int("step", step, minimum=0)
    check_split(split)
    return np.random.default_rng([seed, SPLITS[split], step])


def check_batch_request(step: int, batch_size: int, split: str) -> None:
    """ValueError unless ``step`` is an int >= 0, ``batch_size`` a positive int and
    ``split`` 'train' or 'validation' (what every dataset's ``batch`` takes)."""
    check_int("step", step, minimum=0)
    check_int("batch_size", batch_size)
    check_split(split)


def check_split(split: str) -> None:
    """ValueError unless ``split`` is 'train' or 'validation'."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use 'train' or 'validation'")
