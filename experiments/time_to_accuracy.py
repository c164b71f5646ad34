"""Time to accuracy: validation Acc@1 and NLL against training time and samples, every head.

Trains each configuration (``compare_heads.py``'s, plus convergence levers appended as
``+prior``, ``+headlr2``, ``+warmup``...) with the validation curve taken every
``--eval-every`` training samples on a fixed subset of ``--eval-samples`` validation samples
(``train.eval_every_samples``, ``train.eval_samples``), each run in its own ``hsoftmax train``
process, one after the other (``--jobs 2``: two at a time, in the order configuration by
configuration, seed by seed, so a configuration's two seeds run side by side; give each run
``--set train.num_threads=1`` on a 2-core machine). Then it writes, under ``--out``:

* ``table.md``: per configuration the time (training seconds, evaluations excluded) and the
  samples to reach the target -- the best dense configuration's best validation Acc@1 on the
  curve minus 0.1 -- their ratio to that dense configuration's, the best validation Acc@1
  within half the dense configuration's time to the target, the best validation Acc@1,
  and the test metrics of the run's best epoch (lowest validation NLL, as the trainer tests);
* ``curves.png``: validation Acc@1 against training seconds, every run on one axes;
* ``results.json``: the curves and test metrics of every run.

Runs are cached per configuration and seed: a finished run directory with the same settings
is reused, an interrupted one resumed (its checkpoint), so the command can be rerun after an
interruption or with more configurations. A proxy of a preset (fewer users, fewer epochs):

    python experiments/time_to_accuracy.py --preset diy --users 150 --epochs 8 --seeds 0 \\
        --out experiments/results/tta-proxy --set train.num_threads=1 \\
        --configs dense+mixture hs-kmeans128+mixture+nodes hs-kmeans128+mixture+nodes+prior
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_heads import CONFIGS, _check_reused  # noqa: E402
from compare_heads import _result as _run_summary  # noqa: E402

# convergence levers: a suffix of a configuration's name -> its overrides
LEVERS: dict[str, list[str]] = {
    "prior": ["model.prior_init=true"],  # bias at the training targets' unigram prior
    "headlr2": ["train.head_lr_mult=2"],
    "headlr4": ["train.head_lr_mult=4"],
    "warmup": ["train.warmup_steps=200"],
    "nofused": ["train.fused_adamw=false"],
    "lr2": ["train.lr=0.002"],  # twice the packaged learning rate (1e-3)
    "layers2": ["model.num_layers=2"],  # half the packaged encoder depth (4 layers)
    "layers3": ["model.num_layers=3"],
}


def overrides_of(name: str) -> list[str]:
    """A configuration's overrides: the longest known base name, then ``+lever`` suffixes."""
    parts = name.split("+")
    for cut in range(len(parts), 0, -1):
        base = "+".join(parts[:cut])
        if base in CONFIGS and all(p in LEVERS for p in parts[cut:]):
            return [*CONFIGS[base], *(o for p in parts[cut:] for o in LEVERS[p])]
    raise ValueError(
        f"unknown configuration {name!r}: a compare_heads configuration followed by "
        f"+lever suffixes ({', '.join(LEVERS)})"
    )


def time_to_target(curve: list[dict], target: float) -> tuple[float | None, int | None]:
    """(training seconds, samples) at the first curve point whose validation Acc@1 reaches
    ``target``; (None, None) if none does."""
    for point in curve:
        if point["val_acc@1"] >= target:
            return point["train_seconds"], point["samples"]
    return None, None


def best_by(curve: list[dict], seconds: float) -> float:
    """The best validation Acc@1 on the curve within ``seconds`` of training."""
    return max(p["val_acc@1"] for p in curve if p["train_seconds"] <= seconds)


def target_of(results: list[dict]) -> tuple[float, str]:
    """The target: the best dense configuration's best validation Acc@1 (mean over its seeds of
    each run's best point) minus 0.1; and that configuration's name."""
    best: dict[str, list[float]] = {}
    for r in results:
        if r["config"].startswith("dense"):
            best.setdefault(r["config"], []).append(max(p["val_acc@1"] for p in r["curve"]))
    if not best:
        raise SystemExit("the target needs at least one dense configuration (--configs dense...)")
    name = max(best, key=lambda k: statistics.mean(best[k]))
    return statistics.mean(best[name]) - 0.1, name


def _sets(name: str, seed: int, args, run_dir: Path) -> list[str]:
    return [
        f"output.run_dir={run_dir}",
        "train.progress=false",
        "train.val_metrics=false",
        f"data.preset={args.preset}",
        f"train.epochs={args.epochs}",
        f"train.seed={seed}",
        f"train.eval_every_samples={args.eval_every}",
        f"train.eval_samples={args.eval_samples}",
        *([f"data.users={args.users}"] if args.users else []),
        *overrides_of(name),
        *args.set,
    ]


