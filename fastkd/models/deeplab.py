"""A DeepLabV3+-style segmentation network (ASPP on the deep features, a decoder with a stride-4 skip) whose
forward also returns the feature TaT distils in segmentation: the decoder's second conv + BN output before its
ReLU (256 channels at stride 4 in the official code; `decoder_channels` here, so that a CPU model can be small).

Backbones: "cnn-W1-W2-W3-W4" (small_cnn: strides 1, 2, 4, 8; the skip is the stride-4 stage, the deep features
the last stage's, output stride 8), torchvision "resnet18/34/50/101" (skip = layer1, stride 4; layer4 made
stride 1 with dilation 2: output stride 16) and "mobilenet_v2" (skip = features[:4], stride 4, 24 channels; the
stride-2 block 14 made stride 1 with dilation 2: output stride 16).
"""
from typing import Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastkd.models.backbones import build_backbone, check_backbone_name, small_cnn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                                   dilation=dilation, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _dilate(module: nn.Module) -> None:
    """Stride 1 and dilation 2 for every strided or 3x3 conv of `module` (DeepLab's output stride 16)."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            if conv.kernel_size == (3, 3):
                conv.stride, conv.dilation, conv.padding = (1, 1), (2, 2), (2, 2)
            elif conv.stride != (1, 1):
                conv.stride = (1, 1)


def split_backbone(name: str, in_channels: int, weights: Optional[Mapping] = None):
    """(low-level part, deep part, low-level channels, deep channels)."""
    check_backbone_name(name)
    if name.startswith("mitr-"):
        raise ValueError(f"a segmentation backbone must be a CNN (cnn-W1-W2-W3-W4, a ResNet or mobilenet_v2): "
                         f"MITr's encoder has no stride-4 skip and no dilated form, got {name!r}")
    if name.startswith("cnn-"):
        widths = tuple(int(w) for w in name.split("-")[1:])
        if len(widths) < 4:
            raise ValueError(f"a segmentation backbone needs at least 4 stages (cnn-W1-W2-W3-W4), got {name!r}")
        net = small_cnn(in_channels, widths)
        if weights is not None:
            net.load_state_dict(weights)
        cut = 3 * 2 * 3  # three stages of 2 x (conv, bn, relu): strides 1, 2, 4
        return net[:cut], net[cut:], widths[2], widths[-1]
    net, channels = build_backbone(name, in_channels, weights)
    if name == "mobilenet_v2":
        _dilate(net[14].conv[1])
        return net[:4], net[4:], 24, channels
    _dilate(net[7])  # layer4
    return net[:5], net[5:], _out_channels(net[4]), channels


def _out_channels(layer: nn.Module) -> int:
    return [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


class ASPP(nn.Module):
    """1x1 conv, one 3x3 conv per dilation rate, and image pooling, concatenated and projected (dropout 0.1)."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(in_channels, out_channels, 1)]
                                      + [conv_bn_relu(in_channels, out_channels, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                  nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.project = nn.Sequential(conv_bn_relu((len(rates) + 2) * out_channels, out_channels, 1), nn.Dropout(0.1))

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.interpolate(self.pool(x), size=x.shape[2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], 1))


class DeepLabV3Plus(nn.Module):
    """forward(images) -> (logits (B, K, H, W) at the input size, feature (B, decoder_channels, H/4, W/4))."""

    def __init__(self, backbone: str, num_classes: int, in_channels: int = 3, *, aspp_channels: int = 256,
                 decoder_channels: int = 256, low_channels: int = 48, rates: Sequence[int] = (6, 12, 18),
                 backbone_weights: Optional[Mapping] = None):
        super().__init__()
        self.low, self.deep, low_in, deep_in = split_backbone(backbone, in_channels, backbone_weights)
        self.channels = decoder_channels
        self.aspp = ASPP(deep_in, aspp_channels, rates)
        self.skip = conv_bn_relu(low_in, low_channels, 1)
        self.fuse = conv_bn_relu(aspp_channels + low_channels, decoder_channels, 3)
        self.refine = nn.Sequential(nn.Conv2d(decoder_channels, decoder_channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(decoder_channels))  # the distilled feature: before the ReLU
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        low = self.low(images)
        deep = self.aspp(self.deep(low))
        deep = F.interpolate(deep, size=low.shape[2:], mode="bilinear", align_corners=False)
        feature = self.refine(self.fuse(torch.cat([deep, self.skip(low)], 1)))
        logits = self.classifier(F.relu(feature))
        return F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False), feature
