"""CPU path of MLD: the fused C++ kernels of fastkd._C (csrc/cpu/binary_kl_div*.cpp: one pass, AVX2 + Sleef when the
CPU has it, OpenMP threads, fixed-order sums), the CPU kernels of fastkd::binary_kl_div(_backward), called
here straight at the CPU dispatch key (below autograd). Same signatures as ``binary_kl_div_triton``, plus the eager
autograd node."""
import torch

from fastkd import _C

_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_FORWARD = torch.ops.fastkd.binary_kl_div.default
_BACKWARD = torch.ops.fastkd.binary_kl_div_backward.default

# binary_kl_div_autograd(student, teacher, temperature, reduction) -> loss with a C++ autograd node whose forward
# also computes the gradients for an upstream gradient of 1 and whose backward scales them (csrc/cpu/binary_kl_div.h)
binary_kl_div_autograd = _C.binary_kl_div_autograd


def binary_kl_div_forward(student, teacher, temperature: float, reduction: str):
    return _FORWARD.redispatch(_CPU, student, teacher, temperature, reduction)


def binary_kl_div_backward(grad, student, teacher, temperature: float, reduction: str, teacher_grad: bool):
    return _BACKWARD.redispatch(_CPU, grad, student, teacher, temperature, reduction, teacher_grad)
