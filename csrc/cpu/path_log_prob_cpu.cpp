// CPU kernels of path_log_prob: fused forward (logits, log-softmax and gradient coefficients in
// one pass over each example's path) and a race-free, deterministic backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../hsoftmax.h"
#include "../hsoftmax_math.h"
#include "../tree_paths.h"
#include "checked_trees.h"
#include "cpu_clones.h"
#include "vec.h"

namespace hsoftmax {
namespace {

using vec::dot;
using vec::dot4;
using vec::kLanes;
#if defined(__GNUC__)
using vec::load8;
using vec::store8;
using vec::Vec8f;
#endif

// Examples per parallel task: a path costs ~depth * D multiply-adds, so small chunks already
// amortise the scheduling cost.
constexpr int64_t kBatchGrain = 16;
// The dense weight gradient's row chunks are balanced on a histogram of the entries per bucket of
// 2^kBucketShift consecutive rows.
constexpr int kBucketShift = 6;

// HSM_CPU_CLONES: see cpu_clones.h.

// out[d] += alpha * x[d]
template <typename scalar_t, typename acc_t>
inline void axpy(acc_t alpha, const scalar_t* __restrict__ x, acc_t* __restrict__ out, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] += alpha * static_cast<acc_t>(x[d]);
}

// A row of sums in acc_t: the output row itself when it already has that type (no scratch
// copy), else a float scratch row converted into the output at the end.
template <typename scalar_t>
class RowAccumulator {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;
  std::vector<acc_t> scratch_;
  int64_t dim_;

 public:
  explicit RowAccumulator(int64_t dim) : scratch_(kInPlace ? 0 : dim), dim_(dim) {}

  acc_t* start(scalar_t* out) {
    if constexpr (kInPlace) {
      std::memset(out, 0, dim_ * sizeof(scalar_t));
      return out;
    } else {
      std::fill(scratch_.begin(), scratch_.end(), acc_t(0));
      return scratch_.data();
    }
  }

  void finish(scalar_t* out) {
    if constexpr (!kInPlace) {
      for (int64_t d = 0; d < dim_; ++d) out[d] = static_cast<scalar_t>(scratch_[d]);
    }
  }
};

#if defined(__GNUC__)
// out[d0 .. d0 + 8 NV) = sum_j scale[j] * row_at(j)[d0 ..]: NV accumulators held in registers
// across all n rows (an axpy into memory would reload and store them for every row).
template <int NV, typename RowAt>
HSM_ALWAYS_INLINE void scaled_row_sum_block(RowAt row_at, const float* __restrict__ scale,
                                            int64_t n, int64_t d0, float* __restrict__ out) {
  Vec8f acc[NV] = {};
  for (int64_t j = 0; j < n; ++j) {
    const float s = scale[j];
    const float* p = row_at(j) + d0;
    for (int v = 0; v < NV; ++v) acc[v] += s * load8(p + kLanes * v);
  }
  for (int v = 0; v < NV; ++v) store8(out + d0 + kLanes * v, acc[v]);
}

// the last nv < 8 whole vectors of a row: scaled_row_sum_block<nv>, nv chosen at run time
template <int NV, typename RowAt>
HSM_ALWAYS_INLINE void scaled_row_sum_tail(int64_t nv, RowAt row_at, const float* scale, int64_t n,
                                           int64_t d0, float* out) {
  if (nv == NV) {
    scaled_row_sum_block<NV>(row_at, scale, n, d0, out);
  } else if constexpr (NV > 1) {
    scaled_row_sum_tail<NV - 1>(nv, row_at, scale, n, d0, out);
  }
}
#endif

// out[d] = sum over j < n, in order, of scale[j] * row_at(j)[d]: the weighted sum of n rows of
// length dim that both gradients are made of (grad_hidden: weight rows on a path; grad_weight:
// hidden rows of the examples touching a weight row). Every element is summed in j order from
// 0, so the result does not depend on how the row is blocked.
template <typename scalar_t>
class ScaledRowSum {
  using acc_t = at::opmath_type<scalar_t>;
  RowAccumulator<scalar_t> row_;
  int64_t dim_;

