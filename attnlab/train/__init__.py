"""Training: optax AdamW loop, orbax checkpoints with exact resume, metrics, presets."""

from attnlab.train.config import TrainConfig
from attnlab.train.mesh import make_mesh
from attnlab.train.metrics import PEAK_FLOPS, mfu, peak_flops, plot_losses, read_metrics
from attnlab.train.optim import learning_rate, make_optimizer
from attnlab.train.presets import PRESETS, attention_pattern, load_run_config
from attnlab.train.trainer import (
    LoadedRun,
    NonFiniteLossError,
    TrainResult,
    evaluate_run,
    load_run,
    prepare,
    train,
)

__all__ = [
    "PEAK_FLOPS", "PRESETS", "LoadedRun", "NonFiniteLossError", "TrainConfig", "TrainResult",
    "attention_pattern", "evaluate_run", "learning_rate", "load_run", "load_run_config",
    "make_mesh", "make_optimizer", "mfu", "peak_flops", "plot_losses", "prepare",
    "read_metrics", "train",
]
