// The CUDA path_log_prob kernels, compiled from their own source (csrc/cuda/
// path_log_prob_kernels.cuh) for the CPU and run under the SIMT emulation (simt_emu.h), against
// the CPU kernels through the dispatcher: forward and backward, fp64/fp32/fp16/bf16, on binary,
// Huffman (deep), 128-way, mixed-arity and single-leaf trees, awkward batch sizes and widths, and
// out-of-range targets.
//
// Built twice (tests/cpp/CMakeLists.txt): as test_cuda_emu, which must pass, and with
// HSM_PLANTED_BUG as test_cuda_emu_planted, which breaks the kernels one way at a time and passes
// only if every broken variant is caught.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Flags.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <queue>
#include <random>
#include <string>
#include <vector>

#include "simt_emu.h"
// after simt_emu.h, which defines the CUDA names the kernels use
#include "cuda/path_log_prob_kernels.cuh"

C10_DECLARE_bool(caffe2_cpu_allocator_do_junk_fill);

#ifdef HSM_PLANTED_BUG
int hsm_planted_bug = 0;
#endif

namespace {

namespace ck = hsoftmax::cuda_kernels;

int failures = 0;

// Reports a failure; after the first few of a run only counts them.
void report(const std::string& message) {
  if (++failures <= 3) std::printf("FAIL %s\n", message.c_str());
}

// ---- trees ----

// A tree in the op's flat form, built from the children of each internal node (node ids: leaves
// 0 .. V - 1, internal node i is V + i).
struct TestTree {
  std::string name;
  int64_t num_leaves;
  at::Tensor node_row_ptr, leaf_path_ptr, path_node, path_choice;
  int64_t max_path_rows = 0;
};

TestTree flatten(std::string name, int64_t num_leaves,
                 const std::vector<std::vector<int64_t>>& kids) {
  const int64_t internal = static_cast<int64_t>(kids.size());
  std::vector<int32_t> row_ptr{0};
  for (const auto& k : kids) row_ptr.push_back(row_ptr.back() + static_cast<int32_t>(k.size()) - 1);
  // parent and child position of every node; the root is the node without a parent
  std::vector<int64_t> parent(num_leaves + internal, -1), position(num_leaves + internal, 0);
  for (int64_t i = 0; i < internal; ++i) {
    for (size_t j = 0; j < kids[i].size(); ++j) {
      parent[kids[i][j]] = i;
      position[kids[i][j]] = static_cast<int64_t>(j);
    }
  }
  std::vector<int64_t> leaf_ptr{0};
  std::vector<int32_t> path_node, path_choice;
  int64_t max_rows = 0;
  for (int64_t leaf = 0; leaf < num_leaves; ++leaf) {
    std::vector<std::pair<int32_t, int32_t>> up;  // (internal index, child position), leaf first
    for (int64_t node = leaf; parent[node] >= 0; node = num_leaves + parent[node]) {
      up.emplace_back(static_cast<int32_t>(parent[node]), static_cast<int32_t>(position[node]));
    }
    int64_t rows = 0;
    for (auto it = up.rbegin(); it != up.rend(); ++it) {
      path_node.push_back(it->first);
      path_choice.push_back(it->second);
      rows += row_ptr[it->first + 1] - row_ptr[it->first];
    }
    max_rows = std::max(max_rows, rows);
    leaf_ptr.push_back(static_cast<int64_t>(path_node.size()));
  }
  auto int_tensor = [](const std::vector<int32_t>& v) {
    return at::tensor(at::ArrayRef<int32_t>(v), at::kInt).reshape({static_cast<int64_t>(v.size())});
  };
  TestTree t{std::move(name),       num_leaves,
             int_tensor(row_ptr),   at::tensor(at::ArrayRef<int64_t>(leaf_ptr), at::kLong),
             int_tensor(path_node), int_tensor(path_choice)};
  t.max_path_rows = max_rows;
  return t;
}

// Huffman's construction over leaf weights: the two (or, with arity > 2, the `arity`) lightest
// nodes become the children of a new node.
TestTree huffman(std::string name, const std::vector<double>& weights, int arity = 2) {
  using Item = std::pair<double, int64_t>;
  std::priority_queue<Item, std::vector<Item>, std::greater<Item>> heap;
  const int64_t v = static_cast<int64_t>(weights.size());
  for (int64_t i = 0; i < v; ++i) heap.emplace(weights[i], i);
  std::vector<std::vector<int64_t>> kids;
  while (heap.size() > 1) {
    std::vector<int64_t> group;
    double total = 0;
    while (!heap.empty() && static_cast<int>(group.size()) < arity) {
      total += heap.top().first;
      group.push_back(heap.top().second);
      heap.pop();
    }
    kids.push_back(group);
    heap.emplace(total, v + static_cast<int64_t>(kids.size()) - 1);
  }
  return flatten(std::move(name), v, kids);
}

// Random arities in [2, max_arity]: groups of consecutive nodes of a shuffled list become children.
TestTree mixed(std::string name, int64_t v, int max_arity, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> open(v);
  std::iota(open.begin(), open.end(), 0);
  std::vector<std::vector<int64_t>> kids;
  while (open.size() > 1) {
    std::shuffle(open.begin(), open.end(), rng);
    const int arity =
        std::min<int>(static_cast<int>(open.size()), 2 + static_cast<int>(rng() % (max_arity - 1)));
    kids.emplace_back(open.end() - arity, open.end());
    open.resize(open.size() - arity);
    open.push_back(v + static_cast<int64_t>(kids.size()) - 1);
  }
  return flatten(std::move(name), v, kids);
}

std::vector<TestTree> test_trees() {
  std::vector<TestTree> trees;
  trees.push_back(huffman("binary", std::vector<double>(16, 1.0)));
  std::vector<double> geometric(40);  // a caterpillar: the rarest leaf is 39 levels down
  for (size_t i = 0; i < geometric.size(); ++i)
    geometric[i] = std::ldexp(1.0, -static_cast<int>(i));
  trees.push_back(huffman("huffman-deep", geometric));
  // root of 128 children (127 rows: lanes own several), child 100 a node of 50 children
  std::vector<std::vector<int64_t>> wide(2);
  for (int64_t j = 0; j < 50; ++j) wide[0].push_back(127 + j);
  for (int64_t j = 0; j < 128; ++j) wide[1].push_back(j < 100 ? j : (j == 100 ? 177 : j - 1));
  trees.push_back(flatten("128-way", 177, wide));
  trees.push_back(mixed("mixed-arity", 90, 40, 7));
  trees.push_back(flatten("single-leaf", 1, {}));
  return trees;
}

// ---- the two implementations ----

using Forward = std::tuple<at::Tensor, at::Tensor>;
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct EmuLaunch {
  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) const {
    simt::launch(kernel, grid, block, std::forward<A>(args)...);
  }
};

