"""The benchmark suite: every provider x mode x size, on CPU and (when present) CUDA.

Providers (benchmarks/providers.py): dense Linear + cross-entropy, torch's
AdaptiveLogSoftmaxWithLoss, the plain-PyTorch reference hierarchical softmax, and hsoftmax with
a dense weight gradient and with sparse_grad=True (only the touched rows; CPU).
Modes: fwd (with autograd recording, as in training), bwd (backward of a recorded forward),
fwd+bwd. Sizes: V in {1,187 (Geolife), 15,584 (DIY), 95,569 (Gowalla-sized), 1,000,000},
D in {112, 256}, B in {256, 1,024}. Peak memory of one fwd+bwd is stored with each fwd+bwd
result. Inference (top-10, rank) is timed in test_bench_head.py.

    pytest benchmarks/test_bench_suite.py --benchmark-only --benchmark-json=suite.json
    pytest benchmarks/ --benchmark-only --quick        # V = 15,584, D = 112, B = 1,024 only
    python benchmarks/report.py suite.json --out docs/benchmarks.md --plot docs/benchmarks.png
"""

from __future__ import annotations

import gc
import time

import pytest
import torch
from providers import PROVIDERS, cuda_peak_memory_mb, peak_memory_mb

VOCABS = (1_187, 15_584, 95_569, 1_000_000)
DIMS = (112, 256)
BATCHES = (256, 1_024)
MODES = ("fwd", "bwd", "fwd+bwd")
QUICK = (15_584, 112, 1_024)
TARGET_SECONDS = 1.0  # per benchmark: rounds = TARGET_SECONDS / (one call), clamped to [1, 30]
MEMORY_FRACTION = 0.6  # skip a size whose estimated footprint exceeds this share of RAM
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def estimated_bytes(provider: str, v: int, d: int, b: int) -> int:
    """A deliberately generous estimate: parameters, their gradient and Adam-free extras, plus
    the B x V logits and their gradient for the providers that materialise them."""
    params = 4 * v * d * 2
    logits = 4 * b * v * 3 if provider in ("dense", "adaptive") else 4 * b * 64 * d
    return params + logits


def _ram_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                return int(line.split()[1]) * 1024
    return 1 << 40


def cases():
    for device in DEVICES:
        for v in VOCABS:
            for d in DIMS:
                for provider in PROVIDERS:
                    for b in BATCHES:
                        for mode in MODES:
                            marks = [pytest.mark.quick] if (v, d, b) == QUICK else []
                            yield pytest.param(
                                device,
                                v,
                                d,
                                provider,
                                b,
                                mode,
                                marks=marks,
                                id=f"{device}-{provider}-{mode}-V{v}-D{d}-B{b}",
                            )


_MODEL: dict = {}


def get_model(provider: str, v: int, d: int, device: str) -> torch.nn.Module:
    """One provider instance at a time (a V = 1M layer holds gigabytes)."""
    key = (provider, v, d, device)
    if key not in _MODEL:
        _MODEL.clear()
        gc.collect()
        _MODEL[key] = PROVIDERS[provider](d, v).to(device)
    return _MODEL[key]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device,v,d,provider,b,mode", list(cases()))
def test_output_layer(benchmark, device, v, d, provider, b, mode):
    if provider == "hsoftmax_sparse" and device != "cpu":
        pytest.skip("sparse_grad=True is implemented on CPU only")
    need = estimated_bytes(provider, v, d, b)
    if device == "cpu" and need > MEMORY_FRACTION * _ram_bytes():
        pytest.skip(f"{provider} at V={v}, D={d}, B={b} needs ~{need / 2**30:.1f} GiB: too big")
    model = get_model(provider, v, d, device)
    g = torch.Generator().manual_seed(v + d + b)
    hidden = torch.randn(b, d, generator=g).to(device).requires_grad_()
    target = torch.randint(0, v, (b,), generator=g).to(device)
    params = [hidden, *model.parameters()]

    def zero_grads():
        for p in params:
            p.grad = None

    def fwd():
        loss = model.loss(hidden, target)
        _sync(device)
        return loss

    def fwd_bwd():
        zero_grads()
        model.loss(hidden, target).backward()
        _sync(device)

    def bwd(loss):
        loss.backward()
        _sync(device)

    def bwd_setup():
        zero_grads()
        return (fwd(),), {}

    benchmark.group = f"{device} {mode} D={d} B={b}"
    benchmark.extra_info.update(
        provider=provider, device=device, mode=mode, V=v, D=d, B=b, threads=torch.get_num_threads()
    )
    if mode == "fwd+bwd":
        zero_grads()  # gradients left by an earlier test must not count as already resident
        gc.collect()
        peak = cuda_peak_memory_mb(fwd_bwd) if device == "cuda" else peak_memory_mb(fwd_bwd)
        benchmark.extra_info["peak_mem_mb"] = peak
    # one untimed call: warms caches and sizes the number of rounds
    start = time.perf_counter()
    fwd_bwd()
    once = time.perf_counter() - start
    rounds = int(max(1, min(30, TARGET_SECONDS / max(once, 1e-6))))
    if mode == "fwd":
        benchmark.pedantic(fwd, rounds=rounds, iterations=1, warmup_rounds=1)
    elif mode == "bwd":
        benchmark.pedantic(bwd, setup=bwd_setup, rounds=rounds, warmup_rounds=1)
    else:
        benchmark.pedantic(fwd_bwd, rounds=rounds, iterations=1, warmup_rounds=1)
