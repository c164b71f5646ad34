"""Exact top-10 and rank of a trained tree head as the vocabulary grows: V = 15,584 .. 1,000,000.

    python experiments/scale_topk.py --out experiments/results/scale_topk.json

For each tree arity (``--arities``: balanced trees, 16 by default) and V, one process trains
a ``HierarchicalSoftmax`` head (D = 112, the seed model's d_model) row-sparse
(``sparse_grad=True``, a sparse ``nn.Embedding`` producing the hidden state,
:class:`hsoftmax.optim.SparseAdamW`) on a task whose hidden state is a learned function of the
target: targets ``y`` are Zipf-distributed over the V classes (exponent 1, ids permuted), the
input is ``y`` itself with probability 0.8 and a uniform class otherwise, and the hidden state is
the input's embedding.  The trained head is therefore peaked where it has seen data, as a trained
model's is, not uniform; the rows with a random input get little more than the prior (the
search's hardest case), and their search time is reported apart.

On a fresh batch of 256 hidden states it then checks that ``head.topk(h, 10)`` and
``head.rank(h, y)`` equal brute force: ``torch.topk`` over ``head.log_prob_all(h)`` (every class
scored, in row chunks) and a comparison count over the same matrix.  ``log_prob_all`` sums a
path's terms in another order than the search, so classes within float rounding of each other
(1e-5) may swap; such rows are counted apart from exact agreement, never hidden in it.

Timing and memory: two child processes each load the batch and time one query (CPU time of the
process, ``time.process_time``, robust when other jobs share the cores; wall time too), medians
over ``--reps``: the tree head's exact ``topk(h, 10)`` and ``rank(h, y)`` (the trained head), and a
dense head of the same D: ``torch.topk(F.linear(h, W, b), 10)`` and
``1 + (logits > logits[y]).sum()``.  ``topk_extra_mb`` is the peak resident memory of the child
during its top-k queries (the kernel's high-water mark, reset before them) minus its resident
memory before them (what the query itself needs,
one-time tables included), ``extra_mb`` the same over top-k and rank;
``peak_rss_mb`` the child's whole peak (parameters included).  Threads: ``--threads`` (1 by
default) for both heads.  Quote ratios with the CPU named (``lscpu``).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (15_584, 100_000, 1_000_000)
D, B, K = 112, 256, 10


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_high_water_mark() -> None:
    # Linux: "5" resets the process's peak resident set size (VmHWM), so the peak read after a
    # query is that query's, not the loading's (which holds the state dict and the head at once)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _high_water_mark_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _draw(v: int, n: int, gen):
    import torch

    # Zipf(1) popularity over a fixed random permutation of the ids
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(1))
    weights = 1.0 / torch.arange(1, v + 1, dtype=torch.float64)
    y = perm[torch.multinomial(weights, n, replacement=True, generator=gen)]
    noisy = torch.rand(n, generator=gen) >= 0.8
    ctx = torch.where(noisy, torch.randint(v, (n,), generator=gen), y)
    return ctx, y


def _train(v: int, arity: int, steps: int, threads: int, workdir: Path) -> dict:
    import torch

    from hsoftmax import HierarchicalSoftmax, Tree
    from hsoftmax.optim import SparseAdamW

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.Embedding(v, D, sparse=True)
    torch.nn.init.normal_(emb.weight, std=0.1)
    head = HierarchicalSoftmax(D, Tree.balanced(v, arity), sparse_grad=True)
    opt = SparseAdamW([*emb.parameters(), *head.parameters()], lr=1e-2, weight_decay=0.0)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        ctx, y = _draw(v, B, gen)
        loss = head(emb(ctx), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    train_s = time.perf_counter() - t0

    ctx, y = _draw(v, B, gen)
    with torch.no_grad():
        h = emb(ctx).detach()
    values, ids = head.topk(h, K)
    ranks = head.rank(h, y)
    # brute force: every class scored, then torch.topk and a comparison count
    bf_values, bf_ids, bf_ranks, near_y = [], [], [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for rows in torch.split(torch.arange(B), 16):
            lp = head.log_prob_all(h[rows])
            val, idx = torch.topk(lp, K, dim=1)
            bf_values.append(val)
            bf_ids.append(idx)
            lp_y = lp.gather(1, y[rows, None])
            ties_before = (lp == lp_y) & (torch.arange(v)[None, :] < y[rows, None])
            bf_ranks.append(1 + (lp > lp_y).sum(1) + ties_before.sum(1))
            near_y.append(((lp - lp_y).abs() <= 1e-5).sum(1) - 1)
    brute_s = time.perf_counter() - t0
    bf_values, bf_ids, bf_ranks = torch.cat(bf_values), torch.cat(bf_ids), torch.cat(bf_ranks)
    near_y = torch.cat(near_y)
    same_ids = (ids == bf_ids).all(1)
    # a row whose id lists differ only where brute-force values tie (within float rounding of
    # the two evaluation orders) is not an error of the search; count those separately
    near_tie = torch.zeros(B, dtype=torch.bool)
    for r in torch.nonzero(~same_ids).flatten().tolist():
        near_tie[r] = torch.allclose(values[r], bf_values[r], rtol=0, atol=1e-5)
    clean = ctx == y  # the rows whose input is the target itself (the others: a random class)
    torch.save({"h": h, "y": y, "clean": clean, "head": head.state_dict()}, workdir / "query.pt")
    return {
        "V": v,
        "arity": arity,
        "train_steps": steps,
        "train_s": train_s,
        "loss_first10": statistics.mean(losses[:10]),
        "loss_last10": statistics.mean(losses[-10:]),
        "top1_prob_mean": float(values[:, 0].exp().mean()),
        "top1_prob_mean_clean_rows": float(values[clean, 0].exp().mean()),
        "top1_prob_mean_noisy_rows": float(values[~clean, 0].exp().mean()),
        "clean_rows": int(clean.sum()),
        "topk_rows_equal_brute_force": int(same_ids.sum()),
        "topk_rows_differing_only_at_ties": int(near_tie.sum()),
        "topk_max_abs_value_diff": float((values - bf_values).abs().max()),
        "rank_rows_equal_brute_force": int((ranks == bf_ranks).sum()),
        "rank_max_abs_diff": int((ranks - bf_ranks).abs().max()),
        # rows whose rank differs by no more than the number of classes within 1e-5 of the
        # target's log-prob: the search compares the path kernel's bits, log_prob_all its own
        "rank_rows_differing_only_at_ties": int(
            ((ranks != bf_ranks) & ((ranks - bf_ranks).abs() <= near_y)).sum()
        ),
        "rows": B,
        "brute_force_s": brute_s,
        "peak_rss_mb": _peak_mb(),
    }


def _query(kind: str, threads: int, reps: int, workdir: Path) -> dict:
    import torch
    import torch.nn.functional as F

    from hsoftmax import HierarchicalSoftmax

    torch.set_num_threads(threads)
    saved = torch.load(workdir / "query.pt")
    h, y, saved_clean = saved["h"], saved["y"], saved["clean"]
    if kind == "tree":
        head = HierarchicalSoftmax.from_state_dict(saved["head"])
        v = head.num_leaves
        del saved

        def topk():
            return head.topk(h, K)

        def rank():
            return head.rank(h, y)

    else:
        v = HierarchicalSoftmax.from_state_dict(saved["head"]).num_leaves
        del saved
        torch.manual_seed(0)
        weight = torch.randn(v, D) * D**-0.5
        bias = torch.zeros(v)

        def topk():
            return torch.topk(F.linear(h, weight, bias), K, dim=1)

        def rank():
            logits = F.linear(h, weight, bias)
            return 1 + (logits > logits.gather(1, y[:, None])).sum(1)

    gc.collect()
    _reset_high_water_mark()
    before = _rss_mb()
    out = {"V": v, "head": kind}
    with torch.no_grad():
        for name, fn in (("topk", topk), ("rank", rank)):
            fn()  # warm-up
            cpu, wall = [], []
            for _ in range(reps):
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
            out[f"{name}_ms"] = 1000 * statistics.median(cpu)
            out[f"{name}_wall_ms"] = 1000 * statistics.median(wall)
            # peak memory only grows: after top-k it is top-k's, after rank the larger of both
            out[f"{name}_extra_mb"] = _high_water_mark_mb() - before
    out["extra_mb"] = _high_water_mark_mb() - before
    out["peak_rss_mb"] = _peak_mb()
    if kind == "tree":
        # the search's cost depends on how peaked each row's distribution is: time the rows
        # whose input is the target and the rows with a random input apart (ms per row)
        clean = saved_clean
        with torch.no_grad():
            for part, rows in (("clean", clean), ("noisy", ~clean)):
                hp = h[rows]
                cpu = []
                for _ in range(reps):
                    c0 = time.process_time()
                    head.topk(hp, K)
                    cpu.append(time.process_time() - c0)
                out[f"topk_ms_per_row_{part}"] = 1000 * statistics.median(cpu) / len(hp)
    return out


def _child(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--arities", type=int, nargs="+", default=[16], help="balanced trees")
    p.add_argument("--steps", type=int, default=300, help="training steps of the head")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    p.add_argument("--train", type=int, metavar="V", help=argparse.SUPPRESS)
    p.add_argument("--query", choices=("tree", "dense"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--arity", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.train:
        print(json.dumps(_train(args.train, args.arity, args.steps, args.threads, args.workdir)))
        return
    if args.query:
        print(json.dumps(_query(args.query, args.threads, args.reps, args.workdir)))
        return
    common = ["--threads", str(args.threads), "--reps", str(args.reps)]
    rows = []
    for arity in args.arities:
        for v in args.sizes:
            with tempfile.TemporaryDirectory(prefix="hsoftmax-topk-") as tmp:
                wd = ["--workdir", tmp]
                train = ["--train", str(v), "--arity", str(arity), "--steps", str(args.steps)]
                row = _child([*train, *common, *wd])
                row["tree"] = _child(["--query", "tree", *common, *wd])
                row["dense"] = _child(["--query", "dense", *common, *wd])
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # after every row: a long run cut short keeps its finished rows
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(
        "\n| arity | V | top-10 rows = brute force | tree top-10 (ms) | dense top-10 (ms) "
        "| tree rank (ms) "
        "| dense rank (ms) | extra MB tree / dense |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, d = r["tree"], r["dense"]
        print(
            f"| {r['arity']} | {r['V']:,} | {r['topk_rows_equal_brute_force']} / {r['rows']} | "
            f"{t['topk_ms']:.1f} | {d['topk_ms']:.1f} | {t['rank_ms']:.1f} | {d['rank_ms']:.1f} | "
            f"{t['extra_mb']:.0f} / {d['extra_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
