// The hsoftmax op family: schemas (one TORCH_LIBRARY block), shared argument checks, and the
// stub Python module that loads this library. Backends only add TORCH_LIBRARY_IMPL blocks.
#include "hsoftmax.h"

#ifndef HSM_NO_PYTHON
#include <Python.h>
#endif
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <torch/version.h>

#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#ifdef WITH_CUDA
#include <cuda.h>  // CUDA_VERSION
#endif

namespace hsoftmax {

at::ScalarType coef_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor empty_hidden_grad_basis(const at::Tensor& hidden, bool hidden_grad) {
  const auto options = hidden.options().dtype(coef_dtype(hidden.scalar_type()));
  return hidden_grad ? at::empty({hidden.size(0), hidden.size(1)}, options)
                     : at::empty({0}, options);
}

PathTree path_tree_of(const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr,
                      const at::Tensor& path_node, const at::Tensor& path_choice) {
  return {node_row_ptr.data_ptr<int32_t>(), leaf_path_ptr.data_ptr<int64_t>(),
          path_node.data_ptr<int32_t>(), path_choice.data_ptr<int32_t>(),
          leaf_path_ptr.size(0) - 1};
}

namespace {

using Named = std::pair<const char*, const at::Tensor*>;

// hidden (B, D) floating point; weight (rows, D) and bias (rows,) in its dtype.
void check_hidden_weight_bias(const at::Tensor& hidden, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(hidden.dim() == 2, "hidden must have shape (B, D), got ", hidden.sizes());
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), "hidden must be floating point, got ",
              hidden.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1),
              "weight must have shape (V - 1, D=", hidden.size(1), "), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight dtype ", weight.scalar_type(),
              " must match hidden dtype ", hidden.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "bias must have shape (V - 1,) = (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), "bias dtype ", bias->scalar_type(),
                " must match hidden dtype ", hidden.scalar_type());
  }
}

// The leaf paths (leaf_path_ptr (V + 1,) int64, path_node and path_choice int32 alike) and
// target (B,) int64.
void check_paths_and_target(const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
                            const at::Tensor& path_choice, const at::Tensor& target,
                            int64_t batch) {
  TORCH_CHECK(leaf_path_ptr.dim() == 1 && leaf_path_ptr.size(0) >= 2 &&
                  leaf_path_ptr.scalar_type() == at::kLong,
              "leaf_path_ptr must be an int64 tensor of shape (V + 1,)");
  TORCH_CHECK(path_node.dim() == 1 && path_node.scalar_type() == at::kInt,
              "path_node must be a 1-D int32 tensor");
  TORCH_CHECK(path_choice.sizes() == path_node.sizes() && path_choice.scalar_type() == at::kInt,
              "path_choice must be an int32 tensor shaped like path_node");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == batch, "target must have shape (B=", batch,
              ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64, got ",
              target.scalar_type());
}

// Every tensor contiguous and on hidden's device (on the CPU when cpu_only).
void check_placement(std::initializer_list<Named> tensors, const at::Tensor& hidden,
                     bool cpu_only) {
  for (const auto& [name, t] : tensors) {
    if (t == nullptr) continue;
    if (cpu_only) {
      TORCH_CHECK(t->device().is_cpu(), name, " must be on the CPU, got ", t->device());
    } else {
      TORCH_CHECK(t->device() == hidden.device(), name, " is on ", t->device(),
                  " but hidden is on ", hidden.device());
    }
    TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
  }
}

}  // namespace

void check_forward_args(const at::Tensor& hidden, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& node_row_ptr,
                        const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
                        const at::Tensor& path_choice, const at::Tensor& target,
                        int64_t max_path_rows) {
  check_hidden_weight_bias(hidden, weight, bias);
  check_paths_and_target(leaf_path_ptr, path_node, path_choice, target, hidden.size(0));
  const int64_t num_leaves = leaf_path_ptr.size(0) - 1;
  TORCH_CHECK(weight.size(0) == num_leaves - 1, "weight must have V - 1 = ", num_leaves - 1,
              " rows for a tree of ", num_leaves, " leaves, got ", weight.size(0));
  TORCH_CHECK(node_row_ptr.dim() == 1 && node_row_ptr.scalar_type() == at::kInt,
              "node_row_ptr must be a 1-D int32 tensor");
  TORCH_CHECK(max_path_rows >= 0, "max_path_rows must be >= 0, got ", max_path_rows);
  check_placement({{"hidden", &hidden},
                   {"weight", &weight},
                   {"bias", bias.has_value() ? &*bias : nullptr},
                   {"node_row_ptr", &node_row_ptr},
                   {"leaf_path_ptr", &leaf_path_ptr},
                   {"path_node", &path_node},
                   {"path_choice", &path_choice},
                   {"target", &target}},
                  hidden, /*cpu_only=*/false);
}

