"""ML-Decoder-style multi-label head giving the label-wise embeddings that L2D distils."""
import torch
from torch import Tensor, nn


class LabelWiseEmbeddingHead(nn.Module):
    """Feature map (B, C, h, w) -> (logits (B, Q), label-wise embeddings (B, Q, dim)).

    One learned query per class attends to the flattened, projected feature map (one cross-attention
    layer, no self-attention), then an FFN; LayerNorm after each, as in ML-Decoder. Class q's logit is
    its own linear function of its embedding, all classes at once as one einsum.
    """

    def __init__(self, in_channels: int, num_classes: int, dim: int = 768, heads: int = 8, ffn_dim: int = 2048,
                 dropout: float = 0.1):
        super().__init__()
        self.project = nn.Conv2d(in_channels, dim, kernel_size=1)
        self.queries = nn.Parameter(torch.randn(num_classes, dim) * dim ** -0.5)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.class_weight = nn.Parameter(torch.randn(num_classes, dim) * dim ** -0.5)
        self.class_bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, features: Tensor):
        tokens = self.project(features).flatten(2).transpose(1, 2)          # (B, h*w, dim)
        queries = self.queries.expand(features.shape[0], -1, -1)            # (B, Q, dim)
        attended, _ = self.attention(queries, tokens, tokens, need_weights=False)
        embeddings = self.norm1(queries + attended)
        embeddings = self.norm2(embeddings + self.ffn(embeddings))
        logits = torch.einsum("bqd,qd->bq", embeddings, self.class_weight) + self.class_bias
        return logits, embeddings


class MultiLabelNet(nn.Module):
    """backbone (B, 3|1, H, W) -> (B, C, h, w) followed by a LabelWiseEmbeddingHead."""

    def __init__(self, backbone: nn.Module, head: LabelWiseEmbeddingHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: Tensor):
        return self.head(self.backbone(images))
