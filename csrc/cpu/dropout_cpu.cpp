// CPU kernel of dropout_mask: a counter-based random keep mask, 0 or 1 / (1 - p) per element.
//
// Why it exists: torch's CPU dropout draws every element from one sequential Mersenne-Twister
// stream (bernoulli_), about 15 ns an element; in the next-location model's training step that
// was a third of the time. Here element i's uniform is a hash of (seed, i), so elements are
// independent of each other and of the thread that computes them: the mask is deterministic for
// a given seed and shape whatever the thread count, and the loop vectorises.
//
// The hash is two rounds of the murmur3 32-bit finaliser over the 64-bit counter mixed with the
// 64-bit seed; its top 24 bits give u in [0, 1), and the element is kept when u >= p.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "cpu_clones.h"

namespace hsoftmax {
namespace {

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// The elements [begin, end) of the mask: threshold = ceil(p * 2^24), keep when bits24 >= it.
template <typename scalar_t>
HSM_CPU_CLONES void fill_mask(scalar_t* out, int64_t begin, int64_t end, uint64_t seed,
                              uint32_t threshold, scalar_t scale) {
  const uint32_t s0 = static_cast<uint32_t>(seed);
  const uint32_t s1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t c = static_cast<uint64_t>(i);
    uint32_t h = fmix32(static_cast<uint32_t>(c) ^ s0);
    h = fmix32(h + (static_cast<uint32_t>(c >> 32) ^ s1) * 0x9e3779b9u);
    out[i] = (h >> 8) >= threshold ? scale : scalar_t(0);
  }
}

at::Tensor dropout_mask_cpu(const at::Tensor& self, double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_mask: p must be in [0, 1), got ", p);
  TORCH_CHECK(at::isFloatingType(self.scalar_type()),
              "dropout_mask: expected a floating-point tensor, got ", self.scalar_type());
  at::Tensor out =
      at::empty(self.sizes(), self.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = out.numel();
  // keep iff bits24 >= ceil(p * 2^24): P(keep) = 1 - ceil(p * 2^24) / 2^24, within 2^-24 of 1 - p
  const auto threshold = static_cast<uint32_t>(std::ceil(p * 16777216.0));
  const uint64_t useed = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dropout_mask", [&] {
    scalar_t* data = out.data_ptr<scalar_t>();
    const auto scale = static_cast<scalar_t>(1.0 / (1.0 - p));
    TORCH_CHECK(std::isfinite(static_cast<double>(scale)), "dropout_mask: p = ", p,
                " makes the keep scale 1 / (1 - p) overflow ", out.scalar_type());
    at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
      fill_mask<scalar_t>(data, begin, end, useed, threshold, scale);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hsoftmax, CPU, m) { m.impl("dropout_mask", &dropout_mask_cpu); }

}  // namespace hsoftmax
