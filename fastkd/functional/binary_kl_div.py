"""MLD: L2D's multi-label logits distillation as a per-label binary KL divergence."""
import torch

from fastkd import ops
from fastkd._checks import (check_choice, check_float_tensor, check_positive_number,
                            check_same_device_and_dtype, check_same_shape)
from fastkd._extension import require_extension

REDUCTIONS = ("none", "sum", "mean", "batchmean")


def binary_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                  reduction: str = "batchmean") -> torch.Tensor:
    """KL(teacher || student) of the two-point distributions [sigmoid(z / T), 1 - sigmoid(z / T)] per label.

    student_logits, teacher_logits: (..., K) float tensors of one shape, dtype and device; classes last.
    Per element, with a = z_s / T, b = z_t / T and p_t = sigmoid(b):
        kl = p_t (log sigmoid(b) - log sigmoid(a)) + (1 - p_t) (log sigmoid(-b) - log sigmoid(-a))
    reduction: "none" -> (..., K); "sum"; "mean" (over all elements); "batchmean" (sum / size of dim 0,
    the official L2D default). No T^2 factor: multiply by T**2 yourself for Hinton-style scaling.

    Differs from the official code, which clamps sigmoid to [1e-8, 1 - 1e-8] before the logs: the two agree
    where the clamp is inactive (|z| < ~18.4); beyond that the official loss saturates and its gradient is
    zero, while this log-sigmoid form stays exact and finite (no NaN/Inf for |z| up to 1e4 in fp32).
    Gradients flow to the student, and to the teacher when it requires grad (mutual learning); twice
    differentiable (create_graph=True).
    fp16/bf16 inputs accumulate in fp32; NaN inputs give NaN. No host sync.
    """
    check_float_tensor("student_logits", student_logits, min_dim=1)
    check_float_tensor("teacher_logits", teacher_logits)
    check_same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
    check_same_device_and_dtype("teacher_logits", teacher_logits, "student_logits", student_logits)
    temperature = check_positive_number("temperature", temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    require_extension()
    return ops.binary_kl_div.binary_kl_div(student_logits, teacher_logits, temperature, reduction)
