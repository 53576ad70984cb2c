// Python module fastkd._C: importing it runs the static TORCH_LIBRARY registrations (every op's schema and C++
// kernels), and it exposes the eager CPU autograd nodes of MLD and LED (csrc/cpu/<op>.h), which are entry points of
// the CPU kernels, not ops. Built by setup.py only; the CMake library has no Python dependency.
#include <torch/extension.h>

#include <string>

#include "cpu/binary_kl_div.h"
#include "cpu/masked_pairwise_huber.h"

PYBIND11_MODULE(_C, m) {
  m.def("binary_kl_div_autograd",
        [](const at::Tensor& student, const at::Tensor& teacher, double temperature, const std::string& reduction) {
          return fastkd::cpu::binary_kl_div_autograd(student, teacher, temperature, reduction);
        });
  m.def("masked_pairwise_huber_autograd",
        [](const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& mask, double delta, bool normalize,
           const std::string& reduction, double mean_floor, double weight, double transposed_weight) {
          return fastkd::cpu::masked_pairwise_huber_autograd(student, teacher, mask, delta, normalize, reduction,
                                                             mean_floor, weight, transposed_weight);
        });
}
