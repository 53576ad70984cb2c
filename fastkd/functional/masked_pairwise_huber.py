"""LED, L2D's label-wise embedding distillation: a masked pairwise Huber loss over groups of embeddings."""
import math
import numbers

import torch

from fastkd import ops
from fastkd._checks import (check_binary_mask, check_choice, check_float_tensor, check_positive_number,
                            check_same_device, check_same_device_and_dtype)
from fastkd._extension import require_extension

REDUCTIONS = ("official", "sum", "mean", "none")


def masked_pairwise_huber(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *, delta: float = 1.0,
                          normalize: bool = True, reduction: str = "official", mean_floor: float = 0.0,
                          process_group=None) -> torch.Tensor:
    """RKD-style distance distillation within each group of masked rows.

    student (G, N, Ds), teacher (G, N, Dt) (Ds may differ from Dt), mask (G, N) of 0/1. For each group g with
    n_g >= 2 members: D_ij = sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, 1e-12)) over its members, for student
    and teacher; if `normalize`, each matrix is divided by its own mean over the n(n-1) ordered off-diagonal
    pairs (the student's mean is in the graph; both floored at `mean_floor`, 0 = official); then
    loss_g = sum over ordered pairs i != j of huber_delta(Ds_ij - Dt_ij), torch.nn.HuberLoss(delta) per pair
    (the official smooth-L1 with beta 1 is delta = 1).
    reduction: "official" = sum_g loss_g / n_g; "sum"; "mean" = sum_g loss_g / number of ordered pairs
    counted (0 if none); "none" = loss_g, shape (G,). Groups with 0 or 1 members contribute 0.

    The teacher is a target: it gets no gradient. Differentiable once: differentiating the gradient
    (create_graph=True) raises. Identical embeddings in a group give distances sqrt(1e-12) (finite, zero
    gradient through the clamp, as in the official code). When a group's
    student embeddings nearly coincide (e.g. a small student at random init), normalising by their tiny
    mean makes the gradient huge (~1 / mean): `mean_floor` (e.g. 1e-2 of the embedding norm scale)
    bounds it; the default reproduces the official code.
    process_group: members (dim 1) are split across the ranks of this group (DDP); the loss is over the
    global set of members (see fastkd.ops.masked_pairwise_huber).
    Host syncs: on CUDA one (the largest group size sizes the kernels' grid), two over DDP (the ranks' sizes);
    on CPU none.
    """
    check_float_tensor("student", student)
    check_float_tensor("teacher", teacher)
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"student and teacher must be (G, N, Ds) and (G, N, Dt) with the same G, N, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    check_same_device_and_dtype("teacher", teacher, "student", student)
    mask = check_binary_mask("mask", mask, student.shape[:2])
    check_same_device("mask", mask, "student", student)
    return ops.masked_pairwise_huber.masked_pairwise_huber(student, teacher.detach(), mask,
                                                           *_checked_options(delta, normalize, reduction, mean_floor),
                                                           _group(process_group, reduction))


def _checked_options(delta, normalize, reduction, mean_floor):
    """(delta, normalize, reduction, mean_floor) checked, as the op takes them."""
    delta = check_positive_number("delta", delta)
    check_choice("reduction", reduction, REDUCTIONS)
    mean_floor = float(mean_floor)
    if not mean_floor >= 0:
        raise ValueError(f"mean_floor must be >= 0, got {mean_floor}")
    require_extension()
    return delta, bool(normalize), reduction, mean_floor


def _group(process_group, reduction):
    """The process group if it spans more than one rank, else None."""
    if process_group is None or torch.distributed.get_world_size(process_group) == 1:
        return None
    if reduction == "none":
        raise ValueError("reduction='none' is not supported with a process_group")
    return process_group


def led_cd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, targets: torch.Tensor, *,
                process_group=None, **kwargs) -> torch.Tensor:
    """Class-aware LED: one group per class k, the embeddings e_bk of the images b with y_bk = 1.

    student_emb (B, Q, Ds), teacher_emb (B, Q, Dt), targets (B, Q) 0/1 (bool, int or float); kwargs as in
    masked_pairwise_huber (official defaults; reduction "none" gives (Q,)). With `process_group`, groups span the
    global batch."""
    return _led(student_emb, teacher_emb, targets, 1.0, 0.0, process_group, **kwargs)


def led_id_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
    """Instance-aware LED: one group per image b, the embeddings e_bk of its positive labels (y_bk = 1).
    Shapes as led_cd_loss (reduction "none" gives (B,)); each group lives on one rank, so DDP needs nothing
    special."""
    return _led(student_emb, teacher_emb, targets, 0.0, 1.0, None, **kwargs)


def led_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, targets: torch.Tensor, *, cd_weight: float = 1.0,
             id_weight: float = 1.0, process_group=None, **kwargs) -> torch.Tensor:
    """cd_weight * led_cd_loss + id_weight * led_id_loss, checked once and computed in one autograd node (eager):
    the form to use in a training loop (L2D's official weights are 100 and 1000; fastkd.nn.LEDLoss).

    Shapes and kwargs as led_cd_loss; reduction "none" needs one of the weights to be 0 (the two terms have
    different group counts). With `process_group`, CD's groups span the global batch, ID stays per rank."""
    return _led(student_emb, teacher_emb, targets, _check_weight("cd_weight", cd_weight),
                _check_weight("id_weight", id_weight), process_group, **kwargs)


def _led(student_emb, teacher_emb, targets, cd_weight, id_weight, process_group, delta=1.0, normalize=True,
         reduction="official", mean_floor=0.0):
    """cd_weight * CD + id_weight * ID through one op call on (B, Q, D) as given: ID's groups are its rows (dim 0),
    CD's those of the transposed problem (no views, so no view nodes in the graph). CD over DDP, or alone with
    reduction "none" (loss (Q,)), takes the dim-0 slot of the (Q, B, D) view instead."""
    check_float_tensor("student_emb", student_emb)
    check_float_tensor("teacher_emb", teacher_emb)
    check_same_device_and_dtype("teacher_emb", teacher_emb, "student_emb", student_emb)
    if student_emb.dim() != 3:
        raise ValueError(f"student_emb must be (B, Q, D), got shape {tuple(student_emb.shape)}")
    if teacher_emb.dim() != 3 or teacher_emb.shape[:2] != student_emb.shape[:2]:
        raise ValueError(f"teacher_emb must be (B, Q, D_t) with (B, Q) = {tuple(student_emb.shape[:2])}, got "
                         f"{tuple(teacher_emb.shape)}")
    targets = check_binary_mask("targets", targets, student_emb.shape[:2])
    check_same_device("targets", targets, "student_emb", student_emb)
    options = _checked_options(delta, normalize, reduction, mean_floor)
    if reduction == "none" and cd_weight and id_weight:
        raise ValueError("reduction 'none' gives one loss per group, and CD and ID have different groups: set "
                         "cd_weight or id_weight to 0, or use led_cd_loss and led_id_loss")
    student, teacher = student_emb, teacher_emb.detach()
    group = _group(process_group, reduction) if cd_weight else None
    if group is None and not (cd_weight and reduction == "none"):
        return ops.masked_pairwise_huber.masked_pairwise_huber(student, teacher, targets, *options, None,
                                                               weight=id_weight, transposed_weight=cd_weight)
    return ops.masked_pairwise_huber.masked_pairwise_huber(
        student.transpose(0, 1), teacher.transpose(0, 1), targets.T, *options, group, weight=cd_weight,
        transposed_weight=id_weight)


def _check_weight(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    return float(value)
