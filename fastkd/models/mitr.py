"""MITr (MlTr, "Multi-label Classification with Transformer", Cheng et al.): the first public implementation.

    mitr(variant, num_classes, image_size=None, in_channels=3, **options) -> MITr
    MITr.forward(images (B, in_channels, S, S)) -> (class logits (B, K), count logits (B, K + 1) or None)
    MITr.features(images) -> the last stage's map (B, C_4, S / 32, S / 32) (after its LayerNorm)

Layout: patch projection (Conv P x P, stride P, LayerNorm) -> four stages of C, 2C, 4C, 8C channels, each
after the first entered through space-to-depth -> LayerNorm -> average pool -> arc-sigmoid classifier
p_k = sigmoid(s cos(h, w_k)), s = 8. The object-aware token reads the last stage; its classifier predicts the
number of distinct classes in the image (0..K). Variants (Table 1 of the paper; parameters at 80 classes, paper
Table 2 / here, both counted by tests/test_mitr.py):

    variant  input  P  C    ws  blocks     heads          params (paper / here)
    s        224    4  96   7   1-1-3-1    3-6-12-24      33 M / 34.8 M
    m        384    4  96   12  1-1-9-1    3-6-12-24      62 M / 64.3 M
    l        384    4  128  12  1-1-9-1    4-8-16-32      108 M / 113.3 M
    tiny     48     2  16   4   1-1-1-1    1-2-4-8        0.7 M (CPU; the 1-channel 48 x 48 canvases)

The paper leaves these open (no code was released); each choice, and why:
1. What one "block" holds. A block is pixel attention -> cross-window attention -> shifted pixel attention,
   each sub-layer x + f(LN(x)) followed by x + MLP(LN(x)) (MLP ratio 4, GELU), as the authors' sibling CAT
   (IPSA -> CPSA -> IPSA) and the paper's Fig. 3/Eq. 1-4. Why: it is the only reading whose parameter counts land
   near Table 2 for all three variants (one PA + one CWA per block gives 23 M for s; two PA + one CWA gives
   34.8 M / 64.3 M / 113.3 M), and it lets one block per stage both shift and not shift.
2. Shifting with one block per stage: the block's first pixel attention is unshifted, its second shifted by
   ws // 2 (Swin's alternation inside the block). A stage whose map fits one window (H, W <= ws) never shifts
   (Swin does the same: a shift there would only split the one window).
3. Cross-window attention on a stage with a single window (the last stage of s, m, l: 7 / 7 and 12 / 12): kept
   as the formula gives it. The one token attends to itself, so the layer becomes a learned linear mixing of the
   window's ws^2 positions per channel (a global token-mixing layer); dropping it would remove ~8 M parameters
   of MLP from s and leave Table 2 behind.
4. Heads and projections of cross-window attention: one head, qkv = Linear(ws^2, 3 ws^2), output
   Linear(ws^2, ws^2), no position bias, as CAT's cross-patch attention (`cross_heads` changes the heads).
5. Space-to-depth (Eq. "between every two layers ... reduce the feature size to 1/4 and double the channels",
   citing PiT): PiT's pooling, a depthwise-style strided convolution Conv(C, 2C, 3, stride 2, groups C). Pure
   space-to-depth gives 4C channels, so some projection is needed; Swin's Linear(4C, 2C) would add 1.5 M / 2.8 M
   parameters to s / l and move them further above Table 2, while the cited PiT layer adds almost none.
6. The object-aware token: a learned vector entering the last stage. In every pixel attention of that stage it
   attends, with that layer's projections, to itself and every pixel of the map (global, no position bias),
   then passes the layer's MLP; pixels do not attend to it, and cross-window attention leaves it as it is
   (it is not a window). With one window (s, m, l) this is the paper's token stacked onto the window's pixels,
   except that pixels ignore it; it works for any number of windows. Its head is LN -> Linear(C, K + 1).
7. Count range: the token classifies the number z of distinct positive classes into K + 1 classes 0..K
   (exact for every dataset; COCO images hold at most ~18, and the unused classes cost nothing).
8. The sign typos of Eq. 11 and 13 (p = 1 / (1 + e^{+x W}) would fall as the similarity grows): read as the
   usual sigmoid, p = sigmoid(s cos theta), as the paper's own text requires (a label is given when the product
   is large).
9. Arc sigmoid: cos theta between the pooled feature h and the class weight w_k (both L2-normalised, no bias),
   times s = 8 (the paper's best, Table 6). Without it (ablation) the classifier is Linear(C, K) with bias.
10. ASL's clip (Eq. 16 writes (p - m)^g log(1 - p + m) without ASL's max(p - m, 0)): the clip of the ASL paper
    and its code is used (fastkd.nn.AsymmetricLoss), so p < m gives no negative loss instead of a NaN power.
11. The "MLP" after the pooled pixels and after the token: the paper's own equations (11, 17) call it "the
    fully connected layer", so each head is one layer (the class weights w_k; the token's Linear(C, K + 1)).
    A hidden layer of width C would add 0.6 M parameters per head to s, further above Table 2.
12. Absolute position embedding: none (Swin's relative position bias is the paper's "position embedding [10]").
13. Inputs not a multiple of the window: padded (Swin), and padded pixels are masked out of the keys.
Ablation switches (the paper's Table 5 ladder): position_bias, shift, cross_window, arc_sigmoid, count_token.
"""
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastkd.models.mitr_attention import CrossWindowAttention, WindowAttention


