"""AdamW with linear warm-up and cosine decay, gradient clipping, decay on matrices only."""

from __future__ import annotations

from typing import Any

import jax
import optax

from attnlab.train.config import TrainConfig


def learning_rate(tc: TrainConfig) -> optax.Schedule:
    """Warm-up from 0 to ``tc.lr`` over ``warmup_steps``, cosine to ``lr * min_lr_ratio`` at
    ``steps``. When the warm-up takes every step there is nothing left to decay: the schedule is
    the warm-up alone. Example: ``learning_rate(tc)(0) == 0``."""
    if tc.warmup_steps >= tc.steps:
        return optax.linear_schedule(0.0, tc.lr, tc.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
        decay_steps=tc.steps, end_value=tc.lr * tc.min_lr_ratio,
    )


def _decay_mask(params: Any) -> Any:
    # Norm scales (1-D) are not decayed; matrices (projections, embedding) are.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """The run's optimizer: clip by global norm (if ``clip_norm`` > 0), then AdamW."""
    parts = [optax.clip_by_global_norm(tc.clip_norm)] if tc.clip_norm > 0 else []
    parts.append(optax.adamw(learning_rate(tc), b1=tc.b1, b2=tc.b2,
                             weight_decay=tc.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)
