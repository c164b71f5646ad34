// CPU kernels of the exact tree searches: top-k leaves (best-first search) and the rank of a
// target leaf (pruned depth-first search), both parallel over the batch.
//
// Why they are exact: a leaf's log-probability is the sum of its path's log p(child | node),
// each <= 0, so a node's prefix log-probability bounds every leaf below it from above.
//  * top-k: nodes leave a max-heap in order of prefix; the first k leaves popped are the top k.
//    A node whose prefix is below the k-th best leaf already pushed is never pushed.
//  * rank: only subtrees whose prefix is >= log p(target) can hold a leaf ranked before it.
//
// Every prefix is accumulated root-down as prefix(parent) + log p(child | parent), with one
// function computing a node's children's log-probabilities, so a leaf gets bit-identical values in
// both searches (and a target's rank equals its position in the full top-V list). They are also
// the path kernel's (log_prob) bits: the same dot products, the same node formulas
// (hsoftmax_math.h) and the same root-first summation.
//
// Tie rule: leaves are ordered by log-probability descending, then leaf id ascending.
// NaN log-probabilities (from NaN inputs) are treated as -inf so the heap order stays well-defined.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "../hsoftmax.h"
#include "../hsoftmax_math.h"
#include "cpu_clones.h"
#include "vec.h"

