"""``fastkd::tat_attention_loss`` (TaT's softmax(s q k^T) v fused with its MSE to a target): fake and autograd
kernels, the Python device kernels, and the eager entry point.

The op returns (loss, lse (B, N), rowdot (B, N), residual): lse = log sum_j exp(s q_i.k_j) and rowdot = sum_c E O
per query row (accumulation dtype), residual E = O - target (B, N, Cv) in the input dtype; rowdot and residual
only when `save_residual` (a gradient will be needed; else empty). All three are non-differentiable: they are
what the backward needs besides q, k, v, since dL/dO = w_b E with w_b = 2 * upstream grad * reduction factor.
Host syncs: none.
"""
import torch

from fastkd._extension import EXTENSION_ERROR
from fastkd.kernels.common import acc_dtype, loss_scale
from fastkd.ops.differentiable_once import differentiable_once
from fastkd.ops.registry import kernels, register

FAMILY = "tat_attention_loss"


def _reduce(losses, target, reduction):
    """Per batch item sums (B,) (accumulation dtype) -> the loss in the inputs' dtype."""
    loss = losses if reduction == "none" else losses.sum() * loss_scale(target.shape, reduction)
    return loss.to(target.dtype)


def _forward(k, query, key, value, target, scale, reduction, save_residual):
    losses, lse, rowdot, residual = k.tat_forward(query, key, value, target, scale, save_residual)
    return _reduce(losses, target, reduction), lse, rowdot, residual


def _backward(k, grad, query, key, value, residual, lse, rowdot, scale, reduction, target_grad):
    acc = acc_dtype(query.dtype)
    weight = (2 * loss_scale(residual.shape, reduction) * grad.to(acc)).expand(query.shape[0]).contiguous()
    grads = list(k.tat_backward(weight, query, key, value, residual, lse, rowdot, scale))
    if target_grad:  # d loss / d target = -w_b E
        grads.append((residual.to(acc) * -weight[:, None, None]).to(query.dtype))
    return grads


def _fake(query, key, value, target, scale, reduction, save_residual):
    B, N = query.shape[:2]
    loss = query.new_empty((B,) if reduction == "none" else ())
    lse = query.new_empty((B, N), dtype=acc_dtype(query.dtype))
    if not save_residual:
        return loss, lse, lse.new_empty(0), query.new_empty(0)
    return loss, lse, torch.empty_like(lse), query.new_empty(target.shape)


def _backward_fake(grad, query, key, value, residual, lse, rowdot, scale, reduction, target_grad):
    grads = [query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)]  # contiguous
    return grads + [torch.empty_like(residual)] if target_grad else grads


def _grads(ctx, grad, backward):
    """The autograd formula, for the registered op (backward = the backward op) and the eager Function."""
    query, key, value, residual, lse, rowdot = ctx.saved_tensors
    target_grad = ctx.needs_input_grad[3]
    grads = backward(grad, query, key, value, residual, lse, rowdot, ctx.scale, ctx.reduction, target_grad)
    return grads[0], grads[1], grads[2], (grads[3] if target_grad else None), None, None, None


def _setup_context(ctx, inputs, output):
    query, key, value, _, ctx.scale, ctx.reduction, _ = inputs
    _, lse, rowdot, residual = output
    ctx.mark_non_differentiable(lse, rowdot, residual)
    ctx.save_for_backward(query, key, value, residual, lse, rowdot)


class _Eager(torch.autograd.Function):
    """Eager autograd: the device kernels called directly, one Python boundary per direction. The CPU kernels
    compute the gradients in the forward (`tat_forward_with_grad`; the backward scales them by w_b), the Triton
    kernels in the backward from lse and rowdot."""

    @staticmethod
    def forward(ctx, query, key, value, target, scale, reduction):
        k = kernels(FAMILY, query)
        ctx.scale, ctx.reduction = scale, reduction
        with_grad = getattr(k, "tat_forward_with_grad", None)  # the CPU kernels have it
        if with_grad is None:
            loss, lse, rowdot, residual = _forward(k, query, key, value, target, scale, reduction, True)
            ctx.save_for_backward(query, key, value, residual, lse, rowdot)
            ctx.stored_grads = False
            return loss
        losses, *grads = with_grad(query, key, value, target, scale, ctx.needs_input_grad[3])
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.stored_grads, ctx.target_shape = True, target.shape
        ctx.dtypes = (query.dtype, key.dtype, value.dtype, target.dtype)
        return _reduce(losses, target, reduction)

    @staticmethod
    @differentiable_once(FAMILY)
    def backward(ctx, grad):
        if not ctx.stored_grads:
            return _grads(ctx, grad, lambda *args: _backward(kernels(FAMILY, grad), *args))[:6]
        grads = ctx.saved_tensors
        weight = (2 * loss_scale(ctx.target_shape, ctx.reduction) * grad).to(grads[0].dtype)
        if weight.dim():  # reduction "none": w_b per batch item (a 0-dim weight stays a fast scalar multiply)
            weight = weight.reshape(-1, 1, 1)
        scaled = [(g * weight).to(dtype) for g, dtype in zip(grads, ctx.dtypes)]  # dL/dO_b = w_b E_b
        if len(scaled) == 4:  # d loss / d target = -w_b E
            scaled[3] = scaled[3].neg_()
        return (*scaled[:3], scaled[3] if len(scaled) == 4 else None, None, None)


def tat_attention_loss(query, key, value, target, scale: float, reduction: str):
    """Checked arguments -> loss: the registered op under torch.compile, else the eager Function (or the bare
    forward kernels when no gradient is needed)."""
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad
                                              or target.requires_grad)
    if torch.compiler.is_compiling():
        return torch.ops.fastkd.tat_attention_loss(query, key, value, target, scale, reduction, needs_grad)[0]
    if needs_grad:
        return _Eager.apply(query, key, value, target, scale, reduction)
    return _forward(kernels(FAMILY, query), query, key, value, target, scale, reduction, False)[0]


if EXTENSION_ERROR is None:  # the schemas come with fastkd._C
    torch.library.register_fake("fastkd::tat_attention_loss", _fake)
    torch.library.register_fake("fastkd::tat_attention_loss_backward", _backward_fake)
    torch.library.register_autograd(
        "fastkd::tat_attention_loss",
        differentiable_once(FAMILY)(
            lambda ctx, grad, *_: _grads(ctx, grad, torch.ops.fastkd.tat_attention_loss_backward)),
        setup_context=_setup_context)
    register("tat_attention_loss", FAMILY, _forward)
    register("tat_attention_loss_backward", FAMILY, _backward)
