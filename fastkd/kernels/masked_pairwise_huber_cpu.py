"""CPU path of the masked pairwise Huber loss: the C++ kernels of fastkd._C (csrc/cpu/masked_pairwise_huber.cpp: members
read from the mask, no packing, groups in parallel), the CPU kernels of fastkd::masked_pairwise_huber(_backward),
called here straight at the CPU dispatch key (below autograd). Same signatures as ``masked_pairwise_huber_triton``.
Over DDP every rank holds all the gathered rows and computes every pair, so `local` and `all_reduce` are unused."""
import torch

_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_FORWARD = torch.ops.fastkd.masked_pairwise_huber.default
_BACKWARD = torch.ops.fastkd.masked_pairwise_huber_backward.default
_WITH_GRAD = torch.ops.fastkd.masked_pairwise_huber_with_grad.default


def forward(student, teacher, mask, delta: float, normalize: bool, reduction: str, mean_floor: float, local=None,
            all_reduce=None):
    """(loss, stats (G, 3) [m_s, m_t, c], None: nothing to keep for the backward)."""
    return (*_FORWARD.redispatch(_CPU, student, teacher, mask, delta, normalize, reduction, mean_floor), None)


def forward_with_grad(student, teacher, mask, delta: float, normalize: bool, reduction: str, mean_floor: float):
    """(loss, stats, d loss / d student for an upstream gradient of 1) in one pass (CPU only)."""
    return _WITH_GRAD.redispatch(_CPU, student, teacher, mask, delta, normalize, reduction, mean_floor)


def backward(grad, student, teacher, mask, stats, delta: float, reduction: str, packed=None):
    """Gradient w.r.t. student (shape and strides of student)."""
    return _BACKWARD.redispatch(_CPU, grad, student, teacher, mask, stats, delta, reduction)
