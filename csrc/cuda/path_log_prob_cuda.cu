// CUDA backend of path_log_prob: the device guard, the stream and the launches. The kernels and
// the host logic that sizes and orders their launches are in path_log_prob_kernels.cuh, which the
// SIMT emulation test also compiles (tests/cpp/test_cuda_emu.cpp).
//
// Determinism: the forward and both gradients are deterministic (the weight/bias gradient is a
// sorted, segmented sum in a fixed order, without atomics; see the .cuh).
#include <ATen/ops/ones.h>
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> path_log_prob_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
    const at::Tensor& path_choice, const at::Tensor& target, int64_t max_path_rows,
    bool /*sparse_grad: used by the autograd formula only*/, bool hidden_grad) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const StreamLaunch launch{c10::cuda::getCurrentCUDAStream()};
  auto [log_prob, coef] =
      cuda_kernels::path_log_prob_forward(launch, hidden, weight, bias, node_row_ptr, leaf_path_ptr,
                                          path_node, path_choice, target, max_path_rows);
  auto basis = empty_hidden_grad_basis(hidden, hidden_grad);
  if (hidden_grad && hidden.size(0) > 0) {
    // no fused basis on CUDA yet: the backward kernel's grad_hidden with grad_log_prob = 1 is
    // u_b (the same sum the backward would do, moved here; in hidden's dtype, so float16 and
    // bfloat16 round u_b once more than the fused CPU basis does)
    const auto ones = at::ones({hidden.size(0)}, hidden.options());
    const auto u = std::get<0>(cuda_kernels::path_log_prob_backward(
        launch, ones, coef, hidden, weight, node_row_ptr, leaf_path_ptr, path_node, path_choice,
        target, /*has_bias=*/false, {true, false, false}));
    basis.copy_(u);
  }
  return {log_prob, coef, basis};
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
