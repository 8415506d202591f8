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
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(ids: Iterable[int] | np.ndarray) -> str:
    """Text of byte ids (invalid UTF-8 shows as U+FFFD; stops at nothing, keeps EOS out)."""
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
        raise ValueError(f"ids must lie in [0, {VOCAB_SIZE}); got {arr.min()}..{arr.max()}")
    return bytes(int(i) for i in arr if i != EOS).decode("utf-8", errors="replace")
