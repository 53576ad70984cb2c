"""Metrics: multi-label classification and semantic segmentation (plain torch, any device); detection (COCOeval,
pycocotools imported when called)."""
from fastkd.metrics.detection import COCO_METRICS, coco_evaluate, detections_to_coco
from fastkd.metrics.multilabel import (average_precision, mean_average_precision, mean_over_classes_with_positives,
                                      threshold_scores)
from fastkd.metrics.segmentation import confusion_matrix, segmentation_scores

__all__ = ["COCO_METRICS", "average_precision", "coco_evaluate", "confusion_matrix", "detections_to_coco",
           "mean_average_precision", "mean_over_classes_with_positives", "segmentation_scores", "threshold_scores"]
