"""Backbones and the label-wise embedding head: shapes, gradients, local weights, errors."""
import pytest
import torch

from fastkd.models import LabelWiseEmbeddingHead, MultiLabelNet, build_backbone


@pytest.mark.parametrize("name, channels", [("cnn-8-16", 16), ("resnet18", 512), ("mobilenet_v2", 1280)])
def test_backbone_and_head_shapes_and_gradients(name, channels):
    backbone, out_channels = build_backbone(name, in_channels=1)
    assert out_channels == channels
    model = MultiLabelNet(backbone, LabelWiseEmbeddingHead(out_channels, num_classes=10, dim=32, heads=4,
                                                           ffn_dim=64))
    logits, embeddings = model(torch.randn(2, 1, 48, 48))
    assert logits.shape == (2, 10) and embeddings.shape == (2, 10, 32)
    (logits.sum() + embeddings.square().mean()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_logits_are_per_class_linear_functions_of_the_embeddings():
    head = LabelWiseEmbeddingHead(8, num_classes=5, dim=16, heads=2, ffn_dim=32).eval()
    logits, embeddings = head(torch.randn(3, 8, 4, 4))
    expected = (embeddings * head.class_weight).sum(-1) + head.class_bias
    torch.testing.assert_close(logits, expected)


def test_backbone_weights_from_a_local_file(tmp_path):
    source, _ = build_backbone("cnn-4-8")
    torch.save(source.state_dict(), tmp_path / "backbone.pt")
    loaded, _ = build_backbone("cnn-4-8", weights=str(tmp_path / "backbone.pt"))
    for a, b in zip(source.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_backbone("vit_h")
