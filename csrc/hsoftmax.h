// Declarations shared by the op's schema file and its CPU/CUDA backends.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "tree_paths.h"

namespace hsoftmax {

// Checks every argument of path_log_prob_forward (shapes, dtypes, one device, contiguity) with
// messages naming the argument. Index ranges of `target` are checked by the Python wrapper and
// again, without a device sync, inside each backend.
void check_forward_args(const at::Tensor& hidden, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& node_row_ptr,
                        const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
                        const at::Tensor& path_choice, const at::Tensor& target,
                        int64_t max_path_rows);

// The search ops' hidden, weight, bias and child lists (all on the CPU, contiguous), including
// check_child_lists.
void check_search_args(const at::Tensor& hidden, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& child_ptr,
                       const at::Tensor& children, const at::Tensor& node_row_ptr, int64_t root);

// leaf_rank's leaf paths and targets (after check_search_args), including check_target_paths.
void check_rank_args(const at::Tensor& hidden, const at::Tensor& weight,
                     const at::Tensor& child_ptr, const at::Tensor& node_row_ptr,
                     const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
                     const at::Tensor& path_choice, const at::Tensor& target);

// check_forward_args plus: grad_log_prob (B,) in hidden's dtype, and grad_coef the (B, R)
// coefficient output of path_log_prob_forward, all on hidden's device.
void check_backward_args(const at::Tensor& grad_log_prob, const at::Tensor& grad_coef,
                         const at::Tensor& hidden, const at::Tensor& weight,
                         const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr,
                         const at::Tensor& path_node, const at::Tensor& path_choice,
                         const at::Tensor& target);

// CPU tree arrays against each other, before a kernel indexes with them: every target in range,
// and along its path (leaf_path_ptr -> path_node -> node_row_ptr -> path_choice) every index in
// range, the path holding at most max_path_rows weight rows. O(B * depth).
void check_target_paths(const int64_t* target, int64_t batch, const int32_t* node_row_ptr,
                        int64_t num_internal, const int64_t* leaf_path_ptr, int64_t num_leaves,
                        const int32_t* path_node, const int32_t* path_choice, int64_t num_entries,
                        int64_t max_path_rows);

// CPU child lists of the search ops: child_ptr (M + 1) / children (N - 1) / node_row_ptr (M + 1)
// describe a tree whose root is `root` and that reaches all V leaves, each node once. O(N).
void check_child_lists(const int64_t* child_ptr, const int32_t* children,
                       const int32_t* node_row_ptr, int64_t num_internal, int64_t num_leaves,
                       int64_t root);

// Raw view of the path tensors (checked by check_forward_args) for the kernels.
PathTree path_tree_of(const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr,
                      const at::Tensor& path_node, const at::Tensor& path_choice);

// The dtype of the saved gradient coefficients: float for float/half/bfloat16, double for double.
at::ScalarType coef_dtype(at::ScalarType input);

// path_log_prob_forward's third output, uninitialised: (B, D) in coef_dtype when hidden_grad,
// else empty (0,).
at::Tensor empty_hidden_grad_basis(const at::Tensor& hidden, bool hidden_grad);

}  // namespace hsoftmax
