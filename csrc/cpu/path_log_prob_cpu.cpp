// CPU kernels of path_log_prob: fused forward (logits, log-softmax and gradient coefficients in
// one pass over each example's path) and a race-free, deterministic backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../hsoftmax.h"
#include "../hsoftmax_math.h"
#include "cpu_clones.h"

namespace hsoftmax {
namespace {

// Examples per parallel task: a path costs ~depth * D multiply-adds, so small chunks already
// amortise the scheduling cost.
constexpr int64_t kBatchGrain = 16;

// HSM_CPU_CLONES: see cpu_clones.h.

// Dot product accumulated in acc_t over kLanes independent partial sums: the compiler maps them
// onto SIMD registers without -ffast-math, and enough of them hide the add latency. The summation
// order is fixed, so results are deterministic.
constexpr int kLanes = 16;

template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      lane[j] += static_cast<acc_t>(a[d + j]) * static_cast<acc_t>(b[d + j]);
    }
  }
  for (int j = 0; d + j < n; ++j) {  // tail: the first n % kLanes lanes take one more term
    lane[j] += static_cast<acc_t>(a[d + j]) * static_cast<acc_t>(b[d + j]);
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lane[j] += lane[j + width];
  }
  return lane[0];
}

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

struct TreeView {
  const int32_t* node_row_ptr;
  const int64_t* leaf_path_ptr;
  const int32_t* path_node;
  const int32_t* path_choice;
  int64_t num_leaves;
};

TreeView view_of(const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr,
                 const at::Tensor& path_node, const at::Tensor& path_choice) {
  return {node_row_ptr.data_ptr<int32_t>(), leaf_path_ptr.data_ptr<int64_t>(),
          path_node.data_ptr<int32_t>(), path_choice.data_ptr<int32_t>(),
          leaf_path_ptr.size(0) - 1};
}

void check_targets(const int64_t* target, int64_t batch, int64_t num_leaves) {
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_INDEX(target[b] >= 0 && target[b] < num_leaves, "target[", b, "] = ", target[b],
                      " is out of range for a tree of ", num_leaves, " leaves");
  }
}

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
  TreeView tree;
};

// Calls fn(row, entry) for every weight row on example b's path, entry = index into coef[b].
template <typename F>
inline void for_each_path_row(const TreeView& tree, int64_t y, F&& fn) {
  int64_t e = 0;
  for (int64_t s = tree.leaf_path_ptr[y]; s < tree.leaf_path_ptr[y + 1]; ++s) {
    const int32_t node = tree.path_node[s];
    const int64_t r0 = tree.node_row_ptr[node];
    const int n = tree.node_row_ptr[node + 1] - r0;
    for (int k = 0; k < n; ++k, ++e) fn(r0 + k, e);
  }
}

// Weight rows on a path are scattered over the matrix, and the forward and grad_hidden loops stall
// on them; the next example's path is known in advance, so its rows are fetched while the
// current example computes. Capped so a very wide node does not flood the cache.
template <typename scalar_t>
inline void prefetch_path_rows(const TreeView& tree, int64_t y, const scalar_t* weight,
                               int64_t dim) {
  constexpr int64_t kMaxRows = 64;
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  int64_t budget = kMaxRows;
  for (int64_t s = tree.leaf_path_ptr[y]; s < tree.leaf_path_ptr[y + 1] && budget > 0; ++s) {
    const int32_t node = tree.path_node[s];
    const int64_t r0 = tree.node_row_ptr[node];
    const int64_t r1 = std::min<int64_t>(tree.node_row_ptr[node + 1], r0 + budget);
    budget -= r1 - r0;
    for (const scalar_t* p = weight + r0 * dim; p < weight + r1 * dim; p += kLine) {
      __builtin_prefetch(p, 0, 1);
    }
  }
}

