"""TaT (target-aware transformer) distillation losses as nn.Modules: classification (one-to-all attention over
the whole map) and segmentation (patch groups + anchor points), with the official embeddings."""
import torch
from torch import Tensor, nn

from fastkd.functional import anchor_pool, patch_group, tat_attention_loss

ROLES = ("official", "paper")

# The four official segmentation configs (sihaoevery/TaT-seg scripts, 129 x 129 x 256 DeepLabV3+ features):
# total loss = CE + alpha * (beta * patch-group term + gamma * anchor-point term).
SEGMENTATION_CONFIGS = {
    "voc_resnet18": dict(grid=(16, 16), groups=64, anchor_grid=(32, 32), alpha=0.1, beta=1.0, gamma=0.4),
    "voc_mobilenet": dict(grid=(32, 32), groups=1024, anchor_grid=(64, 64), alpha=0.1, beta=1.0, gamma=0.5),
    "cocostuff_resnet18": dict(grid=(32, 32), groups=512, anchor_grid=(32, 32), alpha=0.6, beta=1.0, gamma=1.0),
    "cocostuff_mobilenet": dict(grid=(16, 16), groups=64, anchor_grid=(32, 32), alpha=0.4, beta=1.0, gamma=1.0),
}


def conv_bn(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """The official TaT embedding: Conv2d (no bias, 'same' padding) + BatchNorm2d."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels))


def _tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H * W, C) row-major tokens, a view (the kernels read it in place)."""
    return x.flatten(2).transpose(1, 2)


def _check_pair(student: Tensor, teacher: Tensor, student_channels: int, teacher_channels: int) -> None:
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0] \
            or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"student and teacher must be (B, Cs, H, W) and (B, Ct, H, W) feature maps with the same "
                         f"B, H, W, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if (student.shape[1], teacher.shape[1]) != (student_channels, teacher_channels):
        raise ValueError(f"student and teacher must have (Cs, Ct) = ({student_channels}, {teacher_channels}) "
                         f"channels, got ({student.shape[1]}, {teacher.shape[1]})")