namespace hsoftmax {
namespace {

// One example's search costs from a few dozen to V dot products: tiny chunks balance the load.
constexpr int64_t kSearchGrain = 4;

// HSM_CPU_CLONES: see cpu_clones.h.

using vec::dot;

template <typename acc_t>
HSM_ALWAYS_INLINE acc_t nan_to_neg_inf(acc_t x) {
  return std::isnan(x) ? -std::numeric_limits<acc_t>::infinity() : x;
}

// Raw views of one call's tensors. Node ids: leaves 0 .. V-1, internal node i has id V + i.
template <typename scalar_t>
struct SearchArgs {
  const scalar_t* hidden;
  const scalar_t* weight;
  const scalar_t* bias;  // may be null
  const int64_t* child_ptr;
  const int32_t* children;
  const int32_t* node_row_ptr;
  int64_t dim, num_leaves, root;
};

// The logits of internal node `node`'s children 1 .. c into out[1 .. c), returns c. Child k >= 1
// has the logit of row node_row_ptr[i] + k - 1 (dot4 is bit-identical to dot, row by row).
template <typename scalar_t, typename acc_t>
HSM_ALWAYS_INLINE int node_logits(const SearchArgs<scalar_t>& a, const scalar_t* h, int64_t node,
                                  acc_t* out) {
  const int64_t i = node - a.num_leaves;
  const int c = static_cast<int>(a.child_ptr[i + 1] - a.child_ptr[i]);
  const int64_t r0 = a.node_row_ptr[i];
  int k = 1;
  // wide nodes: four rows at a time
  for (; k + 4 <= c; k += 4) {
    const scalar_t* rows[4];
    for (int j = 0; j < 4; ++j) rows[j] = a.weight + (r0 + k - 1 + j) * a.dim;
    vec::dot4<scalar_t, acc_t>(h, rows, a.dim, out + k);
    if (a.bias) {
      for (int j = 0; j < 4; ++j) out[k + j] += static_cast<acc_t>(a.bias[r0 + k - 1 + j]);
    }
  }
  for (; k < c; ++k) {
    const int64_t r = r0 + k - 1;
    out[k] = dot<scalar_t, acc_t>(h, a.weight + r * a.dim, a.dim) +
             (a.bias ? static_cast<acc_t>(a.bias[r]) : acc_t(0));
  }
  return c;
}

// log p(child k | node) of a node's c children into out[0 .. c) from the logits in out[1 .. c)
// (math::node_log_probs), a NaN (from NaN inputs) made -inf for the searches' orders.
template <typename acc_t>
HSM_ALWAYS_INLINE void node_log_softmax(acc_t* out, int c) {
  math::node_log_probs(out, c);
  for (int k = 0; k < c; ++k) out[k] = nan_to_neg_inf(out[k]);
}

// log p(child k | node) for every child k of internal node `node` into out[0 .. c), returns c.
// Every search computes a node's children with node_logits + node_log_softmax (here, or for a
// batch of binary nodes in score_binary_nodes), so a leaf's log-prob is the same bits in each.
template <typename scalar_t, typename acc_t>
HSM_ALWAYS_INLINE int child_log_probs(const SearchArgs<scalar_t>& a, const scalar_t* h,
                                      int64_t node, acc_t* out) {
  const int c = node_logits(a, h, node, out);
  node_log_softmax(out, c);
  return c;
}

template <typename acc_t>
struct Entry {
  acc_t log_prob;
  int64_t node;
};

// Search order, "a comes out after b": higher log-prob first; on equal log-prob an internal node
// before a leaf (it may hold an equal leaf with a smaller id), then by node id. Entries are
// distinct nodes, so this is a strict total order.
template <typename acc_t>
struct After {
  int64_t num_leaves;
  HSM_ALWAYS_INLINE bool operator()(const Entry<acc_t>& a, const Entry<acc_t>& b) const {
    if (a.log_prob != b.log_prob) return a.log_prob < b.log_prob;
    const bool a_internal = a.node >= num_leaves, b_internal = b.node >= num_leaves;
    if (a_internal != b_internal) return b_internal;
    return a.node > b.node;
  }
};

// How the top-k heap stores a node. Generic: the Entry itself, ordered by After. float32: one
// uint64 whose integer order is After's order - the log-prob's bits made monotonic in the high
// half (after -0 -> +0, which After treats as equal), then "internal" and the complemented node
// id - so a heap step moves 8 bytes and compares with one instruction, without branches. Node ids
// fit in 31 bits (children are int32); log-probs are never NaN here (child_log_probs maps NaN to
// -inf).
template <typename acc_t>
struct HeapCodec {
  using Key = Entry<acc_t>;
  struct Less {
    After<acc_t> after;
    HSM_ALWAYS_INLINE bool operator()(const Key& a, const Key& b) const { return after(a, b); }
  };
  static Less less(int64_t num_leaves) { return {After<acc_t>{num_leaves}}; }
  HSM_ALWAYS_INLINE static Key encode(const Entry<acc_t>& e, int64_t) { return e; }
  HSM_ALWAYS_INLINE static Entry<acc_t> decode(const Key& k) { return k; }
};

template <>
struct HeapCodec<float> {
  using Key = uint64_t;
  using Less = std::less<uint64_t>;
  static Less less(int64_t) { return {}; }
  HSM_ALWAYS_INLINE static Key encode(const Entry<float>& e, int64_t num_leaves) {
    const auto u = std::bit_cast<uint32_t>(e.log_prob + 0.0f);
    const uint32_t order = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    const uint32_t tie =
        (e.node >= num_leaves ? 0x80000000u : 0u) | (0x7FFFFFFFu - static_cast<uint32_t>(e.node));
    return (uint64_t{order} << 32) | tie;
  }
  HSM_ALWAYS_INLINE static Entry<float> decode(Key k) {
    const auto order = static_cast<uint32_t>(k >> 32);
    const uint32_t u = (order & 0x80000000u) ? (order & 0x7FFFFFFFu) : ~order;
    return {std::bit_cast<float>(u), int64_t{0x7FFFFFFF} - static_cast<int64_t>(k & 0x7FFFFFFFu)};
  }
};

// Puts `key` into the hole at `hole` of a max-heap under `less`, moving it up past every parent
// that ranks below it.
template <typename Key, typename Less>
HSM_ALWAYS_INLINE void sift_up(std::vector<Key>& heap, size_t hole, Key key, const Less& less) {
  while (hole > 0) {
    const size_t parent = (hole - 1) / 2;
    if (!less(heap[parent], key)) break;
    heap[hole] = heap[parent];
    hole = parent;
  }
  heap[hole] = key;
}

// Removes and returns the first key of a max-heap under `less`. Bottom-up ("Floyd") pop: the
// hole left at the top sinks along the better child with one comparison per level, then the last
// key, usually a poor one, rises from there a step or two. std::pop_heap compares it against
// both children at every level, and those data-dependent branches mispredict about half the
// time; here the per-level choice becomes an index increment.
template <typename Key, typename Less>
HSM_ALWAYS_INLINE Key heap_pop(std::vector<Key>& heap, const Less& less) {
  const Key top = heap.front();
  const Key last = heap.back();
  heap.pop_back();
  const size_t n = heap.size();
  if (n == 0) return top;
  size_t hole = 0;
  for (size_t c = 1; c < n; c = 2 * hole + 1) {
    if (c + 1 < n) c += static_cast<size_t>(less(heap[c], heap[c + 1]));
    heap[hole] = heap[c];
    hole = c;
  }
  sift_up(heap, hole, last, less);
  return top;
}

// Inserts `key` into a max-heap under `less` (sift-up: a new entry is usually a poor one and
// stops after a comparison or two).
template <typename Key, typename Less>
HSM_ALWAYS_INLINE void heap_push(std::vector<Key>& heap, Key key, const Less& less) {
  heap.push_back(key);
  sift_up(heap, heap.size() - 1, key, less);
}

// Requests the first rows of internal node `node` (at most kMaxRows), to be scored soon.
template <typename scalar_t>
HSM_ALWAYS_INLINE void prefetch_node_rows(const SearchArgs<scalar_t>& a, int64_t node) {
  constexpr int64_t kMaxRows = 4, kLine = 64 / sizeof(scalar_t);
  const int64_t i = node - a.num_leaves;
  if (i < 0) return;  // a leaf: nothing to score
  const int64_t r0 = a.node_row_ptr[i];
  const int64_t r1 = std::min<int64_t>(a.node_row_ptr[i + 1], r0 + kMaxRows);
  for (const scalar_t* p = a.weight + r0 * a.dim; p < a.weight + r1 * a.dim; p += kLine) {
    __builtin_prefetch(p, 0, 3);
  }
}

// One example's best-first search: nodes come out of a max-heap in After order, so leaves come
// out in the tie-rule order and the first k are the answer. The best child of the node just
// expanded is usually the next to come out; it skips the heap when it is ("greedy dive", which
// halves the heap traffic without changing the order of expansions).
template <typename acc_t>
struct TopkSearch {
  std::vector<typename HeapCodec<acc_t>::Key> heap;  // max-heap in After order
  std::vector<acc_t> kept;  // min-heap: the k best leaf log-probs seen so far
  Entry<acc_t> cur;         // the node to take next
  int64_t example = -1, found = 0;
  acc_t lp[2] = {0, 0};  // cur's children's log p, when has_lp (score_binary_nodes)
  bool has_lp = false;

