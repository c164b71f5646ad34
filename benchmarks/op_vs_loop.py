"""The op's forward + backward against a hand-written C++ loop and against dense, in one run.

    PYTHONPATH=. python benchmarks/op_vs_loop.py [--rounds 30] [--threads 2]
                                                 [--json docs/op-vs-loop.json] [--system-malloc]
                                                 [--split]

Setting (the README's headline figure): V = 15,584, D = 112, B = 1,024, float32, 2 threads, the
balanced binary tree, mean NLL loss, gradients for hidden, weight and bias (dense), uniform
targets. Contenders, each a full training step of the output layer (forward, backward, fresh
gradient tensors):

* ``hsoftmax``: ``-path_log_prob(h, W, b, tree, y).mean()`` then ``.backward()`` (autograd).
* ``plain loop, autograd``: benchmarks/plain_loop.cpp (per-row path dots and ``log1p(exp)``,
  the weight gradient accumulated by threads that each own a range of rows; ``at::parallel_for``),
  compiled ``-O3 -march=native`` into build/plain_loop on first use, behind a
  ``torch.autograd.Function``: the like-for-like baseline of ``hsoftmax``.
* ``hsoftmax kernels``: the op's forward and backward kernels called directly, no autograd, as
  the autograd formula calls them (the forward also sums grad_hidden's basis; the backward
  kernel computes the weight and bias gradients; grad_hidden = gradient * basis).
* ``plain loop``: the loop's two functions called directly: the baseline of the kernels.
* ``dense``: ``F.cross_entropy(F.linear(h, W, b), y)`` then ``.backward()``.

``--split`` times the kernels apart instead: the op's and the loop's forward, and their backward;
the op's as training runs them and without the basis (the forward as evaluation runs it, the
backward kernel computing all three gradients).

Before timing, the loop's loss and gradients are checked against the op's. The contenders are
timed interleaved, in blocks of ``BLOCK`` calls (dense: one call every ``DENSE_EVERY`` rounds), so
load from other processes on a shared machine falls on all of them alike; min and median per
contender and the ratios are printed as a Markdown table. The script re-runs itself with steady
glibc malloc settings (see ``STEADY_MALLOC``) unless ``--system-malloc`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import cpp_extension

from hsoftmax import Tree
from hsoftmax.ops import path_log_prob

V, D, B = 15_584, 112, 1_024
THREADS = 2
BLOCK = 20  # timed calls of a contender in a row
DENSE_EVERY = 2  # dense is ~500x slower: one timed dense step every this many rounds
ROOT = Path(__file__).resolve().parents[1]
# glibc malloc settings for the run: keep freed blocks up to 32 MB on the heap (no mmap) and never
# trim the heap. By default, whether a step's fresh 7 MB gradient reuses a freed block or
# page-faults on new pages depends on each contender's other allocations (0 to ~500 faults a
# step measured, up to ~0.3 ms): allocator noise, not the kernels. The dense baseline's 64 MB
# logits are still mmapped and faulted, as in training.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def load_plain_loop():
    build = ROOT / "build" / "plain_loop"
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="hsoftmax_plain_loop",
        sources=[str(Path(__file__).with_name("plain_loop.cpp"))],
        # -fopenmp: at::parallel_for runs serially in a translation unit without _OPENMP
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.hsoftmax_plain_loop


def padded_binary_paths(tree: Tree):
    """(V, L) int32 weight rows and float ±1 signs of every leaf's path, and (V,) lengths."""
    c = tree.compiled("cpu")
    depth = (c.leaf_path_ptr[1:] - c.leaf_path_ptr[:-1]).long()
    if int((c.node_row_ptr[1:] - c.node_row_ptr[:-1]).max()) != 1:
        raise ValueError("the plain loop handles binary trees only")
    leaf = torch.repeat_interleave(torch.arange(tree.num_leaves), depth)
    step = torch.arange(leaf.numel()) - c.leaf_path_ptr[leaf]
    rows = torch.zeros(tree.num_leaves, int(depth.max()), dtype=torch.int32)
    sign = torch.zeros(tree.num_leaves, int(depth.max()))
    rows[leaf, step] = c.node_row_ptr[c.path_node.long()]
    sign[leaf, step] = c.path_choice.float() * 2 - 1
    return rows, sign, depth.int()


def kernel_inputs(tree: Tree):
    """The op's tree tables, the loop's padded paths (rows, signs, lengths) and the gradient of
    the mean NLL with respect to each log-prob, shared by every contender."""
    c = tree.compiled("cpu")
    tables = (c.node_row_ptr, c.leaf_path_ptr, c.path_node, c.path_choice)
    grad_lp = torch.full((B,), -1.0 / B)  # d mean(-log p) / d log p
    return (tables, *padded_binary_paths(tree), grad_lp)


def malloc_name(args) -> str:
    return "glibc defaults" if args.system_malloc else "steady malloc"


