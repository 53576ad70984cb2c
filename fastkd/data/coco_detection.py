"""COCO-format detection data: an instances JSON (read with pycocotools) and its image folder.

Categories map to labels 1..K in ascending category id (torchvision's convention, 0 is background); crowd
annotations and boxes under one pixel wide or high are left out of the training targets (they stay in the
ground truth COCOeval reads). Images are float32 (3, H, W) in [0, 1] at their own size: the detector's
transform resizes them (shorter side, multi-scale in training) and normalises. Training adds a random
horizontal flip. Images without annotations are kept (empty targets), as detectron2 does for evaluation;
pass `drop_empty=True` to skip them in training, as detectron2 does there.
"""
import contextlib
import io
import os

import numpy as np
import torch


def load_coco(annotation_path: str):
    try:
        from pycocotools.coco import COCO
    except ImportError as error:
        raise ImportError("COCO-format detection reads its annotations with pycocotools: pip install pycocotools") \
            from error
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its loading progress
        return COCO(annotation_path)


class COCODetection(torch.utils.data.Dataset):
    """(image (3, H, W) in [0, 1], target {"boxes" (k, 4) x1 y1 x2 y2, "labels" (k,) in 1..K, "image_id"})."""

    in_channels = 3

    def __init__(self, annotation_path: str, image_dir: str, augment: bool = False, drop_empty: bool = False):
        if not os.path.isfile(annotation_path):
            raise FileNotFoundError(f"COCO annotations not found: {annotation_path}")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"COCO image folder not found: {image_dir}")
        self.coco = load_coco(annotation_path)
        self.annotation_path, self.image_dir, self.augment = annotation_path, image_dir, augment
        self.category_ids = sorted(self.coco.getCatIds())
        self.label_of = {cat: k + 1 for k, cat in enumerate(self.category_ids)}
        self.class_names = [c["name"] for c in self.coco.loadCats(self.category_ids)]
        self.num_classes = len(self.category_ids)
        ids = sorted(self.coco.getImgIds())
        if drop_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))]
        self.image_ids = ids
        missing = [i for i in ids if not os.path.isfile(self._path(i))]
        if missing:
            raise FileNotFoundError(f"{annotation_path}: image {self._path(missing[0])} not found"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    def _path(self, image_id: int) -> str:
        return os.path.join(self.image_dir, self.coco.imgs[image_id]["file_name"])

    def __len__(self):
        return len(self.image_ids)

    def target(self, image_id: int) -> dict:
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            if ann.get("iscrowd", 0) or w < 1 or h < 1:
                continue
            if ann["category_id"] not in self.label_of:
                raise ValueError(f"{self.annotation_path}: annotation {ann.get('id')} has category "
                                 f"{ann['category_id']}, not listed in the file's categories")
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of[ann["category_id"]])
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64), "image_id": torch.tensor(image_id)}

    def __getitem__(self, index: int):
        from PIL import Image  # only the real-data path needs Pillow
        image_id = self.image_ids[index]
        with Image.open(self._path(image_id)) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
        target = self.target(image_id)
        if self.augment and torch.rand(()) < 0.5:
            width = image.shape[-1]
            image = image.flip(-1)
            target["boxes"] = torch.stack([width - target["boxes"][:, 2], target["boxes"][:, 1],
                                           width - target["boxes"][:, 0], target["boxes"][:, 3]], 1)
        return image, target

    def coco_ground_truth(self) -> dict:
        """The annotation file's contents (COCOeval's ground truth)."""
        return self.coco.dataset
