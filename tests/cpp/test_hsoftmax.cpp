// C++ tests, run by ctest: the shared math header and the op through the dispatcher, against
// naive double-precision formulas written out here independently.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "hsoftmax_math.h"

namespace {

int failures = 0;

void expect_near(double got, double want, double tol, const char* what) {
  if (!(std::fabs(got - want) <= tol)) {
    std::printf("FAIL %s: got %.17g want %.17g (tol %.3g)\n", what, got, want, tol);
    ++failures;
  }
}

// log softmax of children (0, z...) at `choice`, plainly.
double naive_node_logp(const std::vector<double>& z, int choice) {
  double total = 1.0;  // exp(0) for the first child
  for (double x : z) total += std::exp(x);
  const double picked = choice == 0 ? 0.0 : z[choice - 1];
  return picked - std::log(total);
}

void test_node_math() {
  for (const auto& z : std::vector<std::vector<double>>{
           {0.3}, {-4.0}, {12.0}, {0.5, -1.0}, {2.0, 2.0, -3.0, 0.1}, {-0.2, 5.0, 1.0}}) {
    for (int choice = 0; choice <= static_cast<int>(z.size()); ++choice) {
      std::vector<double> buf = z;
      const double lp =
          hsoftmax::math::node_log_softmax(buf.data(), static_cast<int>(z.size()), choice);
      expect_near(lp, naive_node_logp(z, choice), 1e-12, "node_log_softmax value");
      // d log p / d z_k = 1[k + 1 == choice] - softmax_k, by central differences
      for (size_t k = 0; k < z.size(); ++k) {
        std::vector<double> up = z, down = z;
        up[k] += 1e-6;
        down[k] -= 1e-6;
        const double fd = (naive_node_logp(up, choice) - naive_node_logp(down, choice)) / 2e-6;
        expect_near(buf[k], fd, 1e-7, "node_log_softmax gradient");
      }
    }
  }
  // stability: huge logits neither overflow nor lose the answer
  std::vector<float> big = {1000.0f};
  expect_near(hsoftmax::math::node_log_softmax(big.data(), 1, 1), 0.0, 1e-6, "log sigma(1000)");
  big = {1000.0f};
  expect_near(hsoftmax::math::node_log_softmax(big.data(), 1, 0), -1000.0, 1e-3,
              "log sigma(-1000)");
  std::vector<float> wide = {-900.0f, 800.0f, 0.0f};
  expect_near(hsoftmax::math::node_log_softmax(wide.data(), 3, 2), 0.0, 1e-6, "wide max");
  expect_near(wide[1], 0.0, 1e-6, "wide coef of the taken child");
}

// The searches' node_log_probs gives each child the same bits as the path kernel's
// node_log_softmax gives the child it takes, so a leaf's log-probability is the same float in
// top-k, rank and log_prob.
void test_search_and_path_agree() {
  for (const auto& z : std::vector<std::vector<float>>{
           {0.3f}, {-4.0f}, {87.5f}, {0.5f, -1.0f}, {2.0f, 2.0f, -3.0f, 0.1f}, {-30.f, 5.f, 1.f}}) {
    const int n = static_cast<int>(z.size());
    std::vector<float> all{0.0f};  // child 0's logit slot, then the others'
    all.insert(all.end(), z.begin(), z.end());
    hsoftmax::math::node_log_probs(all.data(), n + 1);
    for (int choice = 0; choice <= n; ++choice) {
      std::vector<float> buf = z;
      const float lp = hsoftmax::math::node_log_softmax(buf.data(), n, choice);
      if (lp != all[choice]) {
        std::printf("FAIL node_log_probs[%d] = %.9g but node_log_softmax gives %.9g\n", choice,
                    all[choice], lp);
        ++failures;
      }
    }
  }
}

// The binary-node formula in float against double precision over z in [-100, 100].
void test_float_binary_node() {
  double worst_lp = 0, worst_coef = 0;
  for (int i = -200000; i <= 200000; ++i) {  // z in [-100, 100]
    const float z = static_cast<float>(i) * 5e-4f;
    for (int choice = 0; choice <= 1; ++choice) {
      float buf = z;
      const double lp = hsoftmax::math::binary_node_log_softmax(&buf, choice);
      const double want = naive_node_logp({static_cast<double>(z)}, choice);
      worst_lp = std::max(worst_lp, std::fabs(lp - want) / std::max(1.0, std::fabs(want)));
      const double sigma = 1.0 / (1.0 + std::exp(-static_cast<double>(z)));
      worst_coef = std::max(worst_coef, std::fabs(buf - ((choice == 1 ? 1.0 : 0.0) - sigma)));
    }
  }
  std::printf("float binary node: log p rel %.3g, coef abs %.3g\n", worst_lp, worst_coef);
  // log p = x - lse cancels for large x: the formula itself (with any exp/log) rounds to within
  // ulp(|x|) / 2, ~5e-7 for |x| near 10
  expect_near(worst_lp, 0.0, 1e-6, "binary log p relative error");
  expect_near(worst_coef, 0.0, 3e-7, "binary gradient coefficient error");
}

// A 3-leaf tree: root (node 4) -> {leaf 0, node 3}, node 3 -> {leaf 1, leaf 2}.
void test_op_through_dispatcher() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("hsoftmax::path_log_prob_forward", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, int64_t, bool, bool)>();
  // internal nodes in id order: node 3 (index 0) owns row 0, node 4 (index 1) owns row 1
  const auto node_row_ptr = at::tensor({0, 1, 2}, at::kInt);
  const auto leaf_path_ptr = at::tensor({0, 1, 3, 5}, at::kLong);
  const auto path_node = at::tensor({1, 1, 0, 1, 0}, at::kInt);
  const auto path_choice = at::tensor({0, 1, 0, 1, 1}, at::kInt);
  const auto hidden = at::tensor({0.5, -1.0, 2.0, 0.25}, at::kDouble).reshape({2, 2});
  const auto weight = at::tensor({1.0, 2.0, -0.5, 0.75}, at::kDouble).reshape({2, 2});
  const auto bias = at::tensor({0.1, -0.2}, at::kDouble);
  for (int64_t y = 0; y < 3; ++y) {
    const auto target = at::full({2}, y, at::kLong);
    auto [lp, coef, basis] = op.call(hidden, weight, bias, node_row_ptr, leaf_path_ptr, path_node,
                                     path_choice, target, 2, false, true);
    for (int64_t b = 0; b < 2; ++b) {
      const double h0 = hidden[b][0].item<double>(), h1 = hidden[b][1].item<double>();
      const double z_node3 = 1.0 * h0 + 2.0 * h1 + 0.1;   // row 0
      const double z_root = -0.5 * h0 + 0.75 * h1 - 0.2;  // row 1
      double want = naive_node_logp({z_root}, y == 0 ? 0 : 1);
      if (y > 0) want += naive_node_logp({z_node3}, y == 1 ? 0 : 1);
      expect_near(lp[b].item<double>(), want, 1e-12, "path_log_prob_forward");
      // the hidden-gradient basis: d log p / d hidden = sum over the path's nodes of
      // (took the second child - sigmoid(z)) * the node's weight row
      const auto sigmoid = [](double z) { return 1.0 / (1.0 + std::exp(-z)); };
      const double c_root = (y == 0 ? 0.0 : 1.0) - sigmoid(z_root);
      const double c_node3 = y == 0 ? 0.0 : (y == 1 ? 0.0 : 1.0) - sigmoid(z_node3);
      expect_near(basis[b][0].item<double>(), c_root * -0.5 + c_node3 * 1.0, 1e-12,
                  "hidden-gradient basis");
      expect_near(basis[b][1].item<double>(), c_root * 0.75 + c_node3 * 2.0, 1e-12,
                  "hidden-gradient basis");
    }
  }
  bool threw = false;
  try {
    op.call(hidden, weight, bias, node_row_ptr, leaf_path_ptr, path_node, path_choice,
            at::tensor({0, 3}, at::kLong), 2, false, false);
  } catch (const c10::Error&) {
    threw = true;
  }
  if (!threw) {
    std::printf("FAIL out-of-range target did not raise\n");
    ++failures;
  }
}

}  // namespace

int main() {
  test_node_math();
  test_float_binary_node();
  test_search_and_path_agree();
  test_op_through_dispatcher();
  if (failures == 0) std::printf("all C++ tests passed\n");
  return failures == 0 ? 0 : 1;
}