Forward cpu_forward(const TestTree& t, const at::Tensor& h, const at::Tensor& w,
                    const std::optional<at::Tensor>& bias, const at::Tensor& target) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hsoftmax::path_log_prob_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, int64_t, bool, bool)>();
  auto [lp, coef, basis] = op.call(h, w, bias, t.node_row_ptr, t.leaf_path_ptr, t.path_node,
                                   t.path_choice, target, t.max_path_rows, false, false);
  return {lp, coef};
}

Backward cpu_backward(const TestTree& t, const at::Tensor& g, const at::Tensor& coef,
                      const at::Tensor& h, const at::Tensor& w, const at::Tensor& target,
                      bool has_bias, std::array<bool, 3> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hsoftmax::path_log_prob_backward", "")
                       .typed<Backward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       bool, std::array<bool, 3>, bool)>();
  return op.call(g, coef, h, w, t.node_row_ptr, t.leaf_path_ptr, t.path_node, t.path_choice, target,
                 has_bias, mask, false);
}

Forward emu_forward(const TestTree& t, const at::Tensor& h, const at::Tensor& w,
                    const std::optional<at::Tensor>& bias, const at::Tensor& target) {
  return ck::path_log_prob_forward(EmuLaunch{}, h, w, bias, t.node_row_ptr, t.leaf_path_ptr,
                                   t.path_node, t.path_choice, target, t.max_path_rows);
}