void check_search_args(const at::Tensor& hidden, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& child_ptr,
                       const at::Tensor& children, const at::Tensor& node_row_ptr, int64_t root) {
  check_hidden_weight_bias(hidden, weight, bias);
  const int64_t num_leaves = weight.size(0) + 1;
  TORCH_CHECK(child_ptr.dim() == 1 && child_ptr.scalar_type() == at::kLong,
              "child_ptr must be a 1-D int64 tensor (M + 1,)");
  const int64_t internal = child_ptr.size(0) - 1;
  TORCH_CHECK(internal >= 0, "child_ptr must have M + 1 >= 1 entries");
  TORCH_CHECK(children.dim() == 1 && children.scalar_type() == at::kInt &&
                  children.size(0) == num_leaves + internal - 1,
              "children must be an int32 tensor of shape (N - 1,) = (", num_leaves + internal - 1,
              ",), got ", children.sizes(), " ", children.scalar_type());
  TORCH_CHECK(node_row_ptr.dim() == 1 && node_row_ptr.scalar_type() == at::kInt &&
                  node_row_ptr.size(0) == internal + 1,
              "node_row_ptr must be an int32 tensor of shape (M + 1,) = (", internal + 1, ",)");
  TORCH_CHECK(0 <= root && root < num_leaves + internal, "root must be a node id in [0, ",
              num_leaves + internal, "), got ", root);
  TORCH_CHECK(internal > 0 || root == 0, "a tree without internal nodes has root 0, got ", root);
  check_placement({{"hidden", &hidden},
                   {"weight", &weight},
                   {"bias", bias.has_value() ? &*bias : nullptr},
                   {"child_ptr", &child_ptr},
                   {"children", &children},
                   {"node_row_ptr", &node_row_ptr}},
                  hidden, /*cpu_only=*/true);
  // the searches follow these arrays without bounds checks
  check_child_lists(child_ptr.data_ptr<int64_t>(), children.data_ptr<int32_t>(),
                    node_row_ptr.data_ptr<int32_t>(), internal, num_leaves, root);
}

void check_rank_args(const at::Tensor& hidden, const at::Tensor& weight,
                     const at::Tensor& child_ptr, const at::Tensor& node_row_ptr,
                     const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
                     const at::Tensor& path_choice, const at::Tensor& target) {
  check_paths_and_target(leaf_path_ptr, path_node, path_choice, target, hidden.size(0));
  const int64_t num_leaves = weight.size(0) + 1;
  TORCH_CHECK(leaf_path_ptr.size(0) == num_leaves + 1, "leaf_path_ptr must have shape (V + 1,) = (",
              num_leaves + 1, ",), got ", leaf_path_ptr.sizes());
  check_placement({{"leaf_path_ptr", &leaf_path_ptr},
                   {"path_node", &path_node},
                   {"path_choice", &path_choice},
                   {"target", &target}},
                  hidden, /*cpu_only=*/true);
  check_target_paths(target.data_ptr<int64_t>(), target.size(0), node_row_ptr.data_ptr<int32_t>(),
                     child_ptr.size(0) - 1, leaf_path_ptr.data_ptr<int64_t>(), num_leaves,
                     path_node.data_ptr<int32_t>(), path_choice.data_ptr<int32_t>(),
                     path_node.size(0), std::numeric_limits<int64_t>::max());
}

void check_backward_args(const at::Tensor& grad_log_prob, const at::Tensor& grad_coef,
                         const at::Tensor& hidden, const at::Tensor& weight,
                         const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr,
                         const at::Tensor& path_node, const at::Tensor& path_choice,
                         const at::Tensor& target) {
  TORCH_CHECK(grad_coef.dim() == 2 && grad_coef.size(0) == hidden.size(0) &&
                  grad_coef.scalar_type() == coef_dtype(hidden.scalar_type()) &&
                  grad_coef.device() == hidden.device(),
              "grad_coef must be the second output of path_log_prob_forward");
  check_forward_args(hidden, weight, std::nullopt, node_row_ptr, leaf_path_ptr, path_node,
                     path_choice, target, grad_coef.size(1));
  TORCH_CHECK(grad_log_prob.sizes() == target.sizes() &&
                  grad_log_prob.scalar_type() == hidden.scalar_type() &&
                  grad_log_prob.device() == hidden.device(),
              "grad_log_prob must have shape (B,) and hidden's dtype and device");
}

