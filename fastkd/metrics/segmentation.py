"""Semantic segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy."""
import torch


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted class, over pixels whose target is not
    ignore_index. predictions and targets: integer tensors of the same shape."""
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions and targets must have the same shape, got {tuple(predictions.shape)} and "
                         f"{tuple(targets.shape)}")
    keep = targets != ignore_index
    truth, predicted = targets[keep].long(), predictions[keep].long()
    if truth.numel() and (truth.min() < 0 or truth.max() >= num_classes):
        raise ValueError(f"targets must be in [0, {num_classes}) or {ignore_index}, got values in "
                         f"[{truth.min().item()}, {truth.max().item()}]")
    return torch.bincount(truth * num_classes + predicted, minlength=num_classes ** 2).reshape(num_classes,
                                                                                               num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict:
    """{"mIoU", "pixel_acc", "IoU_per_class"} in %, from a (K, K) confusion matrix. A class absent from both the
    targets and the predictions has IoU None and is left out of the mean."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
    present = ~iou.isnan()
    total = confusion.sum()
    return {"mIoU": 100 * iou[present].mean().item() if present.any() else float("nan"),
            "pixel_acc": 100 * (true_positive.sum() / total).item() if total > 0 else float("nan"),
            "IoU_per_class": [None if v != v else 100 * v for v in iou.tolist()]}
