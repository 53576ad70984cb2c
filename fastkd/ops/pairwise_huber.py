"""``fastkd::masked_pairwise_huber`` (L2D's LED term over variable-size groups) as a torch.library custom
op, and the group packing and per-group statistics its backends share.

Forward: pack the groups, pass 1 (distance sums -> means), pass 2 (Huber sums and sum h' Ds), reduce.
It also returns per-group stats [m_s, m_t, c] (G, 3), all the backward needs besides the inputs.
"""
from typing import Tuple

import torch
from torch import Tensor

from fastkd.kernels.common import acc_dtype
from fastkd.ops.dispatch import backend_module


def pack_groups(mask: Tensor, local: Tensor = None):
    """Variable-length member lists of the groups of a (G, N) mask.

    Returns members (G, max(max_n, 1)) int32 positions with each group's query members first (members
    in `local`, or all of them) then its other members, counts (G,) and queries (G,) int32, max_n and the
    total number of query members. Reads those two numbers on the host: the only sync of the op (it sizes
    the grid, like max_seqlen in variable-length attention)."""
    mask = mask.bool()
    key = torch.where(mask, 0, 2).to(torch.int8)  # sort key: members first ...
    if local is not None:
        key += (mask & ~local).to(torch.int8)  # ... and among them this rank's own rows first
    counts = mask.sum(1, dtype=torch.int32)
    queries = counts if local is None else (mask & local).sum(1, dtype=torch.int32)
    if mask.shape[0] == 0 or mask.shape[1] == 0:
        return mask.new_zeros(mask.shape[0], 1, dtype=torch.int32), counts, queries, 0, 0
    max_n, total_queries = torch.stack([counts.max(), queries.sum()]).tolist()
    order = torch.argsort(key, dim=1, stable=True)[:, :max(max_n, 1)]
    return order.to(torch.int32).contiguous(), counts, queries, max_n, total_queries


def group_means(sums: Tensor, counts: Tensor, normalize: bool, mean_floor: float) -> Tuple[Tensor, Tensor]:
    """Normalising means (G, 2) [m_s, m_t] (1 without normalisation or for groups under 2 members) and
    whether the student mean is in the graph (not replaced by the floor)."""
    if not normalize:
        return torch.ones_like(sums), torch.zeros_like(sums[:, 0], dtype=torch.bool)
    pairs = (counts * (counts - 1)).to(sums.dtype)
    raw = sums / pairs.clamp(min=1)[:, None]
    means = torch.where((counts >= 2)[:, None], raw.clamp(min=mean_floor), torch.ones_like(raw))
    return means, (counts >= 2) & (raw[:, 0] > mean_floor)


def group_scale(counts: Tensor, reduction: str, dtype) -> Tensor:
    """Per-group factor of each group's loss in the reduced loss (1 for "none")."""
    counted = counts >= 2
    if reduction == "official":
        return torch.where(counted, 1.0 / counts.clamp(min=1).to(dtype), 0.0)
    if reduction == "mean":
        pairs = torch.where(counted, counts * (counts - 1), 0).sum().clamp(min=1)
        return torch.ones(counts.shape, dtype=dtype, device=counts.device) / pairs.to(dtype)
    return torch.ones(counts.shape, dtype=dtype, device=counts.device)


def group_losses(backend, student, teacher, packed, delta, normalize, mean_floor, all_reduce=None):
    """Per-group losses (G,) and stats (G, 3) [m_s, m_t, c]; `all_reduce` sums partials across ranks."""
    members, counts, queries, max_n, _ = packed
    prepared = backend.prepare(student, teacher, members, counts, queries, max_n)
    sums = backend.pair_sums(prepared)
    if all_reduce is not None:
        all_reduce(sums)
    means, mean_in_graph = group_means(sums, counts, normalize, mean_floor)
    huber_sums = backend.pair_loss(prepared, means, delta)
    if all_reduce is not None:
        all_reduce(huber_sums)
    coef = torch.where(mean_in_graph, huber_sums[:, 1] / sums[:, 0].clamp(min=1e-30), 0.0)
    return huber_sums[:, 0], torch.cat([means, coef[:, None]], dim=1)


def reduce_groups(losses: Tensor, counts: Tensor, reduction: str, dtype) -> Tensor:
    scaled = losses * group_scale(counts, reduction, losses.dtype)
    return (scaled if reduction == "none" else scaled.sum()).to(dtype)


def student_grad(backend, grad, student, teacher, packed, stats, delta, reduction, grad_scale=1.0):
    members, counts, queries, max_n, total_queries = packed
    weight = grad.to(stats.dtype) * group_scale(counts, reduction, stats.dtype) * grad_scale
    prepared = backend.prepare(student, teacher, members, counts, queries, max_n)
    return backend.pair_grad(prepared, total_queries, stats[:, :2], stats[:, 2],
                             weight.expand(counts.shape).contiguous(), delta)


@torch.library.custom_op("fastkd::masked_pairwise_huber", mutates_args=())
def masked_pairwise_huber(student: Tensor, teacher: Tensor, mask: Tensor, delta: float, normalize: bool,
                          reduction: str, mean_floor: float) -> Tuple[Tensor, Tensor]:
    """(loss, stats (G, 3)); see fastkd.functional.masked_pairwise_huber."""
    backend = backend_module("pairwise_huber", student)
    packed = pack_groups(mask)
    losses, stats = group_losses(backend, student, teacher, packed, delta, normalize, mean_floor)
    return reduce_groups(losses, packed[1], reduction, student.dtype), stats


@masked_pairwise_huber.register_fake
def _(student, teacher, mask, delta, normalize, reduction, mean_floor):
    groups = student.shape[0]
    loss = student.new_empty((groups,) if reduction == "none" else ())
    return loss, student.new_empty((groups, 3), dtype=acc_dtype(student.dtype))


@torch.library.custom_op("fastkd::masked_pairwise_huber_backward", mutates_args=())
def masked_pairwise_huber_backward(grad: Tensor, student: Tensor, teacher: Tensor, mask: Tensor, stats: Tensor,
                                   delta: float, reduction: str) -> Tensor:
    """d loss / d student (shape and strides of student) for the upstream gradient `grad`."""
    backend = backend_module("pairwise_huber", student)
    return student_grad(backend, grad, student, teacher, pack_groups(mask), stats, delta, reduction)


@masked_pairwise_huber_backward.register_fake
def _(grad, student, teacher, mask, stats, delta, reduction):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, teacher, mask, ctx.delta, _, ctx.reduction, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(student, teacher, mask, output[1])


def _backward(ctx, grad, _grad_stats):
    student, teacher, mask, stats = ctx.saved_tensors
    grad_student = torch.ops.fastkd.masked_pairwise_huber_backward(grad, student, teacher, mask, stats, ctx.delta,
                                                                   ctx.reduction)
    return grad_student, None, None, None, None, None, None


masked_pairwise_huber.register_autograd(_backward, setup_context=_setup_context)