void check_target_paths(const int64_t* target, int64_t batch, const int32_t* node_row_ptr,
                        int64_t num_internal, const int64_t* leaf_path_ptr, int64_t num_leaves,
                        const int32_t* path_node, const int32_t* path_choice, int64_t num_entries,
                        int64_t max_path_rows) {
  const int64_t num_rows = num_leaves - 1;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t y = target[b];
    TORCH_CHECK_INDEX(0 <= y && y < num_leaves, "target[", b, "] = ", y,
                      " is out of range for a tree of ", num_leaves, " leaves");
    const int64_t s0 = leaf_path_ptr[y], s1 = leaf_path_ptr[y + 1];
    TORCH_CHECK(0 <= s0 && s0 <= s1 && s1 <= num_entries, "malformed tree: leaf_path_ptr[", y,
                "], leaf_path_ptr[", y + 1, "] = ", s0, ", ", s1, " is not a range of the ",
                num_entries, " path entries");
    int64_t rows = 0;
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t node = path_node[s];
      TORCH_CHECK(0 <= node && node < num_internal, "malformed tree: path_node[", s, "] = ", node,
                  " is not an internal node in [0, ", num_internal, ")");
      const int64_t r0 = node_row_ptr[node], r1 = node_row_ptr[node + 1];
      TORCH_CHECK(0 <= r0 && r0 < r1 && r1 <= num_rows, "malformed tree: node_row_ptr[", node,
                  "], node_row_ptr[", node + 1, "] = ", r0, ", ", r1,
                  " is not a non-empty range of the ", num_rows, " weight rows");
      const int64_t choice = path_choice[s];
      TORCH_CHECK(0 <= choice && choice <= r1 - r0, "malformed tree: path_choice[", s,
                  "] = ", choice, " but node ", node, " has ", r1 - r0 + 1, " children");
      rows += r1 - r0;
    }
    TORCH_CHECK(rows <= max_path_rows, "the path of target ", y, " has ", rows,
                " weight rows, more than max_path_rows = ", max_path_rows,
                " (use the tree's max_path_rows)");
  }
}

void check_child_lists(const int64_t* child_ptr, const int32_t* children,
                       const int32_t* node_row_ptr, int64_t num_internal, int64_t num_leaves,
                       int64_t root) {
  const int64_t num_nodes = num_leaves + num_internal;
  TORCH_CHECK(child_ptr[0] == 0 && node_row_ptr[0] == 0,
              "malformed tree: child_ptr[0] and node_row_ptr[0] must be 0");
  for (int64_t i = 0; i < num_internal; ++i) {
    const int64_t c = child_ptr[i + 1] - child_ptr[i];
    TORCH_CHECK(c >= 2, "malformed tree: internal node ", num_leaves + i, " has ", c,
                " children (child_ptr), at least 2 are needed");
    TORCH_CHECK(node_row_ptr[i + 1] - node_row_ptr[i] == c - 1, "malformed tree: node ",
                num_leaves + i, " has ", c, " children but ", node_row_ptr[i + 1] - node_row_ptr[i],
                " weight rows in node_row_ptr (needs ", c - 1, ")");
  }
  TORCH_CHECK(child_ptr[num_internal] == num_nodes - 1,
              "malformed tree: child_ptr[M] = ", child_ptr[num_internal], ", the tree has ",
              num_nodes - 1, " child slots");
  // every node below the root is some node's child exactly once, and all are reached from it
  std::vector<int32_t> parent(num_nodes, -1);
  for (int64_t i = 0; i < num_internal; ++i) {
    for (int64_t j = child_ptr[i]; j < child_ptr[i + 1]; ++j) {
      const int64_t child = children[j];
      TORCH_CHECK(0 <= child && child < num_nodes && child != root && parent[child] < 0,
                  "malformed tree: children[", j, "] = ", child,
                  " is out of range, the root, or a second entry of the same node");
      parent[child] = static_cast<int32_t>(i);
    }
  }
  std::vector<int64_t> stack{root};
  int64_t reached = 0;
  while (!stack.empty()) {
    const int64_t node = stack.back();
    stack.pop_back();
    ++reached;
    if (node < num_leaves) continue;
    for (int64_t j = child_ptr[node - num_leaves]; j < child_ptr[node - num_leaves + 1]; ++j) {
      stack.push_back(children[j]);
    }
  }
  TORCH_CHECK(reached == num_nodes, "malformed tree: only ", reached, " of the ", num_nodes,
              " nodes are reached from root ", root);
}

