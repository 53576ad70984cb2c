"""LED, L2D's label-wise embedding distillation: a masked pairwise Huber loss over groups of embeddings."""
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

    The teacher is a target: it gets no gradient. Identical embeddings in a group give distances
    sqrt(1e-12) (finite, zero gradient through the clamp, as in the official code). When a group's
    student embeddings nearly coincide (e.g. a small student at random init), normalising by their tiny
    mean makes the gradient huge (~1 / mean): `mean_floor` (e.g. 1e-2 of the embedding norm scale)
    bounds it; the default reproduces the official code.
    process_group: members (dim 1) are split across the ranks of this group (DDP); the loss is over the
    global set of members (see fastkd.ops.masked_pairwise_huber).
    Host syncs: one (the largest group size sizes the kernels' grid), two over DDP (the ranks' sizes).
    """
    check_float_tensor("student", student)
    check_float_tensor("teacher", teacher)
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"student and teacher must be (G, N, Ds) and (G, N, Dt) with the same G, N, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    check_same_device_and_dtype("teacher", teacher, "student", student)
    mask = check_binary_mask("mask", mask, student.shape[:2])
    check_same_device("mask", mask, "student", student)
    delta = check_positive_number("delta", delta)
    check_choice("reduction", reduction, REDUCTIONS)
    mean_floor = float(mean_floor)
    if not mean_floor >= 0:
        raise ValueError(f"mean_floor must be >= 0, got {mean_floor}")
    group = process_group if process_group is not None and torch.distributed.get_world_size(process_group) > 1 \
        else None
    if group is not None and reduction == "none":
        raise ValueError("reduction='none' is not supported with a process_group")
    require_extension()
    return ops.masked_pairwise_huber.masked_pairwise_huber(student, teacher.detach(), mask, delta, bool(normalize),
                                                    reduction, mean_floor, group)


def _check_embeddings(student_emb, teacher_emb, targets):
    check_float_tensor("student_emb", student_emb)
    check_float_tensor("teacher_emb", teacher_emb)
    if student_emb.dim() != 3:
        raise ValueError(f"student_emb must be (B, Q, D), got shape {tuple(student_emb.shape)}")
    if teacher_emb.dim() != 3 or teacher_emb.shape[:2] != student_emb.shape[:2]:
        raise ValueError(f"teacher_emb must be (B, Q, D_t) with (B, Q) = {tuple(student_emb.shape[:2])}, got "
                         f"{tuple(teacher_emb.shape)}")
    return check_binary_mask("targets", targets, student_emb.shape[:2])


def led_cd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, targets: torch.Tensor, *,
                process_group=None, **kwargs) -> torch.Tensor:
    """Class-aware LED: one group per class k, the embeddings e_bk of the images b with y_bk = 1.

    student_emb (B, Q, Ds), teacher_emb (B, Q, Dt), targets (B, Q) 0/1 (bool, int or float); kwargs as in
    masked_pairwise_huber (official defaults). With `process_group`, groups span the global batch."""
    targets = _check_embeddings(student_emb, teacher_emb, targets)
    return masked_pairwise_huber(student_emb.transpose(0, 1), teacher_emb.transpose(0, 1), targets.T,
                                 process_group=process_group, **kwargs)


def led_id_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
    """Instance-aware LED: one group per image b, the embeddings e_bk of its positive labels (y_bk = 1).
    Shapes as led_cd_loss; each group lives on one rank, so DDP needs nothing special."""
    targets = _check_embeddings(student_emb, teacher_emb, targets)
    return masked_pairwise_huber(student_emb, teacher_emb, targets, **kwargs)
