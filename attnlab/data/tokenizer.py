"""Byte-level tokenizer: a token is a UTF-8 byte (vocab 256), so no vocabulary file exists."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

VOCAB_SIZE = 256
# NUL never occurs in source text; it ends every document of a corpus so that generation
# can stop there.
EOS = 0


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int32 ids [L]. Example: ``encode("hi") -> [104, 105]``."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}; decode bytes first")
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def check_token_ids(ids: np.ndarray, what: str = "ids", vocab_size: int = VOCAB_SIZE) -> None:
    """ValueError unless ``ids`` are integers in [0, vocab_size).

    The model cannot check its (traced) token ids: an id outside the vocabulary reads a
    wrong embedding row (-1: the last) or NaN. So batches are checked here, where they are
    made (NumPy arrays, cheap to read).
    """
    arr = np.asarray(ids)
    if arr.size == 0:
        return
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be integer token ids, got dtype {arr.dtype}")
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{what} must lie in [0, {vocab_size}) (the byte vocabulary); got values in "
            f"[{lo}, {hi}]"
        )


def decode(ids: Iterable[int] | np.ndarray) -> str:
    """Text of byte ids (invalid UTF-8 shows as U+FFFD; stops at nothing, keeps EOS out)."""
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    check_token_ids(arr)
    return bytes(int(i) for i in arr if i != EOS).decode("utf-8", errors="replace")
