"""Where one training step of the seed model goes: collate, encoder, history, head, optimizer.

Times every phase of ``train_step`` (the trainer's step, taken apart here with the same calls)
for each head on DIY-sized batches (the seed configuration, B = 256, the training set's first
batches in epoch-0 order, length-bucketed as ``train.bucket_batches`` says), after warm-up
steps, as the median over ``--steps`` steps (``step``: their sum), and the mean of the whole
steps (``mean step``: with length bucketing a batch's cost depends on its histories' length,
so the mean over enough steps is what an epoch costs per step):

    python experiments/profile_step.py --preset diy --steps 20 --threads 2 \\
        --configs dense+mixture hs-kmeans128+mixture+nodes

Phases: ``collate`` (sample dicts -> padded tensors), ``encoder`` (embeddings + transformer
forward), ``history`` (pointer scorer, with the user memory if any: the window), ``head`` (the
head's loss with the mixture: forward only), ``backward`` (all of it), ``clip`` (gradient norm
clipping), ``optimizer`` (``zero_grad`` + ``step``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_heads import CONFIGS  # noqa: E402

from hsoftmax.data import MobilityDataset, collate  # noqa: E402
from hsoftmax.data.dataset import batch_context  # noqa: E402
from hsoftmax.models import build_model  # noqa: E402
from hsoftmax.optim import clip_grad_norm_  # noqa: E402
from hsoftmax.training import load_config  # noqa: E402
from hsoftmax.training.data import load_data  # noqa: E402
from hsoftmax.training.loop import epoch_batches, make_optimizer  # noqa: E402

PHASES = ("collate", "encoder", "history", "head", "backward", "clip", "optimizer")


def profile(name: str, args, data) -> dict[str, float]:
    cfg = load_config(args.preset, [*CONFIGS[name], *args.set])
    tcfg = cfg["train"]
    torch.manual_seed(0)
    model = build_model(cfg["model"], data)
    model.train()
    opt = make_optimizer(model, tcfg)  # train.fused_adamw: --set train.fused_adamw=false
    train_set = MobilityDataset(data.train, max_len=cfg["data"]["max_len"])
    bucket = int(tcfg["bucket_batches"])  # length bucketing (train.bucket_batches)
    batches = epoch_batches(
        len(train_set),
        tcfg["batch_size"],
        tcfg["seed"],
        0,
        lengths=train_set.lengths,
        bucket=bucket,
    )
    eps = float(tcfg["label_smoothing"])
    times = {p: [] for p in PHASES}
    for step in range(args.warmup + args.steps):
        idx = batches[step % len(batches)]
        t = [time.perf_counter()]
        batch = collate([train_set[i] for i in idx])
        t.append(time.perf_counter())
        if model.history_kind == "none":
            hidden, window = model.encoder(batch), None
            t.append(time.perf_counter())
        else:
            states = model.encoder(batch, all_positions=True)
            t.append(time.perf_counter())
            last = (batch["mask"].sum(1) - 1).clamp(min=0)
            hidden = states[torch.arange(states.shape[0]), last]
            extra = None
            if model.memory is not None:  # as the model's _encode does in training
                ctx = batch_context(batch) if model.memory.context_count is not None else None
                extra = model.memory(batch["user"], hidden, model.encoder.loc_emb, batch["y"], ctx)
            window = model.output.scorer(batch["x"], batch["mask"], hidden, states, extra)
        t.append(time.perf_counter())
        loss = model.output(hidden, window, batch["y"], label_smoothing=eps)
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        clip_grad_norm_(model.parameters(), float(tcfg["grad_clip"]))
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        if step >= args.warmup:
            for p, a, b in zip(PHASES, t[:-1], t[1:], strict=True):
                times[p].append((b - a) * 1e3)
    out = {p: statistics.median(v) for p, v in times.items()}
    out["mean step"] = statistics.fmean(map(sum, zip(*times.values(), strict=True)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="diy")
    p.add_argument("--users", type=int, default=None, help="data.users (default: all)")
    p.add_argument("--configs", nargs="+", default=["dense+mixture", "hs-kmeans128+mixture+nodes"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, [f"data.users={args.users}"] if args.users else [])
    data = load_data(cfg["data"], progress=False)
    print(
        f"{args.preset}: V = {data.n_locations}, B = {cfg['train']['batch_size']}, "
        f"{args.threads} threads, median of {args.steps} steps (ms), overrides {args.set}"
    )
    tcfg = load_config(args.preset, args.set)["train"]
    lengths = MobilityDataset(data.train, max_len=cfg["data"]["max_len"]).lengths
    batches = epoch_batches(
        len(lengths), tcfg["batch_size"], tcfg["seed"], 0, lengths=lengths,
        bucket=int(tcfg["bucket_batches"]),
    )  # fmt: skip
    padded = sum(int(lengths[b].max()) * len(b) for b in batches) / len(lengths)
    print(
        f"histories of {lengths.mean():.1f} stays on average, padded to {padded:.1f} in epoch 0's "
        f"batches (train.bucket_batches={tcfg['bucket_batches']})"
    )
    print("| configuration | " + " | ".join(PHASES) + " | step | mean step |")
    print("|---" * (len(PHASES) + 3) + "|")
    for name in args.configs:
        ms = profile(name, args, data)
        cells = " | ".join(f"{ms[q]:.1f}" for q in PHASES)
        step = sum(ms[q] for q in PHASES)
        print(f"| {name} | {cells} | {step:.1f} | {ms['mean step']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
