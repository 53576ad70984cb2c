"""torchvision detectors (FCOS, RetinaNet: FPN P3-P7; Faster R-CNN: FPN '0'-'3' + 'pool') on a small CNN for
CPUs or a ResNet-50 (random init or a local state_dict: never a download), and the pieces of their forward
pass called one by one, so that a distillation can reach the FPN levels and run the shared head on other
features: `images, targets = detector.transform(images, targets)`, `pyramid(detector, images.tensors)`,
`detection_losses(detector, images, features, targets)`. Classes are numbered 1..K (0 is background) and every
detector is built with K + 1 classes, as torchvision's COCO models."""
from collections import OrderedDict
from typing import Dict, Optional, Sequence

import torch
from torch import nn

ARCHITECTURES = ("fcos", "retinanet", "fasterrcnn")
LEVEL_STRIDES = {"fcos": (8, 16, 32, 64, 128), "retinanet": (8, 16, 32, 64, 128), "fasterrcnn": (4, 8, 16, 32, 64)}
DEFAULT_ANCHOR_SCALE = {"fcos": 1.0, "retinanet": 4.0, "fasterrcnn": 8.0}  # anchor side / level stride (torchvision)


def check_detector_backbone(name: str) -> None:
    """ValueError unless `name` is "resnet50" or "cnn-W1-W2-W3-W4" (four positive widths, strides 4 to 32)."""
    widths = name.split("-")[1:] if name.startswith("cnn-") else None
    if name == "resnet50" or (widths and len(widths) == 4 and all(w.isdigit() and int(w) > 0 for w in widths)):
        return
    raise ValueError(f"backbone must be 'resnet50' or 'cnn-W1-W2-W3-W4' (four widths, strides 4, 8, 16, 32), "
                     f"got {name!r}")


def _stage(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(outputs),
                         nn.ReLU(inplace=True), nn.Conv2d(outputs, outputs, 3, padding=1, bias=False),
                         nn.BatchNorm2d(outputs), nn.ReLU(inplace=True))


def small_body(widths: Sequence[int], in_channels: int) -> nn.Sequential:
    """A ResNet-shaped body for CPUs: stem (stride 2) then layer1..layer4 at strides 4, 8, 16, 32, each
    conv3x3(stride 2)-BN-ReLU-conv3x3-BN-ReLU, widths W1..W4."""
    layers = [("stem", nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False),
                                     nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)))]
    channels = widths[0]
    for i, width in enumerate(widths):
        layers.append((f"layer{i + 1}", _stage(channels, width)))
        channels = width
    return nn.Sequential(OrderedDict(layers))


