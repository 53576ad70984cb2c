"""``fastkd::masked_pairwise_huber`` (L2D's LED term over variable-size groups): fake and autograd kernels, the
Triton kernels for CUDA (CPU: C++), and the eager entry point, also over DDP ranks.

The op returns (loss, per-group stats [m_s, m_t, c] (G, 3)): the stats are all the backward needs besides the
inputs. Host syncs: on CUDA one, in the packing of the groups (the largest group size and the number of query
members size the grid, like max_seqlen in variable-length attention); the eager backward reuses the forward's
packing, the registered backward op (torch.compile) packs again. On CPU none. Over DDP one more: the ranks' sizes.
On CPU the eager forward also computes the student's gradient (``fastkd::masked_pairwise_huber_with_grad``, the
pairs visited once) and the backward multiplies by the upstream gradient.
"""
import torch
import torch.distributed as dist

from fastkd._extension import EXTENSION_ERROR
from fastkd.kernels.common import acc_dtype
from fastkd.ops.registry import kernels, register

FAMILY = "masked_pairwise_huber"


def _fake(student, teacher, mask, delta, normalize, reduction, mean_floor):
    groups = student.shape[0]
    loss = student.new_empty((groups,) if reduction == "none" else ())
    return loss, student.new_empty((groups, 3), dtype=acc_dtype(student.dtype))


def _backward_fake(grad, student, teacher, mask, stats, delta, reduction):
    return torch.empty_like(student)


def _with_grad_fake(student, teacher, mask, delta, normalize, reduction, mean_floor):
    return *_fake(student, teacher, mask, delta, normalize, reduction, mean_floor), torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, teacher, mask, ctx.delta, _, ctx.reduction, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(student, teacher, mask, output[1])


def _op_backward(ctx, grad, _grad_stats):
    student, teacher, mask, stats = ctx.saved_tensors
    grad_student = torch.ops.fastkd.masked_pairwise_huber_backward(grad, student, teacher, mask, stats, ctx.delta,
                                                                   ctx.reduction)
    return grad_student, None, None, None, None, None, None


def _gather_members(x, group):
    """(G, N_local, ...) from every rank -> (G, N_local * world, ...), rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _global_members(student, teacher, mask, group):
    """Every rank's members (no gradient) and the mask of this rank's own columns."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n_local = student.shape[1]
    sizes = [torch.empty(1, dtype=torch.int64, device=student.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n_local], device=student.device), group=group)
    if any(int(s) != n_local for s in sizes):
        raise ValueError(f"every rank must hold the same number of samples, got {[int(s) for s in sizes]}")
    s_all, t_all = _gather_members(student.detach(), group), _gather_members(teacher, group)
    mask_all = _gather_members(mask.to(torch.uint8), group).bool()
    local = torch.zeros_like(mask_all)
    local[:, rank * n_local:(rank + 1) * n_local] = True
    return s_all, t_all, mask_all, local


class _Eager(torch.autograd.Function):
    """Eager autograd, on one process or over the ranks of `group`: the device kernels called directly; the
    backward reuses what the forward packed.

    Over DDP each rank gathers every rank's rows (no gradient), owns the ordered pairs whose first member is one of
    its rows, and all-reduces the per-group partial sums between passes, so every pair is computed once and the
    means and the loss are global. Symmetry gives each rank the full gradient of its own rows; it is multiplied
    by the world size so that DDP's gradient averaging reproduces one process on the concatenated batch."""

    @staticmethod
    def forward(ctx, student, teacher, mask, delta, normalize, reduction, mean_floor, group):
        k = kernels(FAMILY, student)
        local = all_reduce = None
        if group is not None:
            ctx.rows = slice(dist.get_rank(group) * student.shape[1], (dist.get_rank(group) + 1) * student.shape[1])
            student, teacher, mask, local = _global_members(student, teacher, mask, group)
            all_reduce = lambda t: dist.all_reduce(t, group=group)  # noqa: E731
        ctx.k, ctx.delta, ctx.reduction, ctx.group = k, delta, reduction, group
        with_grad = getattr(k, "forward_with_grad", None)  # the CPU kernels have it
        ctx.stored_grad = with_grad is not None
        if ctx.stored_grad:
            loss, _, grad_student = with_grad(student, teacher, mask, delta, normalize, reduction, mean_floor)
            ctx.save_for_backward(grad_student)
            return loss
        loss, stats, ctx.packed = k.forward(student, teacher, mask, delta, normalize, reduction, mean_floor, local,
                                            all_reduce)
        ctx.save_for_backward(student, teacher, mask, stats)
        return loss

    @staticmethod
    def backward(ctx, grad):
        if ctx.group is not None:
            grad = grad * dist.get_world_size(ctx.group)
        if ctx.stored_grad:  # upstream (G,) for reduction "none", else 0-dim (kept so: a fast scalar multiply)
            grad_student = ctx.saved_tensors[0] * (grad.reshape(-1, 1, 1) if grad.dim() else grad)
        else:
            student, teacher, mask, stats = ctx.saved_tensors
            grad_student = ctx.k.backward(grad, student, teacher, mask, stats, ctx.delta, ctx.reduction, ctx.packed)
        if ctx.group is not None:
            grad_student = grad_student[:, ctx.rows]
        return grad_student, None, None, None, None, None, None, None


def masked_pairwise_huber(student, teacher, mask, delta: float, normalize: bool, reduction: str, mean_floor: float,
                          group=None):
    """Checked arguments (teacher detached, mask bool) -> loss: the registered op under torch.compile, else the
    eager Function (or the bare forward kernels when no gradient is needed). With `group`, members (dim 1) are
    split across its ranks (eager only: collectives)."""
    if group is None and torch.compiler.is_compiling():
        return torch.ops.fastkd.masked_pairwise_huber(student, teacher, mask, delta, normalize, reduction,
                                                      mean_floor)[0]
    if group is not None or (torch.is_grad_enabled() and student.requires_grad):
        return _Eager.apply(student, teacher, mask, delta, normalize, reduction, mean_floor, group)
    return kernels(FAMILY, student).forward(student, teacher, mask, delta, normalize, reduction, mean_floor)[0]


if EXTENSION_ERROR is None:  # the schemas come with fastkd._C
    torch.library.register_fake("fastkd::masked_pairwise_huber", _fake)
    torch.library.register_fake("fastkd::masked_pairwise_huber_backward", _backward_fake)
    torch.library.register_fake("fastkd::masked_pairwise_huber_with_grad", _with_grad_fake)
    torch.library.register_autograd("fastkd::masked_pairwise_huber", _op_backward, setup_context=_setup_context)
    register("masked_pairwise_huber", FAMILY, lambda k, *args: k.forward(*args)[:2], cpu_is_native=True)
    register("masked_pairwise_huber_backward", FAMILY, lambda k, *args: k.backward(*args), cpu_is_native=True)