Backward emu_backward(const TestTree& t, const at::Tensor& g, const at::Tensor& coef,
                      const at::Tensor& h, const at::Tensor& w, const at::Tensor& target,
                      bool has_bias, std::array<bool, 3> mask) {
  return ck::path_log_prob_backward(EmuLaunch{}, g, coef, h, w, t.node_row_ptr, t.leaf_path_ptr,
                                    t.path_node, t.path_choice, target, has_bias, mask);
}

// ---- comparison ----

// |got - want| <= atol + rtol * |want| everywhere, NaN only where want is NaN; prints the worst
// element otherwise.
void expect_close(const at::Tensor& got, const at::Tensor& want, double rtol, double atol,
                  const std::string& what) {
  if (got.sizes() != want.sizes()) {
    report(what + ": shape " + c10::str(got.sizes()) + ", want " + c10::str(want.sizes()));
    return;
  }
  const auto g = got.to(at::kDouble).flatten(), w = want.to(at::kDouble).flatten();
  const double* gp = g.data_ptr<double>();
  const double* wp = w.data_ptr<double>();
  int64_t worst = -1;
  double worst_excess = 0;
  for (int64_t i = 0; i < g.numel(); ++i) {
    if (std::isnan(wp[i]) || std::isnan(gp[i])) {
      if (std::isnan(wp[i]) != std::isnan(gp[i])) {
        worst = i;
        worst_excess = INFINITY;
      }
      continue;
    }
    const double excess = std::fabs(gp[i] - wp[i]) - (atol + rtol * std::fabs(wp[i]));
    if (excess > worst_excess) {
      worst = i;
      worst_excess = excess;
    }
  }
  if (worst >= 0) {
    char detail[160];
    std::snprintf(detail, sizeof(detail),
                  "element %lld of %lld: got %.9g want %.9g (rtol %.1e, atol %.1e)",
                  static_cast<long long>(worst), static_cast<long long>(g.numel()), gp[worst],
                  wp[worst], rtol, atol);
    report(what + ": " + detail);
  }
}

struct Tolerance {
  double rtol, atol;
};

// Both kernels accumulate in float (double for fp64) and round once to the output dtype, with
// different summation orders: they may differ by a rounding of the accumulator (relative ~1e-6
// in float, over sums of ~D terms), or by one unit in the last place of the output dtype.
Tolerance tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return {1e-11, 1e-12};
    case at::kFloat:
      return {2e-5, 2e-5};
    case at::kHalf:
      return {2e-3, 1e-4};  // 2 ulp of half (2^-10 relative)
    default:
      return {1.6e-2, 1e-3};  // 2 ulp of bfloat16 (2^-7 relative)
  }
}

std::string label(const TestTree& t, at::ScalarType dtype, int64_t batch, int64_t dim) {
  return t.name + " " + c10::toString(dtype) + " B=" + std::to_string(batch) +
         " D=" + std::to_string(dim);
}

