"""Training configuration: an OmegaConf structured config with ``section.key=value`` overrides.

A config has the sections ``data``, ``model``, ``train``, ``output`` and a top-level ``name``; the
dataclasses below list every key with its type and default. A YAML file (or one of the packaged
configs ``demo``, ``diy``, ``geolife``, shipped inside the package so they work after
``pip install``) overrides the defaults, and ``--set section.key=value`` overrides the file.
OmegaConf checks keys and types: an unknown key is an error that names it and lists the known
ones, so a typo never silently trains the wrong model. Ranges and choices are checked here.

The rest of the package sees a plain nested ``dict`` (:func:`load_config` returns one).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from hsoftmax.models import HEADS, HISTORY_KINDS, MODEL_DEFAULTS, TREES
from hsoftmax.nn import SMOOTHING_MODES

__all__ = [
    "ADDED_KEYS",
    "DEFAULTS",
    "PACKAGED_CONFIGS",
    "RESUMABLE_KEYS",
    "Config",
    "ConfigError",
    "apply_overrides",
    "check_resume",
    "config_diff",
    "load_config",
    "packaged_config_path",
    "resume_config",
]

# the YAML files shipped in hsoftmax/training/configs/, by name
PACKAGED_CONFIGS = tuple(
    sorted(
        f.name.removesuffix(".yaml")
        for f in resources.files(__package__).joinpath("configs").iterdir()
        if f.name.endswith(".yaml")
    )
)
OPTIMIZERS = ("adamw", "sparse_adamw")


@dataclass
class DataConfig:
    preset: str = "diy"  # synthetic preset (diy | geolife | small), used when path is null
    seed: int = 0  # generator seed of the preset
    # a directory of MHSA pickles or a trackintel staypoints.csv (+ optional locations.csv)
    path: str | None = None
    cache_dir: str | None = None  # preset cache (default ~/.cache/hsoftmax/data)
    max_len: int | None = None  # keep only the most recent max_len history stays
    # samples from staypoints (MHSA protocol); with MHSA pickles previous_day picks the variant
    previous_day: int | None = None  # history window in days (default 7)
    min_history: int | None = None  # fewest history stays of a sample (default 3)
    split: str | None = None  # "0.6,0.2,0.2": train/validation/test per user by day
    # keep only the samples of users 1..users (a cheaper proxy with the same vocabulary)
    users: int | None = None


# The model section is the model factory's defaults, typed by their values (``tree_branching``
# is an int, a list of ints or "binary": checked in _RANGES).
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [
        (key, Any if key == "tree_branching" else type(value), field(default=value))
        for key, value in MODEL_DEFAULTS.items()
    ],
)


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256  # global batch: divided over the DDP processes
    eval_batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-6
    label_smoothing: float = 0.05
    grad_clip: float | None = 1.0  # max gradient norm (null: no clipping)
    lr_patience: int = 2  # ReduceLROnPlateau on the validation loss
    lr_factor: float = 0.5
    min_lr: float = 1e-6
    early_stopping_patience: int = 5  # epochs without validation-loss improvement
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N
    num_threads: int | None = None  # torch.set_num_threads (null: torch's default)
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests, demos)
    # length bucketing: sort each pool of that many random batches by history length before
    # cutting it into batches, so the encoder pads little (0: plain random batches)
    bucket_batches: int = 32
    val_metrics: bool = True  # also compute Acc@k/MRR on validation every epoch
    param_budget: int = 3_000_000  # refuse a larger model ...
    allow_over_budget: bool = False  # ... unless this is true
    progress: bool = True  # tqdm progress bars
    # adamw | sparse_adamw (hsoftmax.optim.SparseAdamW: row-sparse, lazy; for model.sparse)
    optimizer: str = "adamw"
    fused_adamw: bool = True  # AdamW's fused kernel (same update, one kernel per step)
    # the head's learning rate is lr x this (its rows see few examples each in a tree)
    head_lr_mult: float = 1.0
    warmup_steps: int = 0  # linear learning-rate warm-up over the first steps (0: none)
    # validation Acc@1 and NLL every that many training samples (curve.json; null: per epoch
    # only), on eval_samples validation samples (a fixed random subset; null: all)
    eval_every_samples: int | None = None
    eval_samples: int | None = None


@dataclass
class OutputConfig:
    dir: str = "runs"  # run directories are <dir>/<name>-<timestamp>/
    run_dir: str | None = None  # or exactly this directory


@dataclass
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


DEFAULTS: dict = OmegaConf.to_container(OmegaConf.structured(Config))

# Keys a resumed run may change: where and how it runs, and for how many epochs. Anything else
# would silently mix two configurations in one run (the optimizer and scheduler state come
# from the checkpoint, the data and the model from the config).
RESUMABLE_KEYS = frozenset(
    {
        "data.path",
        "data.cache_dir",
        "train.epochs",
        "train.device",
        "train.num_threads",
        "train.progress",
        "train.val_metrics",
        "train.eval_every_samples",
        "train.eval_samples",
        "output.dir",
        "output.run_dir",
    }
)


# Keys added after runs were recorded, with the value that matches how those runs trained: a
# recorded config without the key (``load_config(..., recorded=True)``) gets this value, not the
# new default, so the run resumes as it started.
ADDED_KEYS: dict[str, Any] = {
    "train.bucket_batches": 0,  # length bucketing: off before the key existed
}


class ConfigError(ValueError):
    """A bad config: unknown key, wrong type or range, unparseable override."""


def packaged_config_path(name: str) -> Path:
    """Path of a config shipped in ``hsoftmax/training/configs/<name>.yaml``."""
    path = Path(str(resources.files("hsoftmax.training").joinpath("configs", f"{name}.yaml")))
    if not path.is_file():
        raise ConfigError(f"no packaged config {name!r}; choose one of {PACKAGED_CONFIGS}")
    return path


def _string_keys(cls=Config, where: str = "") -> frozenset[str]:
    """Dotted keys whose type is text: an override keeps the raw string there (YAML would read
    ``name=off`` as False and ``output.dir=2024`` as an int)."""
    keys = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory else None):
            keys |= _string_keys(f.default_factory, f"{where}{f.name}.")
        elif f.type in ("str", "str | None"):
            keys.add(f"{where}{f.name}")
    return frozenset(keys)


_STRING_KEYS = _string_keys()


def _merge(base: DictConfig, update, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:
        section = ".".join(str(e.full_key).split(".")[:-1])
        node = OmegaConf.select(base, section) if section else base
        known = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else ""
        raise ConfigError(
            f"{source}: unknown config key {str(e.full_key)!r} (known: {known})"
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e.msg.splitlines()[0]} (key {e.full_key!r})") from None


def apply_overrides(cfg: dict | DictConfig, overrides: list[str] | None) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML: ``3``, ``1e-3``, ``null``,
    ``[64, 8]``, ``true``; text keys keep the raw string)."""
    conf = cfg if isinstance(cfg, DictConfig) else _structured(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key in _STRING_KEYS and raw not in ("", "null", "~"):
            update = OmegaConf.create()
            OmegaConf.update(update, key, raw, force_add=True)
        else:
            try:
                update = OmegaConf.from_dotlist([f"{key}={raw}"])
            except OmegaConfBaseException as e:
                raise ConfigError(f"override {item!r}: cannot parse the value: {e}") from None
        conf = _merge(conf, update, f"override {item!r}")
    return OmegaConf.to_container(conf)


def _structured(cfg: dict) -> DictConfig:
    return _merge(OmegaConf.structured(Config), cfg, "config")


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, recorded: bool = False
) -> dict:
    """Defaults <- YAML file (a path, or a packaged name like ``"demo"``) <- overrides.

    ``recorded``: the file is a run's own ``config.yaml``; keys of :data:`ADDED_KEYS` it lacks
    take their old values instead of the defaults."""
    conf = OmegaConf.structured(Config)
    if path is not None:
        p = Path(path)
        if not p.is_file() and str(path) in PACKAGED_CONFIGS:
            p = packaged_config_path(str(path))
        if not p.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = OmegaConf.load(p)
        except Exception as e:  # a YAML syntax error, whatever the parser calls it
            raise ConfigError(f"{p}: not a readable YAML config ({e})") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{p}: a config must be a mapping, got {type(loaded).__name__}")
        if recorded:
            for key, old in ADDED_KEYS.items():
                if OmegaConf.select(loaded, key, default="<missing>") == "<missing>":
                    OmegaConf.update(loaded, key, old, force_add=True)
        conf = _merge(conf, loaded, str(p))
    cfg = apply_overrides(conf, overrides)
    _validate(cfg)
    return cfg


