// CUDA backend of path_log_prob: the device guard, the stream and the launches. The kernels and
// the host logic that sizes and orders their launches are in path_log_prob_kernels.cuh, which the
// SIMT emulation test also compiles (tests/cpp/test_cuda_emu.cpp).
//
// Determinism: the forward and both gradients are deterministic (the weight/bias gradient is a
// sorted, segmented sum in a fixed order, without atomics; see the .cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "path_log_prob_kernels.cuh"

namespace hsoftmax {
namespace {

// Launches on the current stream, then checks the launch.
struct StreamLaunch {
  cudaStream_t stream;

  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) const {
    kernel<<<grid, block, 0, stream>>>(std::forward<A>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor> path_log_prob_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
    const at::Tensor& path_choice, const at::Tensor& target, int64_t max_path_rows,
    bool /*sparse_grad: used by the autograd formula only*/) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return cuda_kernels::path_log_prob_forward(StreamLaunch{c10::cuda::getCurrentCUDAStream()},
                                             hidden, weight, bias, node_row_ptr, leaf_path_ptr,
                                             path_node, path_choice, target, max_path_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> path_log_prob_backward_cuda(
    const at::Tensor& grad_log_prob, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr,
    const at::Tensor& path_node, const at::Tensor& path_choice, const at::Tensor& target,
    bool has_bias, std::array<bool, 3> output_mask, bool sparse_weight) {
  TORCH_CHECK(!sparse_weight, "sparse weight gradients are implemented on CPU only");
  const c10::cuda::CUDAGuard guard(hidden.device());
  return cuda_kernels::path_log_prob_backward(
      StreamLaunch{c10::cuda::getCurrentCUDAStream()}, grad_log_prob, coef, hidden, weight,
      node_row_ptr, leaf_path_ptr, path_node, path_choice, target, has_bias, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(hsoftmax, CUDA, m) {
  m.impl("path_log_prob_forward", &path_log_prob_forward_cuda);
  m.impl("path_log_prob_backward", &path_log_prob_backward_cuda);
}

}  // namespace hsoftmax