// One case: random inputs; forward and backward (every output mask, with and without bias) of
// both implementations. Targets listed in `bad` are set out of range: the emulated forward must
// give NaN and zero coefficients there and the backward no contribution from them, which the CPU
// (which raises on them) shows by the same batch with those examples' gradients zeroed.
void compare(const TestTree& t, at::ScalarType dtype, int64_t batch, int64_t dim, uint64_t seed,
             const std::vector<int64_t>& bad = {}) {
  at::manual_seed(seed);
  const auto h = at::randn({batch, dim}, at::kDouble).to(dtype);
  const auto w =
      (at::randn({t.num_leaves - 1, dim}, at::kDouble) * (1.5 / std::sqrt(dim + 1.0))).to(dtype);
  const auto bias = (at::randn({t.num_leaves - 1}, at::kDouble) * 0.5).to(dtype);
  auto target = at::randint(t.num_leaves, {batch}, at::kLong);
  auto g = at::randn({batch}, at::kDouble).to(dtype);
  auto cpu_target = target.clone(), cpu_g = g.clone();
  for (size_t i = 0; i < bad.size(); ++i) {
    const int64_t b = bad[i];
    target[b] = i % 2 == 0 ? t.num_leaves + static_cast<int64_t>(i) : -1 - static_cast<int64_t>(i);
    cpu_g[b] = 0;
  }
  const Tolerance tol = tolerance(dtype);
  const std::string name = label(t, dtype, batch, dim);
  for (const bool with_bias : {true, false}) {
    const std::optional<at::Tensor> b = with_bias ? std::optional<at::Tensor>(bias) : std::nullopt;
    const std::string what = name + (with_bias ? " bias" : " no-bias");
    const auto [lp, coef] = emu_forward(t, h, w, b, target);
    const auto [lp_ref, coef_ref] = cpu_forward(t, h, w, b, cpu_target);
    auto lp_want = lp_ref.to(at::kDouble).clone(), coef_want = coef_ref.clone();
    for (const int64_t i : bad) {
      lp_want[i] = NAN;
      coef_want[i].zero_();
    }
    expect_close(lp, lp_want, tol.rtol, tol.atol, what + " log_prob");
    // coefficients are float (double for fp64) in both, from logits that may round differently
    expect_close(coef, coef_want, dtype == at::kDouble ? 1e-11 : 2e-5,
                 dtype == at::kDouble ? 1e-12 : 2e-5, what + " coef");
    for (const std::array<bool, 3> mask :
         {std::array<bool, 3>{true, true, true}, std::array<bool, 3>{false, true, false},
          std::array<bool, 3>{false, false, true}, std::array<bool, 3>{true, false, false}}) {
      if (!with_bias && !mask[0] && !mask[1]) continue;  // nothing to compute
      // the same coefficients for both, so the backward is compared on its own
      const auto [gh, gw, gb, rows] = emu_backward(t, g, coef_ref, h, w, target, with_bias, mask);
      const auto [gh_ref, gw_ref, gb_ref, rows_ref] =
          cpu_backward(t, cpu_g, coef_ref, h, w, cpu_target, with_bias, mask);
      const std::string m = what + " mask " + std::to_string(mask[0]) + std::to_string(mask[1]) +
                            std::to_string(mask[2]);
      expect_close(gh, gh_ref, tol.rtol, tol.atol, m + " grad_hidden");
      expect_close(gw, gw_ref, tol.rtol, tol.atol, m + " grad_weight");
      expect_close(gb, gb_ref, tol.rtol, tol.atol, m + " grad_bias");
      expect_close(rows, rows_ref, 0, 0, m + " rows");
    }
  }
}

// quick: one case per tree (the planted-bug run, which repeats it for every bug)
void test_all_shapes(bool quick) {
  const auto trees = test_trees();
  const at::ScalarType dtypes[] = {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16};
  uint64_t seed = 1;
  for (const auto& t : trees) {
    if (quick) {
      compare(t, at::kFloat, 13, 70, seed++);
      continue;
    }
    for (const auto dtype : dtypes) {
      // batches around the 8 warps per block; widths below, at and past 32 and 128 (one lane
      // tile of row_runs_kernel), none a multiple of 32 but one
      compare(t, dtype, 13, 70, seed++);
      compare(t, dtype, 1, 5, seed++);
    }
    compare(t, at::kFloat, 9, 32, seed++);
    compare(t, at::kFloat, 21, 133, seed++);
    compare(t, at::kFloat, 11, 37, seed++, {2, 5, 10});  // out-of-range targets
    compare(t, at::kDouble, 0, 16, seed++);              // an empty batch
  }
}

// The rows near the root are on every path: with B * rows entries in chunks of kChunk, the root
// row's entries span many chunks and go through the carries; the result is deterministic (the
// same bits under another interleaving of the threads) and takes no atomic operation.
void test_hot_rows() {
  const auto trees = test_trees();
  const TestTree& binary = trees[0];
  const int64_t batch = 3 * ck::kChunk + 17;  // the root's rows: > 3 chunks each
  compare(binary, at::kFloat, batch, 40, 99);
  compare(binary, at::kHalf, batch, 40, 100);
#ifndef HSM_PLANTED_BUG
  at::manual_seed(5);
  const auto h = at::randn({batch, 40}), w = at::randn({15, 40}), bias = at::randn({15});
  const auto target = at::randint(16, {batch}, at::kLong), g = at::randn({batch});
  const auto [lp, coef] = emu_forward(binary, h, w, bias, target);
  std::vector<Backward> runs;
  for (const uint64_t seed : {0, 1, 2}) {
    simt::set_schedule_seed(seed);
    runs.push_back(emu_backward(binary, g, coef, h, w, target, true, {true, true, true}));
  }
  simt::set_schedule_seed(0);
  for (size_t i = 1; i < runs.size(); ++i) {
    if (!at::equal(std::get<1>(runs[i]), std::get<1>(runs[0])) ||
        !at::equal(std::get<2>(runs[i]), std::get<2>(runs[0])) ||
        !at::equal(std::get<0>(runs[i]), std::get<0>(runs[0]))) {
      report("backward differs between thread interleavings");
    }
  }
  if (simt::atomics() != 0) {
    report("the kernels issued " + std::to_string(simt::atomics()) + " atomic operations");
  }
#endif
}