@dataclass(frozen=True)
class MITrSpec:
    image_size: int
    patch: int
    channels: int
    window: int
    depths: Tuple[int, int, int, int]
    heads: Tuple[int, int, int, int]
    mlp_ratio: float = 4.0


VARIANTS = {
    "s": MITrSpec(224, 4, 96, 7, (1, 1, 3, 1), (3, 6, 12, 24)),
    "m": MITrSpec(384, 4, 96, 12, (1, 1, 9, 1), (3, 6, 12, 24)),
    "l": MITrSpec(384, 4, 128, 12, (1, 1, 9, 1), (4, 8, 16, 32)),
    "tiny": MITrSpec(48, 2, 16, 4, (1, 1, 1, 1), (1, 2, 4, 8)),
}


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class PixelAttentionLayer(nn.Module):
    """x + WindowAttention(LN(x), shift), then x + MLP(LN(x)); the token, if given, reads the map (Eq. 1-2)."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float, position_bias: bool):
        super().__init__()
        self.shift = shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = WindowAttention(dim, heads, window, position_bias)
        self.mlp = _mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, token: Optional[Tensor] = None):
        normed = self.norm1(x)
        if token is not None:
            token = token + self.attention.attend_token(self.norm1(token), normed)
            token = token + self.mlp(self.norm2(token))
        x = x + self.attention(normed, self.shift)
        return x + self.mlp(self.norm2(x)), token


class CrossWindowLayer(nn.Module):
    """x + CrossWindowAttention(LN(x)), then x + MLP(LN(x)) (Eq. 3-4); a token passes through unchanged."""

    def __init__(self, dim: int, window: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = CrossWindowAttention(window, heads)
        self.mlp = _mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, token: Optional[Tensor] = None):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x)), token


class SpaceToDepth(nn.Module):
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C): PiT's pooling, Conv(C, 2C, 3, stride 2, groups C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class MITrEncoder(nn.Module):
    """Patch projection and the four stages: images (B, in_channels, S, S) -> map (B, C_4, S/(8P), S/(8P)) after
    a LayerNorm. forward(images, token=None) -> map, or (map, token) when a token (B, 1, C_4) is given (it reads
    the last stage). Also an L2D backbone ("mitr-tiny", ...): `channels` is C_4."""

    def __init__(self, spec: MITrSpec, in_channels: int = 3, *, position_bias: bool = True, shift: bool = True,
                 cross_window: bool = True, cross_heads: int = 1):
        super().__init__()
        self.spec = spec
        self.patch_embed = nn.Conv2d(in_channels, spec.channels, spec.patch, stride=spec.patch)
        self.patch_norm = nn.LayerNorm(spec.channels)
        self.stages = nn.ModuleList()
        self.downsample = nn.ModuleList()
        size = spec.image_size // spec.patch
        for i, (depth, heads) in enumerate(zip(spec.depths, spec.heads)):
            dim = spec.channels * 2 ** i
            if i:
                self.downsample.append(SpaceToDepth(dim // 2))
                size = -(-size // 2)
            # a map of one window never shifts (Swin); sizes from spec.image_size (other sizes: see `shifts`)
            layers = []
            for _ in range(depth):
                layers.append(PixelAttentionLayer(dim, heads, spec.window, 0, spec.mlp_ratio, position_bias))
                if cross_window:
                    layers.append(CrossWindowLayer(dim, spec.window, cross_heads, spec.mlp_ratio))
                second_shift = spec.window // 2 if shift and size > spec.window else 0
                layers.append(PixelAttentionLayer(dim, heads, spec.window, second_shift, spec.mlp_ratio,
                                                  position_bias))
            self.stages.append(nn.ModuleList(layers))
        self.channels = spec.channels * 8
        self.norm = nn.LayerNorm(self.channels)
        self.apply(_init)

    def forward(self, images: Tensor, token: Optional[Tensor] = None):
        x = self.patch_norm(self.patch_embed(images).permute(0, 2, 3, 1))    # (B, H, W, C) channels last
        for i, stage in enumerate(self.stages):
            if i:
                x = self.downsample[i - 1](x)
            last = i == len(self.stages) - 1
            for layer in stage:
                if last:
                    x, token = layer(x, token)
                else:
                    x, _ = layer(x)
        x = self.norm(x).permute(0, 3, 1, 2)
        return x if token is None else (x, token)


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ArcSigmoidClassifier(nn.Module):
    """logits_k = scale * cos(h, w_k) (so sigmoid(logits) is the paper's arc sigmoid, Eq. 13); (B, D) -> (B, K)."""

    def __init__(self, dim: int, num_classes: int, scale: float = 8.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, h: Tensor) -> Tensor:
        return self.scale * F.normalize(h, dim=-1) @ F.normalize(self.weight, dim=-1).t()

    def extra_repr(self) -> str:
        return f"classes={self.weight.shape[0]}, dim={self.weight.shape[1]}, scale={self.scale}"


class MITr(nn.Module):
    """MITr: encoder -> average pool -> MLP -> classifier, and the object-aware token's count head (module
    docstring). forward(images) -> (class logits (B, K), count logits (B, K + 1), None without the token)."""

    def __init__(self, spec: MITrSpec, num_classes: int, in_channels: int = 3, *, position_bias: bool = True,
                 shift: bool = True, cross_window: bool = True, cross_heads: int = 1, arc_sigmoid: bool = True,
                 arc_scale: float = 8.0, count_token: bool = True):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.encoder = MITrEncoder(spec, in_channels, position_bias=position_bias, shift=shift,
                                   cross_window=cross_window, cross_heads=cross_heads)
        dim = self.encoder.channels
        self.classifier = ArcSigmoidClassifier(dim, num_classes, arc_scale) if arc_sigmoid else nn.Linear(
            dim, num_classes)
        if count_token:
            self.count_token = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.trunc_normal_(self.count_token, std=0.02)
            self.count_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes + 1))
        else:
            self.count_token, self.count_head = None, None
        for module in (self.classifier, self.count_head):
            if module is not None:
                module.apply(_init)

    def features(self, images: Tensor) -> Tensor:
        """The last stage's map (B, C_4, h, w), after its LayerNorm."""
        return self.encoder(images)

    def forward(self, images: Tensor):
        _check_images(images, self.encoder)
        if self.count_token is None:
            return self.classify(self.encoder(images)), None
        x, token = self.encoder(images, self.count_token.expand(images.shape[0], -1, -1))
        return self.classify(x), self.count_head(token[:, 0])

    def classify(self, features: Tensor) -> Tensor:
        return self.classifier(features.mean((2, 3)))


