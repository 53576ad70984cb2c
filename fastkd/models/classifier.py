"""Single-label classifiers for the TaT recipe: a backbone (build_backbone), global average pooling and a linear
layer; forward returns the logits and the backbone's last feature map (ResNet: layer4), the map TaT distils."""
from typing import Mapping, Optional, Tuple

from torch import Tensor, nn

from fastkd.models.backbones import build_backbone


class Classifier(nn.Module):
    """backbone -> (logits (B, K), feature map (B, C, h, w))."""

    def __init__(self, backbone: str, num_classes: int, in_channels: int = 3,
                 backbone_weights: Optional[Mapping] = None):
        super().__init__()
        self.backbone, self.channels = build_backbone(backbone, in_channels, backbone_weights)
        self.fc = nn.Linear(self.channels, num_classes)

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        feature = self.backbone(images)
        return self.fc(feature.mean((2, 3))), feature


# torchvision ResNet children in order: conv1 bn1 relu maxpool layer1..4 (our backbone[0..7]), avgpool, fc
_RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def from_torchvision_resnet(state: Mapping[str, Tensor]) -> dict:
    """A torchvision ResNet state_dict (conv1.*, layer1.*, ..., fc.*) renamed for Classifier (backbone.0.*, ...,
    fc.*); any other state_dict is returned as it is."""
    if "conv1.weight" not in state or "fc.weight" not in state:
        return dict(state)
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "fc":
            renamed[key] = value
        elif head in _RESNET_CHILDREN:
            renamed[f"backbone.{_RESNET_CHILDREN.index(head)}.{rest}"] = value
        else:
            raise KeyError(f"unexpected key {key!r} in a torchvision ResNet state_dict")
    return renamed
