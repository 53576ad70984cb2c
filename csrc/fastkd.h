// fastkd C++ library: the ops' schemas live in ops.cpp (TORCH_LIBRARY(fastkd, m)); CPU kernels in
// cpu/, CUDA kernels in cuda/ (compiled with FASTKD_WITH_CUDA).
#pragma once

#include <string>

namespace fastkd {

// What this build contains, e.g. "cpu" or "cpu+cuda13000".
std::string build_info();

#ifdef FASTKD_WITH_CUDA
// CUDART_VERSION the CUDA sources were compiled with (defined in cuda/cuda_info.cu).
int cuda_runtime_version();
#endif

}  // namespace fastkd
