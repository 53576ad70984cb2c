"""MITr's losses as nn.Modules: the asymmetric loss and the object-aware token (object-count) loss."""
from torch import Tensor, nn

from fastkd.functional.multilabel_losses import asymmetric_loss, object_count_loss


class AsymmetricLoss(nn.Module):
    """``asymmetric_loss(logits, targets)`` (ASL; defaults gamma_pos 0, gamma_neg 4, clip 0.05, eps 1e-8, sum)."""

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05, eps: float = 1e-8,
                 reduction: str = "sum"):
        super().__init__()
        self.gamma_pos, self.gamma_neg, self.clip, self.eps, self.reduction = gamma_pos, gamma_neg, clip, eps, reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return asymmetric_loss(logits, targets, gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg, clip=self.clip,
                               eps=self.eps, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, clip={self.clip}, eps={self.eps}, "
                f"reduction={self.reduction!r}")


class ObjectCountLoss(nn.Module):
    """``object_count_loss(count_logits (B, M), targets (B, K))``: cross-entropy on the number of distinct
    positive classes (MITr's object-aware token loss; summed by default, like ASL, so Eq. 18 adds like terms)."""

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        self.reduction = reduction

    def forward(self, count_logits: Tensor, targets: Tensor) -> Tensor:
        return object_count_loss(count_logits, targets, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
