// CUDA kernels of path_log_prob. One warp per example: lanes split the hidden dimension D for
// each dot product (shuffle reductions) and split a node's children for the softmax, using the
// same formulas as the CPU kernel (hsoftmax_math.h).
//
// Determinism: the forward and grad_hidden are deterministic. grad_weight / grad_bias are
// accumulated with atomicAdd (rows near the root are shared by most examples), so their last bits
// can vary between runs; the op raises under torch.use_deterministic_algorithms(True).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../hsoftmax.h"
#include "../hsoftmax_math.h"

namespace hsoftmax {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;  // 256 threads: enough warps per SM to hide gather latency
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T o = __shfl_xor_sync(kFullMask, v, offset);
    v = o > v ? o : v;
  }
  return v;
}

// All lanes return sum_d a[d] * b[d].
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t warp_dot(const scalar_t* __restrict__ a,
                                          const scalar_t* __restrict__ b, int64_t dim, int lane) {
  acc_t acc = 0;
  for (int64_t d = lane; d < dim; d += kWarp) {
    acc += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  }
  return warp_sum(acc);
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(
    const scalar_t* __restrict__ hidden, const scalar_t* __restrict__ weight,
    const scalar_t* __restrict__ bias, const int32_t* __restrict__ node_row_ptr,
    const int64_t* __restrict__ leaf_path_ptr, const int32_t* __restrict__ path_node,
    const int32_t* __restrict__ path_choice, const int64_t* __restrict__ target, int64_t batch,
    int64_t dim, int64_t rows, int64_t num_leaves, scalar_t* __restrict__ log_prob,
    acc_t* __restrict__ coef) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (b >= batch) return;
  acc_t* c = coef + b * rows;
  const int64_t y = target[b];
  if (y < 0 || y >= num_leaves) {  // validated in Python; never read out of bounds regardless
    for (int64_t e = lane; e < rows; e += kWarp) c[e] = 0;
    if (lane == 0) log_prob[b] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    return;
  }
  const scalar_t* h = hidden + b * dim;
  acc_t lp = 0;
  int64_t e = 0;
  for (int64_t s = leaf_path_ptr[y]; s < leaf_path_ptr[y + 1]; ++s) {
    const int32_t node = path_node[s];
    const int64_t r0 = node_row_ptr[node];
    const int n = node_row_ptr[node + 1] - r0;
    const int choice = path_choice[s];
    if (n == 1) {
      acc_t z = warp_dot<scalar_t, acc_t>(h, weight + r0 * dim, dim, lane);
      if (bias != nullptr) z += static_cast<acc_t>(bias[r0]);
      lp += math::binary_node_log_softmax(&z, choice);
      if (lane == 0) c[e] = z;
    } else {
      // Pass 1: logits. Every lane holds every z after the butterfly reduction, so each lane
      // tracks the max and the picked logit itself; lane k % 32 stores z_k.
      acc_t m = 0, picked = 0;
      for (int k = 0; k < n; ++k) {
        acc_t z = warp_dot<scalar_t, acc_t>(h, weight + (r0 + k) * dim, dim, lane);
        if (bias != nullptr) z += static_cast<acc_t>(bias[r0 + k]);
        m = z > m ? z : m;
        if (k + 1 == choice) picked = z;
        if (k % kWarp == lane) c[e + k] = z;
      }
      // Pass 2: each lane exponentiates the logits it stored; the sum includes exp(0 - m).
      acc_t part = lane == 0 ? math::exp_(-m) : acc_t(0);
      for (int k = lane; k < n; k += kWarp) {
        const acc_t ek = math::exp_(c[e + k] - m);
        c[e + k] = ek;
        part += ek;
      }
      const acc_t sum = warp_sum(part);
      const acc_t inv = acc_t(1) / sum;
      for (int k = lane; k < n; k += kWarp) {
        c[e + k] = math::softmax_grad_coef(c[e + k], inv, k + 1 == choice);
      }
      lp += picked - (m + math::log_(sum));
    }
    e += n;
  }
  for (int64_t k = e + lane; k < rows; k += kWarp) c[k] = 0;
  if (lane == 0) log_prob[b] = static_cast<scalar_t>(lp);
}

