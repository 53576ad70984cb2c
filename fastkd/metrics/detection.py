"""COCO-style detection metrics with pycocotools' COCOeval (bbox): AP (IoU 0.5:0.95), AP50, AP75, APs, APm,
APl, in percent; -1 where COCOeval has nothing to measure (e.g. no small objects)."""
import contextlib
import copy
import io
from typing import Dict, List

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(detections: List[dict], image_ids: List[int], category_ids: List[int]) -> List[dict]:
    """COCO result rows [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}] from a detector's outputs
    (per image: "boxes" (n, 4) x1 y1 x2 y2, "scores" (n,), "labels" (n,) in 1..K, label l -> category_ids[l - 1])."""
    rows = []
    for image_id, out in zip(image_ids, detections):
        for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
            if not 1 <= label <= len(category_ids):
                continue  # the background slot of a K + 1-way head never wins in torchvision, but be safe
            rows.append({"image_id": int(image_id), "category_id": category_ids[label - 1],
                         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)})
    return rows


def coco_evaluate(ground_truth: dict, results: List[dict]) -> Dict[str, float]:
    """COCOeval(iouType="bbox") of result rows against a COCO instances dict; {metric: percent}. No result rows
    gives 0 AP everywhere (pycocotools cannot load an empty result list)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    if not results:
        return {name: 0.0 for name in COCO_METRICS}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.dataset.setdefault("info", {})
        gt.dataset.setdefault("licenses", [])
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (100 * float(v) if v >= 0 else -1.0) for name, v in zip(COCO_METRICS, evaluator.stats[:6])}
