// Device code and launch logic of the CUDA path_log_prob. Compiled by nvcc for the GPU
// (path_log_prob_cuda.cu) and by the host compiler for the SIMT emulation test
// (tests/cpp/test_cuda_emu.cpp, with tests/cpp/simt_emu.h), so the same source is run and checked
// against the CPU kernels on machines without a GPU. Everything a launch needs - grid, block,
// buffers, the order of kernels - is here; the .cu file only supplies the stream and <<<>>>.
//
// Layout: one warp per example (forward, grad_hidden), lanes splitting the hidden dimension D for
// each dot product (shuffle reductions) and a node's children for the softmax, with the formulas
// of hsoftmax_math.h.
//
// The weight/bias gradient is a reduction by row with very uneven rows: the root's rows are on
// every example's path, a leaf's parent's on few. It is computed without atomics:
//  1. path_keys_kernel writes each (example, entry)'s weight row into keys[b * R + e] (a sentinel
//     past the path's end);
//  2. a stable sort of the keys groups the entries by row, each row's entries in example order;
//  3. row_runs_kernel: one warp per chunk of kChunk consecutive sorted entries sums each run of
//     equal rows in registers, writes a row whose entries all lie in the chunk, and leaves the
//     partial sum of a row that crosses the chunk's edge in a carry slot;
//  4. row_carry_kernel: for every row spanning chunks, the warp of its first chunk adds the carries
//     in chunk order and writes the row.
// Every warp handles kChunk entries whatever the rows, every output row is written by one warp,
// and the summation order is fixed, so the result is deterministic and its cost does not depend on
// how many examples share a row (the root's B entries are B / kChunk carries, not B atomics per
// element).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <array>
#include <limits>
#include <optional>
#include <tuple>

#include "../hsoftmax.h"
#include "../hsoftmax_math.h"
#include "../tree_paths.h"

// A planted-bug test (tests/cpp/CMakeLists) compiles this file with HSM_PLANTED_BUG defined and
// sets hsm_planted_bug at run time to break one thing at a time; it must be caught.
#ifdef HSM_PLANTED_BUG
extern int hsm_planted_bug;
#define HSM_BUG(n) (hsm_planted_bug == (n))
#else
#define HSM_BUG(n) false
#endif

namespace hsoftmax {
namespace cuda_kernels {
// Internal linkage, as for code in a .cu file: each including translation unit (the CUDA backend,
// the emulation test) has its own copy, and nvcc's kernel names carry the .cu file's name, which
// .ci/check_ptxas.py matches kernels to their source by.
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;  // 256 threads: enough warps per SM to hide gather latency
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kChunk = 128;  // sorted gradient entries per warp in row_runs_kernel
constexpr int kCols = 4;     // columns of D per lane held in registers by row_runs_kernel

// A launch of one warp per item (example or chunk): the grid and block of every kernel here.
struct WarpLaunch {
  dim3 grid, block;
};

inline WarpLaunch warp_per_item(int64_t items) {
  const int64_t blocks = (items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return {dim3(static_cast<unsigned>(blocks)), dim3(kWarp * kWarpsPerBlock)};
}

// The item of the calling warp and the calling lane.
__device__ __forceinline__ int64_t warp_item() {
  return static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
}
__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x % kWarp); }

// Every lane returns the sum of v over the warp (the butterfly leaves the same bits in each).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > (HSM_BUG(2) ? 1 : 0); offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
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

// log p(target) and the gradient coefficients of every example: coef[b, e] = d log p / d z for
// the e-th weight row on the path, zero past its end.
template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ hidden,
                               const scalar_t* __restrict__ weight,
                               const scalar_t* __restrict__ bias, PathTree tree,
                               const int64_t* __restrict__ target, int64_t batch, int64_t dim,
                               int64_t rows, scalar_t* __restrict__ log_prob,
                               acc_t* __restrict__ coef) {
  const int lane = lane_id();
  const int64_t b = warp_item();
  if (b >= batch) return;  // the whole warp: b is the same in all its lanes
  acc_t* c = coef + b * rows;
  const int64_t y = target[b];
  if (!valid_target(tree, y)) {
    for (int64_t e = lane; e < rows; e += kWarp) c[e] = 0;
    if (lane == 0) log_prob[b] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    return;
  }
  const scalar_t* h = hidden + b * dim;
  acc_t lp = 0;
  int64_t end = 0;
  for_each_path_node(tree, y, [&](int64_t s, int64_t r0, int n, int64_t e) {
    if (HSM_BUG(1)) r0 += 1;  // an off-by-one in the node's first row
    const int choice = tree.path_choice[s];
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
    end = e + n;
  });
  for (int64_t k = end + lane + (HSM_BUG(3) ? kWarp : 0); k < rows; k += kWarp) c[k] = 0;
  if (lane == 0) log_prob[b] = static_cast<scalar_t>(lp);
}

