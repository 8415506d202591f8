"""Training configuration (the model's own configuration is :class:`attnlab.nn.Config`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from attnlab.data import DATASETS
from pallas_kernels.common.static_args import check_int, check_static_float, check_type
from sharding.api import STRATEGIES

# Compute dtypes a run may ask for; parameters and optimizer state stay float32.
DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """What a training run does (optimizer, schedule, data, checkpoints, logging).

    Attributes:
      steps: optimizer steps of the whole run (a resumed run stops at the same step; a
        larger value extends a finished run from its last checkpoint, the learning-rate
        schedule then being the new length's from there).
      batch_size: global batch B (sequences per step), split over the mesh's data axis.
      seq_len: T tokens per sequence; at most the model's ``max_seq_len``.
      lr: peak learning rate of AdamW.
      warmup_steps: linear warm-up from 0 to ``lr``.
      min_lr_ratio: the cosine decay ends at ``lr * min_lr_ratio`` at ``steps``.
      weight_decay: AdamW decoupled weight decay, applied to matrices only (not to norm
        scales).
      clip_norm: global gradient-norm clip (0 disables it).
      b1, b2: Adam moments.
      seed: model initialisation, data order and the step RNG all derive from it.
      task: dataset name (see :data:`attnlab.data.DATASETS`).
      task_options: extra keyword arguments of the dataset (e.g. ``num_kv_pairs``).
      checkpoint_dir: where orbax writes checkpoints (None: ``<run dir>/checkpoints``).
      checkpoint_every: save every N steps (and at the end); 0 saves only at the end.
      keep: checkpoints kept on disk (the newest ``keep``).
      log_every: a JSONL metrics record every N steps.
      eval_every: validation every N steps (0: only at the end).
      eval_batches: validation batches per evaluation (0: no validation during training).
      dtype: compute dtype, ``"bfloat16"`` or ``"float32"`` (params stay float32).
      data_parallel: devices on the mesh's ``data`` axis (None: as many as divide B).
      seq_parallel: devices on the mesh's ``sp`` axis: every sequence is split into that many
        blocks and each attention layer attends across them
        (:func:`attnlab.train.mesh.model_parallel`); ``seq_len`` must be divisible by it
        (twice it for zigzag, its square for striped).
      sp_strategy: how softmax layers attend across the ``sp`` axis when seq_parallel > 1:
        ``"ring"``, ``"striped"``, ``"zigzag"`` (load-balanced causal ring, the default) or
        ``"ulysses"`` (all-to-all to head shards; heads divisible by seq_parallel); see
        :func:`sharding.attention`. Lightning layers always use LASP-2.
      fast_compile: on CPU, compile with XLA optimisation level 0 (tiny models compile
        longer than they run; results are deterministic either way).
      debug_nan_step: testing aid: the loss of this (0-based) step is multiplied by inf, so
        the NaN/inf guard can be exercised. None in real runs.

    Raises:
      ValueError: a count that is not an int in its range (NumPy integers are accepted), a
        hyperparameter that is not a finite float in its range (lr > 0, b1 and b2 in [0, 1),
        ...), an unknown task, dtype or sp_strategy, a batch data_parallel does not divide.
    """

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    seed: int = 0
    task: str = "mqar"
    task_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    keep: int = 3
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    dtype: str = "bfloat16"
    data_parallel: int | None = None
    seq_parallel: int = 1
    sp_strategy: str = "zigzag"
    fast_compile: bool = False
    debug_nan_step: int | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        # Counts: Python ints (NumPy integers accepted; the record must be JSON).
        for name in ("steps", "batch_size", "seq_len", "keep", "log_every", "seq_parallel"):
            set_(name, check_int(name, getattr(self, name)))
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "eval_batches", "seed"):
            set_(name, check_int(name, getattr(self, name), minimum=0))
        if self.data_parallel is not None:
            set_("data_parallel", check_int("data_parallel", self.data_parallel,
                                            why="or None: as many as divide the batch"))
        if self.debug_nan_step is not None:
            set_("debug_nan_step", check_int("debug_nan_step", self.debug_nan_step, minimum=0,
                                             why="or None"))
        # Hyperparameters: finite Python floats (a YAML "3e-3" is a string: write 3.0e-3).
        set_("lr", check_static_float("lr", self.lr, positive=True))
        set_("min_lr_ratio", check_static_float("min_lr_ratio", self.min_lr_ratio,
                                                minimum=0.0, maximum=1.0))
        for name in ("weight_decay", "clip_norm"):
            set_(name, check_static_float(name, getattr(self, name), minimum=0.0))
        for name in ("b1", "b2"):
            value = check_static_float(name, getattr(self, name), minimum=0.0)
            if value >= 1.0:
                raise ValueError(f"{name} must lie in [0, 1) (an Adam moment decay), got {value}")
            set_(name, value)
        check_type("fast_compile", self.fast_compile, bool, "a bool")
        if not isinstance(self.task, str) or self.task not in DATASETS:
            raise ValueError(f"task={self.task!r} is not a dataset; choose one of "
                             f"{', '.join(DATASETS)}")
        check_type("task_options", self.task_options, Mapping,
                   "a mapping of option names to values")
        check_type("checkpoint_dir", self.checkpoint_dir, str, "a path string or None",
                   allow_none=True)
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}; "
                             "lower warmup_steps")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.data_parallel is not None and self.batch_size % self.data_parallel:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by data_parallel="
                             f"{self.data_parallel}; make the batch a multiple of it")
        if self.sp_strategy not in STRATEGIES:
            raise ValueError(f"sp_strategy={self.sp_strategy!r} is not a sequence-parallel "
                             f"strategy; choose one of {', '.join(STRATEGIES)}")
        object.__setattr__(self, "task_options", dict(self.task_options))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what a run directory's ``config.json`` holds)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