  // Whether e can still hold a top-k leaf; a leaf joins the k best seen so far.
  HSM_ALWAYS_INLINE bool admit(const Entry<acc_t>& e, int64_t k, int64_t num_leaves) {
    const std::greater<acc_t> min_first;
    // Strictly below the k-th best known leaf: nothing in there can make the top k.
    if (static_cast<int64_t>(kept.size()) == k && e.log_prob < kept.front()) return false;
    if (e.node < num_leaves) {
      kept.push_back(e.log_prob);
      std::push_heap(kept.begin(), kept.end(), min_first);
      if (static_cast<int64_t>(kept.size()) > k) {
        std::pop_heap(kept.begin(), kept.end(), min_first);
        kept.pop_back();
      }
    }
    return true;
  }
};

// Takes the search's current node (a leaf is emitted, an internal node expanded) and moves it
// to the next one, whose rows it prefetches. Returns false once the k leaves are out.
template <typename scalar_t>
HSM_ALWAYS_INLINE bool topk_step(const SearchArgs<scalar_t>& a, int64_t k,
                                 TopkSearch<at::opmath_type<scalar_t>>& s,
                                 at::opmath_type<scalar_t>* local, scalar_t* values,
                                 int64_t* indices) {
  using acc_t = at::opmath_type<scalar_t>;
  using Codec = HeapCodec<acc_t>;
  const After<acc_t> after{a.num_leaves};
  const auto less = Codec::less(a.num_leaves);
  const Entry<acc_t> cur = s.cur;
  if (cur.node < a.num_leaves) {
    values[s.example * k + s.found] = static_cast<scalar_t>(cur.log_prob);
    indices[s.example * k + s.found] = cur.node;
    if (++s.found == k) return false;
  } else {
    int c = 2;
    if (s.has_lp) {
      local[0] = s.lp[0];
      local[1] = s.lp[1];
      s.has_lp = false;
    } else {
      c = node_logits<scalar_t, acc_t>(a, a.hidden + s.example * a.dim, cur.node, local);
      node_log_softmax(local, c);
    }
    const int64_t first = a.child_ptr[cur.node - a.num_leaves];
    Entry<acc_t> best{acc_t(0), -1};
    for (int j = 0; j < c; ++j) {
      const Entry<acc_t> e{cur.log_prob + local[j], a.children[first + j]};
      if (!s.admit(e, k, a.num_leaves)) continue;
      if (best.node < 0) {
        best = e;
      } else if (after(best, e)) {
        heap_push(s.heap, Codec::encode(best, a.num_leaves), less);
        best = e;
      } else {
        heap_push(s.heap, Codec::encode(e, a.num_leaves), less);
      }
    }
    if (best.node >= 0 &&
        (s.heap.empty() || less(s.heap.front(), Codec::encode(best, a.num_leaves)))) {
      s.cur = best;  // it would come out of the heap next anyway
      prefetch_node_rows(a, s.cur.node);
      return true;
    }
    if (best.node >= 0) heap_push(s.heap, Codec::encode(best, a.num_leaves), less);
  }
  // The k leaves that set the pruning bound are never pruned, so k leaves always come out.
  TORCH_INTERNAL_ASSERT(!s.heap.empty(), "topk_leaves found ", s.found, " < k = ", k, " leaves");
  s.cur = Codec::decode(heap_pop(s.heap, less));
  prefetch_node_rows(a, s.cur.node);
  return true;
}

// Before a round of steps: the children's log-probs of every search whose current node is a
// binary one (most nodes of most trees), the dots four at a time with vec::dot4_pairs. Taken one
// search at a time, each dot is one chain of dependent multiply-adds, then an exp and a log
// that wait on it; side by side the chains overlap. The values are those of child_log_probs:
// dot4_pairs is bit-identical to dot, then the same bias add and node_log_softmax.
template <int kMax, typename scalar_t>
HSM_ALWAYS_INLINE void score_binary_nodes(const SearchArgs<scalar_t>& a,
                                          TopkSearch<at::opmath_type<scalar_t>> (&search)[kMax]) {
  using acc_t = at::opmath_type<scalar_t>;
  int m = 0, who[kMax];
  const scalar_t* hs[kMax];
  const scalar_t* ws[kMax];
  int64_t row[kMax];
  for (int i = 0; i < kMax; ++i) {
    const int64_t node = search[i].cur.node - a.num_leaves;
    if (search[i].example < 0 || node < 0 || a.child_ptr[node + 1] - a.child_ptr[node] != 2) {
      continue;
    }
    who[m] = i;
    row[m] = a.node_row_ptr[node];
    hs[m] = a.hidden + search[i].example * a.dim;
    ws[m] = a.weight + row[m] * a.dim;
    ++m;
  }
  acc_t z[kMax][2];
  int j = 0;
  for (; j + 4 <= m; j += 4) {
    acc_t out[4];
    vec::dot4_pairs<scalar_t, acc_t>(hs + j, ws + j, a.dim, out);
    for (int q = 0; q < 4; ++q) z[j + q][1] = out[q];
  }
  for (; j < m; ++j) z[j][1] = dot<scalar_t, acc_t>(hs[j], ws[j], a.dim);
  for (j = 0; j < m; ++j) {
    if (a.bias) z[j][1] += static_cast<acc_t>(a.bias[row[j]]);
    node_log_softmax(z[j], 2);
    TopkSearch<acc_t>& s = search[who[j]];
    s.lp[0] = z[j][0];
    s.lp[1] = z[j][1];
    s.has_lp = true;
  }
}

// Top-k of examples [begin, end). Each search waits on a weight row from memory at every
// expansion, and expansions depend on each other, so one search at a time leaves the core idle
// most of the time: kInterleave searches run side by side, one step each in turn, and each
// step's prefetch of its next row has the other searches' steps to arrive; the binary nodes of
// a round are scored together first (score_binary_nodes). Each search's own sequence of steps
// is unchanged, so the results are those of one search at a time.
template <typename scalar_t>
HSM_CPU_CLONES void topk_range(const SearchArgs<scalar_t>& a, int64_t k, int max_children,
                               scalar_t* values, int64_t* indices, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kInterleave = 8;
  std::vector<acc_t> local(max_children);
  TopkSearch<acc_t> search[kInterleave];
  int64_t next = begin;
  auto start = [&](TopkSearch<acc_t>& s) {
    s.heap.clear();
    s.kept.clear();
    s.example = next++;
    s.found = 0;
    s.cur = {acc_t(0), a.root};
    prefetch_node_rows(a, s.cur.node);
  };
  int active = 0;
  for (auto& s : search) {
    if (next == end) break;
    start(s);
    ++active;
  }
  while (active > 0) {
    score_binary_nodes(a, search);
    for (int i = 0; i < kInterleave; ++i) {
      TopkSearch<acc_t>& s = search[i];
      if (s.example < 0) continue;
      if (topk_step(a, k, s, local.data(), values, indices)) continue;
      if (next < end) {
        start(s);
      } else {
        s.example = -1;
        --active;
      }
    }
  }
}

// Depth-first walk from the root into every subtree whose prefix log-prob is >= threshold
// (-inf: the whole tree), calling leaf(log_prob, id) for each leaf reached at >= threshold.
// Prefixes are accumulated root-down with child_log_probs, as in the top-k search.
template <typename scalar_t, typename LeafFn>
HSM_ALWAYS_INLINE void walk_at_least(const SearchArgs<scalar_t>& a, const scalar_t* h,
                                     at::opmath_type<scalar_t> threshold,
                                     at::opmath_type<scalar_t>* local,
                                     std::vector<Entry<at::opmath_type<scalar_t>>>& stack,
                                     LeafFn&& leaf) {
  using acc_t = at::opmath_type<scalar_t>;
  stack.clear();
  if (a.root < a.num_leaves) {  // a one-leaf tree: log p = 0
    if (acc_t(0) >= threshold) leaf(acc_t(0), a.root);
    return;
  }
  stack.push_back({acc_t(0), a.root});
  while (!stack.empty()) {
    const Entry<acc_t> top = stack.back();
    stack.pop_back();
    const int c = child_log_probs<scalar_t, acc_t>(a, h, top.node, local);
    const int64_t first = a.child_ptr[top.node - a.num_leaves];
    for (int j = 0; j < c; ++j) {
      const acc_t lp = top.log_prob + local[j];
      if (lp < threshold) continue;
      const int64_t child = a.children[first + j];
      if (child >= a.num_leaves) {
        stack.push_back({lp, child});
      } else {
        leaf(lp, child);
      }
    }
  }
}

// Rank of target y: log p(y) along y's path, then a depth-first search that enters only the
// subtrees whose prefix is >= log p(y) and counts the leaves ordered before y.
template <typename scalar_t>
HSM_CPU_CLONES void rank_range(const SearchArgs<scalar_t>& a, const int64_t* leaf_path_ptr,
                               const int32_t* path_node, const int32_t* path_choice,
                               const int64_t* target, int max_children, int64_t* rank,
                               int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> local(max_children);
  std::vector<Entry<acc_t>> stack;
  for (int64_t b = begin; b < end; ++b) {
    const scalar_t* h = a.hidden + b * a.dim;
    const int64_t y = target[b];
    // log p(y), accumulated exactly as the traversal below accumulates every prefix.
    acc_t threshold = 0;
    for (int64_t s = leaf_path_ptr[y]; s < leaf_path_ptr[y + 1]; ++s) {
      child_log_probs<scalar_t, acc_t>(a, h, a.num_leaves + path_node[s], local.data());
      threshold = threshold + local[path_choice[s]];
    }
    int64_t before = 0;
    walk_at_least(a, h, threshold, local.data(), stack, [&](acc_t lp, int64_t leaf) {
      if (lp > threshold || leaf < y) ++before;
    });
    rank[b] = before + 1;
  }
}

// Internal nodes (tree ids) in breadth-first order from the root: every parent before its
// children. Empty for a one-leaf tree.
std::vector<int64_t> internal_nodes_parents_first(const int64_t* child_ptr, const int32_t* children,
                                                  int64_t num_leaves, int64_t root) {
  std::vector<int64_t> order;
  if (root < num_leaves) return order;
  order.push_back(root);
  for (size_t i = 0; i < order.size(); ++i) {
    const int64_t n = order[i] - num_leaves;
    for (int64_t j = child_ptr[n]; j < child_ptr[n + 1]; ++j) {
      if (children[j] >= num_leaves) order.push_back(children[j]);
    }
  }
  return order;
}

// Examples scored together by all_leaves_range: each weight row is read once per tile.
constexpr int kLeafTile = 16;

// Every leaf's log-probability of examples [begin, end) into out (B, V): the bits topk and rank
// order by. Per tile of kLeafTile examples the nodes are visited parents first (`order`), each
// node's rows scored for the whole tile while they are in cache, four (example, row) dots at a
// time with vec::dot4_pairs (bit-identical to dot, so to node_logits), then node_log_softmax
// per example, and the children's prefixes accumulated root-down as prefix(parent) + log p(child
// | parent), as the searches do. A walk per example would read the whole weight matrix from
// memory once per example; here once per tile.
template <typename scalar_t>
HSM_CPU_CLONES void all_leaves_range(const SearchArgs<scalar_t>& a, const int64_t* order,
                                     int64_t num_internal, int64_t num_nodes, int max_children,
                                     scalar_t* out, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  if (a.root < a.num_leaves) {  // a one-leaf tree: log p = 0
    for (int64_t b = begin; b < end; ++b) out[b * a.num_leaves + a.root] = scalar_t(0);
    return;
  }
  constexpr int Q = kLeafTile;
  std::vector<acc_t> pre(static_cast<size_t>(num_nodes) * Q);  // by internal index
  std::vector<acc_t> logit(static_cast<size_t>(max_children) * Q);
  for (int64_t b0 = begin; b0 < end; b0 += Q) {
    const int q_n = static_cast<int>(std::min<int64_t>(Q, end - b0));
    const scalar_t* h[Q];
    for (int q = 0; q < q_n; ++q) h[q] = a.hidden + (b0 + q) * a.dim;
    const int64_t root_i = a.root - a.num_leaves;
    for (int q = 0; q < q_n; ++q) pre[root_i * Q + q] = acc_t(0);
    for (int64_t t = 0; t < num_internal; ++t) {
      const int64_t i = order[t] - a.num_leaves;
      const int c = static_cast<int>(a.child_ptr[i + 1] - a.child_ptr[i]);
      const int64_t r0 = a.node_row_ptr[i];
      // logit[q * max_children + k], k = 1 .. c-1: child k's logit for example q (child 0: 0)
      for (int k = 1; k < c; ++k) {
        const scalar_t* w = a.weight + (r0 + k - 1) * a.dim;
        const acc_t bias = a.bias ? static_cast<acc_t>(a.bias[r0 + k - 1]) : acc_t(0);
        int q = 0;
        for (; q + 4 <= q_n; q += 4) {
          const scalar_t* ws[4] = {w, w, w, w};
          acc_t d[4];
          vec::dot4_pairs<scalar_t, acc_t>(h + q, ws, a.dim, d);
          for (int j = 0; j < 4; ++j) logit[(q + j) * max_children + k] = d[j] + bias;
        }
        for (; q < q_n; ++q) {
          logit[q * max_children + k] = dot<scalar_t, acc_t>(h[q], w, a.dim) + bias;
        }
      }
      const int64_t first = a.child_ptr[i];
      for (int q = 0; q < q_n; ++q) {
        acc_t* lp = logit.data() + q * max_children;
        node_log_softmax(lp, c);
        const acc_t p = pre[i * Q + q];
        for (int j = 0; j < c; ++j) {
          const int64_t child = a.children[first + j];
          const acc_t v = p + lp[j];
          if (child >= a.num_leaves) {
            pre[(child - a.num_leaves) * Q + q] = v;
          } else {
            out[(b0 + q) * a.num_leaves + child] = static_cast<scalar_t>(v);
          }
        }
      }
    }
  }
}

struct TreeArgs {
  const at::Tensor& child_ptr;
  const at::Tensor& children;
  const at::Tensor& node_row_ptr;
};

template <typename scalar_t>
SearchArgs<scalar_t> args_of(const at::Tensor& hidden, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const TreeArgs& tree,
                             int64_t root) {
  return {hidden.data_ptr<scalar_t>(),
          weight.data_ptr<scalar_t>(),
          bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
          tree.child_ptr.data_ptr<int64_t>(),
          tree.children.data_ptr<int32_t>(),
          tree.node_row_ptr.data_ptr<int32_t>(),
          hidden.size(1),
          weight.size(0) + 1,
          root};
}

int max_children_of(const at::Tensor& child_ptr) {
  const int64_t* ptr = child_ptr.data_ptr<int64_t>();
  int64_t most = 1;
  for (int64_t i = 0; i + 1 < child_ptr.size(0); ++i) most = std::max(most, ptr[i + 1] - ptr[i]);
  return static_cast<int>(most);
}

std::tuple<at::Tensor, at::Tensor> topk_leaves_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& child_ptr, const at::Tensor& children, const at::Tensor& node_row_ptr,
    int64_t root, int64_t k) {
  const TreeArgs tree{child_ptr, children, node_row_ptr};
  check_search_args(hidden, weight, bias, child_ptr, children, node_row_ptr, root);
  const int64_t num_leaves = weight.size(0) + 1;
  TORCH_CHECK(1 <= k && k <= num_leaves, "k must be in [1, V=", num_leaves, "], got ", k);
  auto values = at::empty({hidden.size(0), k}, hidden.options());
  auto indices = at::empty({hidden.size(0), k}, hidden.options().dtype(at::kLong));
  const int max_children = max_children_of(child_ptr);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "topk_leaves_cpu", [&] {
        const auto a = args_of<scalar_t>(hidden, weight, bias, tree, root);
        scalar_t* v = values.data_ptr<scalar_t>();
        int64_t* ix = indices.data_ptr<int64_t>();
        at::parallel_for(0, hidden.size(0), kSearchGrain, [&](int64_t begin, int64_t end) {
          topk_range(a, k, max_children, v, ix, begin, end);
        });
      });
  return {values, indices};
}

