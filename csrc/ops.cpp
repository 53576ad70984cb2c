// Schemas of fastkd's native ops, declared once. Python adds fake and autograd kernels.
#include <torch/library.h>

#include "fastkd.h"

namespace fastkd {

std::string build_info() {
#ifdef FASTKD_WITH_CUDA
  return "cpu+cuda" + std::to_string(cuda_runtime_version());
#else
  return "cpu";
#endif
}

}  // namespace fastkd

TORCH_LIBRARY(fastkd, m) {
  m.def("_build_info() -> str", &fastkd::build_info);
  // MLD's CPU kernels (csrc/cpu/binary_kl.cpp), called by the fastkd::binary_kl_div custom op.
  m.def("_binary_kl_div_cpu(Tensor student, Tensor teacher, float temperature, str reduction) -> Tensor");
  m.def("_binary_kl_div_backward_cpu(Tensor grad, Tensor student, Tensor teacher, float temperature, str reduction, "
        "bool teacher_grad) -> Tensor[]");
  // LGD's mask pooling and box painting over all pyramid levels in one call (csrc/cpu/box_ops.h); `mean` divides
  // by each box's pixel count. Adjoint pair: each one's backward is the other (fastkd/ops/box_ops.py).
  m.def("box_pool(Tensor[] features, Tensor boxes, Tensor batch_idx, SymInt[2] image_size, bool mean) -> Tensor[]");
  m.def("box_paint(Tensor[] values, Tensor boxes, Tensor batch_idx, SymInt[2] image_size, SymInt batch_size, "
        "SymInt[] level_sizes, bool mean) -> Tensor[]");
}
