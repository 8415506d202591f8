"""Bad inputs to the data loaders (``attnlab.data``): each is refused with a ValueError whose
message names the argument, what was given and what is allowed.

Token ids are checked here, where batches are made: the model cannot check its (traced) ids,
and an id outside the vocabulary would read a wrong embedding row (-1: the last) or NaN.
"""

from __future__ import annotations

import numpy as np

from attnlab import data
from tests.helpers import bad_input_test

MQAR = data.MQAR(seq_len=64)
ONES = np.ones(3, np.float32)

CASES = [
    ("make_dataset-unknown-option", lambda: data.make_dataset("mqar", seq_len=64, pairs=3),
     r"unknown option\(s\) \['pairs'\] for task 'mqar'; its options are num_kv_pairs"),
    ("make_dataset-unknown-task", lambda: data.make_dataset("wikitext", seq_len=64),
     "unknown task 'wikitext'; choose one of mqar"),
    ("make_dataset-seq_len-float", lambda: data.make_dataset("induction", seq_len=64.0),
     "seq_len must be a positive int, got 64.0 of type float"),
    ("make_dataset-seed-negative", lambda: data.make_dataset("mqar", seq_len=64, seed=-1),
     "seed must be an int >= 0, got -1"),
    ("Passkey-seq_len-0", lambda: data.Passkey(seq_len=0), "seq_len must be a positive int"),
    ("Needle-too-short", lambda: data.NeedleInHaystack(seq_len=20, num_needles=5),
     r"seq_len=20 is too short for 5 needle\(s\); use seq_len >= 24"),
    ("Needle-value_len-0", lambda: data.NeedleInHaystack(seq_len=64, value_len=0),
     "value_len must be a positive int, got 0"),
    ("VariableTracking-too-short", lambda: data.VariableTracking(seq_len=16, hops=3),
     r"seq_len=16 is too short for 2 chain\(s\) of 3 hops; use seq_len >= 24"),
    ("VariableTracking-hops-0", lambda: data.VariableTracking(seq_len=64, hops=0),
     "hops must be a positive int, got 0"),
    ("Calendar-max_offset-0", lambda: data.Calendar(seq_len=128, max_offset=0),
     "max_offset must be a positive int, got 0"),
    ("StdlibCorpus-validation_percent-float",
     lambda: data.StdlibCorpus(seq_len=64, validation_percent=5.5),
     "validation_percent must be an int >= 0, got 5.5 of type float"),
    ("batch-batch_size-0", lambda: MQAR.batch(0, 0), "batch_size must be a positive int, got 0"),
    ("batch-batch_size-float", lambda: MQAR.batch(0, 2.5),
     "batch_size must be a positive int, got 2.5 of type float"),
    ("batch-step-negative", lambda: MQAR.batch(-1, 2), "step must be an int >= 0, got -1"),
    ("batch-step-float", lambda: MQAR.batch(1.5, 2),
     "step must be an int >= 0, got 1.5 of type float"),
    ("batch-split", lambda: MQAR.batch(0, 2, split="test"),
     "split='test'; use 'train' or 'validation'"),
    ("corpus-batch_size-0", lambda: data.StdlibCorpus(seq_len=64).batch(0, 0),
     "batch_size must be a positive int, got 0"),
    ("rows_from_windows-id-too-large",
     lambda: data.rows_from_windows(np.array([[1, 300, 3]]), np.zeros((1, 3), int)),
     r"tokens must lie in \[0, 256\) \(the byte vocabulary\); got values in \[1, 300\]"),
    ("rows_from_windows-negative-id",
     lambda: data.rows_from_windows(np.array([[1, -1, 3]]), np.zeros((1, 3), int)),
     r"tokens must lie in \[0, 256\) .* got values in \[-1, 3\]"),
    ("rows_from_windows-float-ids",
     lambda: data.rows_from_windows(np.array([[1.0, 2, 3]]), np.zeros((1, 3), int)),
     "tokens must be integer token ids, got dtype float64"),
    ("rows_from_windows-loss-shape",
     lambda: data.rows_from_windows(np.array([[1, 2, 3]]), np.zeros((1, 3), int), ONES),
     r"loss must have the tokens' shape \(1, 3\), got \(3,\)"),
    ("pack_documents-id-too-large",
     lambda: data.pack_documents([(np.array([1, 2, 999]), ONES)], 1, 4),
     r"tokens of document 0 must lie in \[0, 256\) .* got values in \[1, 999\]"),
    ("pack_documents-rows-0", lambda: data.pack_documents([(np.array([1, 2, 3]), ONES)], 0, 4),
     "rows must be a positive int, got 0"),
    ("pack_documents-loss-length",
     lambda: data.pack_documents([(np.array([1, 2, 3]), ONES[:2])], 1, 4),
     r"document 0 must be \(tokens \[L\], loss \[L\]\), got shapes \(3,\) and \(2,\)"),
    ("encode-bytes", lambda: data.encode(b"def"),
     "text must be a str, got bytes; decode bytes first"),
    ("decode-float-ids", lambda: data.decode([1.5]),
     "ids must be integer token ids, got dtype float64"),
    ("decode-id-too-large", lambda: data.decode([1, 300]),
     r"ids must lie in \[0, 256\) .* got values in \[1, 300\]"),
]


test_bad_input = bad_input_test(CASES)
