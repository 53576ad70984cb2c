// CPU kernels of fastkd::binary_kl_div and fastkd::binary_kl_div_backward (schemas in csrc/ops.cpp), and the eager
// CPU autograd node (binary_kl_div.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "binary_kl_div.h"
#include "unit_gradient.h"

#include <torch/csrc/autograd/custom_function.h>

namespace fastkd::cpu {
namespace {

bool use_avx2() {
#if defined(__x86_64__)
  static const bool avx2 = [] {
    // ATEN_CPU_CAPABILITY=default turns the vector builds off, as for torch's own kernels
    const char* capability = std::getenv("ATEN_CPU_CAPABILITY");
    const bool portable_only = capability != nullptr && std::string(capability) == "default";
    return !portable_only && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return avx2;
#else
  return false;
#endif
}

// sum -> 1, mean -> 1 / numel, batchmean -> 1 / size(0); NaN for a zero count (as torch).
double loss_scale(const at::Tensor& x, c10::string_view reduction) {
  double count = 1;
  if (reduction == "mean") count = static_cast<double>(x.numel());
  if (reduction == "batchmean") count = static_cast<double>(x.size(0));
  return count == 0 ? std::numeric_limits<double>::quiet_NaN() : 1.0 / count;
}

}  // namespace

// The kernel instantiation for this CPU: FASTKD_PICK(backward<float, float>)(args...).
#if defined(__x86_64__)
#define FASTKD_PICK(...) (use_avx2() ? &AVX2::__VA_ARGS__ : &DEFAULT::__VA_ARGS__)
#else
#define FASTKD_PICK(...) (&DEFAULT::__VA_ARGS__)
#endif

at::Tensor binary_kl_div_forward(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                 c10::string_view reduction) {
  TORCH_CHECK(student.sizes() == teacher.sizes(), "teacher must have the shape of student");
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const int64_t n = s.numel();
  if (reduction == "none") {
    at::Tensor out = at::empty_like(s);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "binary_kl_div_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      FASTKD_PICK(forward_elementwise<scalar_t, acc_t>)(s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), n,
                                                        static_cast<acc_t>(1.0 / temperature),
                                                        out.mutable_data_ptr<scalar_t>());
    });
    return out;
  }
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "binary_kl_div_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> partials((n + kReduceBlock - 1) / kReduceBlock);
    FASTKD_PICK(forward_block_sums<scalar_t, acc_t>)(s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), n,
                                                     static_cast<acc_t>(1.0 / temperature), partials.data());
    double sum = 0;  // fixed order: the result does not depend on the number of threads
    for (acc_t partial : partials) sum += static_cast<double>(partial);
    loss = at::scalar_tensor(sum * loss_scale(s, reduction), s.options());
  });
  return loss;
}

std::vector<at::Tensor> binary_kl_div_backward(const at::Tensor& grad, const at::Tensor& student,
                                               const at::Tensor& teacher, double temperature,
                                               c10::string_view reduction, bool teacher_grad) {
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const bool grad_is_scalar = reduction != "none";
  const at::Tensor g = grad_is_scalar ? grad.reshape({}).to(s.scalar_type()) : grad.expand_as(s).contiguous();
  at::Tensor ds = at::empty_like(s);
  at::Tensor dt = teacher_grad ? at::empty_like(t) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "binary_kl_div_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FASTKD_PICK(backward<scalar_t, acc_t>)(
        s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), grad_is_scalar,
        s.numel(), static_cast<acc_t>(1.0 / temperature),
        static_cast<acc_t>(loss_scale(s, reduction) / temperature), ds.mutable_data_ptr<scalar_t>(),
        teacher_grad ? dt.mutable_data_ptr<scalar_t>() : nullptr);
  });
  if (teacher_grad) return {ds, dt};
  return {ds};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Loss and gradients for an upstream gradient of 1 in one pass: [loss, dloss/dstudent(, dloss/dteacher)]: the
// forward of the eager autograd node.
std::vector<at::Tensor> binary_kl_div_with_grad(const at::Tensor& student, const at::Tensor& teacher,
                                                double temperature, c10::string_view reduction, bool teacher_grad) {
  TORCH_CHECK(student.sizes() == teacher.sizes(), "teacher must have the shape of student");
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const int64_t n = s.numel();
  const bool reduce = reduction != "none";
  const double scale = reduce ? loss_scale(s, reduction) : 1.0;
  at::Tensor out = reduce ? at::Tensor() : at::empty_like(s);
  at::Tensor ds = at::empty_like(s), dt = teacher_grad ? at::empty_like(t) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "binary_kl_div_with_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> partials(reduce ? (n + kReduceBlock - 1) / kReduceBlock : 0);
    FASTKD_PICK(forward_with_grad<scalar_t, acc_t>)(
        s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), n, static_cast<acc_t>(1.0 / temperature),
        static_cast<acc_t>(scale / temperature), partials.data(), reduce ? nullptr : out.mutable_data_ptr<scalar_t>(),
        ds.mutable_data_ptr<scalar_t>(), teacher_grad ? dt.mutable_data_ptr<scalar_t>() : nullptr);
    if (reduce) {
      double sum = 0;  // fixed order, as in the forward
      for (acc_t partial : partials) sum += static_cast<double>(partial);
      out = at::scalar_tensor(sum * scale, s.options());
    }
  });
  if (teacher_grad) return {out, ds, dt};
  return {out, ds};
}

// The eager CPU autograd node: forward = loss and gradients in one pass; backward = gradients x upstream (a 0-dim
// upstream multiplies on TensorIterator's scalar path; an upstream of exactly 1 passes them on: unit_gradient.h),
// or, under create_graph=True, the gradients recomputed in differentiable ops.
struct BinaryKLDiv : torch::autograd::Function<BinaryKLDiv> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                            double temperature, c10::string_view reduction) {
    const bool teacher_grad = ctx->needs_input_grad(1);
    std::vector<at::Tensor> out = binary_kl_div_with_grad(student, teacher, temperature, reduction, teacher_grad);
    // stored gradients, then the inputs for create_graph=True
    ctx->save_for_backward({out[1], teacher_grad ? out[2] : at::Tensor(), student, teacher});
    ctx->saved_data["scale"] = (reduction == "none" ? 1.0 : loss_scale(student, reduction)) / temperature;
    ctx->saved_data["temperature"] = temperature;
    return out[0];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    at::Tensor ds = saved[0], dt = saved[1];
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable ATen ops, so double backward is exact
      const double temperature = ctx->saved_data["temperature"].toDouble();
      const at::Tensor a = saved[2] / temperature, b = saved[3] / temperature;
      const at::Tensor c = grads[0] * ctx->saved_data["scale"].toDouble(), sig_b = b.sigmoid();
      ds = c * (a.sigmoid() - sig_b);
      dt = dt.defined() ? c * sig_b * (-b).sigmoid() * (b - a) : dt;
    } else if (!is_unit_gradient(grads[0])) {
      ds = ds * grads[0];
      dt = dt.defined() ? dt * grads[0] : dt;
    }
    return {ds, dt, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor binary_kl_div_autograd(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                  c10::string_view reduction) {
  return BinaryKLDiv::apply(student, teacher, temperature, reduction);
}

}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("binary_kl_div", &fastkd::cpu::binary_kl_div_forward);
  m.impl("binary_kl_div_backward", &fastkd::cpu::binary_kl_div_backward);
}
