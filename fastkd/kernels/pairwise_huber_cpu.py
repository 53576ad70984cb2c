"""CPU path of the masked pairwise Huber loss: the stages of ``pairwise_huber_triton`` (same math, same
signatures), vectorised over all groups at once on member rows gathered into (G', max_n, D) for the G'
groups with at least 2 members, padded to the largest group (not to N): batched matmuls, no Python loop
over groups. `prepare` gathers the rows and computes both distance matrices once per call, shared by the
stages that follow."""
from dataclasses import dataclass

import torch

from fastkd.kernels.common import acc_dtype


@dataclass
class Prepared:
    student: torch.Tensor
    active: torch.Tensor     # (G',) the groups with at least 2 members; the others contribute nothing
    members: torch.Tensor    # (G', max_n)
    rows: torch.Tensor       # (G, max_n, Ds) centred student member rows, accumulation dtype
    pairs: torch.Tensor      # (G, max_n, max_n) ordered pairs (i query, j member, i != j)
    d_s: torch.Tensor        # (G, max_n, max_n) distances
    clamped: torch.Tensor    # student pairs whose squared distance hit the clamp
    d_t: torch.Tensor


def _rows(x, active, members):
    """Member rows centred on each group's first member (distances and gradients are translation-invariant;
    centring avoids the |x|^2 cancellation of the Gram form for nearly coincident embeddings)."""
    rows = x[active[:, None], members.long()]
    return (rows - rows[:, :1]).to(acc_dtype(x.dtype))


def _distances(rows):
    sq = (rows * rows).sum(-1)
    d2 = torch.baddbmm(sq[:, :, None] + sq[:, None, :], rows, rows.transpose(1, 2), alpha=-2)
    return d2.clamp(min=1e-12).sqrt(), d2 < 1e-12


def prepare(student, teacher, members, counts, queries, max_n: int) -> Prepared:
    active = torch.nonzero((counts >= 2) & (queries >= 1)).flatten()
    members, counts, queries = members[active], counts[active], queries[active]
    slots = torch.arange(members.shape[1], device=members.device)
    pairs = (slots < queries[:, None])[:, :, None] & (slots < counts[:, None])[:, None, :]
    pairs &= slots[:, None] != slots[None, :]
    rows = _rows(student, active, members)
    d_s, clamped = _distances(rows)
    d_t, _ = _distances(_rows(teacher, active, members))
    return Prepared(student, active, members, rows, pairs, d_s, clamped, d_t)


def _per_group(p: Prepared, active_values):
    """(G', k) values of the active groups -> (G, k), zero for the others."""
    out = active_values.new_zeros(p.student.shape[0], active_values.shape[1])
    return out.index_copy_(0, p.active, active_values)


def _slope_and_huber(u, delta):
    a = u.abs()
    return u.clamp(-delta, delta), torch.where(a <= delta, 0.5 * u * u, delta * (a - 0.5 * delta))


def _pair_sum(p: Prepared, x):
    return torch.where(p.pairs, x, 0).sum((1, 2))


def pair_sums(p: Prepared):
    return _per_group(p, torch.stack([_pair_sum(p, p.d_s), _pair_sum(p, p.d_t)], dim=1))


def pair_loss(p: Prepared, means, delta: float):
    means = means[p.active]
    slope, h = _slope_and_huber(p.d_s / means[:, 0, None, None] - p.d_t / means[:, 1, None, None], delta)
    return _per_group(p, torch.stack([_pair_sum(p, h), _pair_sum(p, slope * p.d_s)], dim=1))


def pair_grad(p: Prepared, total_queries: int, means, coef, weight, delta: float):
    means, coef, weight = means[p.active], coef[p.active], weight[p.active]
    m_s = means[:, 0, None, None]
    slope, _ = _slope_and_huber(p.d_s / m_s - p.d_t / means[:, 1, None, None], delta)
    w = (2 * weight)[:, None, None] / m_s
    weights = torch.where(p.pairs & ~p.clamped, w * (slope - coef[:, None, None]) / p.d_s, 0)
    grad_rows = weights.sum(2, keepdim=True) * p.rows - torch.bmm(weights, p.rows)  # zero outside the queries
    grad = torch.zeros_like(p.student)
    # padded slots hold the group's non-member positions (members is a permutation) and add zeros
    return grad.index_put_((p.active[:, None], p.members.long()), grad_rows.to(grad.dtype), accumulate=True)
