"""Models for the reference recipes: backbones, the ML-Decoder-style label-wise embedding head, single-label
classifiers and a DeepLabV3+-style segmentation network."""
from fastkd.models.backbones import build_backbone, check_backbone_name, small_cnn
from fastkd.models.classifier import Classifier, from_torchvision_resnet
from fastkd.models.deeplab import DeepLabV3Plus
from fastkd.models.ml_decoder import LabelWiseEmbeddingHead, MultiLabelNet
from fastkd.models.mitr import MITr, mitr

__all__ = ["Classifier", "DeepLabV3Plus", "LabelWiseEmbeddingHead", "MITr", "MultiLabelNet", "build_backbone",
           "check_backbone_name", "from_torchvision_resnet", "mitr", "small_cnn"]
