"""Datasets for the reference training recipes: built-in digit canvases, and real multi-label image datasets
on local disk (VOC2007, COCO2014, generic image lists) opened by name with open_dataset."""
import os

from fastkd.data.coco import COCO2014
from fastkd.data.digit_canvases import CanvasConfig, DigitCanvases, generate_canvases, source_splits
from fastkd.data.image_list import ImageList
from fastkd.data.images import MultiLabelImages
from fastkd.data.voc import VOC2007

DATASETS = {"voc2007": VOC2007, "coco2014": COCO2014, "image-list": ImageList}


def open_dataset(name: str, root: str | os.PathLike, split: str, image_size: int = 224,
                 augment: bool = False) -> MultiLabelImages:
    """The real dataset `name` (one of DATASETS) under root, split `split`."""
    if name not in DATASETS:
        raise ValueError(f"dataset name must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name](root, split, image_size=image_size, augment=augment)


__all__ = ["COCO2014", "CanvasConfig", "DATASETS", "DigitCanvases", "ImageList", "MultiLabelImages", "VOC2007",
           "generate_canvases", "open_dataset", "source_splits"]