template <typename scalar_t>
HSM_CPU_CLONES void forward_range(const Args<scalar_t>& a, scalar_t* out, int64_t begin,
                                  int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const TreeView& tree = a.tree;
  for (int64_t b = begin; b < end; ++b) {
    if (b + 1 < end) prefetch_path_rows(tree, a.target[b + 1], a.weight, a.dim);
    const scalar_t* h = a.hidden + b * a.dim;
    acc_t* z = a.coef + b * a.rows;
    const int64_t y = a.target[b];
    acc_t lp = 0;
    int64_t e = 0;
    for (int64_t s = tree.leaf_path_ptr[y]; s < tree.leaf_path_ptr[y + 1]; ++s) {
      const int32_t node = tree.path_node[s];
      const int64_t r0 = tree.node_row_ptr[node];
      const int n = tree.node_row_ptr[node + 1] - r0;
      for (int k = 0; k < n; ++k) {
        const int64_t r = r0 + k;
        z[e + k] = dot<scalar_t, acc_t>(h, a.weight + r * a.dim, a.dim) +
                   (a.bias ? static_cast<acc_t>(a.bias[r]) : acc_t(0));
      }
      lp += math::node_log_softmax(z + e, n, tree.path_choice[s]);
      e += n;
    }
    for (; e < a.rows; ++e) z[e] = 0;
    out[b] = static_cast<scalar_t>(lp);
  }
}

// grad_hidden[b] = sum over the rows r on b's path of g[b] * coef[b, e] * weight[r].
template <typename scalar_t>
HSM_CPU_CLONES void grad_hidden_range(const Args<scalar_t>& a, scalar_t* grad_hidden, int64_t begin,
                                      int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  RowAccumulator<scalar_t> row(a.dim);
  for (int64_t b = begin; b < end; ++b) {
    if (b + 1 < end) prefetch_path_rows(a.tree, a.target[b + 1], a.weight, a.dim);
    scalar_t* gh = grad_hidden + b * a.dim;
    acc_t* acc = row.start(gh);
    const acc_t gb = static_cast<acc_t>(a.grad_log_prob[b]);
    const acc_t* c = a.coef + b * a.rows;
    for_each_path_row(a.tree, a.target[b], [&](int64_t r, int64_t e) {
      axpy<scalar_t, acc_t>(gb * c[e], a.weight + r * a.dim, acc, a.dim);
    });
    row.finish(gh);
  }
}

// The (example, path slot) pairs of a batch grouped by the weight row they touch: rows[k] is the
// k-th touched row (ascending) and entry_coef[seg[k] .. seg[k + 1]) index its coefficients in
// `coef` (B, R), in increasing example order.
struct RowGroups {
  std::vector<int64_t> rows;
  std::vector<int64_t> seg;
  std::vector<int64_t> entry_coef;
};

// Groups by an LSD radix sort on the row id: stable, so each row's sum runs in example order
// (bit-identical results for any thread count, no atomics), and O(entries), independent of V.
template <typename scalar_t>
RowGroups group_by_row(const Args<scalar_t>& a, int64_t batch, int64_t num_rows) {
  std::vector<int64_t> key, idx;
  key.reserve(batch * a.rows);
  idx.reserve(batch * a.rows);
  for (int64_t b = 0; b < batch; ++b) {
    for_each_path_row(a.tree, a.target[b], [&](int64_t r, int64_t e) {
      key.push_back(r);
      idx.push_back(b * a.rows + e);
    });
  }
  const int64_t n = static_cast<int64_t>(key.size());
  constexpr int kBits = 11;
  constexpr int64_t kMask = (int64_t{1} << kBits) - 1;
  std::vector<int64_t> key_tmp(n), idx_tmp(n), count(kMask + 2);
  for (int shift = 0; ((num_rows - 1) >> shift) > 0; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[((key[i] >> shift) & kMask) + 1];
    for (int64_t d = 0; d <= kMask; ++d) count[d + 1] += count[d];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = count[(key[i] >> shift) & kMask]++;
      key_tmp[pos] = key[i];
      idx_tmp[pos] = idx[i];
    }
    key.swap(key_tmp);
    idx.swap(idx_tmp);
  }
  RowGroups groups;
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || key[i] != key[i - 1]) {
      groups.rows.push_back(key[i]);
      groups.seg.push_back(i);
    }
  }
  groups.seg.push_back(n);
  groups.entry_coef = std::move(idx);
  return groups;
}

