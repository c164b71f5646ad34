"""Self-test of an install: kernel parity checks, then (optionally) the benchmarks.

    python -m hsoftmax.selftest                    # CPU checks; says whether a GPU was found
    python -m hsoftmax.selftest --device cuda      # CPU-vs-CUDA parity of values and gradients
    python -m hsoftmax.selftest --device cuda --bench   # ... then the benchmark suite on CUDA

Every check compares the op against an independent reference and prints the worst error; the
exit code is 0 only if all checks pass. No figure is printed that was not measured here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

import hsoftmax
from hsoftmax import Tree, reference
from hsoftmax.ops import path_log_prob

# (name, tree builder): small enough to finish in seconds, shaped like the real use
TREES = [
    ("binary V=1000", lambda: Tree.balanced(1000, 2)),
    ("ternary V=7", lambda: Tree.balanced(7, 3)),
    ("128-ary V=15584", lambda: Tree.balanced(15_584, 128)),
    ("binary V=15584", lambda: Tree.balanced(15_584, 2)),
]


def _inputs(tree: Tree, batch: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    v = tree.num_leaves
    hidden = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(v - 1, dim, generator=g, dtype=torch.float64) / dim**0.5
    bias = torch.randn(v - 1, generator=g, dtype=torch.float64)
    target = torch.randint(0, v, (batch,), generator=g)
    return hidden, weight, bias, target


def _grads(fn, hidden, weight, bias, tree, target, device, dtype):
    params = [t.to(device=device, dtype=dtype).requires_grad_() for t in (hidden, weight, bias)]
    out = fn(*params, tree, target.to(device))
    upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device)
    grads = torch.autograd.grad(out, params, upstream)
    return [t.detach().double().cpu() for t in (out, *grads)]


def check(device: str, dtype: torch.dtype, batch: int = 257, dim: int = 112) -> bool:
    """Op on `device` vs the float64 plain-PyTorch reference on CPU, for every tree."""
    ok = True
    names = ("log_prob", "grad_hidden", "grad_weight", "grad_bias")
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
    for name, build in TREES:
        tree = build()
        data = _inputs(tree, batch, dim, seed=len(name))
        got = _grads(path_log_prob, *data[:3], tree, data[3], device, dtype)
        want = _grads(reference.path_log_prob, *data[:3], tree, data[3], "cpu", torch.float64)
        for label, a, b in zip(names, got, want, strict=True):
            err = float((a - b).abs().max() / b.abs().max().clamp_min(1.0))
            passed = err <= tol[dtype]
            ok &= passed
            print(
                f"  [{'ok' if passed else 'FAIL'}] {device} {str(dtype)[6:]:8s} {name:16s} "
                f"{label:12s} max rel. error {err:.2e} (tolerance {tol[dtype]:.0e})"
            )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bench", action="store_true", help="then run pytest benchmarks/")
    args = parser.parse_args(argv)
    print(
        f"hsoftmax {hsoftmax.__version__}, torch {torch.__version__}, CUDA kernels built: "
        f"{hsoftmax.has_cuda_kernels()} (CUDA {hsoftmax.cuda_version()})"
    )
    gpu = torch.cuda.is_available()
    print(f"GPU: {torch.cuda.get_device_name() if gpu else 'no GPU found'}")
    ok = True
    print("CPU kernel vs float64 reference:")
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        ok &= check("cpu", dtype)
    if args.device == "cuda":
        if not gpu:
            print("CUDA checks: no GPU found, so nothing on CUDA was run.")
            return 1
        if not hsoftmax.has_cuda_kernels():
            print("CUDA checks: this install has no CUDA kernels (rebuild with FORCE_CUDA=1).")
            return 1
        print("CUDA kernel vs float64 reference (CPU):")
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            ok &= check("cuda", dtype)
    print("self-test:", "PASSED" if ok else "FAILED")
    if ok and args.bench:
        bench = Path(__file__).resolve().parent.parent / "benchmarks"
        if not bench.is_dir():
            print(f"benchmarks/ not found next to the package ({bench}); run from a clone")
            return 1
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            str(bench),
            "--benchmark-only",
            f"--benchmark-json=selftest-bench-{args.device}.json",
        ]
        print("running:", " ".join(cmd))
        return subprocess.call(cmd)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
