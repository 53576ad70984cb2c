"""CPU path of the masked pairwise Huber loss: the three stages of ``pairwise_huber_triton`` (same math,
same signatures), vectorised over all groups at once on members gathered into (G, max_n, D) and padded to
the largest group (not to N): batched matmuls, no Python loop over groups."""
import torch

from fastkd.kernels.common import acc_dtype


def _rows(x, members):
    """(G, max_n, D) member rows of x (G, N, D) in the accumulation dtype (a gather: strided views are fine)."""
    index = members.long().unsqueeze(-1).expand(-1, -1, x.shape[2])
    return torch.gather(x, 1, index).to(acc_dtype(x.dtype))


def _pairs(members, counts, queries):
    """(G, max_n, max_n) mask of ordered pairs (i query, j member, i != j)."""
    slots = torch.arange(members.shape[1], device=members.device)
    pairs = (slots < queries[:, None])[:, :, None] & (slots < counts[:, None])[:, None, :]
    return pairs & (slots[:, None] != slots[None, :])


def _distances(rows):
    sq = (rows * rows).sum(-1)
    d2 = sq[:, :, None] + sq[:, None, :] - 2 * torch.bmm(rows, rows.transpose(1, 2))
    return d2.clamp(min=1e-12).sqrt(), d2 < 1e-12


def _slope_and_huber(u, delta):
    a = u.abs()
    return u.clamp(-delta, delta), torch.where(a <= delta, 0.5 * u * u, delta * (a - 0.5 * delta))


def pair_sums(student, teacher, members, counts, queries, max_n: int):
    pairs = _pairs(members, counts, queries)
    d_s, _ = _distances(_rows(student, members))
    d_t, _ = _distances(_rows(teacher, members))
    return torch.stack([torch.where(pairs, d_s, 0).sum((1, 2)), torch.where(pairs, d_t, 0).sum((1, 2))], dim=1)


def pair_loss(student, teacher, members, counts, queries, max_n: int, means, delta: float):
    pairs = _pairs(members, counts, queries)
    d_s, _ = _distances(_rows(student, members))
    d_t, _ = _distances(_rows(teacher, members))
    slope, h = _slope_and_huber(d_s / means[:, 0, None, None] - d_t / means[:, 1, None, None], delta)
    return torch.stack([torch.where(pairs, h, 0).sum((1, 2)), torch.where(pairs, slope * d_s, 0).sum((1, 2))], dim=1)


def pair_grad(student, teacher, members, counts, queries, max_n: int, total_queries: int, means, coef, weight,
              delta: float):
    pairs = _pairs(members, counts, queries)
    rows = _rows(student, members)
    d_s, clamped = _distances(rows)
    d_t, _ = _distances(_rows(teacher, members))
    m_s = means[:, 0, None, None]
    slope, _ = _slope_and_huber(d_s / m_s - d_t / means[:, 1, None, None], delta)
    w = (2 * weight)[:, None, None] / m_s
    weights = torch.where(pairs & ~clamped, w * (slope - coef[:, None, None]) / d_s, 0)
    grad_rows = weights.sum(2, keepdim=True) * rows - torch.bmm(weights, rows)  # zero rows outside the queries
    grad = torch.zeros_like(student)
    index = members.long().unsqueeze(-1).expand_as(grad_rows)
    return grad.scatter_add_(1, index, grad_rows.to(student.dtype))
