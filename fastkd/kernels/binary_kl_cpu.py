"""CPU path of MLD: the fused C++ kernels of fastkd._C (csrc/cpu/binary_kl*.cpp: one pass, AVX2 + Sleef
when the CPU has it, OpenMP threads, fixed-order sums). Same signatures as ``binary_kl_triton``."""
import torch

from fastkd._extension import require_extension


def binary_kl_div_forward(student, teacher, temperature: float, reduction: str):
    require_extension()
    return torch.ops.fastkd._binary_kl_div_cpu(student, teacher, temperature, reduction)


def binary_kl_div_backward(grad, student, teacher, temperature: float, reduction: str, teacher_grad: bool):
    require_extension()
    grads = torch.ops.fastkd._binary_kl_div_backward_cpu(grad, student, teacher, temperature, reduction, teacher_grad)
    return grads[0], (grads[1] if teacher_grad else None)