def resume_config(recorded: dict, overrides: list[str] | None) -> dict:
    """A resumed run's config: its recorded one with ``overrides`` applied, where only the
    :data:`RESUMABLE_KEYS` may change (an override repeating the recorded value is fine)."""
    cfg = apply_overrides(recorded, overrides)
    _validate(cfg)
    check_resume(recorded, cfg)
    return cfg


def check_resume(recorded: dict, cfg: dict) -> None:
    """Raises unless ``cfg`` differs from a run's ``recorded`` config in
    :data:`RESUMABLE_KEYS` only."""
    changed = [
        f"{key} ({old!r} -> {new!r})"
        for key, old, new in config_diff(recorded, cfg)
        if key not in RESUMABLE_KEYS
    ]
    if changed:
        raise ConfigError(
            "a resumed run keeps its configuration; cannot change "
            + ", ".join(changed)
            + f". Only {', '.join(sorted(RESUMABLE_KEYS))} may change: start a new run instead"
        )


def config_diff(a: dict, b: dict, where: str = ""):
    """``(key, a value, b value)`` for every dotted leaf key where two configs differ."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(x, dict) and isinstance(y, dict):
            yield from config_diff(x, y, f"{where}{key}.")
        elif x != y:
            yield f"{where}{key}", x, y


def _positive(x) -> bool:
    return x >= 1


# Ranges OmegaConf's types cannot say: (dotted key, test of a non-null value, what it must be).
_RANGES = (
    *((f"model.{k}", _positive, "a positive int") for k in ("d_model", "num_layers", "nhead")),
    *(
        (f"model.{k}", _positive, "a positive int")
        for k in ("loc_emb_dim", "user_emb_dim", "time_emb_dim", "weekday_emb_dim")
    ),
    *(
        (f"model.{k}", _positive, "a positive int")
        for k in ("duration_emb_dim", "diff_emb_dim", "dim_feedforward", "max_len")
    ),
    ("model.dropout", lambda x: 0 <= x < 1, "in [0, 1)"),
    ("model.tree_arity", lambda x: x >= 2, "an int >= 2"),
    (
        "model.tree_branching",
        lambda b: (
            b == "binary"
            or (isinstance(b, int) and not isinstance(b, bool) and b >= 2)
            or (
                isinstance(b, list)
                and len(b) > 0
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 2 for x in b)
            )
        ),
        'an int >= 2, a list of them, or "binary"',
    ),
    ("model.head", lambda x: x in HEADS, f"one of {HEADS}"),
    ("model.tree", lambda x: x in TREES or Path(x).is_file(), f"one of {TREES} or a tree file"),
    ("model.history", lambda x: x in HISTORY_KINDS, f"one of {HISTORY_KINDS}"),
    ("model.smoothing", lambda x: x in SMOOTHING_MODES, "'leaves' or 'nodes'"),
    ("model.user_memory", lambda x: x >= 0, "an int >= 0 (0: no user memory)"),
    ("model.tree_frequent", lambda x: x >= 0, "an int >= 0 (0: none)"),
    ("model.position_loss", lambda x: 0 <= x < math.inf, "a finite number >= 0 (0: none)"),
    ("data.max_len", _positive, "a positive int or null"),
    ("data.previous_day", _positive, "a positive int or null"),
    ("data.min_history", _positive, "a positive int or null"),
    *(
        (f"train.{k}", _positive, "a positive int")
        for k in ("epochs", "batch_size", "eval_batch_size", "early_stopping_patience")
    ),
    *((f"train.{k}", _positive, "a positive int or null") for k in ("num_threads", "param_budget")),
    ("train.max_steps_per_epoch", _positive, "a positive int or null"),
    ("train.bucket_batches", lambda x: x >= 0, "an int >= 0 (0: off)"),
    ("train.lr", lambda x: x > 0, "a positive number"),
    ("train.weight_decay", lambda x: x >= 0, "a number >= 0"),
    ("train.min_lr", lambda x: x >= 0, "a number >= 0"),
    ("train.label_smoothing", lambda x: 0 <= x <= 1, "in [0, 1]"),
    ("train.grad_clip", lambda x: x > 0, "a positive number or null"),
    ("train.lr_patience", lambda x: x >= 0, "an int >= 0"),
    ("train.lr_factor", lambda x: 0 < x < 1, "in (0, 1)"),
    ("train.optimizer", lambda x: x in OPTIMIZERS, f"one of {OPTIMIZERS}"),
    ("train.head_lr_mult", lambda x: x > 0, "a positive number"),
    ("train.warmup_steps", lambda x: x >= 0, "an int >= 0"),
    ("train.eval_every_samples", _positive, "a positive int or null"),
    ("train.eval_samples", _positive, "a positive int or null"),
    ("data.users", _positive, "a positive int or null"),
    ("name", lambda x: x != "", "a non-empty string"),
    ("output.dir", lambda x: x != "", "a non-empty string"),
)


def _validate(cfg: dict) -> None:
    """Ranges and choices, so a bad value fails here, naming the key, not later as a traceback
    from deep inside training."""
    for key, ok, want in _RANGES:
        section, _, name = key.rpartition(".")
        value = cfg[section][name] if section else cfg[name]
        if value is not None and not ok(value):
            raise ConfigError(f"{key} must be {want}, got {value!r}")
    m = cfg["model"]
    if m["smoothing"] == "nodes" and m["history"] == "logit_add":
        raise ConfigError(
            "model.smoothing 'nodes' smooths each tree decision and needs model.history 'none' "
            "or 'mixture'; logit_add smooths over all classes ('leaves')"
        )
    if m["sparse"] and (m["head"] != "hsoftmax" or cfg["train"]["label_smoothing"] != 0):
        raise ConfigError(
            "model.sparse needs model.head 'hsoftmax' and train.label_smoothing 0 (label "
            "smoothing scores every row of the head, a dense gradient)"
        )
    if m["user_memory_context"] and not m["user_memory"]:
        raise ConfigError(
            "model.user_memory_context counts the memory's visits: set model.user_memory"
        )
    if m["user_memory"] and m["history"] != "mixture":
        raise ConfigError(
            "model.user_memory extends the pointer: it needs model.history 'mixture' (set "
            f"model.user_memory=0 for history {m['history']!r})"
        )
    if m["history"] == "logit_add" and m["head"] != "dense":
        raise ConfigError("model.history 'logit_add' is only valid with model.head 'dense'")
