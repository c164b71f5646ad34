// Scalar math of the hierarchical softmax, shared by the CPU and CUDA kernels.
//
// Every internal node is a softmax over its children. The first child's logit is the constant 0
// and children 1..n own the logits z[0..n). Keeping the formulas here (host + device) means the
// CPU tests exercise exactly the arithmetic the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

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

// d log p / d z_k of a node from e_k = exp(z_k - max) and 1 / sum_j exp(z_j - max), the sum
// including the implicit first child: 1[k taken] - softmax_k.
template <typename T>
HSM_HOST_DEVICE T softmax_grad_coef(T e, T inv_sum, bool taken) {
  return (taken ? T(1) : T(0)) - e * inv_sum;
}

// Binary-node exp(-|x|) and log(1 + e) for e in (0, 1]: the C library's expf/logf (exp/log in
// double). The tree searches (csrc/cpu/search_cpu.cpp) compute a binary node with the same
// calls in the same order, so a leaf's log-probability has the same bits from the path kernel
// (log_prob), from top-k and from rank.
HSM_HOST_DEVICE float exp_neg_abs(float x) { return expf(-fabsf(x)); }
HSM_HOST_DEVICE double exp_neg_abs(double x) { return exp(-fabs(x)); }
HSM_HOST_DEVICE float log_one_plus(float e) { return logf(1.0f + e); }
HSM_HOST_DEVICE double log_one_plus(double e) { return log(1.0 + e); }

// log(exp(0) + exp(x)) of a binary node (logit x for the second child) from e = exp(-|x|):
// max(x, 0) + log(1 + e) never overflows. log(1 + e) rather than log1p(e): for e < eps the
// absolute error (<= e) is far below the tolerance of a log-probability.
template <typename T>
HSM_HOST_DEVICE T binary_lse(T x, T e) {
  return (x > T(0) ? x : T(0)) + log_one_plus(e);
}

// The shift of a node's softmax: m = max(0, z[0..n)), so every exp(z - m) <= 1.
template <typename T>
HSM_HOST_DEVICE T softmax_shift(const T* z, int n) {
  T m = T(0);
  for (int k = 0; k < n; ++k) m = z[k] > m ? z[k] : m;
  return m;
}

// sum_k exp(z_k - m) over the node's children, the implicit first child's exp(-m) first, then
// z[0..n) in order; exps[k] = exp(z[k] - m) when exps is not null (it may be z itself).
template <typename T>
HSM_HOST_DEVICE T shifted_exp_sum(const T* z, int n, T m, T* exps) {
  T sum = exp_(-m);
  for (int k = 0; k < n; ++k) {
    const T ek = exp_(z[k] - m);
    if (exps != nullptr) exps[k] = ek;
    sum += ek;
  }
  return sum;
}

// log p and d log p / dz of a binary node (one logit z for the second child) with one exp and one
// log.
template <typename T>
HSM_HOST_DEVICE T binary_node_log_softmax(T* z, int choice) {
  const T x = z[0];
  const T e = exp_neg_abs(x);
  const T numerator = x >= T(0) ? T(1) : e;
  const T p_second = numerator / (T(1) + e);  // sigma(x)
  z[0] = (choice == 1 ? T(1) : T(0)) - p_second;
  return (choice == 1 ? x : T(0)) - binary_lse(x, e);
}

// Fused step for one node of a path (the CUDA kernel runs the same formulas with the max and the
// sum reduced across a warp): z[0..n) holds the logits of children 1..n on entry and
// d log p / d z on exit; returns the log-probability of child `choice` (0 = the implicit first
// child). n + 1 exps and one log: each exp(z_k - max) is reused for the gradient coefficient.
template <typename T>
HSM_HOST_DEVICE T node_log_softmax(T* z, int n, int choice) {
  if (n == 1) return binary_node_log_softmax(z, choice);
  const T m = softmax_shift(z, n);
  const T picked = choice == 0 ? T(0) : z[choice - 1];
  const T sum = shifted_exp_sum(z, n, m, z);
  const T inv = T(1) / sum;
  for (int k = 0; k < n; ++k) z[k] = softmax_grad_coef(z[k], inv, k + 1 == choice);
  return picked - (m + log_(sum));
}

// log p(child k | node) of every child of a node with c children, for the searches: out[1..c)
// holds the logits of children 1..c-1 on entry, out[0..c) the log-probabilities on exit. The
// same formulas as node_log_softmax, so a leaf's log-probability has the same bits in the
// searches as in the path kernel.
template <typename T>
HSM_HOST_DEVICE void node_log_probs(T* out, int c) {
  if (c == 2) {
    const T x = out[1];
    const T lse = binary_lse(x, exp_neg_abs(x));
    out[0] = T(0) - lse;
    out[1] = x - lse;
    return;
  }
  const T m = softmax_shift(out + 1, c - 1);
  const T lse = m + log_(shifted_exp_sum<T>(out + 1, c - 1, m, nullptr));
  out[0] = T(0) - lse;
  for (int k = 1; k < c; ++k) out[k] = out[k] - lse;
}

}  // namespace math
}  // namespace hsoftmax
