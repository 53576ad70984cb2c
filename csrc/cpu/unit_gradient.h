// Shared by the eager CPU autograd nodes (binary_kl_div.cpp, masked_pairwise_huber.cpp), whose forward stores the
// gradients for an upstream gradient of 1: loss.backward()'s upstream is exactly that, and the node then passes
// the stored gradients on instead of multiplying (the graph is freed before they reach .grad; a retained graph
// makes AccumulateGrad copy them).
#pragma once

#include <ATen/core/Tensor.h>

namespace fastkd::cpu {

// Whether g is a 0-dim fp32/fp64 CPU tensor holding 1 (read on the host: a CPU tensor, no sync).
inline bool is_unit_gradient(const at::Tensor& g) {
  if (g.dim() != 0 || !g.device().is_cpu()) return false;
  if (g.scalar_type() == at::kFloat) return *g.const_data_ptr<float>() == 1.f;
  if (g.scalar_type() == at::kDouble) return *g.const_data_ptr<double>() == 1.0;
  return false;
}

}  // namespace fastkd::cpu
