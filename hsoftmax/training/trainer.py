"""The training loop: data, model, AdamW + ReduceLROnPlateau, early stopping, checkpoints, run dir.

One entry point, :func:`train`, used by ``hsoftmax train``, the benchmark and the tests, and
:func:`evaluate_run` for ``hsoftmax evaluate``.

Determinism. Seeds are set for Python, NumPy and torch; the training order of epoch ``e`` is a
permutation drawn from a generator seeded with ``(train.seed, e)``, so it depends on nothing
else; dropout draws from torch's global generator, whose state is checkpointed after every
epoch with the model, optimizer, scheduler and early-stopping state. Resuming from the
checkpoint of epoch ``e`` therefore continues exactly as the uninterrupted run would (on the same
machine, thread count and library versions).

Distributed. Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
``DistributedDataParallel`` (gloo on CPU, nccl on CUDA). Each epoch's permutation is split
round-robin over the ranks (``perm[rank::world]``, as ``DistributedSampler``), each rank takes
``batch_size / world`` samples per step, so step ``i`` covers the same samples as a
single-process step ``i`` with the full batch and DDP's gradient average equals the
single-process gradient (for equal per-rank batches, without dropout differences). Every rank
computes the validation loss (identical models, so identical decisions); only rank 0 writes.
"""

from __future__ import annotations

import copy
import csv
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
import pandas as pd
import torch
import yaml

from hsoftmax.data import DataFormatError, MobilityData, MobilityDataset, collate
from hsoftmax.metrics import METRIC_NAMES, format_table, metrics_from_ranks, per_user_metrics
from hsoftmax.models import build_model, check_budget, parameter_report

from .checkpoint import (
    atomic_save,
    atomic_write_text,
    get_rng_state,
    load_checkpoint,
    set_rng_state,
)
from .config import check_resume, load_config, resume_config

__all__ = [
    "RunResult",
    "evaluate_model",
    "evaluate_run",
    "load_data",
    "make_optimizer",
    "train",
    "train_step",
]

logger = logging.getLogger("hsoftmax.training")
CKPT = "ckpt.pt"
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


# ---------------------------------------------------------------------------------------- data


def load_data(data_cfg: dict, progress: bool = True) -> MobilityData:
    """The samples named by a ``data`` config section: ``path`` (MHSA pickles or staypoints) or
    the synthetic ``preset``."""
    from hsoftmax.data import load_preset

    if data_cfg.get("path"):
        return _load_dir(Path(data_cfg["path"]), progress)
    return load_preset(
        data_cfg["preset"],
        seed=data_cfg["seed"],
        cache_dir=data_cfg["cache_dir"],
        progress=progress,
    )


