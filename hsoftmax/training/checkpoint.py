"""Atomic checkpoints and the RNG state that makes ``--resume`` exact.

A checkpoint is written to ``<path>.tmp`` and renamed over ``<path>`` (``os.replace`` is atomic
on POSIX), so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "atomic_save",
    "atomic_write_text",
    "get_rng_state",
    "load_checkpoint",
    "set_rng_state",
]


def _atomic_write(path: str | os.PathLike, mode: str, write) -> None:
    """``write(file)`` into ``<path>.tmp``, fsync, then rename over ``path``: a reader (or a
    resumed run) sees the old file or the new one, never a truncated one. A failed write
    removes the temporary file and re-raises."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` via a temporary file and an atomic rename."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and an atomic rename."""
    _atomic_write(path, "w", lambda f: f.write(text))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint on the CPU with ``weights_only=True`` (tensors and plain data only: no
    code runs while loading). A missing, truncated or foreign file raises a one-line error
    naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... by cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: not a readable hsoftmax checkpoint (truncated or corrupt?): {first}"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not an hsoftmax checkpoint (no model state)")
    return ckpt


def get_rng_state() -> dict:
    """The global RNG states: Python ``random``, NumPy, torch CPU and (if present) CUDA."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict:
    # as plain data and a tensor, so the checkpoint loads with weights_only=True
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "name": str(name),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002 (global state other code may use)
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
