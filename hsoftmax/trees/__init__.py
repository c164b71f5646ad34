"""Data-driven trees: Huffman, hierarchical k-means, co-occurrence clusters, statistics, re-treeing.

Every builder returns an :class:`~hsoftmax.Tree` over leaves ``0 .. V-1`` and is deterministic: the
same inputs and ``seed`` give the same ``tree.parents`` (on the same library versions).

Dimension letters (see :mod:`hsoftmax.tree`): V leaves, F features per leaf, N nodes, k the number
of clusters a node is split into.

Cost model. The kernel evaluates, at every internal node on an example's path, one dot product per
child except the first (whose logit is fixed at 0), so an example for leaf ``y`` costs
``sum over the path of (c_n - 1)`` dot products -- not its path length: one 128-way node costs 127.
:func:`tree_stats` reports both.

``Tree.balanced`` and ``Tree.from_parents`` need no data and live on :class:`~hsoftmax.Tree`.
"""

from hsoftmax.trees._checks import latlon_to_km
from hsoftmax.trees.cooccurrence import from_cooccurrence, spectral_embedding
from hsoftmax.trees.frequent import lift_frequent
from hsoftmax.trees.huffman import huffman
from hsoftmax.trees.kmeans import from_features
from hsoftmax.trees.retree import bias_from_log_prob, retree_weights
from hsoftmax.trees.stats import tree_stats

__all__ = [
    "bias_from_log_prob",
    "from_cooccurrence",
    "from_features",
    "huffman",
    "latlon_to_km",
    "lift_frequent",
    "retree_weights",
    "spectral_embedding",
    "tree_stats",
]