def _load_dir(d: Path, progress: bool) -> MobilityData:
    from hsoftmax.data import build_samples, load_mhsa, read_locations, read_staypoints

    if not d.is_dir():
        raise FileNotFoundError(f"data.path {d} is not a directory")
    if (d / "staypoints.csv").is_file():
        sp = read_staypoints(d / "staypoints.csv")
        locs = read_locations(d / "locations.csv") if (d / "locations.csv").is_file() else None
        return build_samples(
            sp, locations=locs, source=str(d / "staypoints.csv"), progress=progress
        )
    found = {}
    for split, pattern in (
        ("train", "*train*.pk"),
        ("validation", "*valid*.pk"),
        ("test", "*test*.pk"),
    ):
        hits = sorted(d.glob(pattern))
        if len(hits) != 1:
            raise FileNotFoundError(
                f"{d}: expected exactly one {pattern} MHSA pickle (or a staypoints.csv), "
                f"found {[h.name for h in hits]}"
            )
        found[split] = hits[0]
    metas = sorted(d.glob("*meta.json"))
    n_loc = None
    if metas:
        try:
            meta = json.loads(metas[0].read_text())
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{metas[0]}: not valid JSON ({e})") from None
        n_loc = meta.get("n_locations") if isinstance(meta, dict) else None
        if isinstance(n_loc, bool) or not isinstance(n_loc, int) or n_loc < 2:
            raise DataFormatError(
                f"{metas[0]}: needs an integer n_locations >= 2 (the vocabulary size, padding "
                f"id 0 included), got {n_loc!r}"
            )
    sets = {k: load_mhsa(p, n_loc, as_sampleset=True) for k, p in found.items()}
    for split, samples in sets.items():
        if len(samples.y) == 0:
            raise DataFormatError(f"{found[split]}: holds no samples")
    if n_loc is None:
        n_loc = 1 + max(int(max(s.loc.max(), s.y.max())) for s in sets.values())
    n_users = 1 + max(int(s.user.max()) for s in sets.values())
    vocab = sorted(d.glob("*vocab_locations.csv"))
    locations = pd.DataFrame(columns=["loc", "id", "lat", "lon"])
    if vocab:
        locations = pd.read_csv(vocab[0])
        missing = {"loc", "lat", "lon"} - set(locations.columns)
        if missing:
            raise DataFormatError(
                f"{vocab[0]}: missing column(s) {sorted(missing)} (needs loc, lat, lon)"
            )
        loc = pd.to_numeric(locations["loc"], errors="coerce")
        bad = ~(loc.notna() & (loc == loc.round()) & (loc >= 0) & (loc < n_loc))
        if bool(bad.any()):
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataFormatError(
                f"{vocab[0]}: row {row}: loc {locations['loc'].iloc[row]!r} is not a location "
                f"id in [0, {n_loc})"
            )
        locations = locations.assign(loc=loc.astype(np.int64))
    return MobilityData(
        sets["train"],
        sets["validation"],
        sets["test"],
        n_locations=int(n_loc),
        n_users=int(n_users),
        location_ids=np.arange(n_loc),
        user_ids=np.arange(n_users),
        locations=locations,
        info={"source": str(d)},
    )


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
    """Index batches of one training epoch for this rank (see the module docstring)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    total = math.ceil(n / world) * world
    if total > n:  # pad as DistributedSampler does, so every rank has as many samples
        perm = torch.cat([perm, perm[: total - n]])
    mine = perm[rank::world]
    per_rank = batch_size // world
    return [mine[i : i + per_rank].tolist() for i in range(0, len(mine), per_rank)]


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_optimizer(model: torch.nn.Module, tcfg: dict) -> torch.optim.Optimizer:
    """AdamW with the ``train`` section's ``lr`` and ``weight_decay``."""
    return torch.optim.AdamW(model.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])


def train_step(net, model, optimizer, dataset, idx, device, tcfg: dict) -> torch.Tensor:
    """One optimisation step on the samples ``idx`` of ``dataset``: collate, forward (the
    label-smoothed mean loss), backward, gradient clipping, ``optimizer.step()``. ``net`` is the
    model or its DDP wrapper. Returns the detached loss."""
    batch = _to(collate([dataset[i] for i in idx]), device)
    loss = net(batch, label_smoothing=float(tcfg["label_smoothing"]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if tcfg["grad_clip"]:
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg["grad_clip"]))
    optimizer.step()
    return loss.detach()


# ------------------------------------------------------------------------------------ evaluate


