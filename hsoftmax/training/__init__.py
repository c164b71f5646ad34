"""Training: config, the loop (single process or DDP), evaluation, checkpoints, run directories.

* :mod:`~hsoftmax.training.config`: OmegaConf structured config, ``--set`` overrides;
* :mod:`~hsoftmax.training.loop`: :func:`train`;
* :mod:`~hsoftmax.training.evaluate`: :func:`evaluate_model`, :func:`evaluate_run`;
* :mod:`~hsoftmax.training.rundir`, :mod:`~hsoftmax.training.checkpoint`,
  :mod:`~hsoftmax.training.distributed`.

``hsoftmax train`` / ``hsoftmax evaluate`` (:mod:`hsoftmax.cli`) are thin wrappers around
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
from .data import load_data
from .ensemble import evaluate_ensemble
from .evaluate import evaluate_model, evaluate_run
from .loop import RunResult, epoch_batches, improves, make_optimizer, train, train_step
from .predict import load_run, predict_run

__all__ = [
    "DEFAULTS",
    "PACKAGED_CONFIGS",
    "ConfigError",
    "RunResult",
    "apply_overrides",
    "atomic_save",
    "epoch_batches",
    "evaluate_ensemble",
    "evaluate_model",
    "evaluate_run",
    "get_rng_state",
    "improves",
    "load_checkpoint",
    "load_config",
    "load_data",
    "load_run",
    "predict_run",
    "make_optimizer",
    "packaged_config_path",
    "set_rng_state",
    "train",
    "train_step",
]
