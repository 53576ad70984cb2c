"""``fastkd::masked_pairwise_huber`` (L2D's LED term over variable-size groups): fake and autograd kernels, the
Triton kernels for CUDA (CPU: C++), and the eager entry point, also over DDP ranks.

The op returns (loss, per-group stats [m_s, m_t, c] (G, 3)): the stats are all the backward needs besides the
inputs. Host syncs: on CUDA one, in the packing of the groups (the largest group size and the number of query
members size the grid, like max_seqlen in variable-length attention); the eager backward reuses the forward's
packing, the registered backward op (torch.compile) packs again. On CPU none. Over DDP one more: the ranks' sizes.
Eager on CPU: one C++ autograd node whose forward also computes the student's gradient (the pairs visited once)
and whose backward multiplies by the upstream gradient.
"""
import torch
import torch.distributed as dist

from fastkd._extension import EXTENSION_ERROR
from fastkd.kernels.common import acc_dtype
from fastkd.ops.differentiable_once import differentiable_once
from fastkd.ops.registry import kernels, register

FAMILY = "masked_pairwise_huber"


def _fake(student, teacher, mask, delta, normalize, reduction, mean_floor):
    groups = student.shape[0]
    loss = student.new_empty((groups,) if reduction == "none" else ())
    return loss, student.new_empty((groups, 3), dtype=acc_dtype(student.dtype))


def _backward_fake(grad, student, teacher, mask, stats, delta, reduction):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, teacher, mask, ctx.delta, _, ctx.reduction, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(student, teacher, mask, output[1])


@differentiable_once(FAMILY)
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


def _terms(student, teacher, mask, weight, transposed_weight):
    """(weight, transposed, (student, teacher, mask)) of each term with a nonzero weight: groups along dim 0, then
    groups along dim 1 (the transposed problem)."""
    terms = [(weight, False, (student, teacher, mask))] if weight else []
    if transposed_weight:
        terms.append((transposed_weight, True, (student.transpose(0, 1), teacher.transpose(0, 1), mask.T)))
    return terms


def _weighted_sum(parts):
    """sum of weight * loss over (weight, loss), without a multiply for weight 1."""
    total = None
    for weight, loss in parts:
        loss = loss if weight == 1 else loss * weight
        total = loss if total is None else total + loss
    return total


class _Eager(torch.autograd.Function):
    """Eager autograd of the Triton kernels, and of every kernel over DDP: the device kernels called directly, the
    terms of one call in one node; the backward reuses what the forward packed.

    Over DDP (`group`, the term over dim 0 only) each rank gathers every rank's rows (no gradient), owns the ordered
    pairs whose first member is one of its rows, and all-reduces the per-group partial sums between passes, so
    every pair is computed once and the means and the loss are global. Symmetry gives each rank the full gradient
    of its own rows; it is multiplied by the world size so that DDP's gradient averaging reproduces one process on
    the concatenated batch."""

    @staticmethod
    def forward(ctx, student, teacher, mask, delta, normalize, reduction, mean_floor, group, weight,
                transposed_weight):
        k = kernels(FAMILY, student)
        ctx.k, ctx.delta, ctx.reduction, ctx.terms = k, delta, reduction, []
        losses, saved = [], []
        for w, transposed, (s, t, m) in _terms(student, teacher, mask, weight, transposed_weight):
            rows = local = all_reduce = None
            if group is not None and not transposed:
                rank, n_local = dist.get_rank(group), s.shape[1]
                rows = slice(rank * n_local, (rank + 1) * n_local)
                s, t, m, local = _global_members(s, t, m, group)
                all_reduce = lambda x: dist.all_reduce(x, group=group)  # noqa: E731
            loss, stats, packed = k.forward(s, t, m, delta, normalize, reduction, mean_floor, local, all_reduce)
            losses.append((w, loss))
            saved += [s, t, m, stats]
            ctx.terms.append((w, transposed, rows, dist.get_world_size(group) if rows is not None else 1, packed))
        ctx.save_for_backward(*saved)
        return _weighted_sum(losses)

    @staticmethod
    @differentiable_once(FAMILY)
    def backward(ctx, grad):
        saved, grad_student = ctx.saved_tensors, None
        for i, (w, transposed, rows, world, packed) in enumerate(ctx.terms):
            student, teacher, mask, stats = saved[4 * i:4 * i + 4]
            upstream = grad if w * world == 1 else grad * (w * world)
            g = ctx.k.backward(upstream, student, teacher, mask, stats, ctx.delta, ctx.reduction, packed)
            g = g[:, rows] if rows is not None else g
            g = g.transpose(0, 1) if transposed else g
            grad_student = g if grad_student is None else grad_student + g
        return grad_student, None, None, None, None, None, None, None, None, None


def masked_pairwise_huber(student, teacher, mask, delta: float, normalize: bool, reduction: str, mean_floor: float,
                          group=None, weight: float = 1.0, transposed_weight: float = 0.0):
    """Checked arguments (teacher detached, mask bool) -> weight * loss + transposed_weight * the loss of the
    transposed problem (groups along dim 1; LED's CD and ID in one call). Under torch.compile the registered op
    per term; else, when a gradient is needed, the CPU kernels' C++ autograd node or the eager Function (Triton,
    and DDP: `group` splits the members of the dim-0 groups across its ranks); else the bare forward kernels."""
    if not (weight or transposed_weight):
        return student.new_zeros(student.shape[:1] if reduction == "none" else ())
    if group is None and torch.compiler.is_compiling():
        return _weighted_sum((w, torch.ops.fastkd.masked_pairwise_huber(*inputs, delta, normalize, reduction,
                                                                        mean_floor)[0])
                             for w, _, inputs in _terms(student, teacher, mask, weight, transposed_weight))
    k = kernels(FAMILY, student)
    if group is not None or (torch.is_grad_enabled() and student.requires_grad):
        autograd = getattr(k, "autograd", None)  # the CPU kernels have it
        if group is None and autograd is not None:
            return autograd(student, teacher, mask, delta, normalize, reduction, mean_floor, weight, transposed_weight)
        return _Eager.apply(student, teacher, mask, delta, normalize, reduction, mean_floor, group, weight,
                            transposed_weight)
    return _weighted_sum((w, k.forward(*inputs, delta, normalize, reduction, mean_floor)[0])
                         for w, _, inputs in _terms(student, teacher, mask, weight, transposed_weight))


if EXTENSION_ERROR is None:  # the schemas come with fastkd._C
    torch.library.register_fake("fastkd::masked_pairwise_huber", _fake)
    torch.library.register_fake("fastkd::masked_pairwise_huber_backward", _backward_fake)
    torch.library.register_autograd("fastkd::masked_pairwise_huber", _op_backward, setup_context=_setup_context)
    register("masked_pairwise_huber", FAMILY, lambda k, *args: k.forward(*args)[:2], cpu_is_native=True)
    register("masked_pairwise_huber_backward", FAMILY, lambda k, *args: k.backward(*args), cpu_is_native=True)