 public:
  explicit ScaledRowSum(int64_t dim) : row_(dim), dim_(dim) {}

  template <typename RowAt>
  HSM_ALWAYS_INLINE void operator()(RowAt row_at, const acc_t* __restrict__ scale, int64_t n,
                                    scalar_t* out) {
#if defined(__GNUC__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      constexpr int64_t kBlock = 8 * kLanes;
      int64_t d0 = 0;
      for (; d0 + kBlock <= dim_; d0 += kBlock) scaled_row_sum_block<8>(row_at, scale, n, d0, out);
      scaled_row_sum_tail<7>((dim_ - d0) / kLanes, row_at, scale, n, d0, out);
      for (d0 += (dim_ - d0) / kLanes * kLanes; d0 < dim_; ++d0) {
        float sum = 0;
        for (int64_t j = 0; j < n; ++j) sum += scale[j] * row_at(j)[d0];
        out[d0] = sum;
      }
      return;
    }
#endif
    acc_t* acc = row_.start(out);
    for (int64_t j = 0; j < n; ++j) axpy<scalar_t, acc_t>(scale[j], row_at(j), acc, dim_);
    row_.finish(out);
  }
};

// Every target and its path checked against the tree arrays (see hsoftmax.h), chunk by chunk
// inside the kernels' own parallel loops, just before a chunk is computed: a separate pass would
// walk every path twice (about a tenth of the kernel's time) and add a fork/join. When every leaf
// path of the tables has been checked already (tree_paths_checked: once per tree, then on each
// change to a table), a chunk's check is its targets' range alone. No kernel reads through an
// unchecked path: a failing chunk is skipped and flagged, and raise_if_bad(), after the loop, runs
// the serial check, which raises the first error in example order (so the message does not depend
// on the thread count); the half-written outputs are discarded.
class PathCheck {
  const PathTree& tree_;
  const int64_t* target_;
  int64_t batch_, num_internal_, num_entries_, max_path_rows_;
  bool paths_checked_;
  std::atomic<bool> bad_{false};

  void check(int64_t begin, int64_t end) const {
    if (paths_checked_) {
      bool in_range = true;
      for (int64_t b = begin; b < end; ++b) in_range &= valid_target(tree_, target_[b]);
      if (in_range) return;
    }
    check_target_paths(target_ + begin, end - begin, tree_.node_row_ptr, num_internal_,
                       tree_.leaf_path_ptr, tree_.num_leaves, tree_.path_node, tree_.path_choice,
                       num_entries_, max_path_rows_);
  }

 public:
  PathCheck(const PathTree& tree, const at::Tensor& target, const at::Tensor& node_row_ptr,
            const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
            const at::Tensor& path_choice, int64_t max_path_rows)
      : tree_(tree),
        target_(target.data_ptr<int64_t>()),
        batch_(target.size(0)),
        num_internal_(node_row_ptr.size(0) - 1),
        num_entries_(path_node.size(0)),
        max_path_rows_(max_path_rows),
        paths_checked_(tree_paths_checked(node_row_ptr, leaf_path_ptr, path_node, path_choice,
                                          max_path_rows)) {}

  // whether examples [begin, end) may be computed
  bool ok(int64_t begin, int64_t end) {
    try {
      check(begin, end);
      return true;
    } catch (const c10::Error&) {
      bad_ = true;
      return false;
    }
  }

  void raise_if_bad() const {
    if (bad_) check(0, batch_);
  }

  void all() const { check(0, batch_); }
};

// Raw views of one call's tensors, so the hot loops below are plain functions that can be cloned
// per instruction set (lambdas handed to at::parallel_for cannot carry a target attribute).
template <typename scalar_t>
struct Args {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* hidden;
  const scalar_t* weight;
  const scalar_t* bias;  // may be null
  const scalar_t* grad_log_prob;
  const int64_t* target;
  acc_t* coef;  // (B, rows): forward writes it, backward reads it
  int64_t dim, rows;
  PathTree tree;
  acc_t* basis = nullptr;  // (B, dim) or null: the forward's hidden-gradient basis
};

