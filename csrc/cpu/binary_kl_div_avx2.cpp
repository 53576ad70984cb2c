// MLD CPU kernels, AVX2 + FMA build (at::vec's 256-bit vectors and Sleef's exp/log1p from libtorch_cpu).
// Chosen at run time only when the CPU has AVX2 (see binary_kl_div.cpp), so the rest of the extension keeps
// the portable flags torch builds it with. setuptools cannot give one file its own flags, so this file
// enables the ISA itself: the pragma switches on code generation, and the macros (which the pragma does
// not define) let sleef.h and at::vec see it -- the same as compiling this file with -mavx2 -mfma -mf16c.
#if defined(__x86_64__)
#pragma GCC target("avx,avx2,fma,f16c")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "binary_kl_div_kernel.h"

FASTKD_INSTANTIATE_BINARY_KL_ALL()
#endif
