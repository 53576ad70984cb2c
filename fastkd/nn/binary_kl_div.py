"""MLD as an nn.Module."""
from torch import Tensor, nn

from fastkd.functional import binary_kl_div


class MLDLoss(nn.Module):
    """L2D's multi-label logits distillation: ``binary_kl_div(student_logits, teacher_logits)``.

    Defaults are the official ones (T = 1, batchmean). Detach the teacher's logits unless you want
    gradients to reach the teacher (mutual learning).
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean"):
        super().__init__()
        self.temperature = temperature
        self.reduction = reduction

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return binary_kl_div(student_logits, teacher_logits, temperature=self.temperature, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"
