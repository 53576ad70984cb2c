"""LGD's appearance embeddings (mask pooling of the student's FPN levels) and intra-object knowledge mapper
(box painting of the interaction embeddings into instructive FPN levels)."""
from typing import List, Optional, Sequence

import torch
from torch import nn

from fastkd.functional import box_paint, box_pool


class AppearanceEncoder(nn.Module):
    """a_l = box_pool(ReLU(GN1(conv3x3(P_l))), boxes, mean) for every level l in one call: (L, N, C).
    One projection shared by all levels (official); GroupNorm with one group, without affine."""

    def __init__(self, channels: int = 256):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                     nn.GroupNorm(1, channels, affine=False), nn.ReLU())

    def forward(self, levels: Sequence[torch.Tensor], boxes: torch.Tensor, batch_idx: torch.Tensor,
                image_size) -> torch.Tensor:
        projected = [self.project(level) for level in levels]
        return torch.stack(box_pool(projected, boxes, batch_idx, image_size, reduction="mean"))


class KnowledgeMapper(nn.Module):
    """Instructive level l (B, C, H_l, W_l) from the interaction embeddings e (L, N, C):
    X_l = conv3x3(sum over objects n of mask_n,l (outer) Linear(e_l,n)) (box_paint), then
    X_l = ReLU(X_l + Linear_ctx(e_l,context of the image)) broadcast over the level when the image has a context
    box (ReLU(X_l) otherwise), then refinement conv-GN-ReLU, conv-GN-ReLU, conv-GN (GN of one group, no affine).
    Context rows are used only for the context vector, never painted."""

    def __init__(self, channels: int = 256):
        super().__init__()
        self.instance = nn.Linear(channels, channels)
        self.context = nn.Linear(channels, channels)
        self.spread = nn.Conv2d(channels, channels, 3, padding=1)
        norm = lambda: nn.GroupNorm(1, channels, affine=False)  # noqa: E731
        self.refine = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), norm(), nn.ReLU(),
                                    nn.Conv2d(channels, channels, 3, padding=1), norm(), nn.ReLU(),
                                    nn.Conv2d(channels, channels, 3, padding=1), norm())

    def forward(self, embeddings: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor, image_size,
                shapes: Sequence[Sequence[int]], context_rows: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """embeddings (L, N, C); boxes (N, 4); batch_idx (N,); shapes: the L level shapes (B, C, H_l, W_l);
        context_rows: (B,) row of each image's context box in the N rows, or None (no context box)."""
        objects = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
        if context_rows is not None:
            objects[context_rows] = False
        values = list(self.instance(embeddings[:, objects]).unbind(0))
        painted = box_paint(values, boxes[objects], batch_idx[objects], image_size, [tuple(s) for s in shapes])
        out = []
        for level, canvas in enumerate(painted):
            x = self.spread(canvas)
            if context_rows is not None:
                x = x + self.context(embeddings[level, context_rows])[:, :, None, None]
            out.append(self.refine(torch.relu(x)))
        return out
