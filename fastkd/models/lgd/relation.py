"""LGD's inter-object relation adapter: per pyramid level, each object's appearance embedding (the query)
attends to the label embeddings (key = value) of the objects of its own image only."""
import torch
from torch import nn


def same_image_mask(batch_idx: torch.Tensor) -> torch.Tensor:
    """(N, N) bool attention mask, True where attention is forbidden: query n and key m in different images."""
    return batch_idx[:, None] != batch_idx[None, :]


class RelationAdapter(nn.Module):
    """MultiheadAttention(channels, heads) (official 256, 8) with query = appearance, key = value = label
    embeddings, masked to the same image. forward(appearance (L, N, C), labels (N, C), batch_idx (N,)) ->
    interaction embeddings (L, N, C). Every object sees at least itself, so no row is fully masked."""

    def __init__(self, channels: int = 256, heads: int = 8):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.attention = nn.MultiheadAttention(channels, heads)

    def forward(self, appearance: torch.Tensor, label_embeddings: torch.Tensor,
                batch_idx: torch.Tensor) -> torch.Tensor:
        levels = appearance.shape[0]
        if appearance.shape[1] == 0:  # a batch without objects (and without context boxes)
            return appearance + 0 * label_embeddings.sum()
        query = appearance.transpose(0, 1)                                        # (N, L, C): levels as batch
        key = label_embeddings[:, None].expand(-1, levels, -1)
        out, _ = self.attention(query, key, key, attn_mask=same_image_mask(batch_idx), need_weights=False)
        return out.transpose(0, 1)
