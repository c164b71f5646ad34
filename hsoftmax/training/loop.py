"""The training loop: data, model, AdamW + ReduceLROnPlateau, early stopping, checkpoints.

One entry point, :func:`train`, used by ``hsoftmax train``, the experiments and the tests.

Determinism. Seeds are set for Python, NumPy and torch; the training order of epoch ``e`` is a
permutation drawn from a generator seeded with ``(train.seed, e)``, so it depends on nothing
else; dropout draws from torch's global generator, whose state is checkpointed after every
epoch with the model, optimizer, scheduler and early-stopping state. Resuming from the
checkpoint of epoch ``e`` therefore continues exactly as the uninterrupted run would (on the same
machine, thread count and library versions).

Distributed: see :mod:`hsoftmax.training.distributed`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hsoftmax.data import MobilityData, MobilityDataset, collate
from hsoftmax.data.samples import save_id_maps
from hsoftmax.metrics import format_table
from hsoftmax.models import build_model, check_budget, parameter_report
from hsoftmax.optim import SparseAdamW, clip_grad_norm_

from . import distributed
from .checkpoint import (
    atomic_save,
    atomic_write_text,
    get_rng_state,
    load_checkpoint,
    set_rng_state,
)
from .config import check_resume, load_config, resume_config
from .data import load_data
from .evaluate import evaluate_model, final_test, to_device
from .rundir import CKPT, FINISHED, new_run_dir, plot_history, write_history, write_run_info

__all__ = ["RunResult", "epoch_batches", "improves", "make_optimizer", "train", "train_step"]

logger = logging.getLogger("hsoftmax.training")
# early stopping: an epoch improves on the best validation NLL only by more than this
MIN_IMPROVEMENT = 1e-6


def improves(val_nll: float, best: float) -> bool:
    """Early stopping's rule: does an epoch's validation NLL beat the best so far?"""
    return val_nll < best - MIN_IMPROVEMENT


@dataclass
class RunResult:
    """What :func:`train` returns (on every rank; only rank 0 has ``test``)."""

    run_dir: Path
    history: list[dict]
    test: dict | None
    params: dict


def epoch_batches(
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    lengths=None,
    bucket: int = 0,
):
    """Index batches of one training epoch for this rank (see the module docstring).

    The epoch's permutation is cut into global batches of ``batch_size`` samples (rounded down
    to a multiple of ``world``) and each rank takes every ``world``-th sample of each, so the
    ranks' batches together are the single-process batches. With ``bucket`` > 0 and the
    samples' history ``lengths``, the permutation is first cut into pools of ``bucket`` global
    batches, each pool is sorted by length (stably, so equal lengths keep their random order)
    and cut into batches, and the order of the epoch's batches is shuffled: a batch then holds
    histories of about one length, so the encoder pads little, while every batch is still
    drawn from a random pool (length bucketing)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    total = math.ceil(n / world) * world
    if total > n:  # pad as DistributedSampler does, so every rank has as many samples
        perm = torch.cat([perm, perm[: total - n]])
    size = batch_size // world * world
    if bucket > 0:
        if lengths is None:
            raise ValueError("length bucketing needs the samples' lengths")
        lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.long)
        if lengths.shape != (n,):
            raise ValueError(f"lengths must have shape ({n},), got {tuple(lengths.shape)}")
        pools = perm.split(bucket * size)
        pools = [p[torch.sort(lengths[p], stable=True).indices] for p in pools]
        batches = [b for p in pools for b in p.split(size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    else:
        batches = perm.split(size)
    return [b[rank::world].tolist() for b in batches if len(b) > rank]


def make_optimizer(model: torch.nn.Module, tcfg: dict) -> torch.optim.Optimizer:
    """``train.optimizer`` (AdamW, fused unless ``fused_adamw`` is false, or the row-sparse
    :class:`hsoftmax.optim.SparseAdamW`) with the ``train`` section's ``lr`` and
    ``weight_decay``; with ``head_lr_mult`` != 1 the output
    head's parameters (names ``output.head.*``) are a second group at ``lr * head_lr_mult``."""
    kind = {"adamw": torch.optim.AdamW, "sparse_adamw": SparseAdamW}[tcfg.get("optimizer", "adamw")]
    mult = float(tcfg.get("head_lr_mult", 1.0))
    params = list(model.parameters())
    if mult != 1.0:
        named = list(model.named_parameters())
        head = [p for n, p in named if n.startswith("output.head.")]
        if not head:
            raise ValueError("train.head_lr_mult needs a model with an output.head")
        rest = [p for n, p in named if not n.startswith("output.head.")]
        params = [{"params": rest}, {"params": head, "lr": tcfg["lr"] * mult}]
    extra = {}
    if kind is torch.optim.AdamW and tcfg.get("fused_adamw", True):
        # one fused kernel for all parameters: the same update, 5-8x cheaper on the CPU than
        # the per-parameter loop (docs/training.md, the step profile)
        extra["fused"] = all(p.is_floating_point() for p in model.parameters())
    return kind(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"], **extra)


def train_step(net, model, optimizer, dataset, idx, device, tcfg: dict) -> torch.Tensor:
    """One optimisation step on the samples ``idx`` of ``dataset``: collate, forward (the
    label-smoothed mean loss), backward, gradient clipping, ``optimizer.step()``. ``net`` is the
    model or its DDP wrapper. Returns the detached loss."""
    batch = to_device(collate([dataset[i] for i in idx]), device)
    loss = net(batch, label_smoothing=float(tcfg["label_smoothing"]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if tcfg["grad_clip"]:
        clip_grad_norm_(model.parameters(), float(tcfg["grad_clip"]))  # sparse gradients too
    optimizer.step()
    return loss.detach()


# ------------------------------------------------------------------------------------- train


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds the global state third-party code uses)
    torch.manual_seed(seed)


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def train(
    cfg: dict | None = None,
    resume: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    data: MobilityData | None = None,
    echo=print,
) -> RunResult:
    """Train a model; return the run directory, the per-epoch history and the test metrics.

    Args:
        cfg: a resolved config (:func:`~hsoftmax.training.config.load_config`); None with
            ``resume``: the run's own ``config.yaml``.
        resume: a run directory holding ``ckpt.pt``: continue that run exactly (``overrides``,
            e.g. ``train.epochs=20``, apply on top of its config; only
            :data:`~hsoftmax.training.config.RESUMABLE_KEYS` may change).
        data: pre-loaded data (skips :func:`load_data`; must match ``cfg["data"]``).
        echo: where progress lines go (``print``; ``lambda *a: None`` to silence).
    """
    cfg, ckpt = _start(cfg, resume, overrides)
    rank, world = distributed.dist_info()
    tcfg = cfg["train"]
    is_main = rank == 0
    say = echo if is_main else (lambda *a, **k: None)
    if tcfg["num_threads"]:
        torch.set_num_threads(int(tcfg["num_threads"]))
    device = distributed.setup(torch.device(tcfg["device"]), tcfg["batch_size"])
    progress = bool(tcfg["progress"]) and is_main
    _seed_all(int(tcfg["seed"]))

    t0 = time.perf_counter()
    if data is None:
        data = load_data(cfg["data"], progress=progress)
    data_seconds = time.perf_counter() - t0
    if cfg["data"]["path"] and getattr(data, "path", None):
        cfg["data"]["path"] = str(data.path)  # absolute: evaluate/predict work from anywhere
    sets = {
        split: MobilityDataset(samples, max_len=cfg["data"]["max_len"])
        for split, samples in data.splits.items()
    }
    t1 = time.perf_counter()
    model = build_model(cfg["model"], data).to(device)
    params = parameter_report(model)
    check_budget(params, tcfg["param_budget"], tcfg["allow_over_budget"])
    say(_describe(cfg, data, sets, params, data_seconds, time.perf_counter() - t1))

    state = _TrainState(model, tcfg)
    if ckpt is not None:
        state.restore(ckpt)
        run_dir = Path(resume)
        say(f"resumed {run_dir} after epoch {state.start_epoch}")
    else:
        run_dir = new_run_dir(cfg)
    if is_main:
        write_run_info(run_dir, cfg, params)
        if hasattr(data, "location_ids"):  # encoded -> original ids, beside the outputs
            save_id_maps(data, run_dir)

    net = distributed.wrap(model, device)
    curve = _Curve(model, sets["validation"], device, tcfg, state, is_main, run_dir)
    epochs = int(tcfg["epochs"])
    for epoch in range(state.start_epoch, epochs):
        if state.early["stopped"]:
            break
        t_epoch = time.perf_counter()
        train_loss, seen, eval_seconds = _train_epoch(
            net, model, state, sets["train"], epoch, device, tcfg, progress, curve
        )
        train_seconds = time.perf_counter() - t_epoch - eval_seconds
        val = evaluate_model(
            model,
            sets["validation"],
            tcfg["eval_batch_size"],
            device,
            float(tcfg["label_smoothing"]),
            metrics=bool(tcfg["val_metrics"]),
            progress=progress,
            desc="validation",
        )
        state.end_epoch(epoch, val["nll"])
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val["loss"],
            "val_nll": val["nll"],
            **{f"val_{k}": v for k, v in val.get("metrics", {}).items() if k != "n"},
            "lr": state.optimizer.param_groups[0]["lr"],
            "train_seconds": train_seconds,
            "samples_per_second": seen * world / max(train_seconds, 1e-9),
            "epoch_seconds": time.perf_counter() - t_epoch,
            "interval_eval_seconds": eval_seconds,
            "peak_rss_mb": _peak_rss_mb(),
        }
        state.history.append(row)
        say(
            f"epoch {epoch + 1}: train loss {train_loss:.4f}, val nll {val['nll']:.4f}"
            + (f", val acc@1 {row['val_acc@1']:.2f}" if "val_acc@1" in row else "")
            + f", {train_seconds:.1f} s train, {row['samples_per_second']:.0f} samples/s"
        )
        if is_main:
            atomic_save(state.checkpoint(epoch + 1, cfg), run_dir / CKPT)
            write_history(run_dir, state.history)
            curve.write()
    if state.early["stopped"]:
        say(f"early stopping: no improvement for {tcfg['early_stopping_patience']} epochs")

    test = None
    if is_main:
        if state.best_model is not None:
            model.load_state_dict(state.best_model)
        plot_history(run_dir, state.history)
        test = final_test(
            model, sets["test"], cfg, device, run_dir, progress, getattr(data, "user_ids", None)
        )
        say(f"test ({len(sets['test'])} samples, best epoch {state.early['best_epoch']}):")
        say(format_table({"test": test}))
        say(f"run directory: {run_dir}")
    distributed.barrier()
    return RunResult(run_dir=run_dir, history=state.history, test=test, params=params)


def _start(cfg, resume, overrides) -> tuple[dict, dict | None]:
    """The run's config, and its checkpoint when resuming."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / CKPT).is_file():
            raise FileNotFoundError(f"cannot resume {run_dir}: it holds no {CKPT}")
        recorded = load_config(run_dir / "config.yaml", recorded=True)
        if cfg is None:
            cfg = resume_config(recorded, overrides)
        else:
            check_resume(recorded, cfg)
        return cfg, load_checkpoint(run_dir / CKPT)
    if cfg is None:
        cfg = load_config(None, overrides)
    fixed = cfg["output"]["run_dir"]
    held = [f for f in (CKPT, FINISHED) if fixed and (Path(fixed) / f).exists()]
    if held:  # its files would pass for the new run's until they are overwritten
        raise ValueError(
            f"run directory {fixed} already holds a run ({', '.join(held)}): resume it "
            f"(hsoftmax train --resume {fixed}) or choose another output.run_dir"
        )
    return cfg, None


def _describe(cfg, data, sets, params, data_seconds, build_seconds) -> str:
    m = cfg["model"]
    return (
        f"data: {len(sets['train'])}/{len(sets['validation'])}/{len(sets['test'])} samples, "
        f"{data.n_locations} locations ({data_seconds:.1f} s); model: head {m['head']}"
        + (f" ({m['tree']} tree)" if m["head"] == "hsoftmax" else "")
        + f", history {m['history']}, parameters "
        + ", ".join(f"{k} {v:,}" for k, v in params.items())
        + f" (built in {build_seconds:.1f} s)"
    )


class _TrainState:
    """Optimizer, scheduler, early stopping, best model and history: what a checkpoint holds
    besides the model and the RNG state."""

    def __init__(self, model: torch.nn.Module, tcfg: dict):
        self.model = model
        self.tcfg = tcfg
        self.optimizer = make_optimizer(model, tcfg)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer,
            mode="min",
            factor=tcfg["lr_factor"],
            patience=tcfg["lr_patience"],
            min_lr=tcfg["min_lr"],
        )
        self.early = {"best": math.inf, "best_epoch": -1, "bad_epochs": 0, "stopped": False}
        self.best_model = None
        self.history: list[dict] = []
        self.start_epoch = 0
        # the learning rate of each group before warm-up scales it
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        # over the whole run: optimisation steps, training samples (all ranks) and training
        # seconds (interval evaluations excluded), and the interval-evaluation curve
        self.progress = {"steps": 0, "samples": 0, "train_seconds": 0.0}
        self.curve: list[dict] = []

    def warm_up(self) -> None:
        """Scale the learning rates linearly over the first ``warmup_steps`` steps."""
        warmup = int(self.tcfg.get("warmup_steps") or 0)
        step = self.progress["steps"]
        if step < warmup:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = base * (step + 1) / warmup

    def end_epoch(self, epoch: int, val_nll: float) -> None:
        """The scheduler step and the early-stopping rule on the validation NLL."""
        self.scheduler.step(val_nll)
        if improves(val_nll, self.early["best"]):
            self.early.update(best=val_nll, best_epoch=epoch + 1, bad_epochs=0)
            self.best_model = copy.deepcopy(self.model.state_dict())
        else:
            self.early["bad_epochs"] += 1
            if self.early["bad_epochs"] >= self.tcfg["early_stopping_patience"]:
                self.early["stopped"] = True

    def checkpoint(self, epoch: int, cfg: dict) -> dict:
        return {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "early_stopping": self.early,
            "best_model": self.best_model,
            "history": self.history,
            "progress": self.progress,
            "curve": self.curve,
            "rng": get_rng_state(),
            "config": cfg,
        }

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.early = ckpt["early_stopping"]
        self.best_model = ckpt["best_model"]
        self.history = ckpt["history"]
        self.start_epoch = ckpt["epoch"]
        # checkpoints written before the curve existed hold neither
        self.progress = ckpt.get("progress", self.progress)
        self.curve = ckpt.get("curve", [])
        set_rng_state(ckpt["rng"])


def _train_epoch(net, model, state, train_set, epoch, device, tcfg, progress, curve):
    """One epoch of steps, with the interval evaluations due in it; returns (mean training loss
    over all ranks, samples seen here, seconds spent in interval evaluations)."""
    from tqdm.auto import tqdm

    rank, world = distributed.dist_info()
    model.train()
    batches = epoch_batches(
        len(train_set),
        tcfg["batch_size"],
        tcfg["seed"],
        epoch,
        rank,
        world,
        lengths=train_set.lengths if tcfg["bucket_batches"] else None,
        bucket=int(tcfg["bucket_batches"]),
    )
    if tcfg["max_steps_per_epoch"]:
        batches = batches[: int(tcfg["max_steps_per_epoch"])]
    bar = tqdm(
        batches,
        desc=f"epoch {epoch + 1}/{tcfg['epochs']}",
        disable=not progress,
        unit="batch",
        leave=False,
        mininterval=1.0,
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    loss_sum, seen, eval_seconds = 0.0, 0, 0.0
    eval_seconds += curve.maybe_evaluate(epoch)  # the untrained model: the curve's first point
    t_last = time.perf_counter()
    for step, idx in enumerate(bar):
        state.warm_up()
        loss = train_step(net, model, state.optimizer, train_set, idx, device, tcfg)
        loss_sum += float(loss) * len(idx)
        seen += len(idx)
        now = time.perf_counter()
        state.progress["steps"] += 1
        state.progress["samples"] += len(idx) * world
        state.progress["train_seconds"] += now - t_last
        eval_seconds += curve.maybe_evaluate(epoch)
        t_last = time.perf_counter()
        if progress and step % 10 == 0:
            rate = seen * world / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", samples_s=f"{rate:.0f}")
    bar.close()
    total, count = distributed.all_reduce_sum(loss_sum, float(seen))
    return total / max(count, 1), seen, eval_seconds


class _Curve:
    """Validation Acc@1 and NLL at fixed training-sample intervals (``train.eval_every_samples``)
    on a fixed subset of ``train.eval_samples`` validation samples: the time-to-accuracy curve.

    A point is taken whenever the samples seen so far (all ranks) reach the next multiple of
    the interval, and once before the first step. Each point records the samples and the
    training seconds so far (evaluations excluded, so the interval does not change the time
    axis). Only rank 0 evaluates; in DDP the other ranks wait at the next all-reduce."""

    def __init__(self, model, validation, device, tcfg, state, is_main, run_dir):
        self.every = tcfg.get("eval_every_samples")
        self.model, self.device, self.tcfg, self.state = model, device, tcfg, state
        self.is_main, self.run_dir = is_main, run_dir
        self.validation = validation
        n = tcfg.get("eval_samples")
        if self.every and n and n < len(validation):
            # a fixed subset, the same at every point and for every head of a comparison
            g = torch.Generator().manual_seed(0)
            keep = torch.randperm(len(validation), generator=g)[:n].sort().values.tolist()
            self.validation = torch.utils.data.Subset(validation, keep)

    def due(self) -> bool:
        """Has the run reached the next interval point (or taken none yet)?"""
        if not self.every:
            return False
        if not self.state.curve:
            return True
        taken = self.state.curve[-1]["samples"] // self.every
        return self.state.progress["samples"] // self.every > taken

    def maybe_evaluate(self, epoch: int) -> float:
        """Take a point if one is due; returns the seconds it took (0 if none)."""
        if not self.is_main or not self.due():
            return 0.0
        t0 = time.perf_counter()
        val = evaluate_model(
            self.model,
            self.validation,
            self.tcfg["eval_batch_size"],
            self.device,
            float(self.tcfg["label_smoothing"]),
        )
        self.model.train()
        p = self.state.progress
        self.state.curve.append(
            {
                "samples": p["samples"],
                "steps": p["steps"],
                "train_seconds": p["train_seconds"],
                "epoch": epoch,
                "val_nll": val["nll"],
                **{f"val_{k}": v for k, v in val["metrics"].items() if k != "n"},
            }
        )
        return time.perf_counter() - t0

    def write(self) -> None:
        if self.every and self.is_main:
            atomic_write_text(self.run_dir / "curve.json", json.dumps(self.state.curve) + "\n")