// Calls fn(row, entry) for every weight row on leaf y's path; entry indexes the example's coef.
template <typename F>
__device__ __forceinline__ void for_each_path_row(const int32_t* __restrict__ node_row_ptr,
                                                  const int64_t* __restrict__ leaf_path_ptr,
                                                  const int32_t* __restrict__ path_node, int64_t y,
                                                  F&& fn) {
  int64_t e = 0;
  for (int64_t s = leaf_path_ptr[y]; s < leaf_path_ptr[y + 1]; ++s) {
    const int32_t node = path_node[s];
    const int64_t r0 = node_row_ptr[node];
    const int n = node_row_ptr[node + 1] - r0;
    for (int k = 0; k < n; ++k, ++e) fn(r0 + k, e);
  }
}

// grad_hidden[b, d] = sum over b's path rows of g[b] * coef[b, e] * weight[r, d]; lanes own d.
template <typename scalar_t, typename acc_t>
__global__ void grad_hidden_kernel(
    const scalar_t* __restrict__ grad_log_prob, const acc_t* __restrict__ coef,
    const scalar_t* __restrict__ weight, const int32_t* __restrict__ node_row_ptr,
    const int64_t* __restrict__ leaf_path_ptr, const int32_t* __restrict__ path_node,
    const int64_t* __restrict__ target, int64_t batch, int64_t dim, int64_t rows,
    int64_t num_leaves, scalar_t* __restrict__ grad_hidden) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (b >= batch) return;
  const int64_t y = target[b];
  const bool valid = y >= 0 && y < num_leaves;
  const acc_t g = static_cast<acc_t>(grad_log_prob[b]);
  const acc_t* c = coef + b * rows;
  for (int64_t d = lane; d < dim; d += kWarp) {
    acc_t acc = 0;
    if (valid) {
      for_each_path_row(node_row_ptr, leaf_path_ptr, path_node, y, [&](int64_t r, int64_t e) {
        acc += c[e] * static_cast<acc_t>(weight[r * dim + d]);
      });
    }
    grad_hidden[b * dim + d] = static_cast<scalar_t>(g * acc);
  }
}

// grad_weight[r] += g[b] * coef[b, e] * hidden[b], grad_bias[r] += g[b] * coef[b, e]; atomics
// into acc_t buffers (float for half/bfloat16 weights).
template <typename scalar_t, typename acc_t>
__global__ void grad_weight_kernel(
    const scalar_t* __restrict__ grad_log_prob, const acc_t* __restrict__ coef,
    const scalar_t* __restrict__ hidden, const int32_t* __restrict__ node_row_ptr,
    const int64_t* __restrict__ leaf_path_ptr, const int32_t* __restrict__ path_node,
    const int64_t* __restrict__ target, int64_t batch, int64_t dim, int64_t rows,
    int64_t num_leaves, acc_t* __restrict__ grad_weight, acc_t* __restrict__ grad_bias) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (b >= batch) return;
  const int64_t y = target[b];
  if (y < 0 || y >= num_leaves) return;
  const acc_t g = static_cast<acc_t>(grad_log_prob[b]);
  const acc_t* c = coef + b * rows;
  const scalar_t* h = hidden + b * dim;
  for_each_path_row(node_row_ptr, leaf_path_ptr, path_node, y, [&](int64_t r, int64_t e) {
    const acc_t cb = g * c[e];
    if (grad_bias != nullptr && lane == 0) atomicAdd(grad_bias + r, cb);
    if (grad_weight != nullptr) {
      for (int64_t d = lane; d < dim; d += kWarp) {
        atomicAdd(grad_weight + r * dim + d, cb * static_cast<acc_t>(h[d]));
      }
    }
  });
}

int64_t num_blocks(int64_t batch) { return (batch + kWarpsPerBlock - 1) / kWarpsPerBlock; }

