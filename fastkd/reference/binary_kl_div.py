"""References for MLD, L2D's multi-label logits distillation (per-label binary KL)."""
import torch
import torch.nn.functional as F

REDUCTIONS = ("none", "sum", "mean", "batchmean")


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce an elementwise loss (..., K): none | sum | mean (over all elements) | batchmean (sum / dim 0)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / loss.numel()
    if reduction == "batchmean":
        return loss.sum() / loss.shape[0]
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def binary_kl_div(student_logits, teacher_logits, temperature=1.0, reduction="batchmean"):
    """Exact MLD in log-sigmoid form: KL(teacher || student) of [sigmoid(z/T), 1 - sigmoid(z/T)] per element.

    kl = p_t (logsig(b) - logsig(a)) + (1 - p_t) (logsig(-b) - logsig(-a)),  a = z_s / T, b = z_t / T.
    Computed in the inputs' dtype; call it on float64 copies to get an oracle.
    """
    a = student_logits / temperature
    b = teacher_logits / temperature
    p_t = torch.sigmoid(b)
    kl = p_t * (F.logsigmoid(b) - F.logsigmoid(a)) + torch.sigmoid(-b) * (F.logsigmoid(-b) - F.logsigmoid(-a))
    return reduce_loss(kl, reduction)


def binary_kl_div_official(student_logits, teacher_logits):
    """Official-style L2D MLD (batchmean, no temperature): sigmoid, clamp to [1e-8, 1 - 1e-8], two KL-div terms.

    The clamp makes it differ from the exact form where |z| > ~18.4 (and zeroes the gradient there).
    """
    eps = 1e-8
    p_s = torch.sigmoid(student_logits).clamp(eps, 1 - eps)
    p_t = torch.sigmoid(teacher_logits).clamp(eps, 1 - eps)
    batch = student_logits.shape[0]
    pos = F.kl_div(torch.log(p_s), p_t, reduction="sum")
    neg = F.kl_div(torch.log(1 - p_s), 1 - p_t, reduction="sum")
    return (pos + neg) / batch