// grad_hidden[b, d] = g[b] * sum over b's path rows of coef[b, e] * weight[r, d]; lanes own d.
template <typename scalar_t, typename acc_t>
__global__ void grad_hidden_kernel(const scalar_t* __restrict__ grad_log_prob,
                                   const acc_t* __restrict__ coef,
                                   const scalar_t* __restrict__ weight, PathTree tree,
                                   const int64_t* __restrict__ target, int64_t batch, int64_t dim,
                                   int64_t rows, scalar_t* __restrict__ grad_hidden) {
  const int lane = lane_id();
  const int64_t b = warp_item();
  if (b >= batch) return;
  const int64_t y = target[b];
  const bool valid = valid_target(tree, y);
  const acc_t g = static_cast<acc_t>(grad_log_prob[b]);
  const acc_t* c = coef + b * rows;
  for (int64_t d = lane; d < dim; d += kWarp) {
    acc_t acc = 0;
    if (valid) {
      for_each_path_row(tree, y, [&](int64_t r, int64_t e) {
        acc += c[e] * static_cast<acc_t>(weight[r * dim + d]);
      });
    }
    grad_hidden[b * dim + d] = static_cast<scalar_t>(g * acc);
  }
}

// keys[b * rows + e] = the e-th weight row on b's path; num_rows (sorts last) past its end and for
// an out-of-range target.
__global__ void path_keys_kernel(PathTree tree, const int64_t* __restrict__ target, int64_t batch,
                                 int64_t rows, int32_t num_rows, int32_t* __restrict__ keys) {
  const int lane = lane_id();
  const int64_t b = warp_item();
  if (b >= batch) return;
  int32_t* k = keys + b * rows;
  const int64_t y = target[b];
  int64_t end = 0;
  if (valid_target(tree, y)) {
    for_each_path_row(tree, y, [&](int64_t r, int64_t e) {
      if (e % kWarp == lane) k[e] = static_cast<int32_t>(r);
      end = e + 1;
    });
  }
  for (int64_t e = end + lane; e < rows; e += kWarp) k[e] = num_rows;
}

// What row_runs_kernel and row_carry_kernel read: the sorted entries (row keys[i] of entry
// order[i] = b * rows + e, whose scale is g[b] * coef[b, e]) and the gradient's operands.
template <typename scalar_t, typename acc_t>
struct RowRuns {
  const int32_t* keys;   // (n,) sorted row ids, num_rows past the valid entries
  const int64_t* order;  // (n,) entry index b * rows + e of each sorted key
  const scalar_t* grad_log_prob;
  const acc_t* coef;  // (B, rows)
  const scalar_t* hidden;
  int64_t n, rows, dim;
  int32_t num_rows;
  scalar_t* grad_weight;  // (num_rows, dim), zero-filled, or null
  scalar_t* grad_bias;    // (num_rows,), zero-filled, or null
  acc_t* carry_weight;    // (chunks, 2, dim): partial sums of rows crossing a chunk's edge
  acc_t* carry_bias;      // (chunks, 2)

  // The sorted entries [c0, c1) of the calling warp's chunk; false when it has none.
  __device__ __forceinline__ bool chunk_of_warp(int64_t& chunk, int64_t& c0, int64_t& c1) const {
    chunk = warp_item();
    c0 = chunk * kChunk;
    c1 = c0 + kChunk < n ? c0 + kChunk : n;
    return c0 < n;
  }

  // Whether sorted entry i exists and holds `row`.
  __device__ __forceinline__ bool holds(int64_t i, int32_t row) const {
    return i >= 0 && i < n && keys[i] == row;
  }
};

