"""Training: config loading, the trainer (single process or DDP), checkpoints.

``hsoftmax train`` / ``hsoftmax evaluate`` (:mod:`hsoftmax.train_cli`) are thin wrappers around
:func:`train` and :func:`evaluate_run`.
"""

from .checkpoint import atomic_save, get_rng_state, load_checkpoint, set_rng_state
from .config import (
    DEFAULTS,
    PACKAGED_CONFIGS,
    ConfigError,
    apply_overrides,
    load_config,
    packaged_config_path,
)
from .trainer import (
    RunResult,
    epoch_batches,
    evaluate_model,
    evaluate_run,
    load_data,
    make_optimizer,
    train,
    train_step,
)

__all__ = [
    "DEFAULTS",
    "PACKAGED_CONFIGS",
    "ConfigError",
    "RunResult",
    "apply_overrides",
    "atomic_save",
    "epoch_batches",
    "evaluate_model",
    "evaluate_run",
    "get_rng_state",
    "load_checkpoint",
    "load_config",
    "load_data",
    "make_optimizer",
    "packaged_config_path",
    "set_rng_state",
    "train",
    "train_step",
]