@torch.no_grad()
def evaluate_model(
    model,
    dataset,
    batch_size: int,
    device,
    label_smoothing: float = 0.0,
    metrics: bool = True,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Loss and (if ``metrics``) exact ranks/top-10 of a model over a dataset, in order.

    Returns ``{"loss", "nll", "metrics", "ranks", "top", "y", "user"}`` (``loss`` label-smoothed,
    ``nll`` the plain negative log-likelihood, both means over samples).
    """
    from tqdm.auto import tqdm

    model.eval()
    n = len(dataset)
    loss_sum = nll_sum = 0.0
    ranks, tops, ys, users = [], [], [], []
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=desc, leave=False, disable=not progress, unit="batch"):
        batch = _to(collate([dataset[i] for i in range(s, min(s + batch_size, n))]), device)
        if metrics:
            loss, nll, top, rank = model.evaluate_batch(batch, 10, label_smoothing)
            ranks.append(rank.cpu())
            tops.append(top[:, 0].cpu())
        else:
            hidden, window = model.hidden_and_window(batch)
            loss = model.output(
                hidden, window, batch["y"], reduction="sum", label_smoothing=label_smoothing
            )
            nll = -model.output.log_prob(hidden, window, batch["y"]).sum()
        loss_sum += float(loss)
        nll_sum += float(nll)
        ys.append(batch["y"].cpu())
        users.append(batch["user"].cpu())
    out = {"loss": loss_sum / max(n, 1), "nll": nll_sum / max(n, 1)}
    y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long)
    out["y"], out["user"] = y, torch.cat(users) if users else y
    if metrics:
        out["ranks"], out["top"] = torch.cat(ranks), torch.cat(tops)
        out["metrics"] = metrics_from_ranks(out["ranks"], out["top"], y)
    return out


# ------------------------------------------------------------------------------------- train


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds the global state third-party code uses)
    torch.manual_seed(seed)


def _new_run_dir(cfg: dict) -> Path:
    if cfg["output"]["run_dir"]:
        return Path(cfg["output"]["run_dir"])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg["output"]["dir"]) / f"{cfg['name']}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


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
    rank, world = _dist_info()
    ckpt = None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / CKPT).is_file():
            raise FileNotFoundError(f"cannot resume {run_dir}: it holds no {CKPT}")
        recorded = load_config(run_dir / "config.yaml")
        if cfg is None:
            cfg = resume_config(recorded, overrides)
        else:
            check_resume(recorded, cfg)
        ckpt = load_checkpoint(run_dir / CKPT)
    else:
        if cfg is None:
            cfg = load_config(None, overrides)
        fixed = cfg["output"]["run_dir"]
        held = [f for f in (CKPT, "test_metrics.json") if fixed and (Path(fixed) / f).exists()]
        if held:  # its files would pass for the new run's until they are overwritten
            raise ValueError(
                f"run directory {fixed} already holds a run ({', '.join(held)}): resume it "
                f"(hsoftmax train --resume {fixed}) or choose another output.run_dir"
            )
    tcfg = cfg["train"]
    is_main = rank == 0
    say = echo if is_main else (lambda *a, **k: None)
    if tcfg["num_threads"]:
        torch.set_num_threads(int(tcfg["num_threads"]))
    device = torch.device(tcfg["device"])
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if tcfg["batch_size"] % world:
            raise ValueError(
                f"train.batch_size ({tcfg['batch_size']}) must be divisible by WORLD_SIZE ({world})"
            )
    progress = bool(tcfg["progress"]) and is_main
    _seed_all(int(tcfg["seed"]))

    t0 = time.perf_counter()
    if data is None:
        data = load_data(cfg["data"], progress=progress)
    data_seconds = time.perf_counter() - t0
    train_set = MobilityDataset(data.train, max_len=cfg["data"]["max_len"])
    val_set = MobilityDataset(data.validation, max_len=cfg["data"]["max_len"])
    test_set = MobilityDataset(data.test, max_len=cfg["data"]["max_len"])

    t1 = time.perf_counter()
    model = build_model(cfg["model"], data).to(device)
    build_seconds = time.perf_counter() - t1
    params = parameter_report(model)
    check_budget(params, tcfg["param_budget"], tcfg["allow_over_budget"])
    say(
        f"data: {len(train_set)}/{len(val_set)}/{len(test_set)} samples, "
        f"{data.n_locations} locations ({data_seconds:.1f} s); model: head {cfg['model']['head']}"
        + (f" ({cfg['model']['tree']} tree)" if cfg["model"]["head"] == "hsoftmax" else "")
        + f", history {cfg['model']['history']}, parameters "
        + ", ".join(f"{k} {v:,}" for k, v in params.items())
        + f" (built in {build_seconds:.1f} s)"
    )
    optimizer = make_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=tcfg["lr_factor"],
        patience=tcfg["lr_patience"],
        min_lr=tcfg["min_lr"],
    )
    early = {"best": math.inf, "best_epoch": -1, "bad_epochs": 0, "stopped": False}
    best_state = None
    history: list[dict] = []
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        early = ckpt["early_stopping"]
        best_state = ckpt["best_model"]
        history = ckpt["history"]
        start_epoch = ckpt["epoch"]
        set_rng_state(ckpt["rng"])
        say(f"resumed {run_dir} after epoch {start_epoch}")
    else:
        run_dir = _new_run_dir(cfg)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        atomic_write_text(run_dir / "params.json", json.dumps(params, indent=2) + "\n")

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    from tqdm.auto import tqdm

    ls = float(tcfg["label_smoothing"])
    epochs = int(tcfg["epochs"])
    for epoch in range(start_epoch, epochs):
        if early["stopped"]:
            break
        model.train()
        batches = epoch_batches(
            len(train_set), tcfg["batch_size"], tcfg["seed"], epoch, rank, world
        )
        if tcfg["max_steps_per_epoch"]:
            batches = batches[: int(tcfg["max_steps_per_epoch"])]
        bar = tqdm(
            batches,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not progress,
            unit="batch",
            leave=False,
            mininterval=1.0,
            file=sys.stderr,
        )
        t_epoch = time.perf_counter()
        loss_sum, seen = 0.0, 0
        for step, idx in enumerate(bar):
            loss = train_step(net, model, optimizer, train_set, idx, device, tcfg)
            loss_sum += float(loss) * len(idx)
            seen += len(idx)
            if progress and step % 10 == 0:
                rate = seen * world / max(time.perf_counter() - t_epoch, 1e-9)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", samples_s=f"{rate:.0f}")
        bar.close()
        train_loss = loss_sum / max(seen, 1)
        if world > 1:
            import torch.distributed as dist

            t = torch.tensor([loss_sum, float(seen)], dtype=torch.float64)
            dist.all_reduce(t)
            train_loss = float(t[0] / t[1])
        train_seconds = time.perf_counter() - t_epoch
        val = evaluate_model(
            model,
            val_set,
            tcfg["eval_batch_size"],
            device,
            ls,
            metrics=bool(tcfg["val_metrics"]),
            progress=progress,
            desc="validation",
        )
        val_loss = val["nll"]
        scheduler.step(val_loss)
        if improves(val_loss, early["best"]):
            early.update(best=val_loss, best_epoch=epoch + 1, bad_epochs=0)
            best_state = copy.deepcopy(model.state_dict())
        else:
            early["bad_epochs"] += 1
            if early["bad_epochs"] >= tcfg["early_stopping_patience"]:
                early["stopped"] = True
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val["loss"],
            "val_nll": val_loss,
            **{f"val_{k}": v for k, v in val.get("metrics", {}).items() if k != "n"},
            "lr": optimizer.param_groups[0]["lr"],
            "train_seconds": train_seconds,
            "samples_per_second": seen * world / max(train_seconds, 1e-9),
            "epoch_seconds": time.perf_counter() - t_epoch,
            "peak_rss_mb": _peak_rss_mb(),
        }
        history.append(row)
        say(
            f"epoch {epoch + 1}: train loss {train_loss:.4f}, val nll {val_loss:.4f}"
            + (f", val acc@1 {row['val_acc@1']:.2f}" if "val_acc@1" in row else "")
            + f", {row['train_seconds']:.1f} s train, {row['samples_per_second']:.0f} samples/s"
        )
        if is_main:
            atomic_save(
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "early_stopping": early,
                    "best_model": best_state,
                    "history": history,
                    "rng": get_rng_state(),
                    "config": cfg,
                },
                run_dir / CKPT,
            )
            _write_history(run_dir, history)
    if early["stopped"]:
        say(f"early stopping: no improvement for {tcfg['early_stopping_patience']} epochs")

    test = None
    if is_main:
        if best_state is not None:
            model.load_state_dict(best_state)
        _plot(run_dir, history)
        test = _final_test(model, test_set, cfg, device, run_dir, progress)
        say(f"test ({len(test_set)} samples, best epoch {early['best_epoch']}):")
        say(format_table({"test": test}))
        say(f"run directory: {run_dir}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return RunResult(run_dir=run_dir, history=history, test=test, params=params)


def _final_test(model, test_set, cfg, device, run_dir: Path, progress: bool) -> dict:
    tcfg = cfg["train"]
    res = evaluate_model(
        model,
        test_set,
        tcfg["eval_batch_size"],
        device,
        float(tcfg["label_smoothing"]),
        progress=progress,
        desc="test",
    )
    test = {**res["metrics"], "nll": res["nll"]}
    atomic_write_text(run_dir / "test_table.md", format_table({"test": test}) + "\n")
    per_user = per_user_metrics(res["ranks"], res["top"], res["y"], res["user"])
    atomic_write_text(
        run_dir / "per_user.csv",
        per_user.to_csv(index=False, float_format="%.4f", lineterminator="\n"),
    )
    # last: its presence marks a finished run (compare_heads --reuse, a fresh run's refusal)
    atomic_write_text(run_dir / "test_metrics.json", json.dumps(test, indent=2) + "\n")
    return test


def _write_history(run_dir: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    tmp = run_dir / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, run_dir / "metrics.csv")
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(history, indent=2) + "\n")
    os.replace(tmp, run_dir / "metrics.json")


def _plot(run_dir: Path, history: list[dict]) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in history], "o-", label="train loss (smoothed)")
    a.plot(ep, [r["val_nll"] for r in history], "o-", label="validation NLL")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(ep, [r["train_seconds"] for r in history], "o-", label="train s/epoch")
    b.set_ylabel("seconds")
    for key in ("val_acc@1", "val_acc@5", "val_acc@10", "val_mrr"):
        if key in history[0]:
            if key == "val_acc@1":
                b.cla()
                b.set_ylabel("validation %")
            b.plot(ep, [r[key] for r in history], "o-", label=key[4:])
    b.set_xlabel("epoch")
    b.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)


def evaluate_run(
    run_dir: str | os.PathLike,
    split: str = "test",
    which: str = "best",
    overrides: list[str] | None = None,
    echo=print,
) -> dict:
    """Re-evaluate a run's checkpoint (``which``: ``best`` or ``last`` epoch) on a split;
    writes ``<split>_metrics_eval.json`` and returns the metrics."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)
    ckpt = load_checkpoint(run_dir / CKPT)
    device = torch.device(cfg["train"]["device"])
    data = load_data(cfg["data"], progress=bool(cfg["train"]["progress"]))
    model = build_model(cfg["model"], data)
    state = (
        ckpt["best_model"] if which == "best" and ckpt["best_model"] is not None else ckpt["model"]
    )
    model.load_state_dict(state)
    model.to(device)
    samples = {"train": data.train, "validation": data.validation, "test": data.test}[split]
    res = evaluate_model(
        model,
        MobilityDataset(samples, max_len=cfg["data"]["max_len"]),
        cfg["train"]["eval_batch_size"],
        device,
        float(cfg["train"]["label_smoothing"]),
        progress=bool(cfg["train"]["progress"]),
        desc=split,
    )
    out = {**res["metrics"], "nll": res["nll"]}
    atomic_write_text(run_dir / f"{split}_metrics_eval.json", json.dumps(out, indent=2) + "\n")
    echo(format_table({f"{split} ({which})": out}))
    return out


__all__ += ["METRIC_NAMES"]
