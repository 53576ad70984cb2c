"""For ops whose backward kernels have no derivative (LED, TaT): under create_graph=True their gradients carry a
graph that raises when differentiated, instead of passing for constants. torch's ``once_differentiable`` does this
only when an upstream gradient requires grad, so ``torch.autograd.grad(loss, x, create_graph=True)`` with the
default upstream of ones would give a constant gradient; this one always does (the C++ CPU node of LED likewise)."""
import functools

import torch
from torch._C import _functions


def differentiable_once(op: str):
    """Decorator for a backward(ctx, *grads) that returns a tuple of gradients (or None)."""
    message = f"fastkd's {op} is differentiable once: its gradient has no gradient (create_graph=True)".encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():  # the usual backward: nothing to add
                return backward(ctx, *grads)
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            error = _functions.DelayedError(message, len(outputs))
            return error(*[None if g is None else g.detach().requires_grad_() for g in outputs])
        return wrapper
    return decorate
