"""Multi-label metrics: per-class average precision, mAP, and the overall / per-class F1 family.

Conventions (they differ between public repositories, so every choice is named):
- AP is non-interpolated, as sklearn's average_precision_score: sum over distinct score thresholds of
  (R_k - R_{k-1}) P_k, tied scores forming one threshold.
- mAP averages AP over the classes that have at least one positive; classes without positives have an
  undefined AP (NaN in `average_precision`) and are skipped and counted, never scored 0 silently.
- OP, OR, OF1: precision, recall, F1 of all (image, class) decisions pooled ("overall", micro).
- CP, CR: per-class precision and recall averaged over classes (0 for a class with nothing predicted or
  no positive, like sklearn's zero_division=0). Two CF1 conventions:
  CF1 = 2 CP CR / (CP + CR) (the ML-GCN lineage) and CF1_mean = mean over classes of per-class F1
  (ASL / ML-Decoder).
- Scores that are not finite (a diverged model) make every metric they enter NaN: the class's AP, and the
  threshold scores; never a number that looks like a result.
L2D's own evaluation keeps each image's top-k predictions with k its number of true labels (an oracle);
it is not offered as a default.
"""
import torch


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class AP (C,) from scores (N, C) and 0/1 targets (N, C); NaN for classes without positives."""
    scores, targets = scores.double(), targets.double()
    order = torch.argsort(scores, dim=0, descending=True, stable=True)
    sorted_scores = torch.gather(scores, 0, order)
    tp = torch.cumsum(torch.gather(targets, 0, order), dim=0)
    # the last position of each run of tied scores is one threshold
    last_of_tie = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_tie[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    tp_at = torch.where(last_of_tie, tp, 0)
    previous = torch.cat([torch.zeros_like(tp_at[:1]), torch.cummax(tp_at, dim=0).values[:-1]])
    predicted = torch.arange(1, len(scores) + 1, dtype=scores.dtype, device=scores.device)[:, None]
    gained = torch.where(last_of_tie, tp - previous, 0)
    positives = targets.sum(0)
    ap = (gained * tp / predicted).sum(0) / positives
    return torch.where((positives > 0) & scores.isfinite().all(0), ap, float("nan"))


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor):
    """(mAP over classes with positives, number of classes skipped because they have none)."""
    return mean_over_classes_with_positives(average_precision(scores, targets), targets)


def mean_over_classes_with_positives(ap: torch.Tensor, targets: torch.Tensor):
    """(mean of the per-class AP (C,) over the classes with a positive in targets (N, C), number of classes
    skipped for having none). A NaN AP of a class with positives (non-finite scores) makes the mean NaN."""
    valid = targets.sum(0) > 0
    return (ap[valid].mean().item() if valid.any() else float("nan")), int((~valid).sum())


def threshold_scores(probabilities: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> dict:
    """OP, OR, OF1, CP, CR, CF1 (ML-GCN: from CP and CR) and CF1_mean (mean per-class F1) at `threshold`;
    all NaN if any probability is not finite."""
    if not probabilities.isfinite().all():
        return dict.fromkeys(("OP", "OR", "OF1", "CP", "CR", "CF1", "CF1_mean"), float("nan"))
    predicted = probabilities >= threshold
    truth = targets.bool()
    tp = (predicted & truth).sum(0).double()
    n_predicted, n_true = predicted.sum(0).double(), truth.sum(0).double()

    def ratio(a, b):
        return torch.where(b > 0, a / b.clamp(min=1), 0.0)

    def f1(p, r):
        return torch.where(p + r > 0, 2 * p * r / (p + r).clamp(min=1e-300), 0.0)

    op, o_r = ratio(tp.sum(), n_predicted.sum()), ratio(tp.sum(), n_true.sum())
    per_class_p, per_class_r = ratio(tp, n_predicted), ratio(tp, n_true)
    cp, cr = per_class_p.mean(), per_class_r.mean()
    return {"OP": op.item(), "OR": o_r.item(), "OF1": f1(op, o_r).item(), "CP": cp.item(), "CR": cr.item(),
            "CF1": f1(cp, cr).item(), "CF1_mean": f1(per_class_p, per_class_r).mean().item()}
