// The baseline the op is timed against (benchmarks/op_vs_loop.py): a binary hierarchical softmax
// written as the plain loop one would write by hand, compiled -O3 -march=native at benchmark
// time. Leaf y's path is path_row[y, :path_len[y]] (weight rows) with path_sign +1 / -1 (the
// second / first child), so log p(y | h) = sum_j log sigmoid(sign_j * (w_row_j . h + b_row_j)).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace {

// eight partial sums, so the compiler can vectorise the dot without -ffast-math
float dot(const float* a, const float* b, int64_t n) {
  float lane[8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int j = 0; j < 8; ++j) lane[j] += a[d + j] * b[d + j];
  for (int j = 0; d + j < n; ++j) lane[j] += a[d + j] * b[d + j];
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

// (log p (B,), coef (B, L) = d log p / d logit of each path row)
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& weight,
                                           const at::Tensor& bias, const at::Tensor& path_row,
                                           const at::Tensor& path_sign, const at::Tensor& path_len,
                                           const at::Tensor& target) {
  const int64_t B = hidden.size(0), D = hidden.size(1), L = path_row.size(1);
  auto log_prob = at::empty({B}, hidden.options());
  auto coef = at::empty({B, L}, hidden.options());
  const float *h = hidden.data_ptr<float>(), *w = weight.data_ptr<float>();
  const float *bs = bias.data_ptr<float>(), *sign = path_sign.data_ptr<float>();
  const int32_t *row = path_row.data_ptr<int32_t>(), *len = path_len.data_ptr<int32_t>();
  const int64_t* y = target.data_ptr<int64_t>();
  float *lp = log_prob.data_ptr<float>(), *c = coef.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float sum = 0;
      for (int j = 0; j < len[y[b]]; ++j) {
        const int64_t r = row[y[b] * L + j];
        const float s = sign[y[b] * L + j];
        const float x = s * (dot(h + b * D, w + r * D, D) + bs[r]);
        const float e = std::exp(-std::fabs(x));
        sum += std::min(x, 0.0f) - std::log1p(e);         // log sigmoid(x)
        c[b * L + j] = s * (x > 0 ? e : 1.0f) / (1 + e);  // s * sigmoid(-x)
      }
      lp[b] = sum;
    }
  });
  return {log_prob, coef};
}

// Gradients of sum_b grad[b] * log p_b: grad_hidden by example; grad_weight / grad_bias dense,
// each thread owning a range of weight rows (so no races) and scanning every path entry.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& path_row, const at::Tensor& path_len,
    const at::Tensor& target) {
  const int64_t B = hidden.size(0), D = hidden.size(1), R = weight.size(0), L = path_row.size(1);
  auto gh = at::empty_like(hidden), gw = at::empty_like(weight),
       gb = at::empty({R}, grad.options());
  const float *g = grad.data_ptr<float>(), *c = coef.data_ptr<float>();
  const float *h = hidden.data_ptr<float>(), *w = weight.data_ptr<float>();
  const int32_t *row = path_row.data_ptr<int32_t>(), *len = path_len.data_ptr<int32_t>();
  const int64_t* y = target.data_ptr<int64_t>();
  float *dh = gh.data_ptr<float>(), *dw = gw.data_ptr<float>(), *db = gb.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(dh + b * D, dh + (b + 1) * D, 0.0f);
      for (int j = 0; j < len[y[b]]; ++j) {
        const float s = g[b] * c[b * L + j];
        const float* wr = w + row[y[b] * L + j] * D;
        for (int64_t d = 0; d < D; ++d) dh[b * D + d] += s * wr[d];
      }
    }
  });
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::fill(dw + r0 * D, dw + r1 * D, 0.0f);
    std::fill(db + r0, db + r1, 0.0f);
    for (int64_t b = 0; b < B; ++b) {
      for (int j = 0; j < len[y[b]]; ++j) {
        const int64_t r = row[y[b] * L + j];
        if (r < r0 || r >= r1) continue;
        const float s = g[b] * c[b * L + j];
        for (int64_t d = 0; d < D; ++d) dw[r * D + d] += s * h[b * D + d];
        db[r] += s;
      }
    }
  });
  return {gh, gw, gb};
}

}  // namespace

TORCH_LIBRARY(hsoftmax_plain_loop, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