def write_json(path: Path, args, times) -> None:
    """The timings with the setting, CPU and torch version they were taken with."""
    setting = {"V": V, "D": D, "B": B, "threads": args.threads, "tree": "balanced binary"}
    setting["malloc"] = malloc_name(args)
    record = {"setting": setting, "cpu": cpu_model(), "torch": torch.__version__, "seconds": times}
    path.write_text(json.dumps(record, indent=1) + "\n")


def op_forward(hidden, weight, bias, tables, target, tree, basis=True):
    """The op's forward kernel as training calls it: with grad_hidden's basis (``basis``)."""
    return torch.ops.hsoftmax.path_log_prob_forward(
        hidden, weight, bias, *tables, target, tree.max_path_rows, False, basis
    )


def make_steps(loop, tree, hidden, weight, bias, target):
    """name -> a function running one step and returning (loss, grad h, grad W, grad b)."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    # every contender reads the same memory, so none finds the others' copy evicted from cache
    hidden, weight, bias = h.detach(), w.detach(), b.detach()
    tables, rows, sign, length, grad_lp = kernel_inputs(tree)

    def autograd_step(loss_fn):
        def step():
            for p in (h, w, b):
                p.grad = None
            loss = loss_fn()
            loss.backward()
            return loss, h.grad, w.grad, b.grad

        return step

    # The kernel steps hold their gradients until their next call, as ``.grad`` holds them until
    # the next step's zero_grad: the allocator then sees the same lifetimes in every contender
    # (a freed 7 MB gradient that is reused at once would spare the kernels page faults that a
    # training step pays).
    held: dict[str, tuple] = {}

    def kernels():
        held.pop("kernels", None)
        # inference mode skips the ops' autograd kernels (the backward op's, registered from
        # Python, would add ~0.1 ms of interpreter time to every direct call)
        # as the autograd formula runs them: the forward also sums grad_hidden's basis, the
        # backward kernel computes the weight and bias gradients
        with torch.inference_mode():
            lp, coef, basis = op_forward(hidden, weight, bias, tables, target, tree)
            gh = grad_lp.unsqueeze(1) * basis
            _, gw, gb, _ = torch.ops.hsoftmax.path_log_prob_backward(
                grad_lp, coef, hidden, weight, *tables, target, True, [False, True, True], False
            )
            held["kernels"] = (gh, gw, gb)
            return -lp.mean(), gh, gw, gb

    def plain_loop():
        held.pop("loop", None)
        lp, coef = loop.forward(hidden, weight, bias, rows, sign, length, target)
        gh, gw, gb = loop.backward(grad_lp, coef, hidden, weight, rows, length, target)
        held["loop"] = (gh, gw, gb)
        return -lp.mean(), gh, gw, gb

    class PlainLoop(torch.autograd.Function):
        """The loop behind autograd, as a user would train with it."""

        @staticmethod
        def forward(ctx, h, w, b):
            lp, coef = loop.forward(h, w, b, rows, sign, length, target)
            ctx.save_for_backward(h, w, coef)
            return lp

        @staticmethod
        def backward(ctx, grad):
            h, w, coef = ctx.saved_tensors
            return loop.backward(grad.contiguous(), coef, h, w, rows, length, target)

    return {
        "hsoftmax": autograd_step(lambda: -path_log_prob(h, w, b, tree, target).mean()),
        "plain loop, autograd": autograd_step(lambda: -PlainLoop.apply(h, w, b).mean()),
        "hsoftmax kernels": kernels,
        "plain loop": plain_loop,
        "dense": autograd_step(lambda: F.cross_entropy(F.linear(h, w, b), target)),
    }


def make_split_steps(loop, tree, hidden, weight, bias, target):
    """``--split``: the forward and backward kernels of the op and of the loop timed apart. The
    op's as training runs them (the forward also sums grad_hidden's basis; the backward is the
    weight and bias gradients plus grad_hidden = gradient * basis), and as a direct call
    without the basis runs them (the forward alone, as in evaluation; the backward kernel
    computing all three gradients)."""
    tables, rows, sign, length, grad_lp = kernel_inputs(tree)
    held: dict[str, tuple] = {}  # outputs held until the next call, as in make_steps
    _, coef, basis = op_forward(hidden, weight, bias, tables, target, tree)
    loop_coef = loop.forward(hidden, weight, bias, rows, sign, length, target)[1]

    def forward(with_basis):
        def step():
            held.pop("op forward", None)
            held["op forward"] = op_forward(hidden, weight, bias, tables, target, tree, with_basis)

        return step

    def loop_forward():
        held.pop("loop forward", None)
        held["loop forward"] = loop.forward(hidden, weight, bias, rows, sign, length, target)

    def backward(with_basis):
        mask = [not with_basis, True, True]

        def step():
            held.pop("op", None)
            grads = torch.ops.hsoftmax.path_log_prob_backward(
                grad_lp, coef, hidden, weight, *tables, target, True, mask, False
            )
            gh = grad_lp.unsqueeze(1) * basis if with_basis else grads[0]
            held["op"] = (gh, *grads[1:])

        return step

    def loop_backward():
        held.pop("loop", None)
        held["loop"] = loop.backward(grad_lp, loop_coef, hidden, weight, rows, length, target)

    return {
        "hsoftmax forward": forward(True),
        "plain loop forward": loop_forward,
        "hsoftmax backward": backward(True),
        "plain loop backward": loop_backward,
        "hsoftmax forward, no basis": forward(False),
        "hsoftmax backward, no basis": backward(False),
    }


def check_same(steps) -> None:
    """The loop computes the op's loss and gradients (float32 rounding apart)."""
    names = ("loss", "grad hidden", "grad weight", "grad bias")
    want = [t.detach() for t in steps["hsoftmax"]()]
    for name in ("plain loop, autograd", "hsoftmax kernels", "plain loop"):
        got = [t.detach() for t in steps[name]()]
        for what, x, y in zip(names, got, want, strict=True):
            err = float((x - y).abs().max())
            scale = float(y.abs().max())
            if not err <= 1e-5 * max(scale, 1e-3):
                raise AssertionError(f"{name}: {what} differs from the op by {err:.3g}")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def time_interleaved(steps, rounds: int) -> dict[str, list[float]]:
    """Each round runs every contender for a block of calls (the first untimed), in alternating
    order: blocks spread load drift over all contenders, and within a block each contender finds
    its own data in cache rather than the previous contender's (dense's 64 MB logits flush it)."""
    fast = [n for n in steps if n != "dense"]
    times: dict[str, list[float]] = {n: [] for n in steps}
    for i in range(rounds):
        order = fast if i % 2 == 0 else fast[::-1]
        if i % DENSE_EVERY == 0 and "dense" in steps:
            order = [*order, "dense"]
        for name in order:
            steps[name]()
            for _ in range(1 if name == "dense" else BLOCK):
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
    return times


