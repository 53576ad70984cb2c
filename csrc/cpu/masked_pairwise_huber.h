// The eager CPU autograd node of LED (defined in masked_pairwise_huber.cpp), called from Python through fastkd._C
// (csrc/python_module.cpp) by fastkd/kernels/masked_pairwise_huber_cpu.py. Its forward computes the loss and the
// student's gradient for an upstream gradient of 1 in one pass (a CPU is compute-bound on the pair distances, so
// storing the gradient beats recomputing it); its backward multiplies by the upstream gradient: one node per call,
// no Python in the backward. torch.compile and the other devices use the registered ops (csrc/ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace fastkd::cpu {

// weight * masked_pairwise_huber(student, teacher, mask) + transposed_weight * the same over the transposed
// problem (groups along dim 1: student.transpose(0, 1), mask.t()), differentiable in student. LED in one node:
// (Q, B, D) views with weight = the CD weight, transposed_weight = the ID weight. reduction "none" (loss (G,))
// needs transposed_weight == 0.
at::Tensor masked_pairwise_huber_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& mask, double delta, bool normalize,
                                          c10::string_view reduction, double mean_floor, double weight,
                                          double transposed_weight);

}  // namespace fastkd::cpu