// Weight rows on a path are scattered over the matrix, and the forward and grad_hidden loops stall
// on them; the next example's path is known in advance, so its rows are fetched while the
// current example computes. Capped so a very wide node does not flood the cache.
template <typename scalar_t>
inline void prefetch_path_rows(const PathTree& tree, int64_t y, const scalar_t* weight,
                               int64_t dim) {
  constexpr int64_t kMaxRows = 64;
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for_each_path_node(tree, y, [&](int64_t, int64_t r0, int n, int64_t e0) {
    const int64_t r1 = r0 + std::min<int64_t>(n, kMaxRows - e0);
    for (const scalar_t* p = weight + r0 * dim; p < weight + r1 * dim; p += kLine) {
      __builtin_prefetch(p, 0, 1);
    }
  });
}

template <typename scalar_t>
HSM_CPU_CLONES void forward_range(const Args<scalar_t>& a, scalar_t* out, int64_t begin,
                                  int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const PathTree& tree = a.tree;
  std::vector<int64_t> path_rows(a.rows);
  std::vector<acc_t> term(a.rows);
  ScaledRowSum<scalar_t> basis_sum(a.basis ? a.dim : 0);
  for (int64_t b = begin; b < end; ++b) {
    if (b + 1 < end) prefetch_path_rows(tree, a.target[b + 1], a.weight, a.dim);
    const scalar_t* h = a.hidden + b * a.dim;
    acc_t* __restrict__ z = a.coef + b * a.rows;
    const int64_t y = a.target[b];
    const int64_t s0 = tree.leaf_path_ptr[y], s1 = tree.leaf_path_ptr[y + 1];
    // 1. the weight rows on the path, in path order
    int64_t m = 0;
    for_each_path_row(tree, y, [&](int64_t r, int64_t) { path_rows[m++] = r; });
    // 2. their logits, four rows at a time
    int64_t e = 0;
    for (; e + 4 <= m; e += 4) {
      const scalar_t* w[4];
      for (int i = 0; i < 4; ++i) w[i] = a.weight + path_rows[e + i] * a.dim;
      dot4<scalar_t, acc_t>(h, w, a.dim, z + e);
    }
    for (; e < m; ++e) z[e] = dot<scalar_t, acc_t>(h, a.weight + path_rows[e] * a.dim, a.dim);
    if (a.bias) {
      for (e = 0; e < m; ++e) z[e] += static_cast<acc_t>(a.bias[path_rows[e]]);
    }
    // 3. log-softmax of each node: one row per node means every node on the path is binary
    // (one exp and one log each)
    acc_t lp = 0;
    if (m == s1 - s0) {
      const int32_t* __restrict__ choice = tree.path_choice + s0;
      acc_t* __restrict__ t = term.data();
      for (e = 0; e < m; ++e) t[e] = math::binary_node_log_softmax(z + e, choice[e]);
      for (e = 0; e < m; ++e) lp += t[e];
    } else {
      for_each_path_node(tree, y, [&](int64_t s, int64_t, int n, int64_t e0) {
        lp += math::node_log_softmax(z + e0, n, tree.path_choice[s]);
      });
    }
    for (e = m; e < a.rows; ++e) z[e] = 0;
    out[b] = static_cast<scalar_t>(lp);
    // 4. the hidden-gradient basis: the path's rows, still in cache, weighted by their
    // coefficients (the backward then reads no weight row for grad_hidden)
    if (a.basis) {
      acc_t* u = a.basis + b * a.dim;
      const auto row_at = [&](int64_t j) { return a.weight + path_rows[j] * a.dim; };
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        basis_sum(row_at, z, m, u);
      } else {
        std::fill(u, u + a.dim, acc_t(0));
        for (e = 0; e < m; ++e) axpy<scalar_t, acc_t>(z[e], row_at(e), u, a.dim);
      }
    }
  }
}

