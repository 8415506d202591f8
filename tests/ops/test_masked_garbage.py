"""Masked positions never influence a row: the references, the LSE merge, lightning's float16
and zero-decay corners, and the sequence-parallel strategies, with NaN or +inf planted where
rows cannot see (``tests/ops/masked_garbage.py``). Every implementation runs the same checks
through its test base (``test_masked_garbage_*`` in ``attention_base``, ``attention_grad_base``,
``decode_base`` and ``lightning_base``)."""

from __future__ import annotations

import pytest

from attnlab.ops import attention, decode_attention, lightning_attention
from tests.ops.masked_garbage import (
    DECODE_SCENARIOS,
    FILLS,
    LIGHTNING_SCENARIOS,
    SOFTMAX_SCENARIOS,
    check_lightning_garbage,
    check_softmax_garbage,
    decode_scenario,
    lightning_scenario,
    softmax_scenario,
)

# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("fill", sorted(FILLS))
@pytest.mark.parametrize("scenario", SOFTMAX_SCENARIOS)
def test_attention_reference(scenario, fill, key):
    def fn(q, k, v, **kw):
        return attention(q, k, v, impl="reference", return_residuals=True, return_entropy=True,
                         **kw)

    check_softmax_garbage(fn, softmax_scenario(scenario, key), FILLS[fill], entropy=True)


@pytest.mark.parametrize("fill", sorted(FILLS))
@pytest.mark.parametrize("scenario", sorted(DECODE_SCENARIOS))
def test_decode_reference(scenario, fill, key):
    def fn(q, k, v, **kw):
        return decode_attention(q, k, v, impl="reference", return_residuals=True, **kw)

    check_softmax_garbage(fn, decode_scenario(scenario, key), FILLS[fill])


@pytest.mark.parametrize("fill", sorted(FILLS))
@pytest.mark.parametrize("scenario", LIGHTNING_SCENARIOS)
def test_lightning_reference(scenario, fill, key):
    def fn(q, k, v, **kw):
        return lightning_attention(q, k, v, impl="reference", return_state=True, **kw)

    check_lightning_garbage(fn, lightning_scenario(scenario, key), FILLS[fill])