// Per chunk of kChunk sorted entries (one warp): the sum of each run of equal rows, kCols * 32
// columns of D at a time held in registers. A run whose row has no entry outside the chunk is
// the row's whole gradient and is written; a row that continues before the chunk leaves its sum in
// carry slot 0, one that only continues after it in slot 1 (see row_carry_kernel).
template <typename scalar_t, typename acc_t>
__global__ void row_runs_kernel(RowRuns<scalar_t, acc_t> r) {
  const int lane = lane_id();
  int64_t chunk, c0, c1;
  if (!r.chunk_of_warp(chunk, c0, c1)) return;
  const int64_t tile = static_cast<int64_t>(kWarp) * kCols;
  // with no weight gradient one pass still sums the bias
  const int64_t passes = r.grad_weight != nullptr ? (r.dim + tile - 1) / tile : 1;
  for (int64_t pass = 0; pass < (passes > 0 ? passes : 1); ++pass) {
    const int64_t d0 = pass * tile + lane;
    acc_t acc[kCols] = {};
    acc_t bias_acc = 0;
    int64_t start = c0;
    for (int64_t i = c0; i < c1; ++i) {
      const int32_t row = r.keys[i];
      if (row >= r.num_rows) break;  // sentinels sort last: the valid entries are done
      const int64_t entry = r.order[i];
      const int64_t b = entry / r.rows;
      const acc_t scale = static_cast<acc_t>(r.grad_log_prob[b]) * r.coef[entry];
      if (r.grad_weight != nullptr) {
        const scalar_t* h = r.hidden + b * r.dim;
#pragma unroll
        for (int j = 0; j < kCols; ++j) {
          const int64_t d = d0 + j * kWarp;
          if (d < r.dim) acc[j] += scale * static_cast<acc_t>(h[d]);
        }
      }
      bias_acc += scale;
      if (r.holds(i + 1, row) && i + 1 < c1) continue;  // the run goes on in this chunk
      // The run [start, i] ends here: the row's whole gradient, or a part of it.
      const bool before = r.holds(start - 1, row) && !HSM_BUG(4);
      const bool after = r.holds(i + 1, row);
      acc_t* w_out = nullptr;
      scalar_t* w_final = nullptr;
      if (before || after) {
        const int slot = before ? 0 : 1;
        if (r.grad_weight != nullptr) w_out = r.carry_weight + (chunk * 2 + slot) * r.dim;
        if (pass == 0 && lane == 0) r.carry_bias[chunk * 2 + slot] = bias_acc;
      } else {
        if (r.grad_weight != nullptr) w_final = r.grad_weight + int64_t{row} * r.dim;
        if (pass == 0 && lane == 0 && r.grad_bias != nullptr) {
          r.grad_bias[row] = static_cast<scalar_t>(bias_acc);
        }
      }
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int64_t d = d0 + j * kWarp;
        if (d < r.dim && w_out != nullptr) w_out[d] = acc[j];
        if (d < r.dim && w_final != nullptr) w_final[d] = static_cast<scalar_t>(acc[j]);
        acc[j] = 0;
      }
      bias_acc = 0;
      start = i + 1;
    }
  }
}

// Per chunk (one warp): if a row starts in this chunk and continues past it, its sum is this
// chunk's slot-1 carry plus the slot-0 carries of the following chunks it covers, added in chunk
// order.
template <typename scalar_t, typename acc_t>
__global__ void row_carry_kernel(RowRuns<scalar_t, acc_t> r) {
  const int lane = lane_id();
  int64_t chunk, c0, c1;
  if (!r.chunk_of_warp(chunk, c0, c1)) return;
  const int32_t row = r.keys[c1 - 1];
  if (row >= r.num_rows || !r.holds(c1, row)) return;     // no valid row crosses the chunk's end
  if (r.keys[c0] == row && r.holds(c0 - 1, row)) return;  // it started in an earlier chunk
  // row_runs_kernel left the row's first part in this chunk's slot 1 (it does not continue
  // before it), the rest in slot 0 of the chunks it covers
  const int first_slot = HSM_BUG(5) ? 0 : 1;
  if (r.grad_weight != nullptr) {
    for (int64_t d = lane; d < r.dim; d += kWarp) {
      acc_t sum = r.carry_weight[(chunk * 2 + first_slot) * r.dim + d];
      for (int64_t next = chunk + 1; r.holds(next * kChunk, row); ++next) {
        sum += r.carry_weight[next * 2 * r.dim + d];
      }
      r.grad_weight[int64_t{row} * r.dim + d] = static_cast<scalar_t>(sum);
    }
  }
  if (lane == 0 && r.grad_bias != nullptr) {
    acc_t sum = r.carry_bias[chunk * 2 + first_slot];
    for (int64_t next = chunk + 1; r.holds(next * kChunk, row); ++next) {
      sum += r.carry_bias[next * 2];
    }
    r.grad_bias[row] = static_cast<scalar_t>(sum);
  }
}

// The forward op on tensors of one device: `launch(kernel, grid, block, args...)` runs a kernel
// (on the current stream on a GPU; under the emulation on the CPU). No host synchronisation.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> path_log_prob_forward(
    const Launch& launch, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& node_row_ptr,
    const at::Tensor& leaf_path_ptr, const at::Tensor& path_node, const at::Tensor& path_choice,
    const at::Tensor& target, int64_t max_path_rows) {
  check_forward_args(hidden, weight, bias, node_row_ptr, leaf_path_ptr, path_node, path_choice,
                     target, max_path_rows);
  const int64_t batch = hidden.size(0);
  auto log_prob = at::empty({batch}, hidden.options());
  auto coef =
      at::empty({batch, max_path_rows}, hidden.options().dtype(coef_dtype(hidden.scalar_type())));
  if (batch == 0) return {log_prob, coef};
  const PathTree tree = path_tree_of(node_row_ptr, leaf_path_ptr, path_node, path_choice);
  const WarpLaunch per_example = warp_per_item(batch);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "path_log_prob_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        launch(forward_kernel<scalar_t, acc_t>, per_example.grid, per_example.block,
               hidden.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
               bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, tree,
               target.data_ptr<int64_t>(), batch, hidden.size(1), max_path_rows,
               log_prob.data_ptr<scalar_t>(), coef.data_ptr<acc_t>());
      });
  return {log_prob, coef};
}