// The backward's view of a batch: entry (b, e) is the e-th weight row on example b's path,
// flat_row[b * R + e], with scale flat_scale[b * R + e] = grad_log_prob[b] * coef[b, e];
// path_len[b] entries per example. Written once by the (parallel) first pass and read by the
// grouping, so the tree is walked once.
template <typename T>
class Buffer {  // n uninitialised elements: a std::vector would first zero what pass 1 overwrites
  std::unique_ptr<T[]> data_;

 public:
  explicit Buffer(int64_t n) : data_(new T[n]) {}
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }
};

template <typename acc_t>
struct Entries {
  Buffer<int32_t> flat_row;
  Buffer<acc_t> flat_scale;
  std::vector<int32_t> path_len;
};

// First backward pass over examples [begin, end): records their entries, adds them to the row
// histogram `count` of buckets of 2^kBucketShift rows (when not null), and computes grad_hidden[b]
// = sum of the path's weight rows scaled by their entries (when not null).
template <typename scalar_t>
HSM_CPU_CLONES void path_entries_range(const Args<scalar_t>& a,
                                       Entries<at::opmath_type<scalar_t>>& entries, int64_t* count,
                                       scalar_t* grad_hidden, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  ScaledRowSum<scalar_t> sum(a.dim);
  std::vector<const scalar_t*> rows(grad_hidden ? a.rows : 0);
  for (int64_t b = begin; b < end; ++b) {
    if (grad_hidden && b + 1 < end) prefetch_path_rows(a.tree, a.target[b + 1], a.weight, a.dim);
    const acc_t gb = static_cast<acc_t>(a.grad_log_prob[b]);
    const acc_t* c = a.coef + b * a.rows;
    int32_t* row = entries.flat_row.data() + b * a.rows;
    acc_t* scale = entries.flat_scale.data() + b * a.rows;
    int64_t m = 0;
    for_each_path_row(a.tree, a.target[b], [&](int64_t r, int64_t e) {
      row[m] = static_cast<int32_t>(r);
      scale[m++] = gb * c[e];
    });
    entries.path_len[b] = static_cast<int32_t>(m);
    if (count) {
      for (int64_t j = 0; j < m; ++j) ++count[row[j] >> kBucketShift];
    }
    if (grad_hidden) {
      for (int64_t j = 0; j < m; ++j) rows[j] = a.weight + int64_t{row[j]} * a.dim;
      sum([&](int64_t j) { return rows[j]; }, scale, m, grad_hidden + b * a.dim);
    }
  }
}

// The entries grouped by weight row. Group k holds entries [seg[k], seg[k + 1]), in increasing
// example order: example[j] and scale[j]. Dense: one group per weight row (many empty). Sparse:
// one group per touched row, rows[k] its id (ascending).
template <typename acc_t>
struct RowGroups {
  std::vector<int64_t> rows;
  std::vector<int64_t> seg;
  std::vector<int32_t> example;
  std::vector<acc_t> scale;
  int64_t num_groups() const { return static_cast<int64_t>(seg.size()) - 1; }
};

