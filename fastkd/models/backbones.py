"""Backbones returning feature maps (B, C, h, w): small CNNs fit for a CPU, torchvision networks (random init,
or weights from a local file: never a hub download) and MITr's encoder ("mitr-tiny", "mitr-s", ...)."""
from typing import Mapping, Optional, Tuple, Union

import torch
from torch import nn

from fastkd.models.mitr import VARIANTS as MITR_VARIANTS
from fastkd.models.mitr import MITrEncoder, variant_spec

TORCHVISION = {  # name -> (constructor name, output channels)
    "resnet18": ("resnet18", 512), "resnet34": ("resnet34", 512), "resnet50": ("resnet50", 2048),
    "resnet101": ("resnet101", 2048), "mobilenet_v2": ("mobilenet_v2", 1280),
}


def small_cnn(in_channels: int = 1, widths=(32, 64, 128), convs_per_stage: int = 2) -> nn.Sequential:
    """Stages of `convs_per_stage` Conv3x3-BN-ReLU, each stage after the first halving the resolution."""
    layers, channels = [], in_channels
    for stage, width in enumerate(widths):
        for conv in range(convs_per_stage):
            stride = 2 if stage > 0 and conv == 0 else 1
            layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            channels = width
    return nn.Sequential(*layers)


MITR = tuple(f"mitr-{variant}" for variant in MITR_VARIANTS)  # MITr's encoder: its last stage's map


def check_backbone_name(name: str) -> None:
    """ValueError unless `name` is a TORCHVISION key, a MITR name or "cnn-W1-W2-..." with positive integer
    widths."""
    widths = name.split("-")[1:] if name.startswith("cnn-") else None
    if name in TORCHVISION or name in MITR or (widths and all(w.isdigit() and int(w) > 0 for w in widths)):
        return
    raise ValueError(f"backbone must be one of {sorted(TORCHVISION) + list(MITR)} or 'cnn-W1-W2-...', got {name!r}")


def build_backbone(name: str, in_channels: int = 3, weights: Optional[Union[str, Mapping]] = None,
                   image_size: Optional[int] = None) -> Tuple[nn.Module, int]:
    """(backbone, output channels). `name`: a TORCHVISION key, "cnn-W1-W2-..." for small_cnn with those
    widths (e.g. "cnn-8-16"), or "mitr-<variant>" for MITr's encoder (built for `image_size`, default the
    variant's: it decides which stages shift their windows; other names ignore it). `weights`: a state_dict for
    the backbone, or the path of one (weights_only load)."""
    check_backbone_name(name)
    if name in MITR:
        backbone = MITrEncoder(variant_spec(name.removeprefix("mitr-"), image_size), in_channels)
        channels = backbone.channels
    elif name.startswith("cnn-"):
        widths = tuple(int(w) for w in name.split("-")[1:])
        backbone, channels = small_cnn(in_channels, widths), widths[-1]
    elif name in TORCHVISION:
        import torchvision
        constructor, channels = TORCHVISION[name]
        net = getattr(torchvision.models, constructor)(weights=None)
        backbone = net.features if name == "mobilenet_v2" else nn.Sequential(*list(net.children())[:-2])
        if in_channels != 3:
            first = backbone[0] if name != "mobilenet_v2" else backbone[0][0]
            replacement = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride, first.padding,
                                    bias=False)
            if name == "mobilenet_v2":
                backbone[0][0] = replacement
            else:
                backbone[0] = replacement
    if isinstance(weights, str):
        weights = torch.load(weights, map_location="cpu", weights_only=True)
    if weights is not None:
        backbone.load_state_dict(weights)
    return backbone, channels
