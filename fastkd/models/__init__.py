"""Models for the reference recipes: backbones and the ML-Decoder-style label-wise embedding head."""
from fastkd.models.backbones import build_backbone, check_backbone_name, small_cnn
from fastkd.models.ml_decoder import LabelWiseEmbeddingHead, MultiLabelNet

__all__ = ["LabelWiseEmbeddingHead", "MultiLabelNet", "build_backbone", "check_backbone_name", "small_cnn"]
