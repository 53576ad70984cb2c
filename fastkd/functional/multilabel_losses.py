"""Multi-label training losses of MITr (plain PyTorch, any device, compile-friendly: no host syncs).

asymmetric_loss (ASL, Ben-Baruch et al.; MITr's Eq. 14-16, with ASL's clip): per element, with p = sigmoid(z),
    positive: -(1 - p)^gamma_pos * log(max(p, eps))
    negative: -p_m^gamma_neg * log(max(1 - p_m, eps)),   p_m = max(p - clip, 0)
The focusing weights (1 - p)^gamma_pos and p_m^gamma_neg are computed without gradient, as ASL's and
ML-Decoder's training code (disable_torch_grad_focal_loss). Defaults: gamma_pos 0, gamma_neg 4, clip 0.05,
eps 1e-8, summed over the batch and the classes.

object_count_loss (MITr's object-aware token loss, Eq. 17): cross-entropy of count logits (B, M) against the
number of distinct positive classes of each image, z = sum_k y_k (count_targets); counts above M - 1 fall in
the last class. MITr's count head has M = K + 1 (0..K), so none does.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

ASL_REDUCTIONS = ("none", "sum", "mean", "batchmean")
COUNT_REDUCTIONS = ("none", "sum", "mean")


def _check_reduction(reduction: str, allowed) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


def asymmetric_loss(logits: Tensor, targets: Tensor, *, gamma_pos: float = 0.0, gamma_neg: float = 4.0,
                    clip: float = 0.05, eps: float = 1e-8, reduction: str = "sum") -> Tensor:
    """ASL of logits (..., K) against 0/1 targets of the same shape (module docstring). reduction: "none"
    (per element, float32 or wider), "sum", "mean" (over elements) or "batchmean" (sum / size of dim 0)."""
    _check_reduction(reduction, ASL_REDUCTIONS)
    if logits.shape != targets.shape or logits.dim() == 0:
        raise ValueError(f"logits and targets must have one shape (..., K), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if clip < 0 or gamma_pos < 0 or gamma_neg < 0:
        raise ValueError(f"clip, gamma_pos and gamma_neg must be >= 0, got {clip}, {gamma_pos}, {gamma_neg}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits, targets = logits.to(dtype), targets.to(dtype)
    p = torch.sigmoid(logits)
    not_p = (1 - p + clip).clamp(max=1) if clip > 0 else 1 - p            # 1 - p_m
    loss = targets * torch.log(p.clamp(min=eps)) + (1 - targets) * torch.log(not_p.clamp(min=eps))
    if gamma_pos or gamma_neg:
        with torch.no_grad():
            p_true = p * targets + not_p * (1 - targets)                    # probability of the right answer
            gamma = gamma_pos * targets + gamma_neg * (1 - targets)
            weight = torch.pow(1 - p_true, gamma)
        loss = loss * weight
    loss = -loss
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss.sum() / logits.shape[0]


def count_targets(targets: Tensor) -> Tensor:
    """Number of distinct positive classes per image: targets (B, K) of 0/1 -> (B,) int64."""
    if targets.dim() != 2:
        raise ValueError(f"targets must be (B, K), got {tuple(targets.shape)}")
    return (targets > 0.5).sum(1)


def object_count_loss(count_logits: Tensor, targets: Tensor, *, reduction: str = "sum") -> Tensor:
    """Cross-entropy of count_logits (B, M) against count_targets(targets (B, K)), capped at M - 1."""
    _check_reduction(reduction, COUNT_REDUCTIONS)
    if count_logits.dim() != 2 or targets.dim() != 2 or count_logits.shape[0] != targets.shape[0]:
        raise ValueError(f"count_logits must be (B, M) and targets (B, K) with the same B, got "
                         f"{tuple(count_logits.shape)} and {tuple(targets.shape)}")
    counts = count_targets(targets).clamp(max=count_logits.shape[1] - 1)
    return F.cross_entropy(count_logits.to(torch.promote_types(count_logits.dtype, torch.float32)), counts,
                           reduction=reduction)
