"""attnlab.data: determinism, packing and segment ids, task answers, the stdlib corpus."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from attnlab import data
from attnlab.data import (
    MQAR,
    Calendar,
    Induction,
    NeedleInHaystack,
    Passkey,
    StdlibCorpus,
    VariableTracking,
    calendar_answer,
    decode,
    encode,
    make_dataset,
    pack_documents,
)
from attnlab.data.tasks import (
    DAYS,
    MONTHS,
    MQAR_KEYS,
    MQAR_VALUES,
    RETRIEVAL_ASSIGN,
    RETRIEVAL_BOS,
    RETRIEVAL_NAMES,
    RETRIEVAL_NEEDLE,
    RETRIEVAL_QUERY,
    RETRIEVAL_VALUES,
)


def _seed(key) -> int:
    import jax

    return int(jax.random.randint(key, (), 0, 2**30))


def _check_layout(b: data.Batch, batch: int, seq_len: int) -> None:
    for name in ("inputs", "targets", "mask", "segment_ids", "positions"):
        assert getattr(b, name).shape == (batch, seq_len), name
    assert b.inputs.dtype == np.int32 and b.targets.dtype == np.int32
    assert b.mask.dtype == np.float32 and set(np.unique(b.mask)) <= {0.0, 1.0}
    assert b.inputs.min() >= 0 and b.inputs.max() < 256
    # Shift: the target at t is the input at t+1 inside a row.
    np.testing.assert_array_equal(b.targets[:, :-1], b.inputs[:, 1:])
    # Documents are numbered 1, 2, ... per row, padding (0) only at the end; positions
    # restart where the segment changes.
    for row in b.segment_ids:
        docs = row[row > 0]
        assert docs[0] == 1 and set(np.diff(docs)) <= {0, 1}
        assert (row[len(docs):] == 0).all()
    for r in range(batch):
        for t in range(seq_len):
            start = t == 0 or b.segment_ids[r, t] != b.segment_ids[r, t - 1]
            expect = 0 if start else b.positions[r, t - 1] + 1
            assert b.positions[r, t] == expect
    # Nothing is predicted across a document boundary.
    nxt = np.concatenate([b.segment_ids[:, 1:], b.segment_ids[:, -1:]], 1)
    crossing = (nxt != b.segment_ids)[:, :-1]
    assert not (b.mask[:, :-1] * crossing).any()


@pytest.mark.parametrize("name", list(data.DATASETS))
def test_batches_are_pure_functions_of_seed_split_step(name: str, key) -> None:
    seed = _seed(key)
    ds = make_dataset(name, seq_len=200, seed=seed)
    a, b = ds.batch(7, 3), make_dataset(name, seq_len=200, seed=seed).batch(7, 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    _check_layout(a, 3, 200)
    assert a.mask.sum() > 0
    assert not np.array_equal(a.inputs, ds.batch(8, 3).inputs)
    assert not np.array_equal(a.inputs, ds.batch(7, 3, split="validation").inputs)
    assert not np.array_equal(a.inputs, make_dataset(name, seq_len=200, seed=seed + 1)
                              .batch(7, 3).inputs)


def test_pack_documents_segments_positions_and_padding() -> None:
    docs = [(np.arange(1, 6), np.ones(5)), (np.arange(10, 13), np.ones(3)),
            (np.arange(20, 27), np.ones(7)), (np.arange(30, 32), np.array([0.0, 1.0]))]
    b = pack_documents(docs, rows=2, seq_len=9)  # 10 tokens per row before the shift
    # Row 0: doc0 (5) + doc1 (3) + 2 padding; row 1: doc2 (7) + doc3 (2) + 1 padding.
    np.testing.assert_array_equal(b.inputs[0], [1, 2, 3, 4, 5, 10, 11, 12, 0])
    np.testing.assert_array_equal(b.segment_ids[0], [1, 1, 1, 1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(b.positions[0], [0, 1, 2, 3, 4, 0, 1, 2, 0])
    np.testing.assert_array_equal(b.mask[0], [1, 1, 1, 1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(b.segment_ids[1], [1, 1, 1, 1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(b.positions[1], [0, 1, 2, 3, 4, 5, 6, 0, 1])
    # doc3's first token is not a target at all, its second one (weight 1) is.
    np.testing.assert_array_equal(b.mask[1], [1, 1, 1, 1, 1, 1, 0, 1, 0])
    _check_layout(b, 2, 9)


def test_mqar_answers_are_the_paired_values(key) -> None:
    task = MQAR(seq_len=127, seed=_seed(key), num_kv_pairs=8)
    b = task.batch(0, 4)
    _check_layout(b, 4, 127)
    assert b.mask.sum() == 4 * 4 * 8  # 4 examples of 32 tokens per row, 8 answers each
    for r in range(4):
        for s in np.unique(b.segment_ids[r]):
            idx = np.flatnonzero(b.segment_ids[r] == s)
            toks = b.inputs[r, idx]
            kv = dict(zip(toks[0:16:2].tolist(), toks[1:16:2].tolist()))
            assert len(kv) == 8 and all(MQAR_KEYS[0] <= k < MQAR_KEYS[1] for k in kv)
            assert all(MQAR_VALUES[0] <= v < MQAR_VALUES[1] for v in kv.values())
            answered = idx[b.mask[r, idx] > 0]
            assert len(answered) == 8
            for t in answered:
                assert b.targets[r, t] == kv[int(b.inputs[r, t])]


def test_mqar_queries_with_replacement_repeat_keys_and_answer_right(key) -> None:
    task = MQAR(seq_len=127, seed=_seed(key), num_kv_pairs=8, queries_with_replacement=True)
    b = task.batch(0, 4)
    _check_layout(b, 4, 127)
    assert b.mask.sum() == 4 * 4 * 8
    repeated = 0
    for r in range(4):
        for s in np.unique(b.segment_ids[r]):
            idx = np.flatnonzero(b.segment_ids[r] == s)
            toks = b.inputs[r, idx]
            kv = dict(zip(toks[0:16:2].tolist(), toks[1:16:2].tolist()))
            asked = toks[16::2].tolist()
            assert set(asked) <= set(kv)
            repeated += len(set(asked)) < len(asked)
            for t in idx[b.mask[r, idx] > 0]:
                assert b.targets[r, t] == kv[int(b.inputs[r, t])]
    # 8 draws from 8 keys repeat one with probability 1 - 8!/8^8 > 0.99 per example.
    assert repeated >= 12


def test_induction_second_copy_is_predictable(key) -> None:
    task = Induction(seq_len=127, seed=_seed(key), prefix_len=16)
    b = task.batch(2, 2)
    for r in range(2):
        for t in np.flatnonzero(b.mask[r]):
            pos = b.positions[r, t]
            # The target repeats the token one after the input's first occurrence.
            assert pos >= 16
            assert b.targets[r, t] == b.inputs[r, t - 16 + 1]


def test_passkey_answer_is_the_hidden_key(key) -> None:
    task = Passkey(seq_len=300, seed=_seed(key), digits=5)
    b = task.batch(0, 3)
    for r in range(3):
        text = decode(b.inputs[r]) + decode(b.targets[r, -1:])
        assert len(text) == 301
        hidden = text.split("The pass key is ")[1][:5]
        assert text.endswith(f"What is the pass key? The pass key is {hidden}")
        assert decode(b.targets[r][b.mask[r] > 0]) == hidden and hidden.isdigit()
    depths = [decode(b.inputs[r]).index("Remember") for r in range(3)]
    assert len(set(depths)) > 1  # the needle moves


def test_calendar_answers(key) -> None:
    assert calendar_answer("What day is 17 days after Tuesday?") == "Friday"
    assert calendar_answer("What month is 5 months after November?") == "April"
    assert calendar_answer("What day is 0 days after Monday?") == "Monday"
    b = Calendar(seq_len=255, seed=_seed(key)).batch(1, 2)
    _check_layout(b, 2, 255)
    n = 0
    for r in range(2):
        for s in np.unique(b.segment_ids[r])[1:-1]:  # whole questions (not cut, not padding)
            idx = np.flatnonzero(b.segment_ids[r] == s)
            line = decode(b.inputs[r, idx])
            q, a = line.strip().split("? ")
            assert a == calendar_answer(q + "?") + "."
            assert a[:-1] in DAYS + MONTHS
            assert decode(b.targets[r, idx][b.mask[r, idx] > 0]) == a
            n += 1
    assert n >= 6


def test_tokenizer_round_trip() -> None:
    text = "def f(x):\n    return 'héllo'  # ünïcode\n"
    ids = encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode())
    assert decode(ids) == text
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 256\)"):
        decode([1, 300])


def test_stdlib_corpus_files_split_and_resume(key) -> None:
    files = data.stdlib_files()
    assert list(files) == sorted(files) and len(files) > 300
    assert "os.py" in files and not any("site-packages" in f or "/test/" in f for f in files)
    seed = _seed(key)
    corpus = StdlibCorpus(seq_len=128, seed=seed)
    train, val = corpus.documents("train"), corpus.documents("validation")
    assert len(val) > 0 and len(train) > 10 * len(val)
    assert all(d[-1] == data.EOS for d in train[:20])
    b = corpus.batch(5, 4)
    _check_layout(b, 4, 128)
    # Batch i of a bigger batch size is a different cut of the same stream: rows 20..23 of
    # the epoch with B=4 are rows 10..11 of step 5 with B=2... pure function of the row index.
    b2 = corpus.batch(10, 2)
    np.testing.assert_array_equal(b2.inputs, b.inputs[:2])
    assert "import" in decode(corpus.batch(0, 8).inputs) or "def " in decode(
        corpus.batch(0, 8).inputs)
    # Far-away steps wrap into later epochs (a new shuffle) without error.
    per_epoch = corpus.num_tokens() // 129
    late = corpus.batch(per_epoch, 1)
    assert not np.array_equal(late.inputs[0], corpus.batch(0, 1).inputs[0])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: make_dataset("wikitext", seq_len=64), "unknown task 'wikitext'; choose one of"),
        (lambda: MQAR(seq_len=30, num_kv_pairs=8), "raise seq_len or lower num_kv_pairs"),
        (lambda: Induction(seq_len=10, prefix_len=8), "needs seq_len >= 15"),
        (lambda: Passkey(seq_len=50), "too short for a passkey example"),
        (lambda: Calendar(seq_len=20), "use seq_len >= 63"),
        (lambda: MQAR(seq_len=64).batch(0, 2, split="test"), "use 'train' or 'validation'"),
        (lambda: StdlibCorpus(seq_len=64, validation_percent=0), "must lie in \\(0, 100\\)"),
    ],
)
def test_bad_options_name_the_fix(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def _solve_needle(prompt: np.ndarray, value_len: int) -> list[int]:
    """The answer read off a needle prompt: the value after ``NEEDLE key``."""
    key = prompt[-1]
    at = [i for i in range(len(prompt) - 2)
          if prompt[i] == RETRIEVAL_NEEDLE and prompt[i + 1] == key]
    assert len(at) == 1, at
    return prompt[at[0] + 2: at[0] + 2 + value_len].tolist()


def _solve_chain(prompt: np.ndarray, value_len: int, hops: int) -> list[int]:
    """Follows ``ASSIGN x y`` back from the asked variable ``hops`` times."""
    name, seen = prompt[-1], 0
    while True:
        at = [i for i in range(len(prompt) - 2)
              if prompt[i] == RETRIEVAL_ASSIGN and prompt[i + 1] == name]
        assert len(at) == 1, at
        seen += 1
        ref = prompt[at[0] + 2]
        if RETRIEVAL_VALUES[0] <= ref < RETRIEVAL_VALUES[1]:
            assert seen == hops
            return prompt[at[0] + 2: at[0] + 2 + value_len].tolist()
        assert RETRIEVAL_NAMES[0] <= ref < RETRIEVAL_NAMES[1]
        name = ref


@pytest.mark.parametrize("task", [
    NeedleInHaystack(seq_len=67, num_needles=1),
    NeedleInHaystack(seq_len=67, num_needles=4, value_len=3),
    VariableTracking(seq_len=67, hops=1, num_chains=2),
    VariableTracking(seq_len=67, hops=3, num_chains=2),
], ids=["needle", "multikey", "vt1", "vt3"])
def test_retrieval_tasks_answer_what_the_context_says(task, key) -> None:
    task = dataclasses.replace(task, seed=_seed(key))
    b = task.batch(3, 4, split="validation")
    _check_layout(b, 4, task.seq_len)
    prompts, answers = task.prompts(3, 4)
    assert prompts.shape == (4, task.context_len + 2) and answers.shape == (4, task.value_len)
    # The batch holds the same examples: its masked targets are the answers.
    np.testing.assert_array_equal(b.targets[b.mask > 0].reshape(4, -1), answers)
    np.testing.assert_array_equal(b.inputs[:, : prompts.shape[1]], prompts)
    assert (prompts[:, 0] == RETRIEVAL_BOS).all() and (prompts[:, -2] == RETRIEVAL_QUERY).all()
    for p, a in zip(prompts, answers):
        if isinstance(task, NeedleInHaystack):
            assert _solve_needle(p, task.value_len) == a.tolist()
            assert (p == RETRIEVAL_NEEDLE).sum() == task.num_needles
        else:
            assert _solve_chain(p, task.value_len, task.hops) == a.tolist()
            assert (p == RETRIEVAL_ASSIGN).sum() == task.hops * task.num_chains