def build_fpn_backbone(arch: str, backbone: str, fpn_channels: int, in_channels: int = 3,
                       weights: Optional[str] = None):
    """torchvision BackboneWithFPN (attributes .body, .fpn, .out_channels) for `arch`: layers 2-4 with P6/P7 from
    P5 (FCOS, RetinaNet) or layers 1-4 with a max-pooled 'pool' level (Faster R-CNN). resnet50: torchvision's
    ResNet-50 with weights from the local state_dict `weights`, then with frozen BatchNorm and its stem and layer1
    frozen (torchvision's trainable_layers=3); without weights, random init, BatchNorm and every layer trained
    (torchvision's choice for an untrained backbone)."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
    check_detector_backbone(backbone)
    returned = [1, 2, 3, 4] if arch == "fasterrcnn" else [2, 3, 4]
    extra = LastLevelMaxPool() if arch == "fasterrcnn" else LastLevelP6P7(fpn_channels, fpn_channels)
    if backbone == "resnet50":
        import torchvision
        from torchvision.ops import FrozenBatchNorm2d
        if in_channels != 3:
            raise ValueError(f"resnet50 takes 3-channel images, got in_channels={in_channels}")
        pretrained = weights is not None  # as torchvision: frozen BatchNorm and layers only over loaded weights
        net = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d)
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.get("model", state).items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if not k.startswith("fc.")]:
                raise ValueError(f"{weights} is not a torchvision ResNet-50 state_dict (missing "
                                 f"{missing[:3]}, unexpected {unexpected[:3]})")
        fpn = _resnet_fpn_extractor(net, 3 if pretrained else 5, returned_layers=returned, extra_blocks=extra)
        if fpn_channels != fpn.out_channels:
            raise ValueError(f"resnet50's FPN has {fpn.out_channels} channels (torchvision), got fpn_channels="
                             f"{fpn_channels}")
        return fpn
    if weights is not None:
        raise ValueError("backbone weights are only read for resnet50")
    widths = [int(w) for w in backbone.split("-")[1:]]
    return BackboneWithFPN(small_body(widths, in_channels), {f"layer{k}": str(i) for i, k in enumerate(returned)},
                           [widths[k - 1] for k in returned], fpn_channels, extra_blocks=extra)


def build_detector(arch: str, num_classes: int, *, backbone: str = "cnn-16-32-64-128", fpn_channels: int = 256,
                   in_channels: int = 3, min_size=800, max_size: int = 1333, image_mean=None, image_std=None,
                   anchor_scale: Optional[float] = None, backbone_weights: Optional[str] = None,
                   score_thresh: float = 0.05, detections_per_img: int = 100) -> nn.Module:
    """A torchvision FCOS, RetinaNet or Faster R-CNN for `num_classes` object classes (labels 1..K; built with
    K + 1 outputs). min_size: shorter side (an int, or a tuple to draw from per batch in training: multi-scale),
    max_size: the longer side's cap. FCOS with fewer than 64 FPN channels normalises its head with GroupNorm of
    two channels a group (torchvision: 32 groups, which fails on a 1 x 1 level of a single image).
    anchor_scale: anchor side / level stride (default torchvision's: FCOS 1, RetinaNet 4 with 3 octave scales and
    3 ratios, Faster R-CNN 8 with 3 ratios)."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    fpn = build_fpn_backbone(arch, backbone, fpn_channels, in_channels, backbone_weights)
    scale = DEFAULT_ANCHOR_SCALE[arch] if anchor_scale is None else anchor_scale
    strides = LEVEL_STRIDES[arch]
    image_mean = list(image_mean) if image_mean is not None else [0.485, 0.456, 0.406][:in_channels]
    image_std = list(image_std) if image_std is not None else [0.229, 0.224, 0.225][:in_channels]
    common = dict(min_size=min_size, max_size=max_size, image_mean=image_mean, image_std=image_std)
    if arch == "fcos":
        anchors = AnchorGenerator(tuple((s * scale,) for s in strides), ((1.0,),) * len(strides))
        detector = FCOS(fpn, num_classes + 1, anchor_generator=anchors, score_thresh=score_thresh,
                        detections_per_img=detections_per_img, **common)
        if fpn_channels < 64:  # GroupNorm(32) of 32 channels on a 1 x 1 level of one image has one value a group
            _fcos_head_norm(detector, num_classes + 1, fpn_channels)
        return detector
    if arch == "retinanet":
        anchors = AnchorGenerator(tuple(tuple(s * scale * 2 ** (k / 3) for k in range(3)) for s in strides),
                                  ((0.5, 1.0, 2.0),) * len(strides))
        return RetinaNet(fpn, num_classes + 1, anchor_generator=anchors, score_thresh=score_thresh,
                         detections_per_img=detections_per_img, **common)
    anchors = AnchorGenerator(tuple((s * scale,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
    return FasterRCNN(fpn, num_classes + 1, rpn_anchor_generator=anchors, box_score_thresh=score_thresh,
                      box_detections_per_img=detections_per_img, **common)


def _fcos_head_norm(detector: nn.Module, num_classes: int, channels: int) -> None:
    """Rebuild FCOS's head towers with GroupNorm of channels // 2 groups (two channels a group) instead of 32."""
    from functools import partial
    from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSRegressionHead
    if channels % 2:
        raise ValueError(f"FCOS needs an even number of FPN channels, got {channels}")
    norm = partial(nn.GroupNorm, channels // 2)
    detector.head.classification_head = FCOSClassificationHead(channels, 1, num_classes, norm_layer=norm)
    detector.head.regression_head = FCOSRegressionHead(channels, 1, norm_layer=norm)


def architecture(detector: nn.Module) -> str:
    """"fcos", "retinanet" or "fasterrcnn" from the detector's class."""
    name = type(detector).__name__.lower()
    if name in ARCHITECTURES:
        return name
    raise ValueError(f"detector must be a torchvision FCOS, RetinaNet or FasterRCNN, got {type(detector).__name__}")


def pyramid(detector: nn.Module, tensors: torch.Tensor, freeze_body: bool = False) -> "OrderedDict[str, torch.Tensor]":
    """The FPN levels of the padded batch `tensors` (B, C, H, W), finest first. freeze_body: the bottom-up body's
    outputs are detached, so the body gets no gradient (LGD's first iterations); the FPN still learns."""
    body = detector.backbone.body(tensors)
    if freeze_body:
        body = OrderedDict((k, v.detach()) for k, v in body.items())
    return detector.backbone.fpn(body)


def detection_losses(detector: nn.Module, images, features: "OrderedDict[str, torch.Tensor]",
                     targets) -> Dict[str, torch.Tensor]:
    """The detector's training losses on `features` (any pyramid of the backbone's shape: the student's, or the
    instructive levels), as its forward computes them after the backbone. images: the transform's ImageList;
    targets: the transformed targets. FCOS: classification, bbox_regression, bbox_ctrness; RetinaNet:
    classification, bbox_regression; Faster R-CNN: the RPN's and the box head's four losses."""
    arch = architecture(detector)
    if arch == "fasterrcnn":
        proposals, rpn_losses = detector.rpn(images, features, targets)
        _, head_losses = detector.roi_heads(features, proposals, images.image_sizes, targets)
        return {**rpn_losses, **head_losses}
    levels = list(features.values())
    head_outputs = detector.head(levels)
    anchors = detector.anchor_generator(images, levels)
    if arch == "fcos":
        return detector.compute_loss(targets, head_outputs, anchors, [x.size(2) * x.size(3) for x in levels])
    return detector.compute_loss(targets, head_outputs, anchors)



def detect(detector: nn.Module, images, features: "OrderedDict[str, torch.Tensor]", original_sizes) -> list:
    """The detector's detections (eval mode) computed from `features` instead of its own backbone's: per image
    {"boxes", "scores", "labels"} in the original image's pixels. images: the transform's ImageList;
    original_sizes: [(H, W)] of the images before the transform."""
    arch = architecture(detector)
    if arch == "fasterrcnn":
        proposals, _ = detector.rpn(images, features)
        detections, _ = detector.roi_heads(features, proposals, images.image_sizes)
    else:
        levels = list(features.values())
        head_outputs = detector.head(levels)
        anchors = detector.anchor_generator(images, levels)
        per_level = [x.size(2) * x.size(3) for x in levels]
        if arch == "retinanet":  # A anchors per location
            per_level = [n * (head_outputs["cls_logits"].size(1) // sum(per_level)) for n in per_level]
        split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        detections = detector.postprocess_detections(split_outputs, split_anchors, images.image_sizes)
    return detector.transform.postprocess(detections, images.image_sizes, original_sizes)
