"""Build a :class:`HistoryCentricModel` from a config dict and the data; count its parameters.

The config keys (section ``model`` of the training YAML) and their defaults are
:data:`MODEL_DEFAULTS`: the seed report's configuration with the hierarchical-softmax head.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from torch import nn

from hsoftmax import trees
from hsoftmax.data.dataset import sample_context
from hsoftmax.nn import DenseSoftmax, HierarchicalSoftmax
from hsoftmax.tree import Tree

from .history import UserMemory
from .history_centric import ENCODER_DEFAULTS, HistoryCentricModel, HistoryEncoder

__all__ = [
    "ENCODER_SIZE_KEYS",
    "HEADS",
    "MODEL_DEFAULTS",
    "TREES",
    "ParameterBudgetError",
    "build_head",
    "build_model",
    "build_tree",
    "check_budget",
    "parameter_report",
]

HEADS = ("hsoftmax", "dense")
# the encoder's size keys of the model config (positive ints), passed to HistoryEncoder
ENCODER_SIZE_KEYS = tuple(k for k in ENCODER_DEFAULTS if k != "dropout")
TREES = ("balanced", "kmeans", "huffman", "cooccurrence")  # or a tree file

MODEL_DEFAULTS: dict = {
    **ENCODER_DEFAULTS,
    "head": "hsoftmax",  # hsoftmax | dense
    "tree": "kmeans",  # balanced | kmeans | huffman (hsoftmax head only)
    "tree_arity": 2,  # balanced and huffman trees
    "tree_branching": 128,  # kmeans tree: int, list of ints, or "binary"
    "tree_seed": 0,
    # the N most frequent training targets become direct children of the tree's root, so every
    # example trains them, as in an adaptive softmax's head (hsoftmax.trees.lift_frequent; 0: none)
    "tree_frequent": 0,
    "history": "mixture",  # none | mixture | logit_add (dense head only)
    # label smoothing over all classes ("leaves", exact, O(V) per example) or of each tree
    # decision towards uniform over its children ("nodes", O(path); history none or mixture,
    # where only the head's decisions are smoothed)
    "smoothing": "leaves",
    # a user memory (history mixture only): each user's N most visited training locations join
    # the pointer (0: none); see hsoftmax.models.history.UserMemory
    "user_memory": 0,
    # the memory also counts each entry's visits per target weekday and two-hour slot and scores
    # them in the example's context (UserMemory's context counts); needs user_memory > 0
    "user_memory_context": False,
    # row-sparse gradients for the location embedding and the tree head (V = 100K .. 1M): a
    # step then touches only the batch's rows; train with train.optimizer=sparse_adamw and
    # train.label_smoothing=0 (smoothing scores every row, a dense gradient)
    "sparse": False,
    # start the head's bias at the training targets' unigram prior (Head.init_prior)
    "prior_init": False,
    # weight of the next-stay loss at every history position (HistoryCentricModel's
    # position_loss): ~L head targets per encoder pass, cheap for a tree head
    "position_loss": 0.0,
}


class ParameterBudgetError(ValueError):
    """The model has more parameters than the configured budget."""


def _location_coords(data) -> np.ndarray | None:
    """(V, 2) lat/lon per encoded id; ids without coordinates (padding, unseen, missing) get the
    mean position, so they sit in some central cluster. None when no id has coordinates."""
    v = data.n_locations
    coords = np.full((v, 2), np.nan)
    locs = data.locations
    if len(locs):
        ids = locs["loc"].to_numpy(np.int64)
        coords[ids] = locs[["lat", "lon"]].to_numpy(np.float64)
    known = np.isfinite(coords).all(1)
    if not known.any():
        return None
    coords[~known] = coords[known].mean(0)
    return coords


def build_tree(method: str, data, arity: int = 2, branching=128, seed: int = 0) -> Tree:
    """The tree over the ``data.n_locations`` classes.

    * ``balanced``: :meth:`Tree.balanced` (consecutive ids grouped; ``arity`` 2 = binary);
    * ``kmeans``: :func:`hsoftmax.trees.from_features` on the locations' lat/lon (projected to km),
      ``branching`` clusters per level (128: root -> 128 clusters -> locations); data without
      coordinates falls back to ``huffman``, with a warning;
    * ``huffman``: :func:`hsoftmax.trees.huffman` on the training targets' counts;
    * ``cooccurrence``: :func:`hsoftmax.trees.from_cooccurrence` on the training transitions
      (last history location -> target), ``branching`` clusters per level;
    * a path to a tree file (``hsoftmax tree build``, :meth:`Tree.save`), checked against V.
    """
    v = data.n_locations
    if method == "balanced":
        return Tree.balanced(v, arity)
    coords = _location_coords(data) if method == "kmeans" else None
    if method == "kmeans" and coords is None:
        warnings.warn(
            "model.tree 'kmeans' needs location coordinates and this data has none (e.g. MHSA "
            "pickles without a trackintel locations.csv beside them): using a huffman tree",
            stacklevel=2,
        )
        method = "huffman"
    if method == "cooccurrence":
        import scipy.sparse as sp

        s = data.train
        last = np.asarray(s.last_loc, dtype=np.int64)
        y = np.asarray(s.y, dtype=np.int64)
        transitions = sp.coo_matrix((np.ones(y.size), (last, y)), shape=(v, v)).tocsr()
        if isinstance(branching, list | int):
            branching = (branching,) if isinstance(branching, int) else tuple(branching)
        return trees.from_cooccurrence(transitions, branching=branching, seed=seed)
    if method not in TREES:
        return _tree_from_file(method, v)
    if method == "kmeans":
        if isinstance(branching, list):
            branching = tuple(branching)
        return trees.from_features(coords, branching=branching, seed=seed, coords="latlon")
    if method == "huffman":
        return trees.huffman(_target_counts(data), arity)
    raise ValueError(f"model.tree must be one of {TREES}, got {method!r}")


def _tree_from_file(path: str, v: int) -> Tree:
    if not Path(path).is_file():
        raise ValueError(f"model.tree must be one of {TREES} or a tree file; no file {path}")
    tree = Tree.load(path)  # a damaged file raises ValueError naming it
    if tree.num_leaves != v:
        raise ValueError(
            f"{path}: the tree has {tree.num_leaves} leaves but the data has V = {v} location ids "
            "(padding 0 and unseen 1 included); build one for this data with `hsoftmax tree build "
            "--method kmeans --data <data dir> --out tree.hst`"
        )
    return tree


def _target_counts(data) -> np.ndarray:
    """(V,) how often each class is a training target (the Huffman tree's and the prior's)."""
    return np.bincount(np.asarray(data.train.y, dtype=np.int64), minlength=data.n_locations)


def build_head(cfg: dict, data, tree: Tree | None = None) -> nn.Module:
    """The output head named by ``cfg["head"]`` with ``in_features = cfg["d_model"]``; with
    ``cfg["prior_init"]`` its bias starts at the unigram prior of ``data.train``'s targets. A
    tree built here (``tree`` None) gets ``cfg["tree_frequent"]`` leaves lifted to its root."""
    d, v = int(cfg["d_model"]), data.n_locations
    if cfg["head"] == "dense":
        head = DenseSoftmax(d, v)
    elif cfg["head"] == "hsoftmax":
        if tree is None:
            tree = build_tree(
                cfg["tree"], data, cfg["tree_arity"], cfg["tree_branching"], cfg["tree_seed"]
            )
            if cfg.get("tree_frequent", 0):
                tree = trees.lift_frequent(tree, _target_counts(data), int(cfg["tree_frequent"]))
        head = HierarchicalSoftmax(d, tree, sparse_grad=bool(cfg.get("sparse", False)))
    else:
        raise ValueError(f"model.head must be one of {HEADS}, got {cfg['head']!r}")
    if cfg.get("prior_init", False):
        head.init_prior(_target_counts(data))
    return head


def build_model(cfg: dict, data, tree: Tree | None = None) -> HistoryCentricModel:
    """A :class:`HistoryCentricModel` for ``data`` from a ``model`` config section (missing keys
    take :data:`MODEL_DEFAULTS`; unknown keys raise ``KeyError``)."""
    unknown = sorted(set(cfg) - set(MODEL_DEFAULTS))
    if unknown:
        raise KeyError(f"unknown model config key(s): {', '.join(unknown)}")
    cfg = {**MODEL_DEFAULTS, **cfg}
    if cfg["history"] == "logit_add" and cfg["head"] != "dense":
        raise ValueError(
            "model.history 'logit_add' adds scores to all V logits and needs model.head 'dense'; "
            "use history 'mixture' with the hsoftmax head"
        )
    if cfg["sparse"] and cfg["head"] != "hsoftmax":
        raise ValueError("model.sparse needs model.head 'hsoftmax' (a dense head scores all rows)")
    encoder = HistoryEncoder(
        data.n_locations,
        data.n_users,
        **{k: cfg[k] for k in (*ENCODER_SIZE_KEYS, "dropout")},
        sparse=bool(cfg["sparse"]),
    )
    memory = None
    if cfg["user_memory"]:  # HistoryCentricModel refuses it without the mixture
        loc, count = UserMemory.tables(
            data.train.sample_user, data.train.y, data.n_users, int(cfg["user_memory"])
        )
        context = None
        if cfg["user_memory_context"]:
            context = UserMemory.context_tables(
                data.train.sample_user, data.train.y, sample_context(data.train), loc
            )
        memory = UserMemory(
            loc, count, int(cfg["d_model"]), int(cfg["loc_emb_dim"]), context_count=context
        )
    return HistoryCentricModel(
        encoder,
        build_head(cfg, data, tree),
        history=cfg["history"],
        smoothing=cfg["smoothing"],
        memory=memory,
        position_loss=cfg["position_loss"],
    )


def parameter_report(model: HistoryCentricModel) -> dict[str, int]:
    """Trainable parameters by component: ``embeddings`` (all embedding tables and the input
    projection), ``encoder`` (transformer layers and final norm), ``history`` (scorer and gate),
    ``head``, and ``total``."""
    parts = {"embeddings": 0, "encoder": 0, "history": 0, "head": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("encoder.layers."):
            parts["encoder"] += p.numel()
        elif name.startswith("encoder."):
            parts["embeddings"] += p.numel()
        elif name.startswith("output.head."):
            parts["head"] += p.numel()
        else:
            parts["history"] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


def check_budget(report: dict[str, int], budget: int | None, allow_over: bool = False) -> None:
    """Raise :class:`ParameterBudgetError` if ``report["total"] > budget`` (unless allowed)."""
    if budget is None or allow_over or report["total"] <= budget:
        return
    detail = ", ".join(f"{k} {v:,}" for k, v in report.items() if k != "total")
    raise ParameterBudgetError(
        f"the model has {report['total']:,} parameters, over the budget of {budget:,} "
        f"({detail}); shrink it, or pass --allow-over-budget (train.allow_over_budget=true)"
    )
