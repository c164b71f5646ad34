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

from hsoftmax.models.factory import ENCODER_SIZE_KEYS, MODEL_DEFAULTS
from hsoftmax.nn import SMOOTHING_MODES

__all__ = [
    "DEFAULTS",
    "RESUMABLE_KEYS",
    "PACKAGED_CONFIGS",
    "ConfigError",
    "apply_overrides",
    "check_resume",
    "config_diff",
    "load_config",
    "merge",
    "packaged_config_path",
    "resume_config",
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


# Keys whose values are text: an override keeps the raw string (YAML would read ``name=off`` as
# False and ``output.dir=2024`` as an int).
STRING_KEYS = frozenset(
    {
        "name",
        "data.preset",
        "data.path",
        "data.cache_dir",
        "model.head",
        "model.tree",
        "model.history",
        "model.smoothing",
        "train.device",
        "output.dir",
        "output.run_dir",
    }
)

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
        "output.dir",
        "output.run_dir",
    }
)


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
        if key.strip() in STRING_KEYS and value is not None:
            value = raw.strip()  # a name, path or device: "off", "1e5", "2024" stay text
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


def _check(cfg: dict, key: str, ok: bool, want: str) -> None:
    if not ok:
        section, _, field = key.partition(".")
        value = cfg[section][field] if field else cfg[section]
        raise ConfigError(f"{key} must be {want}, got {value!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _validate_types(cfg: dict) -> None:
    """Every key's type and range, so a bad value fails here, naming the key, not later as a
    traceback from deep inside training."""
    d, m, t, o = cfg["data"], cfg["model"], cfg["train"], cfg["output"]
    _check(cfg, "name", isinstance(cfg["name"], str) and cfg["name"] != "", "a non-empty string")
    for key in ("preset", "path", "cache_dir"):
        _check(cfg, f"data.{key}", d[key] is None or isinstance(d[key], str), "a string or null")
    _check(cfg, "data.preset", isinstance(d["preset"], str), "a string")
    _check(cfg, "data.seed", _is_int(d["seed"]), "an int")
    _check(
        cfg,
        "data.max_len",
        d["max_len"] is None or (_is_int(d["max_len"]) and d["max_len"] >= 1),
        "a positive int or null",
    )
    for key in ENCODER_SIZE_KEYS:
        _check(cfg, f"model.{key}", _is_int(m[key]) and m[key] >= 1, "a positive int")
    _check(cfg, "model.dropout", _is_num(m["dropout"]) and 0 <= m["dropout"] < 1, "in [0, 1)")
    _check(
        cfg, "model.tree_arity", _is_int(m["tree_arity"]) and m["tree_arity"] >= 2, "an int >= 2"
    )
    _check(cfg, "model.tree_seed", _is_int(m["tree_seed"]), "an int")
    b = m["tree_branching"]
    _check(
        cfg,
        "model.tree_branching",
        b == "binary"
        or (_is_int(b) and b >= 2)
        or (isinstance(b, list) and len(b) > 0 and all(_is_int(x) and x >= 2 for x in b)),
        'an int >= 2, a list of them, or "binary"',
    )
    for key in ("epochs", "batch_size", "eval_batch_size", "early_stopping_patience"):
        _check(cfg, f"train.{key}", _is_int(t[key]) and t[key] >= 1, "a positive int")
    _check(cfg, "train.lr", _is_num(t["lr"]) and t["lr"] > 0, "a positive number")
    for key in ("weight_decay", "min_lr"):
        _check(cfg, f"train.{key}", _is_num(t[key]) and t[key] >= 0, "a number >= 0")
    _check(
        cfg,
        "train.label_smoothing",
        _is_num(t["label_smoothing"]) and 0 <= t["label_smoothing"] <= 1,
        "in [0, 1]",
    )
    _check(
        cfg,
        "train.grad_clip",
        t["grad_clip"] is None or (_is_num(t["grad_clip"]) and t["grad_clip"] > 0),
        "a positive number or null",
    )
    _check(
        cfg, "train.lr_patience", _is_int(t["lr_patience"]) and t["lr_patience"] >= 0, "an int >= 0"
    )
    _check(cfg, "train.lr_factor", _is_num(t["lr_factor"]) and 0 < t["lr_factor"] < 1, "in (0, 1)")
    _check(cfg, "train.seed", _is_int(t["seed"]), "an int")
    _check(cfg, "train.device", isinstance(t["device"], str), "a device string (cpu, cuda:0)")
    for key in ("num_threads", "max_steps_per_epoch"):
        _check(
            cfg,
            f"train.{key}",
            t[key] is None or (_is_int(t[key]) and t[key] >= 1),
            "a positive int or null",
        )
    _check(
        cfg,
        "train.param_budget",
        _is_int(t["param_budget"]) and t["param_budget"] >= 1,
        "a positive int",
    )
    for key in ("val_metrics", "allow_over_budget", "progress"):
        _check(cfg, f"train.{key}", isinstance(t[key], bool), "true or false")
    _check(cfg, "output.dir", isinstance(o["dir"], str) and o["dir"] != "", "a non-empty string")
    _check(
        cfg,
        "output.run_dir",
        o["run_dir"] is None or isinstance(o["run_dir"], str),
        "a string or null",
    )


def _validate(cfg: dict) -> None:
    _validate_types(cfg)
    from hsoftmax.models.factory import HEADS, TREES
    from hsoftmax.models.history import HISTORY_KINDS

    m, t = cfg["model"], cfg["train"]
    for key, allowed in (("head", HEADS), ("tree", TREES), ("history", HISTORY_KINDS)):
        if m[key] not in allowed:
            raise ConfigError(f"model.{key} must be one of {allowed}, got {m[key]!r}")
    if m["smoothing"] not in SMOOTHING_MODES:
        raise ConfigError(f"model.smoothing must be 'leaves' or 'nodes', got {m['smoothing']!r}")
    if m["smoothing"] == "nodes" and m["history"] == "logit_add":
        raise ConfigError(
            "model.smoothing 'nodes' smooths each tree decision and needs model.history 'none' "
            "or 'mixture'; logit_add smooths over all classes ('leaves')"
        )
    if m["history"] == "logit_add" and m["head"] != "dense":
        raise ConfigError("model.history 'logit_add' is only valid with model.head 'dense'")
    if not 0.0 <= float(t["label_smoothing"]) <= 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1], got {t['label_smoothing']}")
