"""Multi-label classification metrics (plain torch, any device)."""
from fastkd.metrics.multilabel import (average_precision, mean_average_precision, mean_over_classes_with_positives,
                                      threshold_scores)

__all__ = ["average_precision", "mean_average_precision", "mean_over_classes_with_positives", "threshold_scores"]