// Dense grouping of the rows [r0, r1): a counting sort of the entries whose row is in range, read
// in (example, slot) order, so each row's entries, and hence its sum, run in example order:
// bit-identical results for any thread count and any chunking, no atomics. Group k is row r0 + k.
template <typename acc_t>
RowGroups<acc_t> group_rows_in_range(const Entries<acc_t>& entries, int64_t rows_per_example,
                                     int64_t r0, int64_t r1) {
  RowGroups<acc_t> g;
  g.seg.assign(r1 - r0 + 1, 0);
  const int64_t batch = static_cast<int64_t>(entries.path_len.size());
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t* row = entries.flat_row.data() + b * rows_per_example;
    for (int32_t j = 0; j < entries.path_len[b]; ++j) {
      if (r0 <= row[j] && row[j] < r1) ++g.seg[row[j] - r0 + 1];
    }
  }
  for (int64_t k = 0; k < r1 - r0; ++k) g.seg[k + 1] += g.seg[k];
  g.example.resize(g.seg[r1 - r0]);
  g.scale.resize(g.seg[r1 - r0]);
  std::vector<int64_t> next(g.seg.begin(), g.seg.end() - 1);
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t* row = entries.flat_row.data() + b * rows_per_example;
    const acc_t* scale = entries.flat_scale.data() + b * rows_per_example;
    for (int32_t j = 0; j < entries.path_len[b]; ++j) {
      if (row[j] < r0 || row[j] >= r1) continue;
      const int64_t slot = next[row[j] - r0]++;
      g.example[slot] = static_cast<int32_t>(b);
      g.scale[slot] = scale[j];
    }
  }
  return g;
}

// Sparse grouping: an LSD radix sort on the row id, stable (example order within a row) and
// O(entries), independent of V.
template <typename acc_t>
RowGroups<acc_t> group_by_row_sparse(const Entries<acc_t>& entries, int64_t rows_per_example,
                                     int64_t num_rows) {
  const int64_t batch = static_cast<int64_t>(entries.path_len.size());
  std::vector<int64_t> key, idx;
  for (int64_t b = 0; b < batch; ++b) {
    for (int32_t j = 0; j < entries.path_len[b]; ++j) {
      key.push_back(entries.flat_row[b * rows_per_example + j]);
      idx.push_back(b * rows_per_example + j);
    }
  }
  const int64_t n = static_cast<int64_t>(key.size());
  constexpr int kBits = 11;
  constexpr int64_t kMask = (int64_t{1} << kBits) - 1;
  std::vector<int64_t> key_tmp(n), idx_tmp(n), bucket(kMask + 2);
  for (int shift = 0; ((num_rows - 1) >> shift) > 0; shift += kBits) {
    std::fill(bucket.begin(), bucket.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++bucket[((key[i] >> shift) & kMask) + 1];
    for (int64_t d = 0; d <= kMask; ++d) bucket[d + 1] += bucket[d];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = bucket[(key[i] >> shift) & kMask]++;
      key_tmp[pos] = key[i];
      idx_tmp[pos] = idx[i];
    }
    key.swap(key_tmp);
    idx.swap(idx_tmp);
  }
  RowGroups<acc_t> g;
  g.example.resize(n);
  g.scale.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || key[i] != key[i - 1]) {
      g.rows.push_back(key[i]);
      g.seg.push_back(i);
    }
    g.example[i] = static_cast<int32_t>(idx[i] / rows_per_example);
    g.scale[i] = entries.flat_scale[idx[i]];
  }
  g.seg.push_back(n);
  return g;
}

// Weight/bias gradient of groups [k0, k1): group k's sum goes to output row k (the weight row
// itself when dense, the k-th touched row when sparse); an empty group's row is zeroed.
template <typename scalar_t>
HSM_CPU_CLONES void grad_weight_groups(const Args<scalar_t>& a,
                                       const RowGroups<at::opmath_type<scalar_t>>& g,
                                       scalar_t* grad_weight, scalar_t* grad_bias, int64_t k0,
                                       int64_t k1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = a.dim;
  ScaledRowSum<scalar_t> sum(dim);
  int64_t k = k0;
  while (k < k1) {
    if (g.seg[k] == g.seg[k + 1]) {  // a run of untouched rows: one memset
      int64_t end = k + 1;
      while (end < k1 && g.seg[end] == g.seg[end + 1]) ++end;
      if (grad_weight) std::memset(grad_weight + k * dim, 0, (end - k) * dim * sizeof(scalar_t));
      if (grad_bias) std::memset(grad_bias + k, 0, (end - k) * sizeof(scalar_t));
      k = end;
      continue;
    }
    const int64_t j0 = g.seg[k], n = g.seg[k + 1] - j0;
    if (grad_weight) {
      const int32_t* example = g.example.data() + j0;
      sum([&](int64_t j) { return a.hidden + int64_t{example[j]} * dim; }, g.scale.data() + j0, n,
          grad_weight + k * dim);
    }
    acc_t bias_acc = 0;
    for (int64_t j = 0; j < n; ++j) bias_acc += g.scale[j0 + j];
    if (grad_bias) grad_bias[k] = static_cast<scalar_t>(bias_acc);
    ++k;
  }
}