class TaTLoss(nn.Module):
    """TaT for classification: mse(softmax(q k^T) v, teacher) over all H * W positions (one-to-all).

    forward(student (B, Cs, H, W), teacher (B, Ct, H, W)) -> loss (scalar for reduction "mean" / "sum").
    roles="official" (the official code): query = gamma(student), key = theta(teacher), value = phi(student);
    roles="paper" (the paper's Eq. 5-7): query = theta(teacher), key = gamma(student), value = phi(student).
    The target is always the teacher feature. gamma, phi = Conv3x3 (no bias) + BN from Cs to Ct channels;
    theta = identity (official default) or, with ``teacher_embed=True``, Conv3x3 + BN on the teacher.
    The teacher is detached (a fixed target); theta's parameters, if any, still learn. Official weights:
    0.2 * TaT + 0.1 * CE, or 0.1 * TaT + 0.5 * CE + 0.5 * KL(T = 1) (ResNet34 -> ResNet18, layer4 7x7x512).
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, roles: str = "official",
                 teacher_embed: bool = False, scale: float = 1.0, reduction: str = "mean"):
        super().__init__()
        if roles not in ROLES:
            raise ValueError(f"roles must be one of {ROLES}, got {roles!r}")
        self.channels = (student_channels, teacher_channels)
        self.roles, self.scale, self.reduction = roles, scale, reduction
        self.gamma = conv_bn(student_channels, teacher_channels, 3)
        self.phi = conv_bn(student_channels, teacher_channels, 3)
        self.theta = conv_bn(teacher_channels, teacher_channels, 3) if teacher_embed else nn.Identity()

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check_pair(student, teacher, *self.channels)
        teacher = teacher.detach()
        student_side, teacher_side = _tokens(self.gamma(student)), _tokens(self.theta(teacher))
        query, key = (student_side, teacher_side) if self.roles == "official" else (teacher_side, student_side)
        return tat_attention_loss(query, key, _tokens(self.phi(student)), _tokens(teacher), scale=self.scale,
                                  reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"roles={self.roles!r}, scale={self.scale}, reduction={self.reduction!r}"


class HierarchicalTaTLoss(nn.Module):
    """TaT for segmentation: alpha * (beta * patch-group term + gamma * anchor-point term).

    forward(student (B, Cs, H, W), teacher (B, Ct, H, W)) -> scalar. As in the official code, q = E_q(student),
    k = E_k(teacher), v = E_v(student) with E = Conv1x1 (no bias) + BN to Ct channels, and the target is the
    detached raw teacher feature. Patch-group term: ``tat_attention_loss`` (mean) of the ``patch_group(., grid,
    groups)`` sequences of q, k, v, target; anchor-point term: the same on ``anchor_pool(., anchor_grid)``.
    A zero weight skips its term. ``HierarchicalTaTLoss.from_config(name, Cs)`` builds one of the four official
    configs (SEGMENTATION_CONFIGS: voc_resnet18, voc_mobilenet, cocostuff_resnet18, cocostuff_mobilenet),
    whose loss is CE + this module's output. The official code feeds one image at a time through the
    embeddings (BN statistics of one image's H * W positions) and averages the per-image losses:
    ``per_image_bn=True``; by default (False) BN sees the whole batch (the per-image mean of equal-size terms is
    the same mean, so only the BN statistics differ).
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, grid, groups: int, anchor_grid,
                 alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0, scale: float = 1.0,
                 per_image_bn: bool = False):
        super().__init__()
        self.per_image_bn = per_image_bn
        self.channels = (student_channels, teacher_channels)
        self.grid, self.groups, self.anchor_grid = tuple(grid), groups, tuple(anchor_grid)
        self.alpha, self.beta, self.gamma, self.scale = alpha, beta, gamma, scale
        self.query_embed = conv_bn(student_channels, teacher_channels, 1)
        self.key_embed = conv_bn(teacher_channels, teacher_channels, 1)
        self.value_embed = conv_bn(student_channels, teacher_channels, 1)

    @classmethod
    def from_config(cls, name: str, student_channels: int, teacher_channels: int = 256) -> "HierarchicalTaTLoss":
        if name not in SEGMENTATION_CONFIGS:
            raise ValueError(f"name must be one of {tuple(SEGMENTATION_CONFIGS)}, got {name!r}")
        return cls(student_channels, teacher_channels, **SEGMENTATION_CONFIGS[name])

    def embed(self, student: Tensor, teacher: Tensor) -> tuple:
        """(q, k, v, target): the embedded (B, Ct, H, W) maps and the detached teacher; with per_image_bn each
        image goes through the embeddings alone (in training, BN normalises over its own positions)."""
        _check_pair(student, teacher, *self.channels)
        target = teacher.detach()

        def run(embed, x):
            return torch.cat([embed(x[i:i + 1]) for i in range(len(x))]) if self.per_image_bn else embed(x)

        return run(self.query_embed, student), run(self.key_embed, target), run(self.value_embed, student), target

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        maps = self.embed(student, teacher)
        loss = maps[0].new_zeros(())
        if self.beta:
            loss = loss + self.beta * tat_attention_loss(*(patch_group(x, self.grid, self.groups) for x in maps),
                                                         scale=self.scale)
        if self.gamma:
            loss = loss + self.gamma * tat_attention_loss(*(anchor_pool(x, self.anchor_grid) for x in maps),
                                                          scale=self.scale)
        return self.alpha * loss

    def extra_repr(self) -> str:
        return (f"grid={self.grid}, groups={self.groups}, anchor_grid={self.anchor_grid}, alpha={self.alpha}, "
                f"beta={self.beta}, gamma={self.gamma}, scale={self.scale}, per_image_bn={self.per_image_bn}")