at::Tensor leaf_rank_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& child_ptr,
                         const at::Tensor& children, const at::Tensor& node_row_ptr,
                         const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
                         const at::Tensor& path_choice, int64_t root, const at::Tensor& target) {
  const TreeArgs tree{child_ptr, children, node_row_ptr};
  check_search_args(hidden, weight, bias, child_ptr, children, node_row_ptr, root);
  check_rank_args(hidden, weight, child_ptr, node_row_ptr, leaf_path_ptr, path_node, path_choice,
                  target);
  const int64_t* y = target.data_ptr<int64_t>();
  auto rank = at::empty({hidden.size(0)}, target.options());
  const int max_children = max_children_of(child_ptr);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "leaf_rank_cpu", [&] {
        const auto a = args_of<scalar_t>(hidden, weight, bias, tree, root);
        int64_t* out = rank.data_ptr<int64_t>();
        at::parallel_for(0, hidden.size(0), kSearchGrain, [&](int64_t begin, int64_t end) {
          rank_range(a, leaf_path_ptr.data_ptr<int64_t>(), path_node.data_ptr<int32_t>(),
                     path_choice.data_ptr<int32_t>(), y, max_children, out, begin, end);
        });
      });
  return rank;
}

at::Tensor leaf_log_prob_all_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& child_ptr,
                                 const at::Tensor& children, const at::Tensor& node_row_ptr,
                                 int64_t root) {
  const TreeArgs tree{child_ptr, children, node_row_ptr};
  check_search_args(hidden, weight, bias, child_ptr, children, node_row_ptr, root);
  auto out = at::empty({hidden.size(0), weight.size(0) + 1}, hidden.options());
  const int max_children = max_children_of(child_ptr);
  const std::vector<int64_t> order = internal_nodes_parents_first(
      child_ptr.data_ptr<int64_t>(), children.data_ptr<int32_t>(), weight.size(0) + 1, root);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "leaf_log_prob_all_cpu", [&] {
        const auto a = args_of<scalar_t>(hidden, weight, bias, tree, root);
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, hidden.size(0), kLeafTile, [&](int64_t begin, int64_t end) {
          all_leaves_range(a, order.data(), static_cast<int64_t>(order.size()),
                           child_ptr.size(0) - 1, max_children, o, begin, end);
        });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hsoftmax, CPU, m) {
  m.impl("topk_leaves", &topk_leaves_cpu);
  m.impl("leaf_rank", &leaf_rank_cpu);
  m.impl("leaf_log_prob_all", &leaf_log_prob_all_cpu);
}

}  // namespace hsoftmax