// Relative costs of the dense weight gradient's work, which its row chunks are balanced on: an
// entry is a row of D multiply-adds on a hidden row that sits in cache; an output row is a store
// of D to the (V - 1, D) gradient, which does not. Measured (benchmarks/op_vs_loop.py --split,
// V = 15,584, 2 threads, Intel Xeon, medians): a row at 4 entries gave the weight and bias
// gradients 0.34-0.35 ms against 0.41-0.47 ms at 0.5, where the thread holding the rows near the
// root (few rows, most entries) finished early and waited; 1 gave 0.39-0.40 ms, 6 and 10
// 0.35-0.38 ms.
constexpr int64_t kEntryCost = 1;
constexpr int64_t kRowCost = 4;

// Dense weight/bias gradient: the rows are cut into one chunk per thread, of equal cost
// (kEntryCost per entry, kRowCost per row) on pass 1's histograms of buckets of rows, and each
// chunk groups and sums its own rows' entries (group_rows_in_range). Each chunk
// reads every entry once, cheap next to the sums; nothing runs serially over the V rows or the
// entries, and there is no shared scatter between the passes.
template <typename scalar_t>
void grad_weight_dense(const Args<scalar_t>& a, const Entries<at::opmath_type<scalar_t>>& entries,
                       const std::vector<int64_t>& count, int64_t num_blocks, int64_t num_rows,
                       scalar_t* grad_weight, scalar_t* grad_bias) {
  const int64_t num_buckets = (num_rows + (int64_t{1} << kBucketShift) - 1) >> kBucketShift;
  if (num_buckets == 0) return;
  std::vector<int64_t> cost(num_buckets + 1, 0);  // cost[i]: buckets [0, i)
  for (int64_t i = 0; i < num_buckets; ++i) {
    int64_t in_bucket = 0;
    for (int64_t t = 0; t < num_blocks; ++t) in_bucket += count[t * num_buckets + i];
    const int64_t rows = std::min(num_rows, (i + 1) << kBucketShift) - (i << kBucketShift);
    cost[i + 1] = cost[i] + kEntryCost * in_bucket + kRowCost * rows;
  }
  const int64_t num_chunks = std::min<int64_t>(num_buckets, at::get_num_threads());
  std::vector<int64_t> bounds(num_chunks + 1, num_rows);  // chunk c: rows [bounds[c], bounds[c+1])
  bounds[0] = 0;
  for (int64_t c = 1; c < num_chunks; ++c) {
    const int64_t goal = cost[num_buckets] * c / num_chunks;
    const int64_t i = std::lower_bound(cost.begin(), cost.end(), goal) - cost.begin();
    bounds[c] = std::max(bounds[c - 1], std::min(num_rows, i << kBucketShift));
  }
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t r0 = bounds[c], r1 = bounds[c + 1];
      if (r0 == r1) continue;
      const auto groups = group_rows_in_range(entries, a.rows, r0, r1);
      grad_weight_groups(a, groups, grad_weight ? grad_weight + r0 * a.dim : nullptr,
                         grad_bias ? grad_bias + r0 : nullptr, 0, r1 - r0);
    }
  });
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& hidden, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const PathTree& tree,
                    const at::Tensor& target, PathCheck& check, at::Tensor& log_prob,
                    at::Tensor& coef, at::Tensor& basis) {
  using acc_t = at::opmath_type<scalar_t>;
  const Args<scalar_t> a{hidden.data_ptr<scalar_t>(),
                         weight.data_ptr<scalar_t>(),
                         bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                         nullptr,
                         target.data_ptr<int64_t>(),
                         coef.data_ptr<acc_t>(),
                         hidden.size(1),
                         coef.size(1),
                         tree,
                         basis.numel() > 0 ? basis.data_ptr<acc_t>() : nullptr};
  scalar_t* out = log_prob.data_ptr<scalar_t>();
  at::parallel_for(0, hidden.size(0), kBatchGrain, [&](int64_t begin, int64_t end) {
    if (check.ok(begin, end)) forward_range(a, out, begin, end);
  });
  check.raise_if_bad();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> path_log_prob_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
    const at::Tensor& path_choice, const at::Tensor& target, int64_t max_path_rows,
    bool /*sparse_grad: used by the autograd formula only*/, bool hidden_grad) {
  check_forward_args(hidden, weight, bias, node_row_ptr, leaf_path_ptr, path_node, path_choice,
                     target, max_path_rows);
  const PathTree tree = path_tree_of(node_row_ptr, leaf_path_ptr, path_node, path_choice);
  PathCheck check(tree, target, node_row_ptr, leaf_path_ptr, path_node, path_choice, max_path_rows);
  auto log_prob = at::empty({hidden.size(0)}, hidden.options());
  auto coef = at::empty({hidden.size(0), max_path_rows},
                        hidden.options().dtype(coef_dtype(hidden.scalar_type())));
  auto basis = empty_hidden_grad_basis(hidden, hidden_grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "path_log_prob_forward_cpu", [&] {
        forward_kernel<scalar_t>(hidden, weight, bias, tree, target, check, log_prob, coef, basis);
      });
  return {log_prob, coef, basis};
}

