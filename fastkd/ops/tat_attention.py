"""``fastkd::tat_attention_loss`` (TaT's softmax(s q k^T) v fused with its MSE to a target) and its backward as
torch.library custom ops.

Forward returns (loss, lse (B, N), rowdot (B, N), residual): lse = log sum_j exp(s q_i.k_j) and
rowdot = sum_c E O per query row (accumulation dtype), residual E = O - target (B, N, Cv) in the input dtype;
rowdot and residual only when `save_residual` (a gradient will be needed; else empty). All three are
non-differentiable: they are what the backward needs besides q, k, v, since dL/dO = w_b E with
w_b = 2 * upstream grad * reduction factor.
"""
from typing import List, Tuple

import torch
from torch import Tensor

from fastkd.kernels.common import acc_dtype, loss_scale
from fastkd.ops.dispatch import backend_module


def _reduce(losses: Tensor, shape, reduction: str, dtype) -> Tensor:
    """Per batch item sums of squared errors (B,) -> "none" (B,), "sum" or "mean" (over B * N * Cv)."""
    return (losses if reduction == "none" else losses.sum() * loss_scale(shape, reduction)).to(dtype)


@torch.library.custom_op("fastkd::tat_attention_loss", mutates_args=())
def tat_attention_loss(query: Tensor, key: Tensor, value: Tensor, target: Tensor, scale: float, reduction: str,
                       save_residual: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse, rowdot, residual); see fastkd.functional.tat_attention_loss."""
    losses, lse, rowdot, residual = backend_module("tat_attention", query).tat_forward(
        query, key, value, target, scale, save_residual)
    return _reduce(losses, target.shape, reduction, query.dtype), lse, rowdot, residual


@tat_attention_loss.register_fake
def _(query, key, value, target, scale, reduction, save_residual):
    B, N = query.shape[:2]
    loss = query.new_empty((B,) if reduction == "none" else ())
    lse = query.new_empty((B, N), dtype=acc_dtype(query.dtype))
    if not save_residual:
        return loss, lse, lse.new_empty(0), query.new_empty(0)
    return loss, lse, torch.empty_like(lse), query.new_empty(target.shape)


@torch.library.custom_op("fastkd::tat_attention_loss_backward", mutates_args=())
def tat_attention_loss_backward(grad: Tensor, query: Tensor, key: Tensor, value: Tensor, residual: Tensor,
                                lse: Tensor, rowdot: Tensor, scale: float, reduction: str,
                                target_grad: bool) -> List[Tensor]:
    """[d loss / d query, d key, d value] (+ [d loss / d target] if target_grad) for the upstream gradient."""
    acc = acc_dtype(query.dtype)
    weight = (2 * loss_scale(residual.shape, reduction) * grad.to(acc)).expand(query.shape[0]).contiguous()
    grads = list(backend_module("tat_attention", query).tat_backward(weight, query, key, value, residual, lse,
                                                                     rowdot, scale))
    if target_grad:  # d loss / d target = -w_b E
        grads.append((residual.to(acc) * -weight[:, None, None]).to(query.dtype))
    return grads


@tat_attention_loss_backward.register_fake
def _(grad, query, key, value, residual, lse, rowdot, scale, reduction, target_grad):
    grads = [torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)]
    return grads + [torch.empty_like(residual)] if target_grad else grads


def _setup_context(ctx, inputs, output):
    query, key, value, _, ctx.scale, ctx.reduction, _ = inputs
    _, lse, rowdot, residual = output
    ctx.mark_non_differentiable(lse, rowdot, residual)
    ctx.save_for_backward(query, key, value, residual, lse, rowdot)


def _backward(ctx, grad, _grad_lse, _grad_rowdot, _grad_residual):
    query, key, value, residual, lse, rowdot = ctx.saved_tensors
    target_grad = ctx.needs_input_grad[3]
    grads = torch.ops.fastkd.tat_attention_loss_backward(grad, query, key, value, residual, lse, rowdot, ctx.scale,
                                                         ctx.reduction, target_grad)
    return grads[0], grads[1], grads[2], (grads[3] if target_grad else None), None, None, None


tat_attention_loss.register_autograd(_backward, setup_context=_setup_context)