// Weight/bias gradient of groups [k0, k1). Dense: the output is the whole (V - 1, D) matrix;
// group k writes row rows[k] and zeroes the untouched rows since the previous group (the chunk
// with the last group also zeroes the rows after it). Sparse: group k writes output row k.
template <typename scalar_t>
HSM_CPU_CLONES void grad_weight_groups(const Args<scalar_t>& a, const RowGroups& g, bool dense,
                                       int64_t num_rows, scalar_t* grad_weight, scalar_t* grad_bias,
                                       int64_t k0, int64_t k1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = a.dim;
  const int64_t num_groups = static_cast<int64_t>(g.rows.size());
  auto zero_rows = [&](int64_t lo, int64_t hi) {
    if (hi <= lo) return;
    if (grad_weight) std::memset(grad_weight + lo * dim, 0, (hi - lo) * dim * sizeof(scalar_t));
    if (grad_bias) std::memset(grad_bias + lo, 0, (hi - lo) * sizeof(scalar_t));
  };
  RowAccumulator<scalar_t> row(dim);
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t r = g.rows[k];
    if (dense) zero_rows(k == 0 ? 0 : g.rows[k - 1] + 1, r);
    const int64_t out = dense ? r : k;
    scalar_t* gw = grad_weight ? grad_weight + out * dim : nullptr;
    acc_t* acc = gw ? row.start(gw) : nullptr;
    acc_t bias_acc = 0;
    for (int64_t j = g.seg[k]; j < g.seg[k + 1]; ++j) {
      const int64_t idx = g.entry_coef[j];
      const int64_t b = idx / a.rows;  // coef is (B, R), row-major
      const acc_t cb = static_cast<acc_t>(a.grad_log_prob[b]) * a.coef[idx];
      bias_acc += cb;
      if (gw) axpy<scalar_t, acc_t>(cb, a.hidden + b * dim, acc, dim);
    }
    if (gw) row.finish(gw);
    if (grad_bias) grad_bias[out] = static_cast<scalar_t>(bias_acc);
  }
  if (dense && k1 == num_groups) zero_rows(num_groups ? g.rows.back() + 1 : 0, num_rows);
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& hidden, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const TreeView& tree,
                    const at::Tensor& target, at::Tensor& log_prob, at::Tensor& coef) {
  using acc_t = at::opmath_type<scalar_t>;
  const Args<scalar_t> a{hidden.data_ptr<scalar_t>(),
                         weight.data_ptr<scalar_t>(),
                         bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                         nullptr,
                         target.data_ptr<int64_t>(),
                         coef.data_ptr<acc_t>(),
                         hidden.size(1),
                         coef.size(1),
                         tree};
  scalar_t* out = log_prob.data_ptr<scalar_t>();
  at::parallel_for(0, hidden.size(0), kBatchGrain,
                   [&](int64_t begin, int64_t end) { forward_range(a, out, begin, end); });
}

