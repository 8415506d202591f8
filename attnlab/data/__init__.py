"""Offline, deterministic data: synthetic tasks and the standard-library corpus.

Every dataset has ``seq_len``, ``seed`` and ``batch(step, batch_size, split) -> Batch``, a pure
function of ``(seed, split, step)``. :func:`make_dataset` builds one by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from attnlab.data.batch import Batch, pack_documents, positions_from_segments, rows_from_windows
from attnlab.data.corpus import StdlibCorpus, stdlib_files
from attnlab.data.tasks import (
    MQAR,
    Calendar,
    Induction,
    NeedleInHaystack,
    Passkey,
    RetrievalTask,
    VariableTracking,
    calendar_answer,
)
from attnlab.data.tokenizer import EOS, VOCAB_SIZE, decode, encode

DATASETS: dict[str, Any] = {
    "mqar": MQAR, "induction": Induction, "passkey": Passkey, "calendar": Calendar,
    "stdlib": StdlibCorpus, "needle": NeedleInHaystack, "variable_tracking": VariableTracking,
}


def make_dataset(name: str, *, seq_len: int, seed: int = 0, **kwargs: Any) -> Any:
    """The dataset ``name`` (one of :data:`DATASETS`) for rows of ``seq_len`` tokens.

    Raises ValueError for an unknown name or bad options. Example:
    ``make_dataset("mqar", seq_len=128).batch(0, 8).inputs.shape == (8, 128)``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(DATASETS)}")
    cls = DATASETS[name]
    options = [f.name for f in dataclasses.fields(cls) if f.name not in ("seq_len", "seed")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for task {name!r}; its options are "
                         f"{', '.join(options) or 'none'}")
    return cls(seq_len=seq_len, seed=seed, **kwargs)


__all__ = [
    "DATASETS", "EOS", "MQAR", "VOCAB_SIZE", "Batch", "Calendar", "Induction",
    "NeedleInHaystack", "Passkey", "RetrievalTask", "VariableTracking",
    "StdlibCorpus", "calendar_answer", "decode", "encode", "make_dataset", "pack_documents",
    "positions_from_segments", "rows_from_windows", "stdlib_files",
]
