"""Distributed data parallel under ``torchrun``: process group, device, gradient averaging.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in ``DistributedDataParallel`` (gloo
on CPU, nccl on CUDA). Each epoch's permutation is split round-robin over the ranks
(``perm[rank::world]``, as ``DistributedSampler``), each rank takes ``batch_size / world`` samples
per step, so step ``i`` covers the same samples as a single-process step ``i`` with the full
batch and DDP's gradient average equals the single-process gradient (for equal per-rank batches,
without dropout differences). Every rank computes the validation loss (identical models, so
identical decisions); only rank 0 writes.
"""

from __future__ import annotations

import os

import torch

__all__ = ["all_reduce_sum", "barrier", "dist_info", "setup", "wrap"]


def dist_info() -> tuple[int, int]:
    """``(rank, world size)`` from torchrun's environment; ``(0, 1)`` in a single process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device, batch_size: int) -> torch.device:
    """Join the process group (once) and return this rank's device; a no-op for one process."""
    _, world = dist_info()
    if world == 1:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if batch_size % world:
        raise ValueError(
            f"train.batch_size ({batch_size}) must be divisible by WORLD_SIZE ({world})"
        )
    return device


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model, or its ``DistributedDataParallel`` wrapper under torchrun."""
    if dist_info()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def all_reduce_sum(*values: float) -> list[float]:
    """The sums over the ranks of a few scalars (the values themselves in one process)."""
    if dist_info()[1] == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist_info()[1] > 1:
        import torch.distributed as dist

        dist.barrier()
