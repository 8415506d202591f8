"""Synthetic tasks that probe what attention can do (offline, deterministic).

Each task is a frozen dataclass with ``seq_len`` and ``seed``; ``task.batch(step, batch_size,
split=...)`` returns a :class:`~attnlab.data.batch.Batch` [B, T] that is a pure function of
``(seed, split, step)``, so a resumed run sees the same data. The loss mask selects the answer
tokens, so the masked accuracy is the task accuracy.

* :class:`MQAR` multi-query associative recall (Zoology, Arora et al. 2023): key-value pairs,
  then queries of the keys; predict each key's value.
* :class:`Induction` a random token sequence repeated once; predict the second copy.
* :class:`Passkey` a number hidden at a random depth of filler text, asked for at the end.
* :class:`Calendar` "What day is 17 days after Tuesday? Friday." modular arithmetic in text.
* :class:`NeedleInHaystack` token-level needle(s) in a haystack (RULER's NIAH; with several
  needles its multi-key variant), one asked at the end.
* :class:`VariableTracking` token-level chains of assignments ``x2 = x1``, ``x1 = v``
  (RULER's variable tracking: multi-hop), one chain's last variable asked at the end.

The two retrieval tasks share one layout, a row per example:
``BOS <context with the statements> QUERY name <answer>``, so their prompts
(:meth:`~NeedleInHaystack.prompts`: everything before the answer) have one length, and the
context (BOS through the haystack) is ``seq_len - 2 - value_len + 1`` tokens.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from attnlab.data.batch import Batch, check_batch_request, pack_documents, rng_for
from attnlab.data.tokenizer import encode
from pallas_kernels.common.static_args import check_int

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")

# MQAR token ranges: keys and values never overlap, 0 is padding.
MQAR_KEYS = (1, 128)
MQAR_VALUES = (128, 256)


def _check_sizes(seed: int, **sizes: int) -> None:
    """ValueError unless ``seed`` is an int >= 0 and every size a positive int."""
    check_int("seed", seed, minimum=0)
    for name, v in sizes.items():
        check_int(name, v)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MQAR:
    """Multi-query associative recall.

    An example is ``k1 v1 k2 v2 ... kn vn  q1 a1 q2 a2 ...`` with distinct keys, n queries,
    each a key from the pairs, and its answer the paired value. Only the answers are in the
    loss. Examples are packed, one document each, as many per row as fit (at least one:
    ``4 * num_kv_pairs <= seq_len + 1``).

    By default the queries are all n keys in a random order, so the answers are a permutation
    of the values: a model that never looks a key up can still answer the last query by
    elimination (expected accuracy ``H_n / n``, 52 % at n = 4, against ``1 / n`` for a guess
    among the values in context). With ``queries_with_replacement`` each query is drawn
    independently from the n keys, so nothing but recall beats ``1 / n``.

    Attributes:
      seq_len: T.
      seed: data seed.
      num_kv_pairs: n (at most 127 distinct keys).
      queries_with_replacement: draw the n queries independently (keys may repeat, some
        are not asked) instead of asking every key once.
    """

    seq_len: int
    seed: int = 0
    num_kv_pairs: int = 8
    queries_with_replacement: bool = False
    name: ClassVar[str] = "mqar"
    is_text: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_sizes(self.seed, seq_len=self.seq_len, num_kv_pairs=self.num_kv_pairs)
        if self.num_kv_pairs > MQAR_KEYS[1] - MQAR_KEYS[0]:
            raise ValueError(f"num_kv_pairs={self.num_kv_pairs} exceeds the "
                             f"{MQAR_KEYS[1] - MQAR_KEYS[0]} distinct keys; use fewer pairs")
        if 4 * self.num_kv_pairs > self.seq_len + 1:
            raise ValueError(
                f"an MQAR example with num_kv_pairs={self.num_kv_pairs} has "
                f"{4 * self.num_kv_pairs} tokens, more than seq_len+1={self.seq_len + 1}; "
                "raise seq_len or lower num_kv_pairs"
            )

    def example(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [4n], loss weight [4n]) of one example."""
        n = self.num_kv_pairs
        keys = rng.choice(np.arange(*MQAR_KEYS), n, replace=False)
        vals = rng.integers(*MQAR_VALUES, size=n)
        replace = self.queries_with_replacement
        order = rng.integers(0, n, size=n) if replace else rng.permutation(n)
        tokens = np.concatenate([np.stack([keys, vals], 1).reshape(-1),
                                 np.stack([keys[order], vals[order]], 1).reshape(-1)])
        loss = np.zeros(4 * n, np.float32)
        loss[2 * n + 1 :: 2] = 1.0
        return tokens.astype(np.int32), loss

    def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
        """Batch ``step`` of ``split`` [batch_size, seq_len]."""
        check_batch_request(step, batch_size, split)
        rng = rng_for(self.seed, step, split)
        per_row = (self.seq_len + 1) // (4 * self.num_kv_pairs)
        docs = [self.example(rng) for _ in range(batch_size * per_row)]
        return pack_documents(docs, batch_size, self.seq_len)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Induction:
    """Induction heads: ``prefix_len`` random tokens, then the same tokens again.

    The loss covers the second copy from its second token on (the first token of the copy
    is not predictable; every later one is, by finding the previous occurrence of the
    current token and copying its successor).

    Attributes:
      seq_len: T.
      seed: data seed.
      prefix_len: m; an example has 2m tokens and ``2m <= seq_len + 1``.
      vocab: tokens are drawn from [1, vocab).
    """

    seq_len: int
    seed: int = 0
    prefix_len: int = 32
    vocab: int = 256
    name: ClassVar[str] = "induction"
    is_text: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_sizes(self.seed, seq_len=self.seq_len, prefix_len=self.prefix_len)
        if 2 * self.prefix_len > self.seq_len + 1:
            raise ValueError(f"prefix_len={self.prefix_len} needs seq_len >= "
                             f"{2 * self.prefix_len - 1}; got seq_len={self.seq_len}")
        if not 2 < self.vocab <= 256:
            raise ValueError(f"vocab={self.vocab} must lie in (2, 256]")

    def example(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [2m], loss weight [2m]) of one example."""
        m = self.prefix_len
        prefix = rng.integers(1, self.vocab, size=m)
        loss = np.zeros(2 * m, np.float32)
        loss[m + 1 :] = 1.0
        return np.concatenate([prefix, prefix]).astype(np.int32), loss

    def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
        """Batch ``step`` of ``split`` [batch_size, seq_len]."""
        check_batch_request(step, batch_size, split)
        rng = rng_for(self.seed, step, split)
        per_row = (self.seq_len + 1) // (2 * self.prefix_len)
        return pack_documents([self.example(rng) for _ in range(batch_size * per_row)],
                              batch_size, self.seq_len)


_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
           "There and back again. ")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Passkey:
    """Passkey retrieval (needle in a haystack), byte-level text, one document per row.

    ``There is a pass key hidden in this text. <filler> The pass key is 48213. Remember it.
    <filler> What is the pass key? The pass key is 48213.`` -- the needle sits at a random
    depth; the loss covers the digits of the final answer.

    Attributes:
      seq_len: T (at least about 130 bytes of text).
      seed: data seed.
      digits: length of the pass key.
    """

    seq_len: int
    seed: int = 0
    digits: int = 5
    name: ClassVar[str] = "passkey"
    is_text: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_sizes(self.seed, seq_len=self.seq_len, digits=self.digits)
        fixed = len(self.text("0" * self.digits, 0.0, 0))
        if self.seq_len + 1 < fixed:
            raise ValueError(f"seq_len={self.seq_len} is too short for a passkey example "
                             f"with digits={self.digits}; use seq_len >= {fixed - 1}")

    def text(self, key: str, depth: float, filler_chars: int) -> str:
        """The example text with ``filler_chars`` bytes of filler, the needle at ``depth``."""
        filler = (_FILLER * (filler_chars // len(_FILLER) + 1))[:filler_chars]
        cut = int(round(depth * len(filler)))
        return ("There is a pass key hidden in this text. " + filler[:cut]
                + f"The pass key is {key}. Remember it. " + filler[cut:]
                + f"What is the pass key? The pass key is {key}")

    def example(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
        """(tokens [L <= T+1], loss weight [L], the key) of one example."""
        key = "".join(str(d) for d in rng.integers(0, 10, size=self.digits))
        fixed = len(self.text(key, 0.0, 0))
        tokens = encode(self.text(key, float(rng.random()), self.seq_len + 1 - fixed))
        loss = np.zeros(len(tokens), np.float32)
        loss[-self.digits :] = 1.0
        return tokens, loss, key

    def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
        """Batch ``step`` of ``split`` [batch_size, seq_len]."""
        check_batch_request(step, batch_size, split)
        rng = rng_for(self.seed, step, split)
        docs = [self.example(rng)[:2] for _ in range(batch_size)]
        return pack_documents(docs, batch_size, self.seq_len)


def calendar_answer(question: str) -> str:
    """The answer to a :class:`Calendar` question (written from the text, for checking).

    Example: ``calendar_answer("What day is 17 days after Tuesday?") -> "Friday"``.
    """
    words = question.rstrip("?").split()
    n, unit, start = int(words[3]), words[4], words[6]
    names = DAYS if unit == "days" else MONTHS
    return names[(names.index(start) + n) % len(names)]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Calendar:
    """Day-of-week and month modular arithmetic in text, many questions packed per row.

    ``What day is 17 days after Tuesday? Friday.`` / ``What month is 5 months after
    November? April.`` -- one document per question, the loss on the answer word.

    Attributes:
      seq_len: T (at least 64).
      seed: data seed.
      max_offset: offsets are drawn from [0, max_offset).
    """

    seq_len: int
    seed: int = 0
    max_offset: int = 100
    name: ClassVar[str] = "calendar"
    is_text: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_sizes(self.seed, seq_len=self.seq_len, max_offset=self.max_offset)
        if self.seq_len < 63:
            raise ValueError(f"seq_len={self.seq_len} is too short for a calendar question; "
                             "use seq_len >= 63")

    def question(self, rng: np.random.Generator) -> str:
        """A random question (without its answer)."""
        n = int(rng.integers(0, self.max_offset))
        if rng.random() < 0.5:
            return f"What day is {n} days after {DAYS[int(rng.integers(0, 7))]}?"
        return f"What month is {n} months after {MONTHS[int(rng.integers(0, 12))]}?"

    def example(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, loss weight) of one question and its answer."""
        q = self.question(rng)
        head, answer = encode(q + " "), encode(calendar_answer(q) + ".")
        # The newline keeps decoded rows readable; it is not part of the answer.
        w = [np.zeros(len(head)), np.ones(len(answer)), np.zeros(1)]
        return np.concatenate([head, answer, encode("\n")]), np.concatenate(w).astype(np.float32)

    def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
        """Batch ``step`` of ``split`` [batch_size, seq_len]."""
        check_batch_request(step, batch_size, split)
        rng = rng_for(self.seed, step, split)
        # Questions are at most 47 bytes; this many always fill the rows.
        n = batch_size * ((self.seq_len + 1) // 30 + 1)
        return pack_documents([self.example(rng) for _ in range(n)], batch_size, self.seq_len)


# Token ids of the retrieval tasks (no text): markers, filler, names (keys, variables), values.
RETRIEVAL_BOS, RETRIEVAL_NEEDLE, RETRIEVAL_QUERY, RETRIEVAL_ASSIGN = 1, 2, 3, 4
RETRIEVAL_FILLER = (16, 128)
RETRIEVAL_NAMES = (128, 192)
RETRIEVAL_VALUES = (192, 256)
_QUERY_LEN = 2  # QUERY name


def _retrieval_row(rng: np.random.Generator, seq_len: int, statements: list[np.ndarray],
                   name: int, answer: np.ndarray) -> np.ndarray:
    """``BOS haystack-with-statements QUERY name answer``: T+1 tokens, the statements in the
    given order at random depths of random filler."""
    context = seq_len + 1 - _QUERY_LEN - len(answer)
    filler = rng.integers(*RETRIEVAL_FILLER, size=context - 1 - sum(map(len, statements)))
    cuts = np.sort(rng.integers(0, len(filler) + 1, size=len(statements)))
    parts, start = [np.array([RETRIEVAL_BOS])], 0
    for cut, st in zip(cuts, statements, strict=True):
        parts += [filler[start:cut], st]
        start = cut
    parts += [filler[start:], np.array([RETRIEVAL_QUERY, name]), answer]
    return np.concatenate(parts).astype(np.int32)


class RetrievalTask:
    """What the token-level retrieval tasks (:class:`NeedleInHaystack`,
    :class:`VariableTracking`) share: a subclass is a frozen dataclass with ``seq_len``,
    ``seed`` and ``value_len`` and a ``row(rng)`` of T + 1 tokens whose last ``value_len``
    are the answer."""

    __slots__ = ()

    @property
    def context_len(self) -> int:
        """Tokens before ``QUERY`` (BOS and the haystack)."""
        return self.seq_len + 1 - _QUERY_LEN - self.value_len

    def batch(self, step: int, batch_size: int, split: str = "train") -> Batch:
        """Batch ``step`` of ``split`` [batch_size, seq_len], one example per row."""
        check_batch_request(step, batch_size, split)
        rng = rng_for(self.seed, step, split)
        docs = []
        for _ in range(batch_size):
            tokens = self.row(rng)
            loss = np.zeros(len(tokens), np.float32)
            loss[-self.value_len:] = 1.0
            docs.append((tokens, loss))
        return pack_documents(docs, batch_size, self.seq_len)

    def prompts(self, step: int, batch_size: int, split: str = "validation"
                ) -> tuple[np.ndarray, np.ndarray]:
        """(prompts [B, T + 1 - value_len], answers [B, value_len]) int32: batch ``step``'s
        examples cut before their answers, for generation."""
        check_batch_request(step, batch_size, split)
        rng = rng_for(self.seed, step, split)
        rows = np.stack([self.row(rng) for _ in range(batch_size)])
        return rows[:, :-self.value_len], rows[:, -self.value_len:]


def _check_retrieval(seq_len: int, seed: int, value_len: int, statement_tokens: int,
                     what: str, **sizes: int) -> None:
    _check_sizes(seed, seq_len=seq_len, value_len=value_len, **sizes)
    need = 1 + statement_tokens + _QUERY_LEN + value_len - 1
    if seq_len < need:
        raise ValueError(f"seq_len={seq_len} is too short for {what}; use seq_len >= {need}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class NeedleInHaystack(RetrievalTask):
    """Needle(s) in a haystack, token-level (RULER's NIAH single and multi-key variants).

    ``BOS f f .. NEEDLE k1 v1 .. f .. NEEDLE k2 v2 .. f QUERY k2 v2``: ``num_needles`` needles
    with distinct keys at random depths of random filler; one key is asked, its value (of
    ``value_len`` tokens) is the answer and the only thing in the loss.

    Attributes:
      seq_len: T; one example per row (T + 1 tokens).
      seed: data seed.
      num_needles: needles in the haystack (1: single NIAH; more: multi-key).
      value_len: tokens of a value.
    """

    seq_len: int
    seed: int = 0
    num_needles: int = 1
    value_len: int = 2
    name: ClassVar[str] = "needle"
    is_text: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_retrieval(self.seq_len, self.seed, self.value_len,
                         self.num_needles * (2 + self.value_len),
                         f"{self.num_needles} needle(s)", num_needles=self.num_needles)
        if self.num_needles > RETRIEVAL_NAMES[1] - RETRIEVAL_NAMES[0]:
            raise ValueError(f"num_needles={self.num_needles} exceeds the "
                             f"{RETRIEVAL_NAMES[1] - RETRIEVAL_NAMES[0]} distinct keys")

    def row(self, rng: np.random.Generator) -> np.ndarray:
        """One example, T + 1 tokens; the last ``value_len`` are the answer."""
        keys = rng.choice(np.arange(*RETRIEVAL_NAMES), self.num_needles, replace=False)
        vals = rng.integers(*RETRIEVAL_VALUES, size=(self.num_needles, self.value_len))
        needles = [np.concatenate([[RETRIEVAL_NEEDLE, k], v]) for k, v in zip(keys, vals)]
        asked = int(rng.integers(self.num_needles))
        return _retrieval_row(rng, self.seq_len, needles, int(keys[asked]), vals[asked])


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VariableTracking(RetrievalTask):
    """Variable tracking, token-level (RULER's VT): multi-hop chains of assignments.

    A chain is ``ASSIGN x1 v`` then ``ASSIGN x2 x1`` .. ``ASSIGN xh x(h-1)`` (``hops``
    statements, in this order at random depths; the chains interleave). One chain's last
    variable is asked: ``QUERY xh``; the answer is the chain's value v (``value_len`` tokens).
    Answering needs ``hops`` look-ups, each maybe in another part of the context.

    Attributes:
      seq_len: T; one example per row (T + 1 tokens).
      seed: data seed.
      hops: assignments per chain (1: a needle; 2 or more: multi-hop).
      num_chains: chains in the context (the others are distractors).
      value_len: tokens of a value.
    """

    seq_len: int
    seed: int = 0
    hops: int = 2
    num_chains: int = 2
    value_len: int = 2
    name: ClassVar[str] = "variable_tracking"
    is_text: ClassVar[bool] = False

    def __post_init__(self) -> None:
        per_chain = 2 + self.value_len + 3 * (self.hops - 1)
        _check_retrieval(self.seq_len, self.seed, self.value_len, self.num_chains * per_chain,
                         f"{self.num_chains} chain(s) of {self.hops} hops", hops=self.hops,
                         num_chains=self.num_chains)
        if self.hops * self.num_chains > RETRIEVAL_NAMES[1] - RETRIEVAL_NAMES[0]:
            raise ValueError(f"hops * num_chains = {self.hops * self.num_chains} exceeds the "
                             f"{RETRIEVAL_NAMES[1] - RETRIEVAL_NAMES[0]} distinct variables")

    def row(self, rng: np.random.Generator) -> np.ndarray:
        """One example, T + 1 tokens; the last ``value_len`` are the answer."""
        h, n = self.hops, self.num_chains
        names = rng.choice(np.arange(*RETRIEVAL_NAMES), h * n, replace=False).reshape(n, h)
        vals = rng.integers(*RETRIEVAL_VALUES, size=(n, self.value_len))
        chains = [[np.concatenate([[RETRIEVAL_ASSIGN, names[c, 0]], vals[c]])]
                  + [np.array([RETRIEVAL_ASSIGN, names[c, j], names[c, j - 1]])
                     for j in range(1, h)] for c in range(n)]
        # A random interleaving that keeps each chain in order.
        order = rng.permutation(np.repeat(np.arange(n), h))
        nxt = [0] * n
        statements = []
        for c in order:
            statements.append(chains[c][nxt[c]])
            nxt[c] += 1
        asked = int(rng.integers(n))
        return _retrieval_row(rng, self.seq_len, statements, int(names[asked, -1]),
                              vals[asked])
