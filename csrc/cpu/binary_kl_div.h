// Declarations of the per-capability MLD CPU kernels (defined in binary_kl_div_kernel.h, instantiated in
// binary_kl_div_default.cpp and, on x86-64, binary_kl_div_avx2.cpp), and of the eager CPU autograd node (defined in
// binary_kl_div.cpp), called from Python through fastkd._C (csrc/python_module.cpp) by
// fastkd/kernels/binary_kl_div_cpu.py: its forward computes the loss and its gradients for an upstream gradient of
// 1 in one pass (a CPU is compute-bound on exp/log1p, so storing the gradient beats recomputing it), its backward
// multiplies by the upstream gradient: one node per call, no Python in the backward. torch.compile and the other
// devices use the registered ops (csrc/ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastkd::cpu {
// Elements per reduction block: blocks are summed in a fixed order, so sums do not depend on threads.
constexpr int64_t kReduceBlock = 16384;

// binary_kl_div(student, teacher, temperature, reduction), differentiable in both inputs.
at::Tensor binary_kl_div_autograd(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                  c10::string_view reduction);
}  // namespace fastkd::cpu

#define FASTKD_DECLARE_BINARY_KL(NS)                                                                            \
  namespace fastkd::cpu::NS {                                                                                   \
  template <typename scalar_t, typename acc_t>                                                                  \
  void forward_block_sums(const scalar_t* s, const scalar_t* t, int64_t n, acc_t inv_temperature, acc_t* partials); \
  template <typename scalar_t, typename acc_t>                                                                  \
  void forward_elementwise(const scalar_t* s, const scalar_t* t, int64_t n, acc_t inv_temperature, scalar_t* out); \
  template <typename scalar_t, typename acc_t>                                                                  \
  void forward_with_grad(const scalar_t* s, const scalar_t* t, int64_t n, acc_t inv_temperature, acc_t grad_scale, \
                         acc_t* partials, scalar_t* out, scalar_t* ds, scalar_t* dt);                           \
  template <typename scalar_t, typename acc_t>                                                                  \
  void backward(const scalar_t* s, const scalar_t* t, const scalar_t* grad, bool grad_is_scalar, int64_t n,     \
                acc_t inv_temperature, acc_t scale, scalar_t* ds, scalar_t* dt);                                 \
  }

FASTKD_DECLARE_BINARY_KL(DEFAULT)
#if defined(__x86_64__)
FASTKD_DECLARE_BINARY_KL(AVX2)
#endif
