"""CPU path of the masked pairwise Huber loss: the C++ kernels of fastkd._C (csrc/cpu/masked_pairwise_huber.cpp: members
read from the mask, no packing, groups in parallel), the CPU kernels of fastkd::masked_pairwise_huber(_backward),
called here straight at the CPU dispatch key (below autograd). Same signatures as ``masked_pairwise_huber_triton``,
plus the eager autograd node. Over DDP every rank holds all the gathered rows and computes every pair, so `local` and
`all_reduce` are unused."""
import torch

from fastkd import _C

_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_FORWARD = torch.ops.fastkd.masked_pairwise_huber.default
_BACKWARD = torch.ops.fastkd.masked_pairwise_huber_backward.default

# autograd(student, teacher, mask, delta, normalize, reduction, mean_floor, weight, transposed_weight) -> weight *
# loss + transposed_weight * the loss of the transposed problem, with one C++ autograd node whose forward also
# computes the student's gradient for an upstream gradient of 1 and whose backward scales it
# (csrc/cpu/masked_pairwise_huber.h)
autograd = _C.masked_pairwise_huber_autograd


def forward(student, teacher, mask, delta: float, normalize: bool, reduction: str, mean_floor: float, local=None,
            all_reduce=None):
    """(loss, stats (G, 3) [m_s, m_t, c], None: nothing to keep for the backward)."""
    return (*_FORWARD.redispatch(_CPU, student, teacher, mask, delta, normalize, reduction, mean_floor), None)


def backward(grad, student, teacher, mask, stats, delta: float, reduction: str, packed=None):
    """Gradient w.r.t. student (shape and strides of student)."""
    return _BACKWARD.redispatch(_CPU, grad, student, teacher, mask, stats, delta, reduction)
