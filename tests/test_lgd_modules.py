"""LGD's modules (fastkd.models.lgd): the label encoder's descriptor and per-image PointNet, the relation
adapter's mask (no attention across images), the appearance encoder and knowledge mapper against the dense-mask
formulas of the official code, the distillation loss, and the label-guided teacher's gradients."""
import pytest
import torch
import torch.nn.functional as F

from fastkd.models.lgd import (AppearanceEncoder, KnowledgeMapper, LabelEncoder, LabelGuidedTeacher, RelationAdapter,
                               box_descriptors, lgd_distillation_loss, same_image_mask, segment_max)
from fastkd.reference.box_ops import box_masks

IMAGE = (40, 56)  # (H_pad, W_pad)
BOXES = torch.tensor([[0.0, 0.0, 27.5, 19.0], [10.0, 5.0, 55.0, 39.0], [3.0, 30.0, 20.0, 39.0], [8.0, 8.0, 8.0, 20.0]])
BATCH_IDX = torch.tensor([0, 0, 1, 1])


def test_descriptor_is_box_over_padded_size_and_one_hot_rescaled_to_plus_minus_one():
    d = box_descriptors(BOXES[:2], torch.tensor([2, 0]), 4, IMAGE)
    expected_first = torch.tensor([0 / 56, 0 / 40, 27.5 / 56, 19 / 40, 0, 0, 1, 0]) * 2 - 1
    torch.testing.assert_close(d[0], expected_first)
    assert d.shape == (2, 8) and d.min() >= -1 and d.max() <= 1
    assert d[1, 4:].tolist() == [1, -1, -1, -1]
    with pytest.raises(ValueError, match="labels must have shape"):
        box_descriptors(BOXES, torch.tensor([0, 1]), 4, IMAGE)


def test_segment_max_is_the_per_image_max():
    x = torch.randn(7, 5)
    idx = torch.tensor([2, 0, 2, 2, 0, 0, 2])
    out = segment_max(x, idx, 4)
    for b in range(4):
        rows = x[idx == b]
        torch.testing.assert_close(out[b], rows.max(0).values if len(rows) else torch.zeros(5))


def test_label_encoder_treats_each_image_as_a_set_and_never_mixes_images():
    torch.manual_seed(0)
    encoder = LabelEncoder(num_slots=5, out_channels=16, widths=(8, 12, 24))
    with torch.no_grad():  # a non-identity start of the transformers, so that they matter
        for transformer in (encoder.input_transform, encoder.feature_transform):
            transformer.matrix[-1].weight.normal_(0, 0.1)
    desc = box_descriptors(BOXES, torch.tensor([0, 3, 4, 1]), 5, IMAGE)
    out = encoder(desc, BATCH_IDX, 2)
    assert out.shape == (4, 16)
    torch.testing.assert_close(out.mean(1), torch.zeros(4), atol=1e-5, rtol=0)  # LayerNorm without affine
    order = torch.tensor([1, 0, 2, 3])  # objects of image 0 swapped: their embeddings swap, nothing else moves
    torch.testing.assert_close(encoder(desc[order], BATCH_IDX, 2), out[order], atol=1e-5, rtol=1e-5)
    moved = desc.clone()
    moved[2:, :4] = torch.rand(2, 4) * 2 - 1  # image 1's boxes change: image 0's embeddings do not
    again = encoder(moved, BATCH_IDX, 2)
    torch.testing.assert_close(again[:2], out[:2])
    assert not torch.allclose(again[2:], out[2:])
    alone = encoder(desc[:2], BATCH_IDX[:2], 1)  # image 0 encoded on its own
    torch.testing.assert_close(alone, out[:2], atol=1e-5, rtol=1e-5)


def test_relation_mask_forbids_attention_across_images():
    mask = same_image_mask(torch.tensor([0, 0, 1, 2, 1]))
    assert mask.tolist() == [[False, False, True, True, True], [False, False, True, True, True],
                             [True, True, False, True, False], [True, True, True, False, True],
                             [True, True, False, True, False]]


def test_relation_adapter_attends_within_each_image_only():
    torch.manual_seed(0)
    adapter = RelationAdapter(16, heads=4)
    appearance, labels = torch.randn(3, 4, 16), torch.randn(4, 16)
    out = adapter(appearance, labels, BATCH_IDX)
    assert out.shape == (3, 4, 16)
    changed = labels.clone()
    changed[2:] += 5  # image 1's label embeddings change: image 0's outputs do not
    torch.testing.assert_close(adapter(appearance, changed, BATCH_IDX)[:, :2], out[:, :2])
    # image 0 alone, with plain scaled dot-product attention per head
    attention = adapter.attention
    wq, wk, wv = attention.in_proj_weight.chunk(3)
    bq, bk, bv = attention.in_proj_bias.chunk(3)
    for level in range(3):
        q = (appearance[level, :2] @ wq.T + bq).view(2, 4, 4).transpose(0, 1)
        k = (labels[:2] @ wk.T + bk).view(2, 4, 4).transpose(0, 1)
        v = (labels[:2] @ wv.T + bv).view(2, 4, 4).transpose(0, 1)
        heads = torch.softmax(q @ k.transpose(1, 2) / 2.0, -1) @ v
        expected = attention.out_proj(heads.transpose(0, 1).reshape(2, 16))
        torch.testing.assert_close(out[level, :2], expected, atol=1e-5, rtol=1e-5)


