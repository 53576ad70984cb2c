// Proves the CUDA sources were built; real kernels (box_pool / box_paint) join this folder.
#include <cuda_runtime_api.h>

#include "../fastkd.h"

namespace fastkd {

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace fastkd
