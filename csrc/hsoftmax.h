// Declarations shared by the op's schema file and its CPU/CUDA backends.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace hsoftmax {

// Checks every argument of path_log_prob_forward (shapes, dtypes, one device, contiguity) with
// messages naming the argument. Index ranges of `target` are checked by the Python wrapper and
// again, without a device sync, inside each backend.
void check_forward_args(const at::Tensor& hidden, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& node_row_ptr,
                        const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
                        const at::Tensor& path_choice, const at::Tensor& target,
                        int64_t max_path_rows);

// check_forward_args plus: grad_log_prob (B,) in hidden's dtype, and grad_coef the (B, R)
// coefficient output of path_log_prob_forward, all on hidden's device.
void check_backward_args(const at::Tensor& grad_log_prob, const at::Tensor& grad_coef,
                         const at::Tensor& hidden, const at::Tensor& weight,
                         const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr,
                         const at::Tensor& path_node, const at::Tensor& path_choice,
                         const at::Tensor& target);

// The dtype of the saved gradient coefficients: float for float/half/bfloat16, double for double.
at::ScalarType coef_dtype(at::ScalarType input);

}  // namespace hsoftmax
