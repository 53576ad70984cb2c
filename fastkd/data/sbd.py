"""SBD (the Semantic Boundaries Dataset, Hariharan et al. 2011): PASCAL VOC class maps for 11,355 images, the
source of the augmented VOC 2012 training set. Read by torchvision's SBDataset (mode "segmentation"; needs
scipy), never downloaded, from root = benchmark_RELEASE/dataset with img/{id}.jpg, cls/{id}.mat (a struct
GTcls whose field Segmentation is the uint8 (H, W) class map: 0 background, 1-20 the VOC classes, no 255
border), train.txt and val.txt.

`VOCTrainAug(voc_root, sbd_root)`: the usual 10,582-image "train_aug" set = VOC 2012 segmentation train plus
every SBD image (its train and val lists) that is neither in VOC 2012 val nor already in VOC train (those keep
VOC's finer mask, with its 255 borders). Same pairs as VOCSegmentation2012 (scale, pad, crop, flip).
"""
import os
from typing import Iterable

import torch

from fastkd.data.voc_segmentation import VOC_SEG_CLASSES, SegmentationPairs, VOCSegmentation2012

SBD_SPLITS = ("train", "val")


class SBDSegmentation(torch.utils.data.Dataset):
    """The SBD images of `splits` (train.txt, val.txt; an id in both is read once) whose id is not in `exclude`,
    as (image float32 (3, H, W), mask long (H, W))."""

    in_channels, num_classes, ignore_index, class_names = 3, 21, 255, VOC_SEG_CLASSES

    def __init__(self, root: str, splits: Iterable[str] = SBD_SPLITS, crop_size: int = 513, augment: bool = False,
                 exclude: Iterable[str] = ()):
        import torchvision
        splits, exclude = tuple(splits), set(exclude)
        if not splits or any(split not in SBD_SPLITS for split in splits):
            raise ValueError(f"splits must be a non-empty subset of {SBD_SPLITS}, got {splits!r}")
        for split in splits:
            if not os.path.isfile(os.path.join(root, f"{split}.txt")):
                raise FileNotFoundError(f"sbd: {root}/{split}.txt not found (pass the folder "
                                        f"benchmark_RELEASE/dataset that holds img/, cls/, train.txt, val.txt)")
        self.datasets = []
        seen = set(exclude)
        for split in splits:
            dataset = torchvision.datasets.SBDataset(root, image_set=split, mode="segmentation",
                                                     transforms=SegmentationPairs(crop_size, augment))
            keep = [i for i, path in enumerate(dataset.images) if _image_id(path) not in seen]
            seen.update(_image_id(dataset.images[i]) for i in keep)
            dataset.images = [dataset.images[i] for i in keep]
            dataset.masks = [dataset.masks[i] for i in keep]
            self.datasets.append(dataset)
        self.ids = [_image_id(path) for dataset in self.datasets for path in dataset.images]
        missing = [p for dataset in self.datasets for p in dataset.images + dataset.masks if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"sbd: {missing[0]} not found"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        self._joined = torch.utils.data.ConcatDataset(self.datasets)

    def __len__(self):
        return len(self._joined)

    def __getitem__(self, index):
        return self._joined[index]


class VOCTrainAug(torch.utils.data.ConcatDataset):
    """VOC 2012 train + the SBD images outside VOC 2012 train and val (see the module docstring)."""

    in_channels, num_classes, ignore_index, class_names = 3, 21, 255, VOC_SEG_CLASSES

    def __init__(self, voc_root: str, sbd_root: str, crop_size: int = 513, augment: bool = True):
        voc = VOCSegmentation2012(voc_root, "train", crop_size, augment)
        held_out = VOCSegmentation2012(voc_root, "val")
        exclude = [_image_id(p) for p in voc.dataset.images + held_out.dataset.images]
        self.voc, self.sbd = voc, SBDSegmentation(sbd_root, SBD_SPLITS, crop_size, augment, exclude)
        super().__init__([self.voc, self.sbd])


def _image_id(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
