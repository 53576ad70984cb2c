"""LGD's label-guided teacher: instructive FPN levels from the ground truth and the student's own features.

Per batch: the objects of every image (boxes in padded-input pixels, classes), plus one context box over the
whole padded image per image when `context_box`; label embeddings = Linear-LN-ReLU(LabelEncoder(descriptors));
appearance = AppearanceEncoder(student levels) (the levels detached first when `detach_appearance`, as the
official R-CNN presets); interaction = RelationAdapter(appearance, labels); instructive levels =
KnowledgeMapper(interaction). The student detector's head then trains on them (recipes/lgd.py).
"""
from typing import List, Sequence

import torch
from torch import nn

from fastkd.models.lgd.label_encoder import LabelEncoder, box_descriptors
from fastkd.models.lgd.mapper import AppearanceEncoder, KnowledgeMapper
from fastkd.models.lgd.relation import RelationAdapter


class LabelGuidedTeacher(nn.Module):
    def __init__(self, num_classes: int, channels: int = 256, heads: int = 8, context_box: bool = True,
                 detach_appearance: bool = False, encoder_widths: Sequence[int] = (64, 128, 1024)):
        super().__init__()
        self.num_classes, self.context_box, self.detach_appearance = num_classes, context_box, detach_appearance
        self.label_encoder = LabelEncoder(num_classes + 1, channels, encoder_widths)  # last slot: context box
        self.label_projection = nn.Sequential(nn.Linear(channels, channels),
                                              nn.LayerNorm(channels, elementwise_affine=False), nn.ReLU())
        self.appearance = AppearanceEncoder(channels)
        self.relation = RelationAdapter(channels, heads)
        self.mapper = KnowledgeMapper(channels)

    def objects(self, targets: Sequence[dict], image_size) -> tuple:
        """(boxes (N, 4), slots (N,), batch_idx (N,), context_rows (B,) or None) of the batch: each image's
        objects (classes 1..K as torchvision numbers them, slot = class - 1), then its context box."""
        height, width = image_size
        boxes, slots, owners, context_rows, count = [], [], [], [], 0
        for b, target in enumerate(targets):
            n = len(target["boxes"])
            if n and not bool(((target["labels"] >= 1) & (target["labels"] <= self.num_classes)).all()):
                raise ValueError(f"target labels must be in 1..{self.num_classes}, got {target['labels'].tolist()} "
                                 f"in image {b}")
            boxes.append(target["boxes"].float())
            slots.append(target["labels"].long() - 1)
            owners.append(torch.full((n,), b, dtype=torch.long, device=target["boxes"].device))
            count += n
            if self.context_box:
                boxes.append(target["boxes"].new_tensor([[0.0, 0.0, width - 1.0, height - 1.0]]).float())
                slots.append(torch.full((1,), self.num_classes, dtype=torch.long, device=boxes[-1].device))
                owners.append(torch.full((1,), b, dtype=torch.long, device=boxes[-1].device))
                context_rows.append(count)
                count += 1
        device = boxes[0].device if boxes else torch.device("cpu")
        rows = torch.tensor(context_rows, dtype=torch.long, device=device) if self.context_box else None
        return torch.cat(boxes), torch.cat(slots), torch.cat(owners), rows

    def forward(self, student_levels: Sequence[torch.Tensor], targets: Sequence[dict],
                image_size) -> List[torch.Tensor]:
        """Instructive levels, each of its student level's shape. student_levels: (B, C, H_l, W_l); targets: B
        dicts with "boxes" (n_b, 4) in padded-input pixels and "labels" (n_b,) in 1..num_classes; image_size:
        (H_pad, W_pad)."""
        if len(targets) != student_levels[0].shape[0]:
            raise ValueError(f"targets must hold one dict per image ({student_levels[0].shape[0]}), got {len(targets)}")
        boxes, slots, batch_idx, context_rows = self.objects(targets, image_size)
        labels = self.label_projection(self.label_encoder(
            box_descriptors(boxes, slots, self.num_classes + 1, image_size), batch_idx, len(targets)))
        levels = [level.detach() for level in student_levels] if self.detach_appearance else list(student_levels)
        appearance = self.appearance(levels, boxes, batch_idx, image_size)
        interaction = self.relation(appearance, labels, batch_idx)
        return self.mapper(interaction, boxes, batch_idx, image_size, [tuple(level.shape) for level in student_levels],
                           context_rows)
