"""MS-COCO 2014 as multi-label classification (which of the 80 object categories appear in the image).

Layout (the official zips, extracted): root/annotations/instances_{split}2014.json and root/{split}2014/ with
the images, for split in train, val. Read with pycocotools (pip install pycocotools).

Categories map to contiguous indices 0..K-1 in ascending category id (COCO's ids run 1..90 with gaps);
class_names are the category names. Every annotation counts, iscrowd ones included. Images with no
annotation are kept, with an all-zero target (about 1% of the images).
"""
import contextlib
import io
import os

import torch

from fastkd.data.images import MultiLabelImages

COCO_SPLITS = ("train", "val")


def _load_coco(annotation_path: str):
    try:
        from pycocotools.coco import COCO
    except ImportError as error:
        raise ImportError("COCO2014 reads its annotations with pycocotools: pip install pycocotools") from error
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its loading progress
        return COCO(annotation_path)


class COCO2014(MultiLabelImages):
    """COCO 2014 split as (image (3, S, S), target (80,)); see the module docstring for layout and labels."""

    def __init__(self, root: str | os.PathLike, split: str, image_size: int = 224, augment: bool = False):
        if split not in COCO_SPLITS:
            raise ValueError(f"split must be one of {COCO_SPLITS}, got {split!r}")
        annotation_path = os.path.join(root, "annotations", f"instances_{split}2014.json")
        if not os.path.isfile(annotation_path):
            raise FileNotFoundError(f"COCO annotations not found: {annotation_path}")
        coco = _load_coco(annotation_path)
        category_ids = sorted(coco.getCatIds())
        category_index = {cat: k for k, cat in enumerate(category_ids)}
        image_ids = sorted(coco.getImgIds())
        image_index = {image_id: i for i, image_id in enumerate(image_ids)}
        targets = torch.zeros(len(image_ids), len(category_ids))
        for ann in coco.dataset.get("annotations", []):
            if ann["category_id"] not in category_index or ann["image_id"] not in image_index:
                raise ValueError(f"{annotation_path}: annotation {ann.get('id')} refers to category "
                                 f"{ann['category_id']} / image {ann['image_id']}, not both listed in the file")
            targets[image_index[ann["image_id"]], category_index[ann["category_id"]]] = 1
        paths = [os.path.join(root, f"{split}2014", coco.imgs[i]["file_name"]) for i in image_ids]
        names = [cat["name"] for cat in coco.loadCats(category_ids)]
        super().__init__(paths, targets, names, image_size, augment, "coco2014", split)
        self.image_ids = image_ids
