"""Where a trained model's Acc@1 is lost: test targets by where they can be found, and what the
count baselines get right that the model does not.

For each run directory (``hsoftmax train`` output), on its own data's test split:

* targets in three groups: **in the window** (a location of the sample's own history window),
  **in the user's training targets only** (not in the window, but among the locations the user
  went to in the training split), **neither** (new for this user); each group's share and the
  model's Acc@1 on it;
* the Acc@1 of the count baselines of :mod:`hsoftmax.data.baselines` (``most_frequent``,
  ``markov``, ``context_markov``: the Markov chain also keyed by the target weekday and the
  two-hour slot in which the last stay ends), their Acc@1 on each group, and the share of test
  samples a baseline gets right and the model wrong: a lower bound on what the model leaves.

    PYTHONPATH=. python experiments/error_analysis.py experiments/results/diy/runs/RUN [RUN ...] \\
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from hsoftmax.data import MobilityDataset
from hsoftmax.data.baselines import predict
from hsoftmax.training import load_run
from hsoftmax.training.config import load_config
from hsoftmax.training.data import load_data
from hsoftmax.training.evaluate import evaluate_model

BASELINES = ("most_frequent", "markov", "context_markov")


def target_groups(train, test) -> dict[str, np.ndarray]:
    """Boolean masks over the test samples: ``window``, ``user_train`` (not in the window, in the
    user's training targets), ``new`` (neither)."""
    y = np.asarray(test.y, dtype=np.int64)
    in_window = np.fromiter(
        (y[i] in test.loc[test.hist_start[i] : test.hist_end[i]] for i in range(len(y))),
        dtype=bool,
        count=len(y),
    )
    span = int(max(train.y.max(initial=0), y.max(initial=0))) + 1
    seen = np.unique(np.asarray(train.sample_user, np.int64) * span + train.y)
    in_user = np.isin(np.asarray(test.sample_user, np.int64) * span + y, seen)
    return {"window": in_window, "user_train": ~in_window & in_user, "new": ~in_window & ~in_user}


def analyse(run_dir: Path, batch_size: int = 512) -> dict:
    cfg = load_config(run_dir / "config.yaml")
    data = load_data(cfg["data"], progress=False)
    model = load_run(run_dir, data=data)
    test = data.test
    result = evaluate_model(model, MobilityDataset(test), batch_size, torch.device("cpu"))
    y = np.asarray(test.y, dtype=np.int64)
    right = result["top"].numpy() == y
    groups = target_groups(data.train, test)
    out = {
        "run": str(run_dir),
        "n": len(y),
        "acc@1": 100 * right.mean(),
        "groups": {
            g: {"share": 100 * m.mean(), "model_acc@1": 100 * right[m].mean() if m.any() else 0.0}
            for g, m in groups.items()
        },
        "baselines": {},
    }
    for name in BASELINES:
        top1 = np.array([p[0] if len(p) else -1 for p in predict(name, data.train, test,
                                                                  data.n_locations)])  # fmt: skip
        b_right = top1 == y
        out["baselines"][name] = {
            "acc@1": 100 * b_right.mean(),
            "by_group": {g: 100 * b_right[m].mean() if m.any() else 0.0 for g, m in groups.items()},
            "right_where_model_wrong": 100 * (b_right & ~right).mean(),
            "either_right": 100 * (b_right | right).mean(),
        }
    return out


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines += [
            f"**{r['run']}**: {r['n']:,} test samples, model Acc@1 {r['acc@1']:.2f}",
            "",
            "| targets | share % | model Acc@1 | "
            + " | ".join(f"{b} Acc@1" for b in BASELINES)
            + " |",
            "|---|---|---|" + "---|" * len(BASELINES),
        ]
        for g, v in r["groups"].items():
            cells = " | ".join(f"{r['baselines'][b]['by_group'][g]:.2f}" for b in BASELINES)
            lines.append(f"| {g} | {v['share']:.2f} | {v['model_acc@1']:.2f} | {cells} |")
        cells = " | ".join(f"{r['baselines'][b]['acc@1']:.2f}" for b in BASELINES)
        lines.append(f"| all | 100 | {r['acc@1']:.2f} | {cells} |")
        cells = " | ".join(f"{r['baselines'][b]['right_where_model_wrong']:.2f}" for b in BASELINES)
        lines += [f"| baseline right, model wrong | | | {cells} |", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [analyse(run) for run in args.runs]
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
