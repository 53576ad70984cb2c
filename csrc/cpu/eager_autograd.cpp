// Eager CPU autograd nodes of MLD and LED (see eager_autograd.h): forward = one pass for loss and gradient,
// backward = stored gradient x upstream gradient (a 0-dim upstream multiplies on TensorIterator's scalar path).
#include "eager_autograd.h"

#include <torch/csrc/autograd/custom_function.h>

namespace fastkd::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct BinaryKLDiv : torch::autograd::Function<BinaryKLDiv> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                            double temperature, c10::string_view reduction) {
    std::vector<at::Tensor> out =
        binary_kl_div_with_grad(student, teacher, temperature, reduction, ctx->needs_input_grad(1));
    ctx->save_for_backward(variable_list(out.begin() + 1, out.end()));
    return out[0];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list stored = ctx->get_saved_variables();
    return {stored[0] * grads[0], stored.size() > 1 ? stored[1] * grads[0] : at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

struct MaskedPairwiseHuber : torch::autograd::Function<MaskedPairwiseHuber> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                            const at::Tensor& mask, double delta, bool normalize, c10::string_view reduction,
                            double mean_floor, double weight, double transposed_weight) {
    TORCH_CHECK(reduction != "none" || transposed_weight == 0,
                "reduction 'none' gives one loss per group: it needs transposed_weight == 0");
    at::Tensor loss, grad;
    if (weight != 0) {
      auto [term, stats, term_grad] =
          masked_pairwise_huber_with_grad(student, teacher, mask, delta, normalize, reduction, mean_floor);
      loss = weight == 1 ? term : term * weight;
      grad = weight == 1 ? term_grad : term_grad * weight;
    }
    if (transposed_weight != 0) {
      auto [term, stats, term_grad] = masked_pairwise_huber_with_grad(
          student.transpose(0, 1), teacher.transpose(0, 1), mask.t(), delta, normalize, reduction, mean_floor);
      term = term * transposed_weight;
      term_grad = term_grad.transpose(0, 1) * transposed_weight;
      loss = loss.defined() ? loss + term : term;
      grad = grad.defined() ? grad + term_grad : term_grad;
    }
    if (!loss.defined()) {  // both weights 0
      loss = at::zeros(reduction == "none" ? at::IntArrayRef{student.size(0)} : at::IntArrayRef{}, student.options());
      grad = at::zeros_like(student);
    }
    ctx->saved_data["per_group"] = reduction == "none";
    ctx->save_for_backward({grad});
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor stored = ctx->get_saved_variables()[0];
    const at::Tensor upstream = ctx->saved_data["per_group"].toBool() ? grads[0].reshape({-1, 1, 1}) : grads[0];
    return {stored * upstream, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor binary_kl_div_autograd(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                  c10::string_view reduction) {
  return BinaryKLDiv::apply(student, teacher, temperature, reduction);
}

at::Tensor masked_pairwise_huber_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& mask, double delta, bool normalize,
                                          c10::string_view reduction, double mean_floor, double weight,
                                          double transposed_weight) {
  return MaskedPairwiseHuber::apply(student, teacher, mask, delta, normalize, reduction, mean_floor, weight,
                                    transposed_weight);
}

}  // namespace fastkd::cpu