def split_run(steps, args) -> None:
    """Times the ``--split`` steps and prints their table."""
    for step in steps.values():
        step()
    times = time_interleaved(steps, args.rounds)
    print(f"V={V:,} D={D} B={B}, {args.threads} threads, float32, {cpu_model()}")
    print()
    print("| kernel | min ms | median ms | calls |")
    print("|---|---:|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {min(t) * 1e3:.3f} | {statistics.median(t) * 1e3:.3f} | {len(t)} |")
    print()
    for part in ("forward", "backward"):
        a, b = times[f"hsoftmax {part}"], times[f"plain loop {part}"]
        med, lo = statistics.median(a) / statistics.median(b), min(a) / min(b)
        print(f"hsoftmax {part} / plain loop {part}: {med:.2f}x (medians), {lo:.2f}x (mins)")
    if args.json:
        write_json(args.json, args, times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--json", type=Path, help="also write the timings here")
    parser.add_argument(
        "--split", action="store_true", help="time the forward and backward kernels apart"
    )
    parser.add_argument(
        "--system-malloc", action="store_true", help="keep glibc's default (dynamic) thresholds"
    )
    args = parser.parse_args()
    if not args.system_malloc and any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items()):
        # glibc reads these once, at start-up: run this script again with them set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC})
    torch.set_num_threads(args.threads)
    loop = load_plain_loop()
    g = torch.Generator().manual_seed(0)
    tree = Tree.balanced(V, 2)
    hidden = torch.randn(B, D, generator=g)
    weight = torch.randn(V - 1, D, generator=g) / D**0.5
    bias = torch.randn(V - 1, generator=g) * 0.1
    target = torch.randint(0, V, (B,), generator=g)
    if args.split:
        with torch.inference_mode():
            split_run(make_split_steps(loop, tree, hidden, weight, bias, target), args)
        return
    steps = make_steps(loop, tree, hidden, weight, bias, target)
    check_same(steps)
    for step in steps.values():  # warm-up: allocator, caches, thread pool
        step()
    times = time_interleaved(steps, args.rounds)
    stats = {n: (min(t), statistics.median(t), len(t)) for n, t in times.items()}
    cpu = cpu_model()
    malloc = malloc_name(args)
    print(f"V={V:,} D={D} B={B}, {args.threads} threads, float32, {malloc}, {cpu}")
    print(f"torch {torch.__version__}")
    print()
    print("| fwd+bwd | min ms | median ms | calls |")
    print("|---|---:|---:|---:|")
    for name, (lo, med, n) in stats.items():
        print(f"| {name} | {lo * 1e3:.3f} | {med * 1e3:.3f} | {n} |")
    print()
    pairs = (("hsoftmax", "plain loop, autograd"), ("hsoftmax kernels", "plain loop"))
    for a, b in pairs:
        lo, med = stats[a][0] / stats[b][0], stats[a][1] / stats[b][1]
        print(f"{a} / {b}: {med:.2f}x (medians), {lo:.2f}x (mins)")
    lo, med = stats["dense"][0] / stats["hsoftmax"][0], stats["dense"][1] / stats["hsoftmax"][1]
    print(f"dense / hsoftmax: {med:.0f}x (medians), {lo:.0f}x (mins)")
    if args.json:
        write_json(args.json, args, times)


if __name__ == "__main__":
    main()