#ifndef HSM_PLANTED_BUG
// The emulator itself: it must report undefined behaviour rather than run through it.
void shuffle_with_exited_lane(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
void divergent_shuffles(float* out) {
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 2.0f, 1);
  }
}
void partial_syncthreads(float* out) {
  if (threadIdx.x < 40) __syncthreads();
  out[threadIdx.x] = 1;
}
void warp_sums(float* out) {
  const float v = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = ck::warp_sum(v);
  float down = v;
  for (int offset = 16; offset > 0; offset /= 2)
    down += __shfl_down_sync(0xffffffffu, down, offset);
  __syncthreads();
  if (threadIdx.x % 32 == 0) out[64 + threadIdx.x / 32] = down;
}

void test_emulator() {
  std::vector<float> out(128, 0);
  for (const auto& [name, kernel] :
       {std::pair<const char*, void (*)(float*)>{"exited lane", shuffle_with_exited_lane},
        {"divergent shuffles", divergent_shuffles},
        {"partial __syncthreads", partial_syncthreads}}) {
    bool caught = false;
    try {
      simt::launch(kernel, dim3(1), dim3(64), out.data());
    } catch (const simt::Error& e) {
      caught = true;
    }
    if (!caught) {
      report(std::string("the emulator ran a kernel with ") + name);
    }
  }
  simt::launch(warp_sums, dim3(1), dim3(64), out.data());
  for (int i = 0; i < 64; ++i) {
    const float want = i < 32 ? 496.0f : 1520.0f;  // 0 + .. + 31 and 32 + .. + 63
    if (out[i] != want || out[64 + i / 32] != want) {
      report("warp sum of lane " + std::to_string(i) + ": " + std::to_string(out[i]) + " / " +
             std::to_string(out[64 + i / 32]) + ", want " + std::to_string(want));
      break;
    }
  }
}
#endif

}  // namespace

int main() {
  // every tensor allocated on the CPU starts as junk (NaN for floats), so a kernel output that is
  // never written cannot pass as the zeros it should hold
  FLAGS_caffe2_cpu_allocator_do_junk_fill = true;
  if (!std::isnan(at::empty({4}, at::kFloat)[0].item<float>())) {
    std::printf("FAIL the CPU allocator does not fill new tensors with junk\n");
    return 1;
  }
#ifdef HSM_PLANTED_BUG
  const char* bugs[] = {"",
                        "off-by-one in a node's first weight row (forward)",
                        "the warp reduction skips its last lane exchange",
                        "the forward leaves the first coefficients past a path unwritten",
                        "row_runs_kernel ignores that a row continues from the previous chunk",
                        "row_carry_kernel reads the head of a row from the wrong carry slot"};
  int missed = 0;
  for (int bug = 1; bug < static_cast<int>(std::size(bugs)); ++bug) {
    hsm_planted_bug = bug;
    failures = 0;
    try {
      test_all_shapes(/*quick=*/true);
      test_hot_rows();
    } catch (const std::exception& e) {
      report(std::string("exception: ") + e.what());
    }
    std::printf("planted bug %d (%s): %s\n", bug, bugs[bug],
                failures > 0 ? "caught" : "NOT CAUGHT");
    missed += failures == 0;
  }
  return missed == 0 ? 0 : 1;
#else
  const auto start = std::chrono::steady_clock::now();
  test_emulator();
  test_all_shapes(/*quick=*/false);
  test_hot_rows();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%llu fiber switches in %.1f s\n", static_cast<unsigned long long>(simt::switches()),
              seconds);
  if (failures == 0) std::printf("all emulated CUDA tests passed\n");
  return failures == 0 ? 0 : 1;
#endif
}
