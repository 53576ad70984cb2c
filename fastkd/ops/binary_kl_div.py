"""``fastkd::binary_kl_div`` (MLD): fake and autograd kernels, the Triton kernel for CUDA (CPU: C++), and the eager
entry point. Eager on CPU: one C++ autograd node whose forward also computes the gradient (one pass: the CPU is
compute-bound on exp/log1p, so storing the gradient beats recomputing it) and whose backward multiplies; on CUDA
the backward kernel recomputes it (memory-bound: both move 5n elements). Host syncs: none (the upstream gradient is
read inside the kernels)."""
import torch

from fastkd._extension import EXTENSION_ERROR
from fastkd.ops.registry import kernels, register

FAMILY = "binary_kl_div"


def _fake(student, teacher, temperature, reduction):
    return student.new_empty(student.shape if reduction == "none" else ())


def _backward_fake(grad, student, teacher, temperature, reduction, teacher_grad):
    return [torch.empty_like(student), torch.empty_like(teacher)] if teacher_grad else [torch.empty_like(student)]


def _setup_context(ctx, inputs, output):
    student, teacher, ctx.temperature, ctx.reduction = inputs
    ctx.save_for_backward(student, teacher)


def _grads(ctx, grad, backward):
    """The autograd formula, for the registered op (backward = the backward op) and the eager Function; under
    create_graph=True in plain torch ops, so that double backward is exact."""
    student, teacher = ctx.saved_tensors
    teacher_grad = ctx.needs_input_grad[1]
    if torch.is_grad_enabled():
        backward = _differentiable_backward
    grads = backward(grad, student, teacher, ctx.temperature, ctx.reduction, teacher_grad)
    return grads[0], (grads[1] if teacher_grad else None), None, None


def _differentiable_backward(grad, student, teacher, temperature, reduction, teacher_grad):
    """The backward op's math in differentiable torch ops: with a = z_s / T, b = z_t / T and c = grad x the
    reduction's scale / T, d/dz_s = c (sigmoid(a) - sigmoid(b)) and d/dz_t = c sigmoid(b) sigmoid(-b) (b - a)."""
    count = {"sum": 1, "none": 1, "mean": student.numel(), "batchmean": student.shape[0]}[reduction]
    a, b = student / temperature, teacher / temperature
    c = grad / (count * temperature)
    sig_b = torch.sigmoid(b)
    grads = [c * (torch.sigmoid(a) - sig_b)]
    return grads + [c * sig_b * torch.sigmoid(-b) * (b - a)] if teacher_grad else grads


class _Eager(torch.autograd.Function):
    """Eager autograd of the Triton kernels: called directly, one Python boundary per direction (forward takes
    ctx: the setup_context form costs more per call)."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, reduction):
        _setup_context(ctx, (student, teacher, temperature, reduction), None)
        return kernels(FAMILY, student).binary_kl_div_forward(student, teacher, temperature, reduction)

    @staticmethod
    def backward(ctx, grad):
        return _grads(ctx, grad, kernels(FAMILY, grad).binary_kl_div_backward)


def binary_kl_div(student, teacher, temperature: float, reduction: str):
    """Checked arguments -> loss: the registered op under torch.compile; else, when a gradient is needed, the CPU
    kernels' C++ autograd node or the eager Function of the Triton kernels; else the bare forward kernel."""
    if torch.compiler.is_compiling():
        return torch.ops.fastkd.binary_kl_div(student, teacher, temperature, reduction)
    k = kernels(FAMILY, student)
    if torch.is_grad_enabled() and (student.requires_grad or teacher.requires_grad):
        autograd = getattr(k, "binary_kl_div_autograd", None)  # the CPU kernels have it
        if autograd is not None:
            return autograd(student, teacher, temperature, reduction)
        return _Eager.apply(student, teacher, temperature, reduction)
    return k.binary_kl_div_forward(student, teacher, temperature, reduction)


if EXTENSION_ERROR is None:  # the schemas come with fastkd._C
    torch.library.register_fake("fastkd::binary_kl_div", _fake)
    torch.library.register_fake("fastkd::binary_kl_div_backward", _backward_fake)
    torch.library.register_autograd("fastkd::binary_kl_div",
                                    lambda ctx, grad: _grads(ctx, grad, torch.ops.fastkd.binary_kl_div_backward),
                                    setup_context=_setup_context)
    register("binary_kl_div", FAMILY, lambda k, *args: k.binary_kl_div_forward(*args), cpu_is_native=True)
    register("binary_kl_div_backward", FAMILY, lambda k, *args: k.binary_kl_div_backward(*args), cpu_is_native=True)
