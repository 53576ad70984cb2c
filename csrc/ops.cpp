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
}
