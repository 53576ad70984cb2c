"""fastkd.metrics against scikit-learn, ties and degenerate classes included."""
import pytest
import torch

from fastkd import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def make(n=200, classes=7, seed=0, ties=False):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.rand(n, classes, generator=gen) < 0.3
    scores = torch.rand(n, classes, generator=gen) + 0.4 * targets
    if ties:
        scores = (scores * 4).round() / 4  # few distinct values: many tied thresholds
    return scores, targets


@pytest.mark.parametrize("ties", [False, True])
def test_average_precision_matches_sklearn(ties):
    scores, targets = make(ties=ties)
    ap = metrics.average_precision(scores, targets)
    for c in range(scores.shape[1]):
        expected = sklearn_metrics.average_precision_score(targets[:, c].numpy(), scores[:, c].numpy())
        assert ap[c].item() == pytest.approx(expected, abs=1e-12)


def test_classes_without_positives_are_skipped_and_counted():
    scores, targets = make()
    targets[:, 2] = False
    ap = metrics.average_precision(scores, targets)
    assert ap[2].isnan()
    m_ap, skipped = metrics.mean_average_precision(scores, targets)
    assert skipped == 1
    assert m_ap == pytest.approx(ap[[0, 1, 3, 4, 5, 6]].mean().item())


def test_threshold_scores_match_sklearn():
    probs, targets = make(seed=1)
    probs = probs / probs.max()
    targets[:, 3] = False  # a class with no positives: per-class recall 0 (zero_division=0)
    got = metrics.threshold_scores(probs, targets, threshold=0.5)
    y, p = targets.numpy(), (probs >= 0.5).numpy()
    for key, average, fn in [("OP", "micro", sklearn_metrics.precision_score),
                             ("OR", "micro", sklearn_metrics.recall_score),
                             ("OF1", "micro", sklearn_metrics.f1_score),
                             ("CP", "macro", sklearn_metrics.precision_score),
                             ("CR", "macro", sklearn_metrics.recall_score),
                             ("CF1_mean", "macro", sklearn_metrics.f1_score)]:
        assert got[key] == pytest.approx(fn(y, p, average=average, zero_division=0), abs=1e-12), key
    assert got["CF1"] == pytest.approx(2 * got["CP"] * got["CR"] / (got["CP"] + got["CR"]))


def test_nonfinite_scores_give_nan_metrics_not_numbers():
    torch.manual_seed(0)
    targets = (torch.rand(20, 4) < 0.4).float()
    targets[0] = 1
    scores = torch.full((20, 4), float("nan"))
    ap = metrics.average_precision(scores, targets)
    assert ap.isnan().all()
    m_ap, skipped = metrics.mean_average_precision(scores, targets)
    assert m_ap != m_ap and skipped == 0
    assert all(v != v for v in metrics.threshold_scores(scores, targets).values())
    partly = torch.rand(20, 4)
    partly[3, 2] = float("inf")
    ap = metrics.average_precision(partly, targets)
    assert ap[2].isnan() and not ap[[0, 1, 3]].isnan().any()
    assert metrics.mean_average_precision(partly, targets)[0] != metrics.mean_average_precision(partly, targets)[0]
    empty_class = targets.clone()
    empty_class[:, 1] = 0
    m_ap, skipped = metrics.mean_average_precision(torch.rand(20, 4), empty_class)  # no positives: skipped, not NaN
    assert m_ap == m_ap and skipped == 1
