"""LGD's label encoder: a PointNet over the objects of each image, one descriptor per object (box and class).

Descriptor of an object (official): [x1 / W, y1 / H, x2 / W, y2 / H, one-hot(class)] with (H, W) the padded
batch size, rescaled from [0, 1] to [-1, 1]. The one-hot has num_classes + 1 slots, the last for the context
box (a box over the whole padded image). The encoder is PointNet's segmentation form with both spatial
transformers (input and feature transform), pointwise layers as Linear + LayerNorm without affine (the official
code replaces BatchNorm by LayerNorm), per-image max pooling (the "global feature") concatenated back to every
object of the image, and a final MLP to `out_channels` (256). Objects of different images never mix.
"""
from typing import Sequence

import torch
from torch import nn


def box_descriptors(boxes: torch.Tensor, labels: torch.Tensor, num_slots: int, image_size) -> torch.Tensor:
    """(N, 4 + num_slots) descriptors in [-1, 1]. boxes: (N, 4) x1 y1 x2 y2 in padded-input pixels; labels: (N,)
    integer slot in [0, num_slots); image_size: (H_pad, W_pad)."""
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if labels.shape != boxes.shape[:1]:
        raise ValueError(f"labels must have shape ({boxes.shape[0]},) (one per box), got {tuple(labels.shape)}")
    height, width = image_size
    scale = boxes.new_tensor([width, height, width, height])
    one_hot = nn.functional.one_hot(labels.long(), num_slots).to(boxes.dtype)
    return torch.cat([boxes / scale, one_hot], 1) * 2 - 1


def segment_max(x: torch.Tensor, batch_idx: torch.Tensor, num_images: int) -> torch.Tensor:
    """(num_images, C): the max over the rows of x (N, C) that belong to each image (zeros for an image without
    rows). Vectorised (scatter_reduce), gradient to the arg-max rows."""
    out = x.new_zeros(num_images, x.shape[1])
    return out.scatter_reduce(0, batch_idx[:, None].expand_as(x), x, "amax", include_self=False)


def _pointwise(inputs: int, outputs: int, relu: bool = True) -> nn.Sequential:
    layers = [nn.Linear(inputs, outputs), nn.LayerNorm(outputs, elementwise_affine=False)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class SpatialTransformer(nn.Module):
    """PointNet's T-Net: predicts one (d, d) matrix per image from its objects (pointwise MLP, per-image max,
    MLP), initialised at the identity; forward returns x (N, d) multiplied by its image's matrix."""

    def __init__(self, dim: int, widths: Sequence[int]):
        super().__init__()
        w1, w2, w3 = widths
        self.dim = dim
        self.points = nn.Sequential(_pointwise(dim, w1), _pointwise(w1, w2), _pointwise(w2, w3))
        self.matrix = nn.Sequential(_pointwise(w3, max(w3 // 2, 1)), _pointwise(max(w3 // 2, 1), max(w3 // 4, 1)),
                                    nn.Linear(max(w3 // 4, 1), dim * dim))
        nn.init.zeros_(self.matrix[-1].weight)
        nn.init.zeros_(self.matrix[-1].bias)

    def forward(self, x: torch.Tensor, batch_idx: torch.Tensor, num_images: int) -> torch.Tensor:
        pooled = segment_max(self.points(x), batch_idx, num_images)
        matrices = self.matrix(pooled).view(num_images, self.dim, self.dim) + torch.eye(self.dim, device=x.device,
                                                                                        dtype=x.dtype)
        return torch.bmm(x[:, None], matrices[batch_idx])[:, 0]


class LabelEncoder(nn.Module):
    """Label embeddings (N, out_channels) of N objects from their descriptors (N, 4 + num_slots) and image index.

    widths = (w1, w2, w3): PointNet's 64 / 128 / 1024 (official), also the widths of the transformers' MLPs.
    """

    def __init__(self, num_slots: int, out_channels: int = 256, widths: Sequence[int] = (64, 128, 1024)):
        super().__init__()
        if len(widths) != 3 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be three positive ints (official 64, 128, 1024), got {tuple(widths)}")
        w1, w2, w3 = widths
        dim = 4 + num_slots
        self.num_slots = num_slots
        self.input_transform = SpatialTransformer(dim, widths)
        self.local = _pointwise(dim, w1)
        self.feature_transform = SpatialTransformer(w1, widths)
        self.lift = nn.Sequential(_pointwise(w1, w2), _pointwise(w2, w3, relu=False))
        self.head = nn.Sequential(_pointwise(w1 + w3, 2 * out_channels), _pointwise(2 * out_channels, out_channels),
                                  nn.Linear(out_channels, out_channels),
                                  nn.LayerNorm(out_channels, elementwise_affine=False))

    def forward(self, descriptors: torch.Tensor, batch_idx: torch.Tensor, num_images: int) -> torch.Tensor:
        if descriptors.dim() != 2 or descriptors.shape[1] != 4 + self.num_slots:
            raise ValueError(f"descriptors must have shape (N, {4 + self.num_slots}), got {tuple(descriptors.shape)}")
        x = self.input_transform(descriptors, batch_idx, num_images)
        local = self.feature_transform(self.local(x), batch_idx, num_images)
        global_feature = segment_max(self.lift(local), batch_idx, num_images)[batch_idx]
        return self.head(torch.cat([local, global_feature], 1))