def _check_images(images: Tensor, encoder: MITrEncoder) -> None:
    expected = encoder.patch_embed.in_channels
    if images.dim() != 4 or images.shape[1] != expected:
        raise ValueError(f"images must be (B, {expected}, H, W), got {tuple(images.shape)}")


def mitr(variant: str, num_classes: int, image_size: Optional[int] = None, in_channels: int = 3,
         **options) -> MITr:
    """MITr of `variant` ("s", "m", "l" as the paper's Table 1, or "tiny" for CPU runs) for `num_classes`
    classes. image_size: the input side the model is built for (default the variant's); it fixes which stages
    shift (a stage whose map fits one window does not). options: MITr's ablation switches."""
    return MITr(variant_spec(variant, image_size), num_classes, in_channels, **options)


def variant_spec(variant: str, image_size: Optional[int] = None, patch: Optional[int] = None) -> MITrSpec:
    """VARIANTS[variant], built for image_size and with patch side `patch` when given (else the variant's)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    spec = VARIANTS[variant]
    if patch is not None:
        if patch < 1:
            raise ValueError(f"patch must be >= 1, got {patch}")
        spec = replace(spec, patch=patch)
    if image_size is not None:
        if image_size < spec.patch * 8:
            raise ValueError(f"image_size must be >= {spec.patch * 8} for variant {variant!r} (patch {spec.patch}, "
                             f"three halvings), got {image_size}")
        spec = replace(spec, image_size=image_size)
    return spec