std::tuple<at::Tensor, at::Tensor> path_log_prob_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
    const at::Tensor& path_choice, const at::Tensor& target, int64_t max_path_rows,
    bool /*sparse_grad: used by the autograd formula only*/) {
  check_forward_args(hidden, weight, bias, node_row_ptr, leaf_path_ptr, path_node, path_choice,
                     target, max_path_rows);
  const TreeView tree = view_of(node_row_ptr, leaf_path_ptr, path_node, path_choice);
  check_targets(target.data_ptr<int64_t>(), target.size(0), tree.num_leaves);
  auto log_prob = at::empty({hidden.size(0)}, hidden.options());
  auto coef = at::empty({hidden.size(0), max_path_rows},
                        hidden.options().dtype(coef_dtype(hidden.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "path_log_prob_forward_cpu",
      [&] { forward_kernel<scalar_t>(hidden, weight, bias, tree, target, log_prob, coef); });
  return {log_prob, coef};
}

// Fills the requested gradients: grad_hidden (B, D); grad_weight / grad_bias either dense
// (V - 1, D) / (V - 1,) or, when `sparse`, the K touched rows (K, D) / (K,) with their row ids.
template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_log_prob, const at::Tensor& coef,
                     const at::Tensor& hidden, const at::Tensor& weight, const TreeView& tree,
                     const at::Tensor& target, bool want_weight, bool want_bias, bool sparse,
                     at::Tensor& grad_hidden, at::Tensor& grad_weight, at::Tensor& grad_bias,
                     at::Tensor& grad_rows) {
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

  if (grad_hidden.numel() > 0) {
    scalar_t* gh = grad_hidden.data_ptr<scalar_t>();
    at::parallel_for(0, batch, kBatchGrain,
                     [&](int64_t begin, int64_t end) { grad_hidden_range(a, gh, begin, end); });
  }
  if (!want_weight && !want_bias) return;

  const RowGroups groups = group_by_row(a, batch, num_rows);
  const int64_t num_groups = static_cast<int64_t>(groups.rows.size());
  const int64_t out_rows = sparse ? num_groups : num_rows;
  if (want_weight) grad_weight = at::empty({out_rows, dim}, weight.options());
  if (want_bias) grad_bias = at::empty({out_rows}, weight.options());
  if (sparse) {
    grad_rows = at::empty({num_groups}, weight.options().dtype(at::kLong));
    std::copy(groups.rows.begin(), groups.rows.end(), grad_rows.data_ptr<int64_t>());
  }
  scalar_t* gw = want_weight ? grad_weight.data_ptr<scalar_t>() : nullptr;
  scalar_t* gb = want_bias ? grad_bias.data_ptr<scalar_t>() : nullptr;
  if (num_groups == 0) {  // empty batch (or V = 1): a dense gradient is all zeros
    if (!sparse) grad_weight_groups(a, groups, true, num_rows, gw, gb, 0, 0);
    return;
  }
  // Rows near the root collect most entries, so equal group counts would leave one thread with
  // most of the work: cut the groups into chunks of equal cost (2 per entry, an axpy of D, plus
  // 1 per output row written or zeroed, a store of D).
  std::vector<int64_t> cost(num_groups + 1, 0);
  for (int64_t k = 0; k < num_groups; ++k) {
    const int64_t rows_written = sparse ? 1 : groups.rows[k] - (k ? groups.rows[k - 1] : -1);
    cost[k + 1] = cost[k] + 2 * (groups.seg[k + 1] - groups.seg[k]) + rows_written;
  }
  const int64_t num_chunks = std::min<int64_t>(num_groups, at::get_num_threads() * 4);
  std::vector<int64_t> bounds(num_chunks + 1, num_groups);
  bounds[0] = 0;
  for (int64_t c = 1; c < num_chunks; ++c) {
    const int64_t goal = cost[num_groups] * c / num_chunks;
    bounds[c] = std::lower_bound(cost.begin(), cost.end(), goal) - cost.begin();
  }
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      grad_weight_groups(a, groups, !sparse, num_rows, gw, gb, bounds[c], bounds[c + 1]);
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
  const TreeView tree = view_of(node_row_ptr, leaf_path_ptr, path_node, path_choice);
  check_targets(target.data_ptr<int64_t>(), target.size(0), tree.num_leaves);
  const auto g = grad_log_prob.contiguous();
  const auto c = coef.contiguous();
  at::Tensor gh = output_mask[0] ? at::empty_like(hidden) : at::empty({0}, hidden.options());
  at::Tensor gw = at::empty({0}, weight.options());
  at::Tensor gb = at::empty({0}, weight.options());
  at::Tensor rows = at::empty({0}, weight.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "path_log_prob_backward_cpu", [&] {
        backward_kernel<scalar_t>(g, c, hidden, weight, tree, target, output_mask[1],
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
