"""References for L2D's label-wise embedding distillation (LED): the official loops (test oracle and
baseline) and a vectorised padded eager version (baseline). Semantics: shared/design/official-semantics.md."""
import torch

DISTANCE_CLAMP = 1e-12  # squared distances are clamped here before the sqrt, as in the official code


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """(n, D) -> (n, n): sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 1e-12)) off the diagonal, 0 on it."""
    sq = (x * x).sum(-1)
    d2 = sq[:, None] + sq[None, :] - 2 * x @ x.T
    d = d2.clamp(min=DISTANCE_CLAMP).sqrt()
    return d * (1 - torch.eye(len(x), dtype=x.dtype, device=x.device))


def huber(u: torch.Tensor, delta: float) -> torch.Tensor:
    """torch.nn.HuberLoss(delta) per element: 0.5 u^2 if |u| <= delta else delta (|u| - delta / 2)."""
    a = u.abs()
    return torch.where(a <= delta, 0.5 * u * u, delta * (a - 0.5 * delta))


def group_loss(s: torch.Tensor, t: torch.Tensor, delta=1.0, normalize=True, mean_floor=0.0) -> torch.Tensor:
    """One group of n >= 2 members s (n, Ds), t (n, Dt): sum over ordered pairs i != j of
    huber(Ds_ij / mean(Ds) - Dt_ij / mean(Dt)), means over the n(n-1) off-diagonal entries (floored at
    mean_floor), the teacher side without gradient."""
    n = len(s)
    d_s = pairwise_distances(s)
    with torch.no_grad():
        d_t = pairwise_distances(t)
    if normalize:
        pairs = n * (n - 1)
        d_s = d_s / (d_s.sum() / pairs).clamp(min=mean_floor)
        d_t = d_t / (d_t.sum() / pairs).clamp(min=mean_floor)
    off_diagonal = 1 - torch.eye(n, dtype=s.dtype, device=s.device)
    return (huber(d_s - d_t, delta) * off_diagonal).sum()


def masked_pairwise_huber(student, teacher, mask, delta=1.0, normalize=True, reduction="official", mean_floor=0.0):
    """Official-style loop over groups. student (G, N, Ds), teacher (G, N, Dt), mask (G, N).
    reduction: official = sum_g loss_g / n_g; sum; mean = sum_g loss_g / counted ordered pairs (0 if none);
    none = loss_g per group (G,). Groups with fewer than 2 members contribute 0."""
    losses, sizes = [], []
    for g in range(student.shape[0]):
        members = mask[g].bool()
        n = int(members.sum())
        sizes.append(n)
        if n < 2:
            losses.append(student[g].sum() * 0)  # zero, but in the graph like the other terms
        else:
            losses.append(group_loss(student[g][members], teacher[g][members], delta, normalize, mean_floor))
    if reduction == "none":
        return torch.stack(losses) if losses else student.sum((1, 2)) * 0
    zero = student.sum() * 0  # keeps an all-empty result in the graph
    if reduction == "official":
        return sum((loss / n for loss, n in zip(losses, sizes) if n >= 2), zero)
    total = sum(losses, zero)
    if reduction == "sum":
        return total
    pairs = sum(n * (n - 1) for n in sizes if n >= 2)
    return total / max(pairs, 1)


def led_cd_loss(student_emb, teacher_emb, targets, **kwargs):
    """Class-aware LED: for each class, the group of its positives' embeddings over the batch."""
    return masked_pairwise_huber(student_emb.transpose(0, 1), teacher_emb.transpose(0, 1), targets.T.bool(), **kwargs)


def led_id_loss(student_emb, teacher_emb, targets, **kwargs):
    """Instance-aware LED: for each instance, the group of its positive labels' embeddings."""
    return masked_pairwise_huber(student_emb, teacher_emb, targets.bool(), **kwargs)


def masked_pairwise_huber_padded(student, teacher, mask, delta=1.0, normalize=True):
    """Vectorised eager baseline with the "official" reduction: padded batched distance matrices (G, N, N)
    for all groups at once, masked. Memory O(G N^2 + G N D)."""
    mask = mask.bool()
    n = mask.sum(1)
    pair_mask = mask[:, :, None] & mask[:, None, :] & ~torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)

    def distances(x):
        sq = (x * x).sum(-1)
        d2 = sq[:, :, None] + sq[:, None, :] - 2 * torch.bmm(x, x.transpose(1, 2))
        return d2.clamp(min=DISTANCE_CLAMP).sqrt() * pair_mask

    d_s = distances(student)
    with torch.no_grad():
        d_t = distances(teacher)
    pairs = (n * (n - 1)).clamp(min=1)[:, None, None]
    counted = (n >= 2)[:, None, None]
    if normalize:  # groups under 2 members have no pairs: divide their zeros by 1, not by a zero mean
        d_s = d_s / torch.where(counted, d_s.sum((1, 2), keepdim=True) / pairs, 1.0)
        d_t = d_t / torch.where(counted, d_t.sum((1, 2), keepdim=True) / pairs, 1.0)
    loss = (huber(d_s - d_t, delta) * pair_mask).sum((1, 2))
    return (loss / n.clamp(min=1) * (n >= 2)).sum()
