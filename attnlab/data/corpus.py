"""A real text corpus that needs no download: the running interpreter's standard library.

The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (test suites and site-packages
left out), in sorted order, so the corpus is identical on every machine with the same Python.
Each file is one document: its UTF-8 bytes followed by :data:`~attnlab.data.tokenizer.EOS`.

Batches: every epoch concatenates the split's documents in a permutation drawn from
``(seed, split, epoch)`` and cuts the stream into rows of T+1 tokens (the tail shorter than a
row is dropped). Global row r = step * B + b is row ``r % rows_per_epoch`` of epoch
``r // rows_per_epoch``, so batch ``step`` is a pure function of ``(seed, split, step)``: a
run resumes from any step without replaying the data. Documents cut at a row boundary go on
in the next row of the stream with positions restarting at 0.
"""

from __future__ import annotations

import dataclasses
import functools
import sysconfig
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np

from attnlab.data.batch import SPLITS, Batch, check_batch_request, check_split, rows_from_windows
from attnlab.data.tokenizer import EOS
from pallas_kernels.common.static_args import check_int

_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def stdlib_files(root: str | None = None) -> tuple[str, ...]:
    """Sorted relative paths (POSIX) of the corpus's ``.py`` files under ``root``."""
    base = Path(root) if root is not None else stdlib_root()
    rel = (p.relative_to(base) for p in base.rglob("*.py"))
    return tuple(sorted(r.as_posix() for r in rel if not _SKIP_DIRS & set(r.parts)))


def split_of(relpath: str, validation_percent: int) -> str:
    """'validation' for a stable ``validation_percent`` % of files (by CRC32 of the path)."""
    return "validation" if zlib.crc32(relpath.encode()) % 100 < validation_percent else "train"


@functools.cache
def _split_docs(root: str | None, validation_percent: int, split: str) -> tuple[np.ndarray, ...]:
    base = Path(root) if root is not None else stdlib_root()
    docs = []
    for rel in stdlib_files(root):
        if split_of(rel, validation_percent) == split:
            data = np.frombuffer((base / rel).read_bytes(), np.uint8)
            docs.append(np.concatenate([data, np.array([EOS], np.uint8)]))
    if not docs:
        raise ValueError(f"no {split} files under {base} (validation_percent="
                         f"{validation_percent}); is this a Python installation's stdlib?")
    return tuple(docs)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StdlibCorpus:
    """Byte-level Python source from the standard library, packed into rows.

    Attributes:
      seq_len: T.
      seed: shuffle seed.
      validation_percent: share of files (by path hash) held out for validation.
      root: the directory to read (default: the running interpreter's stdlib).
    """

    seq_len: int
    seed: int = 0
    validation_percent: int = 5
    root: str | None = None
    name: ClassVar[str] = "stdlib"
    is_text: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int("seq_len", self.seq_len)
        check_int("seed", self.seed, minimum=0)
        check_int("validation_percent", self.validation_percent, minimum=0)
        if not 0 < self.validation_percent < 100:
            raise ValueError(f"validation_percent={self.validation_percent} must lie in (0, 100)")

    def documents(self, split: str = "train") -> tuple[np.ndarray, ...]:
        """The split's documents (uint8 arrays ending in EOS), in file order."""
        check_split(split)
        return _split_docs(self.root, self.validation_percent, split)

    def num_tokens(self, split: str = "train") -> int:
        """Tokens in one epoch of ``split``."""
        return sum(len(d) for d in self.documents(split))

    def _epoch(self, split: str, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return _epoch_stream(self.root, self.validation_percent, split, self.seed, epoch)

    def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
        """Batch ``step`` of ``split`` [batch_size, seq_len] (see the module docstring)."""
        check_batch_request(step, batch_size, split)
        width = self.seq_len + 1
        per_epoch = self.num_tokens(split) // width
        if per_epoch == 0:
            raise ValueError(f"seq_len={self.seq_len} is longer than the whole {split} split")
        toks = np.empty((batch_size, width), np.int32)
        docs = np.empty((batch_size, width), np.int64)
        for b in range(batch_size):
            epoch, row = divmod(step * batch_size + b, per_epoch)
            stream, doc_of = self._epoch(split, epoch)
            toks[b] = stream[row * width : (row + 1) * width]
            docs[b] = doc_of[row * width : (row + 1) * width]
        return rows_from_windows(toks, docs)


@functools.lru_cache(maxsize=4)
def _epoch_stream(
    root: str | None, validation_percent: int, split: str, seed: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document index of each token) of one shuffled epoch."""
    docs = _split_docs(root, validation_percent, split)
    order = np.random.default_rng([seed, SPLITS[split], epoch, 0x5EED]).permutation(len(docs))
    stream = np.concatenate([docs[i] for i in order])
    doc_of = np.repeat(order, [len(docs[i]) for i in order])
    return stream, doc_of
