// Scalar math of the hierarchical softmax, shared by the CPU and CUDA kernels.
//
// Every internal node is a softmax over its children. The first child's logit is the constant 0
// and children 1..n own the logits z[0..n). Keeping the formulas here (host + device) means the
// CPU tests exercise exactly the arithmetic the GPU runs.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HSM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HSM_HOST_DEVICE inline
#endif

namespace hsoftmax {
namespace math {

HSM_HOST_DEVICE float exp_(float x) { return expf(x); }
HSM_HOST_DEVICE double exp_(double x) { return exp(x); }
HSM_HOST_DEVICE float log_(float x) { return logf(x); }
HSM_HOST_DEVICE double log_(double x) { return log(x); }

// Running log-sum-exp: the value is max + log(sum) with sum = sum_j exp(x_j - max).
// Subtracting the running max keeps every exp() argument <= 0, so nothing overflows.
template <typename T>
struct LogSumExp {
  T max;
  T sum;

  // Start from the implicit first child (logit 0): exp(0 - 0) = 1.
  HSM_HOST_DEVICE static LogSumExp with_implicit_zero() { return {T(0), T(1)}; }
  // The empty accumulator, for partial sums that do not own the implicit child.
  HSM_HOST_DEVICE static LogSumExp empty() {
    return {-std::numeric_limits<T>::infinity(), T(0)};
  }

  HSM_HOST_DEVICE void push(T x) {
    if (x > max) {
      sum = sum * exp_(max - x) + T(1);
      max = x;
    } else {
      sum += exp_(x - max);
    }
  }

  HSM_HOST_DEVICE void merge(const LogSumExp& o) {
    if (o.sum == T(0)) return;
    if (sum == T(0)) {
      *this = o;
    } else if (o.max > max) {
      sum = sum * exp_(max - o.max) + o.sum;
      max = o.max;
    } else {
      sum += o.sum * exp_(o.max - max);
    }
  }

  HSM_HOST_DEVICE T value() const { return max + log_(sum); }
};

// d log p / d z_k for logit k of a node whose log-normaliser is `lse`: 1[k taken] - softmax_k.
template <typename T>
HSM_HOST_DEVICE T grad_coef(T z, T lse, bool taken) {
  return (taken ? T(1) : T(0)) - exp_(z - lse);
}

// Fused step for one node on a host path (the CUDA kernel runs the same three pieces spread
// over a warp): z[0..n) holds the logits of children 1..n on entry and d log p / d z on exit;
// returns the log-probability of child `choice` (0 = the implicit first child).
template <typename T>
HSM_HOST_DEVICE T node_log_softmax(T* z, int n, int choice) {
  LogSumExp<T> acc = LogSumExp<T>::with_implicit_zero();
  for (int k = 0; k < n; ++k) acc.push(z[k]);
  const T lse = acc.value();
  const T picked = choice == 0 ? T(0) : z[choice - 1];
  for (int k = 0; k < n; ++k) z[k] = grad_coef(z[k], lse, k + 1 == choice);
  return picked - lse;
}

}  // namespace math
}  // namespace hsoftmax