def _levels(b=2, c=8):
    return [torch.randn(b, c, 10, 14), torch.randn(b, c, 5, 7), torch.randn(b, c, 1, 1)]


def test_appearance_is_the_mean_of_the_projected_features_inside_each_box():
    torch.manual_seed(0)
    encoder, levels = AppearanceEncoder(8), _levels()
    out = encoder(levels, BOXES, BATCH_IDX, IMAGE)
    assert out.shape == (3, 4, 8)
    for l, level in enumerate(levels):
        projected = encoder.project(level)
        masks = box_masks(BOXES, IMAGE, level.shape[2:]).float()
        for n in range(4):
            expected = (projected[BATCH_IDX[n]] * masks[n]).sum((1, 2)) / masks[n].sum().clamp_min(1)
            torch.testing.assert_close(out[l, n], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_context", [False, True])
def test_knowledge_mapper_equals_the_dense_mask_formula(with_context):
    torch.manual_seed(0)
    mapper = KnowledgeMapper(8)
    shapes = [tuple(level.shape) for level in _levels()]
    embeddings = torch.randn(3, 4, 8)
    context_rows = torch.tensor([1, 3]) if with_context else None
    out = mapper(embeddings, BOXES, BATCH_IDX, IMAGE, shapes, context_rows)
    objects = [0, 2] if with_context else [0, 1, 2, 3]
    for l, shape in enumerate(shapes):
        masks = box_masks(BOXES, IMAGE, shape[2:]).float()
        values = mapper.instance(embeddings[l])
        canvas = torch.zeros(shape)
        for n in objects:  # X = sum over objects of mask_n (outer) Linear(e_n): overlaps add
            canvas[BATCH_IDX[n]] += values[n][:, None, None] * masks[n]
        x = mapper.spread(canvas)
        if with_context:
            x = x + mapper.context(embeddings[l, context_rows])[:, :, None, None]
        torch.testing.assert_close(out[l], mapper.refine(torch.relu(x)), atol=1e-5, rtol=1e-5)


def test_distillation_loss_is_mse_of_instance_normalised_levels_with_a_detached_teacher():
    torch.manual_seed(0)
    student = [level.requires_grad_() for level in _levels()]
    teacher = [level.requires_grad_() for level in _levels()]
    loss = lgd_distillation_loss(student, teacher)
    def norm(x):  # torch's instance norm refuses a 1 x 1 map, which normalises to zeros
        return F.instance_norm(x, eps=1e-5) if x.shape[2:].numel() > 1 else torch.zeros_like(x)
    s = torch.cat([norm(x).flatten(1) for x in student], 1)
    t = torch.cat([norm(x).flatten(1) for x in teacher], 1)
    torch.testing.assert_close(loss, F.mse_loss(s, t))
    loss.backward()
    assert all(x.grad is not None for x in student) and all(x.grad is None for x in teacher)
    assert student[2].grad.abs().max() == 0  # a 1 x 1 level normalises to zeros on both sides
    with pytest.raises(ValueError, match="level 1"):
        lgd_distillation_loss(student, [teacher[0], teacher[0], teacher[2]])


@pytest.mark.parametrize("context_box,detach_appearance", [(True, False), (False, True)])
def test_teacher_output_shapes_and_gradients(context_box, detach_appearance):
    torch.manual_seed(0)
    teacher = LabelGuidedTeacher(3, 16, heads=4, context_box=context_box, detach_appearance=detach_appearance,
                                 encoder_widths=(8, 8, 16))
    levels = [x.requires_grad_() for x in _levels(c=16)]
    targets = [{"boxes": BOXES[:2], "labels": torch.tensor([1, 3])}, {"boxes": BOXES[2:3], "labels": torch.tensor([2])}]
    out = teacher(levels, targets, IMAGE)
    assert [tuple(x.shape) for x in out] == [tuple(x.shape) for x in levels]
    sum(x.square().sum() for x in out).backward()
    unused = [name for name, p in teacher.named_parameters() if p.grad is None]
    expected_unused = [] if context_box else ["mapper.context.weight", "mapper.context.bias"]
    assert unused == expected_unused
    assert (levels[0].grad is None) == detach_appearance
    with pytest.raises(ValueError, match="labels must be in 1..3"):
        teacher(levels, [{"boxes": BOXES[:1], "labels": torch.tensor([4])}, targets[1]], IMAGE)
