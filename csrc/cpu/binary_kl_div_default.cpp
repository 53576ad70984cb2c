// MLD CPU kernels, portable build (at::vec's generic vectors).
#define CPU_CAPABILITY DEFAULT
#include "binary_kl_div_kernel.h"

FASTKD_INSTANTIATE_BINARY_KL_ALL()
