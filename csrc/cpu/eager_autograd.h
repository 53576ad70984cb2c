// The eager CPU autograd nodes of MLD and LED (csrc/cpu/eager_autograd.cpp), called from Python through fastkd._C
// (csrc/python_module.cpp) by fastkd/kernels/<op>_cpu.py. Their forward computes the loss and its gradient for an
// upstream gradient of 1 in one pass (a CPU is compute-bound on the transcendentals and pair distances, so storing
// the gradient beats recomputing it); their backward multiplies by the upstream gradient. One node per call, no
// Python in the backward. torch.compile and the other devices use the registered ops (csrc/ops.cpp) instead.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace fastkd::cpu {

// One-pass kernels (defined in binary_kl_div.cpp, masked_pairwise_huber.cpp).
// [loss, d loss / d student(, d loss / d teacher)] for an upstream gradient of 1.
std::vector<at::Tensor> binary_kl_div_with_grad(const at::Tensor& student, const at::Tensor& teacher,
                                                double temperature, c10::string_view reduction, bool teacher_grad);
// (loss, stats (G, 3), d loss / d student for an upstream gradient of 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_pairwise_huber_with_grad(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& mask, double delta, bool normalize,
    c10::string_view reduction, double mean_floor);

// binary_kl_div(student, teacher, temperature, reduction), differentiable in both inputs.
at::Tensor binary_kl_div_autograd(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                  c10::string_view reduction);

// weight * masked_pairwise_huber(student, teacher, mask) + transposed_weight * the same over the transposed
// problem (groups along dim 1: student.transpose(0, 1), mask.t()), differentiable in student. LED in one node:
// (Q, B, D) views with weight = the CD weight, transposed_weight = the ID weight. reduction "none" (loss (G,))
// needs transposed_weight == 0.
at::Tensor masked_pairwise_huber_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& mask, double delta, bool normalize,
                                          c10::string_view reduction, double mean_floor, double weight,
                                          double transposed_weight);

}  // namespace fastkd::cpu
