// Schemas of every fastkd op, declared once. Kernels attach per device: C++ ones here with TORCH_LIBRARY_IMPL
// (csrc/cpu, csrc/cuda), Python ones (Triton, vectorised PyTorch) and the fake and autograd kernels in
// fastkd/ops/<op>.py. Each backward is an op of its own, so that torch.compile can trace it. (The eager CPU
// autograd nodes of MLD and LED are not ops: csrc/cpu/binary_kl_div.h, masked_pairwise_huber.h.)
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
  // MLD: per-label binary KL (CPU: csrc/cpu/binary_kl_div.cpp; CUDA: fastkd/kernels/binary_kl_div_triton.py).
  m.def("binary_kl_div(Tensor student, Tensor teacher, float temperature, str reduction) -> Tensor");
  m.def("binary_kl_div_backward(Tensor grad, Tensor student, Tensor teacher, float temperature, str reduction, "
        "bool teacher_grad) -> Tensor[]");
  // LED: masked pairwise Huber over variable-size groups; returns (loss, per-group stats (G, 3)).
  m.def("masked_pairwise_huber(Tensor student, Tensor teacher, Tensor mask, float delta, bool normalize, "
        "str reduction, float mean_floor) -> (Tensor, Tensor)");
  m.def("masked_pairwise_huber_backward(Tensor grad, Tensor student, Tensor teacher, Tensor mask, Tensor stats, "
        "float delta, str reduction) -> Tensor");
  // TaT: softmax(scale q k^T) v fused with its MSE; returns (loss, lse, rowdot, residual).
  m.def("tat_attention_loss(Tensor query, Tensor key, Tensor value, Tensor target, float scale, str reduction, "
        "bool save_residual) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("tat_attention_loss_backward(Tensor grad, Tensor query, Tensor key, Tensor value, Tensor residual, "
        "Tensor lse, Tensor rowdot, float scale, str reduction, bool target_grad) -> Tensor[]");
  // LGD's mask pooling and box painting over all pyramid levels in one call (csrc/cpu/box_ops.h); `mean` divides
  // by each box's pixel count. Adjoint pair: each one's backward is the other (fastkd/ops/box_ops.py).
  m.def("box_pool(Tensor[] features, Tensor boxes, Tensor batch_idx, SymInt[2] image_size, bool mean) -> Tensor[]");
  m.def("box_paint(Tensor[] values, Tensor boxes, Tensor batch_idx, SymInt[2] image_size, SymInt batch_size, "
        "SymInt[] level_sizes, bool mean) -> Tensor[]");
}
