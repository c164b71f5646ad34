"""Shared test helpers: devices, random trees, and tolerance rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hsoftmax import Tree

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_params():
    """Parametrize over CPU and, where one exists, CUDA (the CUDA cases skip elsewhere)."""
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param(
            "cuda",
            id="cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
            ],
        ),
    ]


def random_tree(num_leaves: int, seed: int, max_children: int = 5) -> Tree:
    """A random unbalanced tree: repeatedly merge 2..max_children random roots of the forest."""
    rng = np.random.default_rng(seed)
    parents: list[int] = [-1] * num_leaves
    forest = list(range(num_leaves))
    while len(forest) > 1:
        c = int(rng.integers(2, min(max_children, len(forest)) + 1))
        picked = rng.choice(len(forest), size=c, replace=False)
        new = len(parents)
        parents.append(-1)
        for i in sorted(picked.tolist(), reverse=True):
            parents[forest.pop(i)] = new
        forest.append(new)
    return Tree.from_parents(parents, num_leaves=num_leaves)


def two_level_tree(num_leaves: int, groups: int) -> Tree:
    """Root -> `groups` clusters -> leaves (the seed report's "128 clusters" tree)."""
    sizes = np.array_split(np.arange(num_leaves), groups)
    parents = np.empty(num_leaves + groups + 1, dtype=np.int64)
    root = num_leaves + groups
    for g, members in enumerate(sizes):
        parents[members] = num_leaves + g
        parents[num_leaves + g] = root
    parents[root] = -1
    return Tree.from_parents(parents)


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, tuple]:
    """Largest absolute difference and where it is, for failure messages."""
    diff = (a.double() - b.double()).abs()
    idx = np.unravel_index(int(diff.argmax()), diff.shape) if diff.numel() else ()
    return (float(diff.max()) if diff.numel() else 0.0), tuple(int(i) for i in idx)


def assert_close_to_reference(
    out: torch.Tensor, ref64: torch.Tensor, ref_same: torch.Tensor, name: str
) -> None:
    """flash-attention's rule: the kernel's error against a float64 reference must be within
    2x the error of plain PyTorch at the same precision (plus a small absolute floor)."""
    err, where = max_abs_err(out, ref64)
    base, _ = max_abs_err(ref_same, ref64)
    floor = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}
    bound = 2 * base + floor[out.dtype] * max(1.0, float(ref64.abs().max()) if ref64.numel() else 1)
    assert err <= bound, (
        f"{name}: max error {err:.3e} at {where} (kernel {float(out[where]):.8g}, float64 "
        f"reference {float(ref64[where]):.8g}), bound {bound:.3e} (plain PyTorch error {base:.3e})"
    )


def node_smoothing_reference(head, hidden, target, eps):
    """sum over the target's path of (1 - eps) * -log p(c_n | n) + eps * mean_c -log p(c | n),
    node by node with plain PyTorch (child 0's logit is 0, child k's the node's row k - 1)."""
    tree, v = head.tree, head.num_classes
    parents = tree.parents.numpy()
    row_ptr = tree.compiled().node_row_ptr
    out = []
    for b in range(hidden.shape[0]):
        total, node = hidden.new_zeros(()), int(target[b])
        while parents[node] >= 0:
            parent = int(parents[node])
            kids = tree.children(parent)
            r0 = int(row_ptr[parent - v])
            z = (
                head.weight[r0 : r0 + len(kids) - 1] @ hidden[b]
                + head.bias[r0 : r0 + len(kids) - 1]
            )
            lp = torch.cat([hidden.new_zeros(1), z]).log_softmax(0)
            total = total + (1 - eps) * -lp[kids.index(node)] + eps * -lp.mean()
            node = parent
        out.append(total)
    return torch.stack(out)


# ------------------------------------------------------------------ trainer tests on `small`

QUIET = {"echo": lambda *a, **k: None}

TINY_MODEL = [
    "model.loc_emb_dim=32",
    "model.user_emb_dim=16",
    "model.time_emb_dim=4",
    "model.weekday_emb_dim=2",
    "model.duration_emb_dim=4",
    "model.diff_emb_dim=2",
    "model.d_model=32",
    "model.num_layers=1",
    "model.nhead=2",
    "model.dim_feedforward=64",
    "model.tree_branching=16",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A cache holding the `small` preset's samples, generated once per test module."""
    from hsoftmax.data import load_preset

    d = tmp_path_factory.mktemp("cache")
    load_preset("small", seed=0, cache_dir=d, progress=False)
    return d


def small_config(cache_dir, tmp_path, *extra):
    """A tiny model on the `small` preset, quiet, one thread, run directories under tmp_path."""
    from hsoftmax.training import load_config

    return load_config(
        None,
        [
            "name=test",
            "data.preset=small",
            f"data.cache_dir={cache_dir}",
            f"output.dir={tmp_path}",
            "train.progress=false",
            "train.num_threads=1",
            *TINY_MODEL,
            *extra,
        ],
    )
