// The autograd formula of path_log_prob_forward, for every backend (the Autograd dispatch key).
//
// It lives in C++ rather than in torch.library.register_autograd because the Python formula
// cost ~0.15-0.2 ms of interpreter and boxed dispatch per training step (measured at V = 15,584,
// D = 112, B = 1,024 on 2 cores, where the kernels' forward + backward take ~0.9 ms): a quarter
// of the step, paid on every call. The fake kernels stay in Python (hsoftmax/ops.py), and so does
// the backward op's autograd, which only raises on a double backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_sparse_coo_tensor_unsafe.h>
#include <ATen/ops/mul.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace hsoftmax {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
    const at::Tensor& path_choice, const at::Tensor& target, int64_t max_path_rows,
    bool sparse_grad, bool hidden_grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("hsoftmax::path_log_prob_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, int64_t, bool, bool)>();
  return op.call(hidden, weight, bias, node_row_ptr, leaf_path_ptr, path_node, path_choice, target,
                 max_path_rows, sparse_grad, hidden_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_log_prob, const at::Tensor& coef, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr,
    const at::Tensor& path_node, const at::Tensor& path_choice, const at::Tensor& target,
    bool has_bias, std::array<bool, 3> output_mask, bool sparse_weight) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("hsoftmax::path_log_prob_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, bool, std::array<bool, 3>, bool)>();
  return op.call(grad_log_prob, coef, hidden, weight, node_row_ptr, leaf_path_ptr, path_node,
                 path_choice, target, has_bias, output_mask, sparse_weight);
}

class PathLogProb : public torch::autograd::Function<PathLogProb> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr,
                               const at::Tensor& path_node, const at::Tensor& path_choice,
                               const at::Tensor& target, int64_t max_path_rows, bool sparse_grad,
                               bool hidden_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [log_prob, coef, basis] =
        call_forward(hidden, weight, bias, node_row_ptr, leaf_path_ptr, path_node, path_choice,
                     target, max_path_rows, sparse_grad, hidden_grad);
    ctx->mark_non_differentiable({coef, basis});
    // coef's gradient is never used: without this, autograd would allocate zeros for it
    ctx->set_materialize_grads(false);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["sparse_grad"] = sparse_grad;
    ctx->save_for_backward(
        {hidden, weight, coef, node_row_ptr, leaf_path_ptr, path_node, path_choice, target, basis});
    return {log_prob, coef, basis};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool sparse = ctx->saved_data["sparse_grad"].toBool();
    // the inputs' edges: hidden 0, weight 1, bias 2 when given (the tree tensors follow)
    std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                has_bias && ctx->needs_input_grad(2)};
    variable_list out(11);  // one per forward argument; undefined = no gradient
    if (!grads[0].defined()) return out;
    const auto s = ctx->get_saved_variables();
    const auto& weight = s[1];
    at::Tensor grad_hidden, grad_weight, grad_bias, rows;
    // grad_hidden from the forward's basis, g_b * u_b, unless a graph of the backward is wanted
    // (create_graph: the backward op's own autograd must then see, and refuse, the derivative)
    const auto& basis = s[8];  // (B, D) when the forward computed it, else (0,)
    const bool from_basis = mask[0] && basis.dim() == 2 && !at::GradMode::is_enabled();
    if (from_basis) {
      out[0] = at::mul(grads[0].unsqueeze(1), basis).to(s[0].scalar_type());
      mask[0] = false;
      if (!mask[1] && !mask[2]) return out;
    }
    if (at::GradMode::is_enabled()) {
      // create_graph: through the dispatcher, so the backward op's own autograd records it (and
      // raises if it is ever differentiated)
      std::tie(grad_hidden, grad_weight, grad_bias, rows) =
          call_backward(grads[0].contiguous(), s[2], s[0], weight, s[3], s[4], s[5], s[6], s[7],
                        has_bias, mask, sparse);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(grad_hidden, grad_weight, grad_bias, rows) =
          call_backward(grads[0].contiguous(), s[2], s[0], weight, s[3], s[4], s[5], s[6], s[7],
                        has_bias, mask, sparse);
    }
    if (sparse) {
      // the kernel emits sorted unique rows: coalesced by construction, no invariant check
      const auto index = rows.unsqueeze(0);
      if (mask[1]) {
        grad_weight = at::_sparse_coo_tensor_unsafe(
            index, grad_weight, weight.sizes(), grad_weight.options().layout(at::kSparse), true);
      }
      if (mask[2]) {
        grad_bias = at::_sparse_coo_tensor_unsafe(index, grad_bias, {weight.size(0)},
                                                  grad_bias.options().layout(at::kSparse), true);
      }
    }
    if (mask[0]) out[0] = grad_hidden;
    if (mask[1]) out[1] = grad_weight;
    if (mask[2]) out[2] = grad_bias;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> path_log_prob_forward_autograd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& node_row_ptr, const at::Tensor& leaf_path_ptr, const at::Tensor& path_node,
    const at::Tensor& path_choice, const at::Tensor& target, int64_t max_path_rows,
    bool sparse_grad, bool hidden_grad) {
  const auto out = PathLogProb::apply(hidden, weight, bias, node_row_ptr, leaf_path_ptr, path_node,
                                      path_choice, target, max_path_rows, sparse_grad, hidden_grad);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(hsoftmax, Autograd, m) {
  m.impl("path_log_prob_forward", &path_log_prob_forward_autograd);
}

}  // namespace hsoftmax