def run_one(name: str, seed: int, args, out: Path) -> dict:
    from hsoftmax.training.config import load_config

    run_dir = out / "runs" / f"{name}-seed{seed}"
    sets = _sets(name, seed, args, run_dir)
    expected = load_config(args.config, sets)
    if (run_dir / "test_metrics.json").exists():
        _check_reused(run_dir, expected)
        return _result(name, seed, run_dir)
    if (run_dir / "ckpt.pt").exists():
        _check_reused(run_dir, expected)
        cmd = ["-m", "hsoftmax", "train", "--resume", str(run_dir)]
    else:
        cmd = ["-m", "hsoftmax", "train", "--config", args.config]
    for s in sets:
        cmd += ["--set", s]
    # the child imports the hsoftmax this script imports (a checkout or the installed package)
    import hsoftmax

    env = dict(os.environ)
    root = str(Path(hsoftmax.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{name} seed {seed} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    print(f"{name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return _result(name, seed, run_dir)


def _result(name: str, seed: int, run_dir: Path) -> dict:
    """compare_heads' summary of a run, with its validation curve and training totals."""
    history = json.loads((run_dir / "metrics.json").read_text())
    return {
        **_run_summary(name, seed, run_dir, wall_seconds=None),
        "curve": json.loads((run_dir / "curve.json").read_text()),
        "train_seconds": sum(r["train_seconds"] for r in history),
        "samples_per_second": statistics.median(r["samples_per_second"] for r in history),
    }


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _reach(rows: list[dict], target: float) -> tuple[float | None, float | None, int]:
    """(mean seconds, mean samples) to ``target`` over the runs that reached it, and their
    number; (None, None, 0) if none did."""
    hits = [h for h in (time_to_target(r["curve"], target) for r in rows) if h[0] is not None]
    return _mean([s for s, _ in hits]), _mean([n for _, n in hits]), len(hits)


def _half(rows: list[dict], dense_seconds: float | None) -> float | None:
    """The acceptance measure also when the target is not reached: the runs' mean best
    validation Acc@1 within half of the dense configuration's time to the target."""
    if not dense_seconds:
        return None
    return _mean([best_by(r["curve"], dense_seconds / 2) for r in rows])


def table(results: list[dict], target: float, dense_name: str) -> str:
    """One row per configuration (means over its seeds)."""
    dense_s, dense_n, _ = _reach([r for r in results if r["config"] == dense_name], target)
    columns = (
        "configuration", "seeds", "epochs", "samples/s", "s to target", "samples to target",
        "time / dense's", "samples / dense's", "val Acc@1 by half dense's time",
        "best val Acc@1", "test Acc@1", "test Acc@5", "test MRR", "test NLL",
    )  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]

    def fmt(x, spec):
        return "–" if x is None else format(x, spec)

    for name in dict.fromkeys(r["config"] for r in results):
        rows = [r for r in results if r["config"] == name]
        # the mean over the seeds that reached the target, with their number if not all did
        secs, nums, k = _reach(rows, target)
        some = "" if k == len(rows) else f" ({k}/{len(rows)} seeds)"
        cells = [
            name,
            str(len(rows)),
            "/".join(str(r["epochs"]) for r in rows),
            f"{statistics.mean(r['samples_per_second'] for r in rows):.0f}",
            "not reached" if secs is None else f"{secs:.0f}{some}",
            "–" if nums is None else f"{nums:,.0f}{some}",
            fmt(secs / dense_s if secs is not None and dense_s else None, ".2f"),
            fmt(nums / dense_n if nums is not None and dense_n else None, ".2f"),
            fmt(_half(rows, dense_s), ".2f"),
            f"{statistics.mean(max(p['val_acc@1'] for p in r['curve']) for r in rows):.2f}",
            *(
                f"{statistics.mean(r['test'][m] for r in rows):.{d}f}"
                for m, d in (("acc@1", 2), ("acc@5", 2), ("mrr", 2), ("nll", 3))
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dense_counterpart(name: str) -> str | None:
    """The dense configuration with a tree configuration's history and levers: the tree and what
    only a tree has (node smoothing, frequent classes at the root) dropped
    (``hs-kmeans128+mixture+nodes+memory`` -> ``dense+mixture+memory``, ``hs-kmeans128`` ->
    ``dense``, ``hs-kmeans128+nodes+frequent1000`` -> ``dense``); None for a dense one."""
    head, *rest = name.split("+")
    if not head.startswith("hs-"):
        return None
    tree_only = [p for p in rest if p == "nodes" or p.startswith("frequent")]
    return "+".join(["dense", *(p for p in rest if p not in tree_only)])


def pairs_table(results: list[dict]) -> str:
    """Each tree configuration against its dense counterpart, when both ran: the target is the
    counterpart's best validation Acc@1 (mean over its seeds) - 0.1, as in ``target_of``."""
    names = list(dict.fromkeys(r["config"] for r in results))
    columns = (
        "tree configuration", "dense counterpart", "target", "tree s to target",
        "dense s to target", "time / dense's", "val Acc@1 by half dense's time: tree / dense",
        "test Acc@1: tree / dense", "test MRR: tree / dense",
    )  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for name in names:
        dense = dense_counterpart(name)
        if dense in names:
            lines.append("| " + " | ".join(_pair_cells(results, name, dense)) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _pair_cells(results: list[dict], tree: str, dense: str) -> list[str]:
    runs = {n: [r for r in results if r["config"] == n] for n in (tree, dense)}
    target, _ = target_of(runs[dense])
    reach, seeds = {}, {}
    for n, rs in runs.items():  # mean over the seeds that reached the target
        reach[n], _, k = _reach(rs, target)
        seeds[n] = f"{k}/{len(rs)} seeds"
    half = {n: _half(rs, reach[dense]) for n, rs in runs.items()}
    test = {
        (n, m): statistics.mean(r["test"][m] for r in rs)
        for n, rs in runs.items()
        for m in ("acc@1", "mrr")
    }
    return [
        tree,
        dense,
        f"{target:.2f}",
        *(
            "not reached" if reach[n] is None else f"{reach[n]:.0f} ({seeds[n]})"
            for n in (tree, dense)
        ),
        "–" if reach[tree] is None or not reach[dense] else f"{reach[tree] / reach[dense]:.2f}",
        " / ".join("–" if half[n] is None else f"{half[n]:.2f}" for n in (tree, dense)),
        *(" / ".join(f"{test[n, m]:.2f}" for n in (tree, dense)) for m in ("acc@1", "mrr")),
    ]


def plot(results: list[dict], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {}
    for r in results:
        colour = colours.setdefault(r["config"], f"C{len(colours) % 10}")
        xs = [p["train_seconds"] for p in r["curve"]]
        ys = [p["val_acc@1"] for p in r["curve"]]
        label = r["config"] if r["seed"] == min(q["seed"] for q in results) else None
        ax.plot(xs, ys, color=colour, label=label, linestyle="-" if r["seed"] % 2 == 0 else "--")
    ax.axhline(target, color="k", linewidth=0.8, linestyle=":", label=f"target {target:.2f}")
    ax.set_xlabel("training seconds (evaluations excluded)")
    ax.set_ylabel("validation Acc@1 (%)")
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    lo = min(min(p["val_acc@1"] for p in r["curve"][1:] or r["curve"]) for r in results)
    ax.set_ylim(max(0.0, lo - 2), None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="diy", choices=("diy", "diy-100k", "geolife", "small"))
    p.add_argument(
        "--config",
        default=None,
        help="training config (default: the preset's; diy for diy-100k, demo for small)",
    )
    p.add_argument("--users", type=int, default=None, help="data.users: a proxy with fewer users")
    p.add_argument("--epochs", type=int, default=100, help="at most (early stopping applies)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--configs", nargs="+", default=["dense+mixture", "hs-kmeans128+mixture+nodes"])
    p.add_argument("--eval-every", type=int, default=16384, help="training samples per point")
    p.add_argument("--eval-samples", type=int, default=2000, help="validation samples per point")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each its own process)")
    p.add_argument(
        "--note", default="", help="appended to the machine in the header (e.g. its load)"
    )
    p.add_argument("--out", default=None, help="default experiments/results/tta-<preset>")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    args.config = args.config or {"small": "demo", "diy-100k": "diy"}.get(args.preset, args.preset)
    for name in args.configs:
        try:
            overrides_of(name)
        except ValueError as e:
            p.error(str(e))
    out = Path(args.out or f"experiments/results/tta-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    todo = [(name, seed) for name in args.configs for seed in args.seeds]
    if args.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:  # each run is a child process
            results = list(pool.map(lambda job: run_one(*job, args, out), todo))
    else:
        results = [run_one(name, seed, args, out) for name, seed in todo]
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    target, dense_name = target_of(results)
    proxy = f", users 1..{args.users}" if args.users else ""
    header = (
        f"preset {args.preset}{proxy}, epochs <= {args.epochs}, seeds {args.seeds}, a point "
        f"every {args.eval_every:,} training samples on {args.eval_samples:,} validation "
        f"samples, overrides {args.set or 'none'}, {args.jobs} run(s) at a time; "
        f"on {_machine()}{args.note}.\n"
        f"Target: {dense_name}'s best validation Acc@1 - 0.1 = {target:.2f}. Time: training "
        "seconds to the first point at or above it (evaluations excluded); test: the best "
        "epoch (lowest validation NLL)."
    )
    text = table(results, target, dense_name)
    pairs = pairs_table(results)
    if pairs:
        text += (
            "\n\nEach tree configuration against the dense one with the same history (its "
            "target: that dense configuration's best validation Acc@1 - 0.1):\n\n" + pairs
        )
    (out / "table.md").write_text(f"{header}\n\n{text}\n")
    plot(results, target, out / "curves.png", header.split(";")[0])
    print(header)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
