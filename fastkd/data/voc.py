"""PASCAL VOC 2007 as multi-label classification (20 classes: which object classes appear in the image).

Layout (the official tarballs, extracted): root/VOCdevkit/VOC2007/ or that VOC2007 directory itself, holding
ImageSets/Main/{split}.txt (one image id a line), Annotations/{id}.xml and JPEGImages/{id}.jpg.

Difficult objects (<difficult>1</difficult>) count as positives by default: the object is there, only hard to
detect. skip_difficult=True ignores them (the class is then positive only if a non-difficult object of it
appears), matching the VOC detection evaluation's treatment.
"""
import os
import xml.etree.ElementTree as ET

import torch

from fastkd.data.images import MultiLabelImages

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOC_SPLITS = ("train", "val", "trainval", "test")


def find_voc2007(root: str | os.PathLike) -> str:
    """The VOC2007 directory: root/VOCdevkit/VOC2007 if present, else root itself if it has ImageSets/Main."""
    for candidate in (os.path.join(root, "VOCdevkit", "VOC2007"), os.fspath(root)):
        if os.path.isdir(os.path.join(candidate, "ImageSets", "Main")):
            return candidate
    raise FileNotFoundError(f"root {os.fspath(root)!r} holds neither VOCdevkit/VOC2007/ImageSets/Main nor "
                            f"ImageSets/Main: pass the directory containing VOCdevkit, or VOC2007 itself")


def read_labels(xml_path: str, skip_difficult: bool = False) -> list[int]:
    """Sorted class indices of the objects annotated in one VOC XML file."""
    if not os.path.isfile(xml_path):
        raise FileNotFoundError(f"VOC annotation not found: {xml_path}")
    labels = set()
    for obj in ET.parse(xml_path).getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise ValueError(f"{xml_path}: unknown class name {name!r}, expected one of {VOC_CLASSES}")
        if skip_difficult and (obj.findtext("difficult") or "0").strip() == "1":
            continue
        labels.add(VOC_CLASSES.index(name))
    return sorted(labels)


class VOC2007(MultiLabelImages):
    """VOC 2007 split as (image (3, S, S), target (20,)); see the module docstring for layout and difficult."""

    def __init__(self, root: str | os.PathLike, split: str, image_size: int = 224, augment: bool = False,
                 skip_difficult: bool = False):
        if split not in VOC_SPLITS:
            raise ValueError(f"split must be one of {VOC_SPLITS}, got {split!r}")
        base = find_voc2007(root)
        list_path = os.path.join(base, "ImageSets", "Main", f"{split}.txt")
        if not os.path.isfile(list_path):
            raise FileNotFoundError(f"VOC2007 split list not found: {list_path}")
        with open(list_path) as f:
            ids = [line.strip() for line in f if line.strip()]
        targets = torch.zeros(len(ids), len(VOC_CLASSES))
        for i, image_id in enumerate(ids):
            targets[i, read_labels(os.path.join(base, "Annotations", f"{image_id}.xml"), skip_difficult)] = 1
        paths = [os.path.join(base, "JPEGImages", f"{image_id}.jpg") for image_id in ids]
        super().__init__(paths, targets, list(VOC_CLASSES), image_size, augment, "voc2007", split)
        self.ids = ids