// The backward op (dense gradients only), as path_log_prob_forward.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> path_log_prob_backward(
    const Launch& launch, const at::Tensor& grad_log_prob, const at::Tensor& coef,
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& node_row_ptr,
    const at::Tensor& leaf_path_ptr, const at::Tensor& path_node, const at::Tensor& path_choice,
    const at::Tensor& target, bool has_bias, std::array<bool, 3> output_mask) {
  check_backward_args(grad_log_prob, coef, hidden, weight, node_row_ptr, leaf_path_ptr, path_node,
                      path_choice, target);
  const bool want_h = output_mask[0], want_w = output_mask[1], want_b = output_mask[2] && has_bias;
  const auto g = grad_log_prob.contiguous();
  const auto c = coef.contiguous();
  const int64_t batch = hidden.size(0), dim = hidden.size(1), rows = c.size(1);
  const int64_t num_rows = weight.size(0);
  TORCH_CHECK(num_rows < std::numeric_limits<int32_t>::max(), "a tree of ", num_rows + 1,
              " leaves is too large for the CUDA kernels (at most 2^31 - 1)");
  const PathTree tree = path_tree_of(node_row_ptr, leaf_path_ptr, path_node, path_choice);
  at::Tensor gh = want_h ? at::empty_like(hidden) : at::empty({0}, hidden.options());
  // untouched rows keep these zeros; every touched row is written once
  at::Tensor gw = want_w ? at::zeros_like(weight) : at::empty({0}, weight.options());
  at::Tensor gb =
      want_b ? at::zeros({num_rows}, weight.options()) : at::empty({0}, weight.options());
  const int64_t n = batch * rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "path_log_prob_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const WarpLaunch per_example = warp_per_item(batch);
        if (want_h && batch > 0) {
          launch(grad_hidden_kernel<scalar_t, acc_t>, per_example.grid, per_example.block,
                 g.data_ptr<scalar_t>(), c.data_ptr<acc_t>(), weight.data_ptr<scalar_t>(), tree,
                 target.data_ptr<int64_t>(), batch, dim, rows, gh.data_ptr<scalar_t>());
        }
        if (!(want_w || want_b) || n == 0) return;
        auto keys = at::empty({n}, target.options().dtype(at::kInt));
        launch(path_keys_kernel, per_example.grid, per_example.block, tree,
               target.data_ptr<int64_t>(), batch, rows, static_cast<int32_t>(num_rows),
               keys.data_ptr<int32_t>());
        // stable: each row's entries stay in example order, so the sums below are deterministic
        const auto [sorted, order] =
            at::sort(keys, /*stable=*/std::optional<bool>(true), /*dim=*/0);
        const int64_t chunks = (n + kChunk - 1) / kChunk;
        const auto acc_options = weight.options().dtype(coef_dtype(weight.scalar_type()));
        auto carry_w = at::empty({want_w ? chunks * 2 * dim : 0}, acc_options);
        auto carry_b = at::empty({chunks * 2}, acc_options);
        const RowRuns<scalar_t, acc_t> runs{sorted.data_ptr<int32_t>(),
                                            order.data_ptr<int64_t>(),
                                            g.data_ptr<scalar_t>(),
                                            c.data_ptr<acc_t>(),
                                            hidden.data_ptr<scalar_t>(),
                                            n,
                                            rows,
                                            dim,
                                            static_cast<int32_t>(num_rows),
                                            want_w ? gw.data_ptr<scalar_t>() : nullptr,
                                            want_b ? gb.data_ptr<scalar_t>() : nullptr,
                                            carry_w.data_ptr<acc_t>(),
                                            carry_b.data_ptr<acc_t>()};
        const WarpLaunch per_chunk = warp_per_item(chunks);
        launch(row_runs_kernel<scalar_t, acc_t>, per_chunk.grid, per_chunk.block, runs);
        launch(row_carry_kernel<scalar_t, acc_t>, per_chunk.grid, per_chunk.block, runs);
      });
  return {gh, gw, gb, at::empty({0}, weight.options().dtype(at::kLong))};
}

}  // namespace
}  // namespace cuda_kernels
}  // namespace hsoftmax
