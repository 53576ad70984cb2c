"""MITr's losses against plain formulas written element by element: the asymmetric loss (clip, focusing
weights without gradient, reductions) and the object-aware token loss with its count targets."""
import math

import pytest
import torch

import fastkd
from fastkd.nn import AsymmetricLoss, ObjectCountLoss


def plain_asl(logits, targets, gamma_pos=0.0, gamma_neg=4.0, clip=0.05, eps=1e-8):
    """Per element, in Python floats."""
    out = torch.zeros_like(logits, dtype=torch.float64)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in logits.shape)).view(-1, logits.dim()):
        i = tuple(index.tolist())
        p = 1 / (1 + math.exp(-float(logits[i])))
        if targets[i] > 0.5:
            out[i] = -((1 - p) ** gamma_pos) * math.log(max(p, eps))
        else:
            p_m = max(p - clip, 0.0)
            out[i] = -(p_m ** gamma_neg) * math.log(max(1 - p_m, eps))
    return out


@pytest.mark.parametrize("gamma_pos, gamma_neg, clip", [(0.0, 4.0, 0.05), (1.0, 2.0, 0.0), (0.0, 0.0, 0.2)])
def test_asymmetric_loss_matches_the_plain_formula(gamma_pos, gamma_neg, clip):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, generator=gen, dtype=torch.float64) * 4
    logits[0, 0] = -3.5  # p < clip: a negative without loss
    targets = (torch.rand(4, 7, generator=gen) < 0.4).double()
    expected = plain_asl(logits, targets, gamma_pos, gamma_neg, clip)
    kwargs = dict(gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip)
    torch.testing.assert_close(fastkd.asymmetric_loss(logits, targets, reduction="none", **kwargs), expected)
    torch.testing.assert_close(fastkd.asymmetric_loss(logits, targets, **kwargs), expected.sum())  # default sum
    torch.testing.assert_close(AsymmetricLoss(reduction="mean", **kwargs)(logits, targets), expected.mean())
    torch.testing.assert_close(AsymmetricLoss(reduction="batchmean", **kwargs)(logits, targets), expected.sum() / 4)


def test_asymmetric_focusing_weight_has_no_gradient():
    logits = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    fastkd.asymmetric_loss(logits, targets).backward()
    p = torch.sigmoid(logits.detach())[0]
    # positive, gamma_pos 0: d/dz -log p = -(1 - p); negative: weight w = p_m^4 held fixed, d/dz -w log(1 - p_m)
    # = w p (1 - p) / (1 - p_m) for p > clip
    p_m = p - 0.05
    expected = torch.stack([-(1 - p[0]), *(p_m[k] ** 4 * p[k] * (1 - p[k]) / (1 - p_m[k]) for k in (1, 2))])
    torch.testing.assert_close(logits.grad[0], expected)


def test_asymmetric_loss_equals_bce_without_focusing_or_clip():
    logits, targets = torch.randn(3, 5, dtype=torch.float64), (torch.rand(3, 5) < 0.5).double()
    torch.testing.assert_close(fastkd.asymmetric_loss(logits, targets, gamma_neg=0.0, clip=0.0),
                               torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum"))


def test_low_precision_is_computed_in_float32():
    logits, targets = torch.randn(2, 6).half(), (torch.rand(2, 6) < 0.5).half()
    loss = fastkd.asymmetric_loss(logits, targets, reduction="none")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, fastkd.asymmetric_loss(logits.float(), targets.float(), reduction="none"))


def test_count_targets_and_object_count_loss():
    targets = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.float32)
    assert fastkd.count_targets(targets).tolist() == [3, 0, 1]
    count_logits = torch.randn(3, 5, dtype=torch.float64)
    log_p = count_logits.log_softmax(-1)
    expected = -torch.stack([log_p[0, 3], log_p[1, 0], log_p[2, 1]])
    torch.testing.assert_close(ObjectCountLoss(reduction="none")(count_logits, targets), expected)
    torch.testing.assert_close(fastkd.object_count_loss(count_logits, targets), expected.sum())
    torch.testing.assert_close(fastkd.object_count_loss(count_logits, targets, reduction="mean"), expected.mean())
    # a head with fewer count classes: 3 objects fall in its last class (2)
    torch.testing.assert_close(fastkd.object_count_loss(count_logits[:, :3], targets, reduction="none")[0],
                               -count_logits[0, :3].log_softmax(-1)[2])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastkd.asymmetric_loss(torch.zeros(2, 3), torch.zeros(2, 3), reduction="batch")
    with pytest.raises(ValueError, match="one shape"):
        fastkd.asymmetric_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="count_logits must be"):
        fastkd.object_count_loss(torch.zeros(2, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastkd.object_count_loss(torch.zeros(2, 5), torch.zeros(2, 4), reduction="batchmean")