std::tuple<at::Tensor, at::Tensor> path_log_prob_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
    const at::Tensor& path_choice, const at::Tensor& target, int64_t max_path_rows,
    bool /*sparse_grad: used by the autograd formula only*/) {
  check_forward_args(hidden, weight, bias, node_row_ptr, leaf_path_ptr, path_node, path_choice,
                     target, max_path_rows);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t batch = hidden.size(0);
  auto log_prob = at::empty({batch}, hidden.options());
  auto coef =
      at::empty({batch, max_path_rows}, hidden.options().dtype(coef_dtype(hidden.scalar_type())));
  if (batch == 0) return {log_prob, coef};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "path_log_prob_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        forward_kernel<scalar_t, acc_t><<<num_blocks(batch), kWarp * kWarpsPerBlock, 0, stream>>>(
            hidden.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
            bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
            node_row_ptr.data_ptr<int32_t>(), leaf_path_ptr.data_ptr<int64_t>(),
            path_node.data_ptr<int32_t>(), path_choice.data_ptr<int32_t>(),
            target.data_ptr<int64_t>(), batch, hidden.size(1), max_path_rows,
            leaf_path_ptr.size(0) - 1, log_prob.data_ptr<scalar_t>(), coef.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {log_prob, coef};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> path_log_prob_backward_cuda(
    const at::Tensor& grad_log_prob, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr,
    const at::Tensor& path_node, const at::Tensor& path_choice, const at::Tensor& target,
    bool has_bias, std::array<bool, 3> output_mask, bool sparse_weight) {
  TORCH_CHECK(!sparse_weight, "sparse weight gradients are implemented on CPU only");
  check_backward_args(grad_log_prob, coef, hidden, weight, node_row_ptr, leaf_path_ptr, path_node,
                      path_choice, target);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const bool want_h = output_mask[0], want_w = output_mask[1], want_b = output_mask[2] && has_bias;
  if (want_w || want_b) {
    at::globalContext().alertNotDeterministic(
        "hsoftmax::path_log_prob_backward (CUDA weight/bias gradient, atomicAdd)");
  }
  const auto g = grad_log_prob.contiguous();
  const auto c = coef.contiguous();
  const int64_t batch = hidden.size(0), dim = hidden.size(1), rows = c.size(1);
  const int64_t num_leaves = leaf_path_ptr.size(0) - 1;
  const auto acc_type = coef_dtype(hidden.scalar_type());
  at::Tensor gh = want_h ? at::empty_like(hidden) : at::empty({0}, hidden.options());
  at::Tensor gw_acc = want_w ? at::zeros(weight.sizes(), weight.options().dtype(acc_type))
                             : at::empty({0}, weight.options().dtype(acc_type));
  at::Tensor gb_acc = want_b ? at::zeros({weight.size(0)}, weight.options().dtype(acc_type))
                             : at::empty({0}, weight.options().dtype(acc_type));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (batch > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, hidden.scalar_type(), "path_log_prob_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const dim3 grid(num_blocks(batch)), block(kWarp * kWarpsPerBlock);
          if (want_h) {
            grad_hidden_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
                g.data_ptr<scalar_t>(), c.data_ptr<acc_t>(), weight.data_ptr<scalar_t>(),
                node_row_ptr.data_ptr<int32_t>(), leaf_path_ptr.data_ptr<int64_t>(),
                path_node.data_ptr<int32_t>(), target.data_ptr<int64_t>(), batch, dim, rows,
                num_leaves, gh.data_ptr<scalar_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
          if (want_w || want_b) {
            grad_weight_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
                g.data_ptr<scalar_t>(), c.data_ptr<acc_t>(), hidden.data_ptr<scalar_t>(),
                node_row_ptr.data_ptr<int32_t>(), leaf_path_ptr.data_ptr<int64_t>(),
                path_node.data_ptr<int32_t>(), target.data_ptr<int64_t>(), batch, dim, rows,
                num_leaves, want_w ? gw_acc.data_ptr<acc_t>() : nullptr,
                want_b ? gb_acc.data_ptr<acc_t>() : nullptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
  }
  at::Tensor gw = want_w ? gw_acc.to(weight.scalar_type()) : at::empty({0}, weight.options());
  at::Tensor gb = want_b ? gb_acc.to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {gh, gw, gb, at::empty({0}, weight.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY_IMPL(hsoftmax, CUDA, m) {
  m.impl("path_log_prob_forward", &path_log_prob_forward_cuda);
  m.impl("path_log_prob_backward", &path_log_prob_backward_cuda);
}

}  // namespace hsoftmax
