"""LGD's student adapter and distillation loss."""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class StudentAdapter(nn.Module):
    """conv3x3 - ReLU - conv3x3 - ReLU - conv3x3 (official "SequentialConvs"), shared by every level."""

    def __init__(self, channels: int = 256):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, levels: Sequence[torch.Tensor]) -> list:
        return [self.convs(level) for level in levels]


def instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the spatial positions of each (image, channel), biased variance: what
    InstanceNorm2d without affine computes, also for a 1 x 1 level (all zeros, where torch's refuses)."""
    mean = x.mean((2, 3), keepdim=True)
    var = (x - mean).square().mean((2, 3), keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def lgd_distillation_loss(student_levels: Sequence[torch.Tensor], teacher_levels: Sequence[torch.Tensor],
                          eps: float = 1e-5) -> torch.Tensor:
    """mse(IN(student), IN(teacher.detach())) over every level's elements concatenated (a mean over all of
    them), InstanceNorm without affine per (image, channel) of each level. Levels (B, C, H_l, W_l), pairwise of
    one shape. The teacher side never gets a gradient."""
    if len(student_levels) != len(teacher_levels) or not student_levels:
        raise ValueError(f"student_levels and teacher_levels must be non-empty lists of one length, got "
                         f"{len(student_levels)} and {len(teacher_levels)}")
    students, teachers = [], []
    for i, (s, t) in enumerate(zip(student_levels, teacher_levels)):
        if s.shape != t.shape:
            raise ValueError(f"level {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} shapes differ")
        students.append(instance_norm(s.float(), eps).flatten(1))
        teachers.append(instance_norm(t.detach().float(), eps).flatten(1))
    return F.mse_loss(torch.cat(students, 1), torch.cat(teachers, 1))
