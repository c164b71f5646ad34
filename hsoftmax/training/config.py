"""Training configuration: nested dicts from YAML, with defaults and ``key=value`` overrides.

A config has the sections ``data``, ``model``, ``train``, ``output`` and a top-level ``name``;
:data:`DEFAULTS` lists every key. A YAML file (or one of the packaged configs ``demo``, ``diy``,
``geolife``, shipped inside the package so they work after ``pip install``) overrides the
defaults, and ``--set section.key=value`` overrides the file. Unknown keys are errors that name
the key, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import yaml

from hsoftmax.models.factory import MODEL_DEFAULTS

__all__ = [
    "DEFAULTS",
    "PACKAGED_CONFIGS",
    "ConfigError",
    "apply_overrides",
    "load_config",
    "merge",
    "packaged_config_path",
]

PACKAGED_CONFIGS = ("demo", "diy", "geolife")

DEFAULTS: dict = {
    "name": "run",
    "data": {
        "preset": "diy",  # synthetic preset (diy | geolife | small), used when path is null
        "seed": 0,  # generator seed of the preset
        "path": None,  # a directory of MHSA pickles (*train*.pk, *valid*.pk, *test*.pk) or
        #                staypoints.csv (+ optional locations.csv)
        "cache_dir": None,  # preset cache (default ~/.cache/hsoftmax/data or $HSOFTMAX_CACHE)
        "max_len": None,  # keep only the most recent max_len history stays
    },
    "model": dict(MODEL_DEFAULTS),
    "train": {
        "epochs": 100,
        "batch_size": 256,  # global batch: divided over the DDP processes
        "eval_batch_size": 512,
        "lr": 1e-3,
        "weight_decay": 1e-6,
        "label_smoothing": 0.05,
        "grad_clip": 1.0,  # max gradient norm (null: no clipping)
        "lr_patience": 2,  # ReduceLROnPlateau on the validation loss
        "lr_factor": 0.5,
        "min_lr": 1e-6,
        "early_stopping_patience": 5,  # epochs without validation-loss improvement
        "seed": 0,
        "device": "cpu",  # cpu | cuda | cuda:N
        "num_threads": None,  # torch.set_num_threads (null: torch's default)
        "max_steps_per_epoch": None,  # cut epochs short (smoke tests, demos)
        "val_metrics": True,  # also compute Acc@k/MRR on validation every epoch
        "param_budget": 3_000_000,  # refuse a larger model ...
        "allow_over_budget": False,  # ... unless this is true
        "progress": True,  # tqdm progress bars
    },
    "output": {
        "dir": "runs",  # run directories are <dir>/<name>-<timestamp>/
        "run_dir": None,  # or exactly this directory
    },
}


class ConfigError(ValueError):
    """A bad config: unknown key, wrong section, unparseable override."""


def packaged_config_path(name: str) -> Path:
    """Path of a config shipped in ``hsoftmax/training/configs/<name>.yaml``."""
    path = Path(str(resources.files("hsoftmax.training").joinpath("configs", f"{name}.yaml")))
    if not path.is_file():
        raise ConfigError(f"no packaged config {name!r}; choose one of {PACKAGED_CONFIGS}")
    return path


def merge(base: dict, update: dict, where: str = "") -> dict:
    """Deep-merge ``update`` into a copy of ``base``; keys absent from ``base`` raise."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        name = f"{where}{key}"
        if key not in out:
            raise ConfigError(f"unknown config key {name!r} (known: {', '.join(sorted(out))})")
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name!r} is a section; got {value!r}")
            out[key] = merge(out[key], value, name + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(cfg: dict, overrides: list[str] | None) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML: ``3``, ``1e-3``, ``null``,
    ``[64, 8]``, ``true``)."""
    out = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse the value: {e}") from None
        if isinstance(value, str):
            try:  # YAML 1.1 reads 3e-4 (no dot) as a string; a number is meant
                value = float(value)
            except ValueError:
                pass
        parts = key.strip().split(".")
        update: dict = value
        for part in reversed(parts):
            update = {part: update}
        out = merge(out, update)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults <- YAML file (a path, or a packaged name like ``"demo"``) <- overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = Path(path)
        if not p.is_file() and str(path) in PACKAGED_CONFIGS:
            p = packaged_config_path(str(path))
        if not p.is_file():
            raise ConfigError(f"config file {path} not found")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a config must be a mapping, got {type(loaded).__name__}")
        cfg = merge(cfg, loaded)
    cfg = apply_overrides(cfg, overrides)
    _validate(cfg)
    return cfg


def _validate(cfg: dict) -> None:
    from hsoftmax.models.factory import HEADS, TREES
    from hsoftmax.models.history import HISTORY_KINDS

    m, t = cfg["model"], cfg["train"]
    for key, allowed in (("head", HEADS), ("tree", TREES), ("history", HISTORY_KINDS)):
        if m[key] not in allowed:
            raise ConfigError(f"model.{key} must be one of {allowed}, got {m[key]!r}")
    if m["history"] == "logit_add" and m["head"] != "dense":
        raise ConfigError("model.history 'logit_add' is only valid with model.head 'dense'")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if not isinstance(t[key], int) or t[key] < 1:
            raise ConfigError(f"train.{key} must be a positive int, got {t[key]!r}")
    if not 0.0 <= float(t["label_smoothing"]) <= 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1], got {t['label_smoothing']}")