// Fills the requested gradients: grad_hidden (B, D); grad_weight / grad_bias either dense
// (V - 1, D) / (V - 1,) or, when `sparse`, the K touched rows (K, D) / (K,) with their row ids.
template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_log_prob, const at::Tensor& coef,
                     const at::Tensor& hidden, const at::Tensor& weight, const PathTree& tree,
                     const at::Tensor& target, PathCheck& check, bool want_weight, bool want_bias,
                     bool sparse, at::Tensor& grad_hidden, at::Tensor& grad_weight,
                     at::Tensor& grad_bias, at::Tensor& grad_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = hidden.size(0), num_rows = weight.size(0), dim = hidden.size(1);
  const Args<scalar_t> a{hidden.data_ptr<scalar_t>(),
                         weight.data_ptr<scalar_t>(),
                         nullptr,
                         grad_log_prob.data_ptr<scalar_t>(),
                         target.data_ptr<int64_t>(),
                         const_cast<acc_t*>(coef.data_ptr<acc_t>()),
                         dim,
                         coef.size(1),
                         tree};
  const bool want_hidden = grad_hidden.numel() > 0;
  const bool want_groups = want_weight || want_bias;
  if (!want_hidden && !want_groups) return check.all();
  TORCH_CHECK(batch <= std::numeric_limits<int32_t>::max(), "batch of ", batch,
              " examples is too large (at most 2^31 - 1)");

  // Pass 1, parallel over fixed blocks of examples (fixed, so the histograms and hence the
  // result do not depend on the thread count): entries, bucket histograms, grad_hidden.
  Entries<acc_t> entries{Buffer<int32_t>(batch * a.rows), Buffer<acc_t>(batch * a.rows),
                         std::vector<int32_t>(batch)};
  const bool dense_groups = want_groups && !sparse;
  const int64_t num_blocks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch / kBatchGrain));
  const int64_t block = (batch + num_blocks - 1) / num_blocks;
  const int64_t num_buckets = (num_rows + (int64_t{1} << kBucketShift) - 1) >> kBucketShift;
  std::vector<int64_t> count(dense_groups ? num_blocks * num_buckets : 0, 0);
  scalar_t* gh = want_hidden ? grad_hidden.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, num_blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t begin = t * block, end = std::min(batch, (t + 1) * block);
      if (!check.ok(begin, end)) continue;
      int64_t* block_count = dense_groups ? count.data() + t * num_buckets : nullptr;
      path_entries_range(a, entries, block_count, gh, begin, end);
    }
  });
  check.raise_if_bad();
  if (!want_groups) return;

  if (!sparse) {
    if (want_weight) grad_weight = at::empty({num_rows, dim}, weight.options());
    if (want_bias) grad_bias = at::empty({num_rows}, weight.options());
    grad_weight_dense(a, entries, count, num_blocks, num_rows,
                      want_weight ? grad_weight.data_ptr<scalar_t>() : nullptr,
                      want_bias ? grad_bias.data_ptr<scalar_t>() : nullptr);
    return;
  }
  const auto groups = group_by_row_sparse(entries, a.rows, num_rows);
  const int64_t num_groups = groups.num_groups();
  if (want_weight) grad_weight = at::empty({num_groups, dim}, weight.options());
  if (want_bias) grad_bias = at::empty({num_groups}, weight.options());
  grad_rows = at::empty({num_groups}, weight.options().dtype(at::kLong));
  std::copy(groups.rows.begin(), groups.rows.end(), grad_rows.data_ptr<int64_t>());
  scalar_t* gw = want_weight ? grad_weight.data_ptr<scalar_t>() : nullptr;
  scalar_t* gb = want_bias ? grad_bias.data_ptr<scalar_t>() : nullptr;
  if (num_groups == 0) return;
  // Rows near the root collect most entries, so equal group counts would leave one thread with
  // most of the work: cut the groups into chunks of equal cost, 2 per entry (a row of D
  // multiply-adds) plus 1 per output row (a store of D), i.e. 2 * seg[k] + k before group k.
  const int64_t num_chunks = std::min<int64_t>(num_groups, at::get_num_threads() * 4);
  const int64_t total = 2 * groups.seg[num_groups] + num_groups;
  std::vector<int64_t> bounds(num_chunks + 1, num_groups);
  bounds[0] = 0;
  for (int64_t c = 1; c < num_chunks; ++c) {
    const int64_t goal = total * c / num_chunks;
    int64_t lo = bounds[c - 1], hi = num_groups;  // first k with 2 * seg[k] + k >= goal
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (2 * groups.seg[mid] + mid < goal) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    bounds[c] = lo;
  }
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      grad_weight_groups(a, groups, gw, gb, bounds[c], bounds[c + 1]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> path_log_prob_backward_cpu(
    const at::Tensor& grad_log_prob, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr,
    const at::Tensor& path_node, const at::Tensor& path_choice, const at::Tensor& target,
    bool has_bias, std::array<bool, 3> output_mask, bool sparse_weight) {
  check_backward_args(grad_log_prob, coef, hidden, weight, node_row_ptr, leaf_path_ptr, path_node,
                      path_choice, target);
  const PathTree tree = path_tree_of(node_row_ptr, leaf_path_ptr, path_node, path_choice);
  PathCheck check(tree, target, node_row_ptr, leaf_path_ptr, path_node, path_choice, coef.size(1));
  const auto g = grad_log_prob.contiguous();
  const auto c = coef.contiguous();
  at::Tensor gh = output_mask[0] ? at::empty_like(hidden) : at::empty({0}, hidden.options());
  at::Tensor gw = at::empty({0}, weight.options());
  at::Tensor gb = at::empty({0}, weight.options());
  at::Tensor rows = at::empty({0}, weight.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "path_log_prob_backward_cpu", [&] {
        backward_kernel<scalar_t>(g, c, hidden, weight, tree, target, check, output_mask[1],
                                  output_mask[2] && has_bias, sparse_weight, gh, gw, gb, rows);
      });
  return {gh, gw, gb, rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(hsoftmax, CPU, m) {
  m.impl("path_log_prob_forward", &path_log_prob_forward_cpu);
  m.impl("path_log_prob_backward", &path_log_prob_backward_cpu);
}

}  // namespace hsoftmax
