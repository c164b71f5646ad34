// Small SIMD-friendly kernels shared by the CPU ops: dot products in a fixed summation order
// (deterministic, and the same bits wherever a row's dot is taken) and float32 versions on GCC
// vector extensions, which compile to AVX in the x86-64-v3 clones and to SSE in the baseline.
#pragma once

#include <cstdint>
#include <cstring>

// The Vec8f helpers are internal and always inlined: no call passes a vector across a library
// boundary, or from an AVX clone into baseline code (which would expect it in other registers),
// so the ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

// Helpers called from the HSM_CPU_CLONES functions must be inlined into them to be compiled for
// each clone's instruction set (a call would land in the baseline version): small ones are,
// larger ones are forced.
#if defined(__GNUC__)
#define HSM_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define HSM_ALWAYS_INLINE inline
#endif

namespace hsoftmax {
namespace vec {

// Dot products accumulated in acc_t over kLanes independent partial sums: the compiler maps them
// onto a SIMD register without -ffast-math. The summation order is fixed (lane j takes terms
// j, j + kLanes, ...; then a fixed tree), so results are deterministic, and dot4 computes each of
// its four dots in exactly the order dot does: a row's logit does not depend on its neighbours.
constexpr int kLanes = 8;

template <typename acc_t>
HSM_ALWAYS_INLINE acc_t reduce_lanes(acc_t* lane) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lane[j] += lane[j + width];
  }
  return lane[0];
}

template <typename scalar_t, typename acc_t>
HSM_ALWAYS_INLINE acc_t dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                            int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      lane[j] += static_cast<acc_t>(a[d + j]) * static_cast<acc_t>(b[d + j]);
    }
  }
  for (int j = 0; d + j < n; ++j) {  // tail: the first n % kLanes lanes take one more term
    lane[j] += static_cast<acc_t>(a[d + j]) * static_cast<acc_t>(b[d + j]);
  }
  return reduce_lanes(lane);
}

// float32 specialisations on GCC/Clang vector extensions (eight lanes: one AVX register, two SSE
// registers in the default clone), in the same lane order and reduction tree as the generic dot.
#if defined(__GNUC__)
typedef float Vec8f __attribute__((vector_size(32)));
static_assert(kLanes == 8, "Vec8f holds kLanes floats");

HSM_ALWAYS_INLINE Vec8f load8(const float* p) {
  Vec8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// elements n .. n + 8 of p with those at or past `len` read as 0 (the tail of a row)
HSM_ALWAYS_INLINE Vec8f load8_tail(const float* p, int64_t len) {
  float buf[kLanes] = {};
  for (int64_t j = 0; j < len; ++j) buf[j] = p[j];
  return load8(buf);
}

// The products of a row's last n % 8 elements (zero-padded), rounded before they are added:
// whether the compiler fuses a tail's multiply and add depends on the surrounding code (it did
// in dot4 and not in dot inside the target_clones kernels), so the product passes through
// memory, and every dot of a row gives the same bits wherever it is taken.
HSM_ALWAYS_INLINE Vec8f tail_product(const float* a, const float* b, int64_t len) {
  Vec8f p = load8_tail(a, len) * load8_tail(b, len);
  __asm__("" : "+m"(p));
  return p;
}

HSM_ALWAYS_INLINE float reduce8(Vec8f v) {
  float lane[kLanes];
  std::memcpy(lane, &v, sizeof(v));
  return reduce_lanes(lane);
}

HSM_ALWAYS_INLINE void store8(float* p, Vec8f v) { std::memcpy(p, &v, sizeof(v)); }

template <>
HSM_ALWAYS_INLINE float dot<float, float>(const float* __restrict__ a, const float* __restrict__ b,
                                          int64_t n) {
  Vec8f acc = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) acc += load8(a + d) * load8(b + d);
  if (d < n) acc += tail_product(a + d, b + d, n - d);
  return reduce8(acc);
}
#endif

// A single dot with two accumulator chains (even and odd blocks of kLanes), for callers that
// take one dot at a time and would otherwise wait on the multiply-add latency of one chain.
// Its own fixed order: not bit-identical to dot.
template <typename scalar_t, typename acc_t>
HSM_ALWAYS_INLINE acc_t dot_wide(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                 int64_t n) {
  return dot<scalar_t, acc_t>(a, b, n);
}

#if defined(__GNUC__)
template <>
HSM_ALWAYS_INLINE float dot_wide<float, float>(const float* __restrict__ a,
                                               const float* __restrict__ b, int64_t n) {
  Vec8f even = {}, odd = {};
  int64_t d = 0;
  for (; d + 2 * kLanes <= n; d += 2 * kLanes) {
    even += load8(a + d) * load8(b + d);
    odd += load8(a + d + kLanes) * load8(b + d + kLanes);
  }
  if (d + kLanes <= n) {
    even += load8(a + d) * load8(b + d);
    d += kLanes;
  }
  if (d < n) odd += tail_product(a + d, b + d, n - d);
  return reduce8(even + odd);
}
#endif

// Four dots of four (h, w) pairs at once, each bit-identical to dot(h[i], w[i]): four
// independent accumulator chains instead of one waiting on the multiply-add latency. The rows
// may belong to different queries (the top-k search's batched binary nodes) or to one (dot4).
template <typename scalar_t, typename acc_t>
HSM_ALWAYS_INLINE void dot4_pairs(const scalar_t* const* h, const scalar_t* const* w, int64_t n,
                                  acc_t* __restrict__ out) {
  for (int i = 0; i < 4; ++i) out[i] = dot<scalar_t, acc_t>(h[i], w[i], n);
}

#if defined(__GNUC__)
template <>
HSM_ALWAYS_INLINE void dot4_pairs<float, float>(const float* const* h, const float* const* w,
                                                int64_t n, float* __restrict__ out) {
  Vec8f a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    a0 += load8(h[0] + d) * load8(w[0] + d);
    a1 += load8(h[1] + d) * load8(w[1] + d);
    a2 += load8(h[2] + d) * load8(w[2] + d);
    a3 += load8(h[3] + d) * load8(w[3] + d);
  }
  if (d < n) {
    a0 += tail_product(h[0] + d, w[0] + d, n - d);
    a1 += tail_product(h[1] + d, w[1] + d, n - d);
    a2 += tail_product(h[2] + d, w[2] + d, n - d);
    a3 += tail_product(h[3] + d, w[3] + d, n - d);
  }
  out[0] = reduce8(a0);
  out[1] = reduce8(a1);
  out[2] = reduce8(a2);
  out[3] = reduce8(a3);
}
#endif

// Four dots of `h` at once: four independent accumulator chains hide the multiply-add latency
// that a single dot waits on (once inlined, h's loads are shared). Each result is
// bit-identical to dot(h, w_i): a row's logit does not depend on its neighbours on the path.
template <typename scalar_t, typename acc_t>
HSM_ALWAYS_INLINE void dot4(const scalar_t* __restrict__ h, const scalar_t* const* w, int64_t n,
                            acc_t* __restrict__ out) {
  const scalar_t* hs[4] = {h, h, h, h};
  dot4_pairs<scalar_t, acc_t>(hs, w, n, out);
}

}  // namespace vec
}  // namespace hsoftmax
