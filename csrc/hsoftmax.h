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

// The dtype of the saved gradient coefficients: float for float/half/bfloat16, double for double.
at::ScalarType coef_dtype(at::ScalarType input);

}  // namespace hsoftmax
