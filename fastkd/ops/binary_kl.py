"""``fastkd::binary_kl_div`` and its backward as torch.library custom ops (fake + autograd registered)."""
from typing import List

import torch
from torch import Tensor

from fastkd.ops.dispatch import backend_module


@torch.library.custom_op("fastkd::binary_kl_div", mutates_args=())
def binary_kl_div(student: Tensor, teacher: Tensor, temperature: float, reduction: str) -> Tensor:
    """Per-label binary KL(teacher || student) of sigmoid(z / T); see fastkd.functional.binary_kl_div."""
    return backend_module("binary_kl", student).binary_kl_div_forward(student, teacher, temperature, reduction)


@binary_kl_div.register_fake
def _(student, teacher, temperature, reduction):
    return student.new_empty(student.shape if reduction == "none" else ())


@torch.library.custom_op("fastkd::binary_kl_div_backward", mutates_args=())
def binary_kl_div_backward(grad: Tensor, student: Tensor, teacher: Tensor, temperature: float, reduction: str,
                           teacher_grad: bool) -> List[Tensor]:
    """[d loss / d student] (+ [d loss / d teacher] if teacher_grad), times the upstream gradient `grad`."""
    grads = backend_module("binary_kl", student).binary_kl_div_backward(
        grad, student, teacher, temperature, reduction, teacher_grad)
    return list(grads) if teacher_grad else [grads[0]]


@binary_kl_div_backward.register_fake
def _(grad, student, teacher, temperature, reduction, teacher_grad):
    return [torch.empty_like(student), torch.empty_like(teacher)] if teacher_grad else [torch.empty_like(student)]


def _setup_context(ctx, inputs, output):
    student, teacher, ctx.temperature, ctx.reduction = inputs
    ctx.save_for_backward(student, teacher)


def _backward(ctx, grad):
    student, teacher = ctx.saved_tensors
    teacher_grad = ctx.needs_input_grad[1]
    grads = torch.ops.fastkd.binary_kl_div_backward(grad, student, teacher, ctx.temperature, ctx.reduction,
                                                    teacher_grad)
    return grads[0], (grads[1] if teacher_grad else None), None, None


binary_kl_div.register_autograd(_backward, setup_context=_setup_context)
