"""LED as an nn.Module."""
from torch import Tensor, nn

from fastkd.functional import led_loss


class LEDLoss(nn.Module):
    """L2D's label-wise embedding distillation: lambda_cd * CD + lambda_id * ID (official weights 100, 1000), in one
    autograd node (fastkd.led_loss).

    forward(student_emb (B, Q, Ds), teacher_emb (B, Q, Dt), targets (B, Q) 0/1). kwargs (delta, normalize,
    reduction, mean_floor) go to both terms; `process_group` makes CD span the global batch under DDP.
    """

    def __init__(self, lambda_cd: float = 100.0, lambda_id: float = 1000.0, process_group=None, **kwargs):
        super().__init__()
        self.lambda_cd, self.lambda_id = lambda_cd, lambda_id
        self.process_group = process_group
        self.kwargs = kwargs

    def forward(self, student_emb: Tensor, teacher_emb: Tensor, targets: Tensor) -> Tensor:
        return led_loss(student_emb, teacher_emb, targets, cd_weight=self.lambda_cd, id_weight=self.lambda_id,
                        process_group=self.process_group, **self.kwargs)

    def extra_repr(self) -> str:
        return f"lambda_cd={self.lambda_cd}, lambda_id={self.lambda_id}" + "".join(
            f", {k}={v!r}" for k, v in self.kwargs.items())