// What this library was compiled against, read by hsoftmax/_build.py to refuse a mismatched
// torch at import time instead of failing later with an obscure symbol or kernel error.
static std::string build_info() {
  std::string info = "torch=" TORCH_VERSION ";cuda=";
#ifdef WITH_CUDA
  info += std::to_string(CUDA_VERSION);
#else
  info += "none";
#endif
  return info;
}

TORCH_LIBRARY(hsoftmax, m) {
  // log p(target | hidden) of every example, plus d log p / d logit for every weight row on the
  // example's path (B, max_path_rows), which the backward consumes. Rows past the end of an
  // example's path are zero. sparse_grad only tells the autograd formula to return a sparse
  // weight gradient; the forward ignores it. With hidden_grad, the third output is the
  // hidden-gradient basis (B, D) in the coefficients' dtype, u_b = sum over the path's rows of
  // coef * weight row, so that d/d hidden_b of sum_b g_b log p_b is g_b * u_b; the CPU kernel
  // sums it while the path's rows are in cache (the autograd formula asks for it when hidden
  // needs a gradient). Otherwise the third output is empty (0,).
  m.def(
      "path_log_prob_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor node_row_ptr, "
      "Tensor leaf_path_ptr, Tensor path_node, Tensor path_choice, Tensor target, "
      "int max_path_rows, bool sparse_grad=False, bool hidden_grad=False) "
      "-> (Tensor, Tensor, Tensor)");
  // Gradients of sum_b grad_log_prob[b] * log p_b w.r.t. (hidden, weight, bias); an output whose
  // output_mask entry is false (or bias when has_bias is false) is returned empty. With
  // sparse_weight, the weight/bias gradients hold only the K rows the batch touched, listed in
  // the fourth output (K,) in increasing order; otherwise that output is empty.
  m.def(
      "path_log_prob_backward(Tensor grad_log_prob, Tensor grad_coef, Tensor hidden, "
      "Tensor weight, Tensor node_row_ptr, Tensor leaf_path_ptr, Tensor path_node, "
      "Tensor path_choice, Tensor target, bool has_bias, bool[3] output_mask, "
      "bool sparse_weight=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // Exact top-k leaves of every example by best-first search over the tree: values (B, k) are
  // log-probabilities, indices (B, k) leaf ids, ordered by log-prob desc, then leaf id asc.
  m.def(
      "topk_leaves(Tensor hidden, Tensor weight, Tensor? bias, Tensor child_ptr, "
      "Tensor children, Tensor node_row_ptr, int root, int k) -> (Tensor, Tensor)");
  // 1-based rank (B,) of each target leaf in that order, by a depth-first search pruned to the
  // subtrees whose prefix log-prob is >= the target's.
  m.def(
      "leaf_rank(Tensor hidden, Tensor weight, Tensor? bias, Tensor child_ptr, Tensor children, "
      "Tensor node_row_ptr, Tensor leaf_path_ptr, Tensor path_node, Tensor path_choice, "
      "int root, Tensor target) -> Tensor");
  // log p(leaf | hidden) of every leaf (B, V), with the bits topk_leaves and leaf_rank order by
  // (and path_log_prob_forward computes); not differentiable.
  m.def(
      "leaf_log_prob_all(Tensor hidden, Tensor weight, Tensor? bias, Tensor child_ptr, "
      "Tensor children, Tensor node_row_ptr, int root) -> Tensor");
  // A random keep mask shaped like self (only its shape, dtype and device are read): each element
  // is 0 or 1 / (1 - p), kept with probability 1 - p, a pure function of (seed, element index).
  // CPU only; the model's dropout uses it in place of torch's much slower CPU bernoulli_.
  m.def("dropout_mask(Tensor self, float p, int seed) -> Tensor");
  m.def("build_info() -> str", &build_info);
}

}  // namespace hsoftmax

#ifndef HSM_NO_PYTHON
// A stub module: importing hsoftmax._C loads this library and runs the registrations above.
// (The CMake build for the C++ tests defines HSM_NO_PYTHON and links the library directly.)
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
