// CPU kernels of path_log_prob: fused forward (logits, log-softmax and gradient coefficients in
// one pass over each example's path) and a race-free, deterministic backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "../hsoftmax.h"
#include "../hsoftmax_math.h"

namespace hsoftmax {
namespace {

// Examples per parallel task: a path costs ~depth * D multiply-adds, so small chunks already
// amortise the scheduling cost.
constexpr int64_t kBatchGrain = 16;
constexpr int64_t kRowGrain = 64;

// Dot product accumulated in acc_t. The simd reduction order is fixed at compile time, so the
// result is deterministic for a given build.
template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n) {
  acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < n; ++d) acc += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  return acc;
}

// out[d] += alpha * x[d]
template <typename scalar_t, typename acc_t>
inline void axpy(acc_t alpha, const scalar_t* __restrict__ x, acc_t* __restrict__ out, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) out[d] += alpha * static_cast<acc_t>(x[d]);
}

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

template <typename scalar_t>
void forward_kernel(const at::Tensor& hidden, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const TreeView& tree,
                    const at::Tensor& target, at::Tensor& log_prob, at::Tensor& coef) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = hidden.size(0), dim = hidden.size(1), rows = coef.size(1);
  const scalar_t* h_all = hidden.data_ptr<scalar_t>();
  const scalar_t* w = weight.data_ptr<scalar_t>();
  const scalar_t* bias_ptr = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
  const int64_t* tgt = target.data_ptr<int64_t>();
  scalar_t* out = log_prob.data_ptr<scalar_t>();
  acc_t* coef_all = coef.data_ptr<acc_t>();

  at::parallel_for(0, batch, kBatchGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* h = h_all + b * dim;
      acc_t* z = coef_all + b * rows;
      const int64_t y = tgt[b];
      acc_t lp = 0;
      int64_t e = 0;
      for (int64_t s = tree.leaf_path_ptr[y]; s < tree.leaf_path_ptr[y + 1]; ++s) {
        const int32_t node = tree.path_node[s];
        const int64_t r0 = tree.node_row_ptr[node];
        const int n = tree.node_row_ptr[node + 1] - r0;
        for (int k = 0; k < n; ++k) {
          const int64_t r = r0 + k;
          z[e + k] = dot<scalar_t, acc_t>(h, w + r * dim, dim) +
                     (bias_ptr ? static_cast<acc_t>(bias_ptr[r]) : acc_t(0));
        }
        lp += math::node_log_softmax(z + e, n, tree.path_choice[s]);
        e += n;
      }
      for (; e < rows; ++e) z[e] = 0;
      out[b] = static_cast<scalar_t>(lp);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> path_log_prob_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
    const at::Tensor& path_choice, const at::Tensor& target, int64_t max_path_rows) {
  check_forward_args(hidden, weight, bias, node_row_ptr, leaf_path_ptr, path_node, path_choice,
                     target, max_path_rows);
  const TreeView tree = view_of(node_row_ptr, leaf_path_ptr, path_node, path_choice);
  check_targets(target.data_ptr<int64_t>(), target.size(0), tree.num_leaves);
  auto log_prob = at::empty({hidden.size(0)}, hidden.options());
  auto coef = at::empty({hidden.size(0), max_path_rows},
                        hidden.options().dtype(coef_dtype(hidden.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(),
                                  "path_log_prob_forward_cpu", [&] {
                                    forward_kernel<scalar_t>(hidden, weight, bias, tree, target,
                                                             log_prob, coef);
                                  });
  return {log_prob, coef};
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_log_prob, const at::Tensor& coef,
                     const at::Tensor& hidden, const at::Tensor& weight, const TreeView& tree,
                     const at::Tensor& target, at::Tensor* grad_hidden, at::Tensor* grad_weight,
                     at::Tensor* grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = hidden.size(0), dim = hidden.size(1), rows = coef.size(1);
  const int64_t num_rows = weight.size(0);
  const scalar_t* h_all = hidden.data_ptr<scalar_t>();
  const scalar_t* w = weight.data_ptr<scalar_t>();
  const scalar_t* g = grad_log_prob.data_ptr<scalar_t>();
  const acc_t* coef_all = coef.data_ptr<acc_t>();
  const int64_t* tgt = target.data_ptr<int64_t>();

  // grad_hidden[b] = sum over the rows r on b's path of g[b] * coef[b, e] * weight[r].
  if (grad_hidden != nullptr) {
    scalar_t* gh_all = grad_hidden->data_ptr<scalar_t>();
    at::parallel_for(0, batch, kBatchGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(dim);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const acc_t gb = static_cast<acc_t>(g[b]);
        const acc_t* c = coef_all + b * rows;
        const int64_t y = tgt[b];
        int64_t e = 0;
        for (int64_t s = tree.leaf_path_ptr[y]; s < tree.leaf_path_ptr[y + 1]; ++s) {
          const int32_t node = tree.path_node[s];
          const int64_t r0 = tree.node_row_ptr[node];
          const int n = tree.node_row_ptr[node + 1] - r0;
          for (int k = 0; k < n; ++k, ++e) {
            axpy<scalar_t, acc_t>(gb * c[e], w + (r0 + k) * dim, acc.data(), dim);
          }
        }
        scalar_t* gh = gh_all + b * dim;
        for (int64_t d = 0; d < dim; ++d) gh[d] = static_cast<scalar_t>(acc[d]);
      }
    });
  }

  if (grad_weight == nullptr && grad_bias == nullptr) return;

  // Group the (example, path entry) pairs by the weight row they touch with a stable counting
  // sort, so each row's gradient is one thread's sum in increasing example order: no atomics, no
  // races, and bit-identical results for any thread count.
  std::vector<int64_t> row_ptr(num_rows + 1, 0);
  auto for_each_entry = [&](auto&& fn) {
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t y = tgt[b];
      int64_t e = 0;
      for (int64_t s = tree.leaf_path_ptr[y]; s < tree.leaf_path_ptr[y + 1]; ++s) {
        const int32_t node = tree.path_node[s];
        const int64_t r0 = tree.node_row_ptr[node];
        const int n = tree.node_row_ptr[node + 1] - r0;
        for (int k = 0; k < n; ++k, ++e) fn(r0 + k, b, b * rows + e);
      }
    }
  };
  for_each_entry([&](int64_t r, int64_t, int64_t) { ++row_ptr[r + 1]; });
  for (int64_t r = 0; r < num_rows; ++r) row_ptr[r + 1] += row_ptr[r];
  std::vector<int64_t> fill(row_ptr.begin(), row_ptr.end() - 1);
  std::vector<int64_t> entry_example(row_ptr[num_rows]);
  std::vector<int64_t> entry_coef(row_ptr[num_rows]);
  for_each_entry([&](int64_t r, int64_t b, int64_t idx) {
    const int64_t slot = fill[r]++;
    entry_example[slot] = b;
    entry_coef[slot] = idx;
  });

  scalar_t* gw_all = grad_weight ? grad_weight->data_ptr<scalar_t>() : nullptr;
  scalar_t* gb_all = grad_bias ? grad_bias->data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, num_rows, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(gw_all ? dim : 0);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t bias_acc = 0;
      for (int64_t j = row_ptr[r]; j < row_ptr[r + 1]; ++j) {
        const int64_t b = entry_example[j];
        const acc_t cb = static_cast<acc_t>(g[b]) * coef_all[entry_coef[j]];
        bias_acc += cb;
        if (gw_all) axpy<scalar_t, acc_t>(cb, h_all + b * dim, acc.data(), dim);
      }
      if (gw_all) {
        scalar_t* gw = gw_all + r * dim;
        for (int64_t d = 0; d < dim; ++d) gw[d] = static_cast<scalar_t>(acc[d]);
      }
      if (gb_all) gb_all[r] = static_cast<scalar_t>(bias_acc);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> path_log_prob_backward_cpu(
    const at::Tensor& grad_log_prob, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr,
    const at::Tensor& path_node, const at::Tensor& path_choice, const at::Tensor& target,
    bool has_bias, std::array<bool, 3> output_mask) {
  check_forward_args(hidden, weight, std::nullopt, node_row_ptr, leaf_path_ptr, path_node,
                     path_choice, target, coef.size(1));
  TORCH_CHECK(grad_log_prob.sizes() == target.sizes() &&
                  grad_log_prob.scalar_type() == hidden.scalar_type(),
              "grad_log_prob must have shape (B,) and hidden's dtype");
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == hidden.size(0) &&
                  coef.scalar_type() == coef_dtype(hidden.scalar_type()),
              "grad_coef must be the second output of path_log_prob_forward");
  const TreeView tree = view_of(node_row_ptr, leaf_path_ptr, path_node, path_choice);
  check_targets(target.data_ptr<int64_t>(), target.size(0), tree.num_leaves);
  const auto g = grad_log_prob.contiguous();
  const auto c = coef.contiguous();
  at::Tensor gh = output_mask[0] ? at::empty_like(hidden) : at::empty({0}, hidden.options());
  at::Tensor gw = output_mask[1] ? at::empty_like(weight) : at::empty({0}, weight.options());
  at::Tensor gb = (output_mask[2] && has_bias) ? at::empty({weight.size(0)}, weight.options())
                                               : at::empty({0}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "path_log_prob_backward_cpu", [&] {
        backward_kernel<scalar_t>(g, c, hidden, weight, tree, target,
                                  output_mask[0] ? &gh : nullptr, output_mask[1] ? &gw : nullptr,
                                  (output_mask[2] && has_bias) ? &gb : nullptr);
      });
  return {gh, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(hsoftmax, CPU, m) {
  m.impl("path_log_prob_forward", &path_log_prob_forward_cpu);
  m.impl("path_log_prob_backward", &path_log_prob_backward_cpu);
}

}  // namespace hsoftmax
