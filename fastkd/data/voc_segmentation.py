"""PASCAL VOC 2012 semantic segmentation (21 classes: background + 20; boundary pixels 255 = ignored), read by
torchvision's VOCSegmentation from the standard layout, never downloaded: root/VOCdevkit/VOC2012/ with
ImageSets/Segmentation/{train,val,trainval}.txt, JPEGImages/{id}.jpg and SegmentationClass/{id}.png (palette
PNGs whose indices are the classes). SBD (the augmented training set) is read by fastkd.data.sbd.

Training pairs: random scale in [0.5, 2], padding (image 0 after normalisation, mask 255) up to the crop, random
crop `crop_size`, random horizontal flip. Evaluation pairs: the whole image (evaluate with batch size 1).
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from fastkd.data.images import IMAGENET_MEAN, IMAGENET_STD

VOC_SEG_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor")
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


class SegmentationPairs:
    """The joint transform: PIL image and palette mask -> (float32 (3, H, W), long (H, W))."""

    def __init__(self, crop_size: int, augment: bool):
        self.crop_size, self.augment = crop_size, augment

    def __call__(self, image, mask):
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        image = (pixels.float() / 255.0 - _MEAN) / _STD
        mask = torch.from_numpy(np.asarray(mask, dtype=np.uint8).astype(np.int64))
        if not self.augment:
            return image, mask
        scale = 0.5 + 1.5 * torch.rand(()).item()  # torch's RNG: what a checkpoint saves
        size = [max(1, round(s * scale)) for s in mask.shape]
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        crop = self.crop_size
        pad_h, pad_w = max(crop - size[0], 0), max(crop - size[1], 0)
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=255)
        y = int(torch.randint(mask.shape[0] - crop + 1, ()))
        x = int(torch.randint(mask.shape[1] - crop + 1, ()))
        image, mask = image[:, y:y + crop, x:x + crop], mask[y:y + crop, x:x + crop]
        if torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


class VOCSegmentation2012(torch.utils.data.Dataset):
    """VOC 2012 segmentation split as (image float32 (3, H, W), mask long (H, W))."""

    in_channels, num_classes, ignore_index, class_names = 3, 21, 255, VOC_SEG_CLASSES

    def __init__(self, root: str, split: str, crop_size: int = 513, augment: bool = False):
        if split not in ("train", "val", "trainval"):
            raise ValueError(f"split must be train, val or trainval, got {split!r}")
        base = os.path.join(root, "VOCdevkit", "VOC2012")
        if not os.path.isfile(os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt")):
            raise FileNotFoundError(f"voc2012: {base}/ImageSets/Segmentation/{split}.txt not found (pass the "
                                    f"directory that holds VOCdevkit/VOC2012)")
        import torchvision
        self.dataset = torchvision.datasets.VOCSegmentation(root, year="2012", image_set=split, download=False,
                                                            transforms=SegmentationPairs(crop_size, augment))
        missing = [p for p in self.dataset.images + self.dataset.masks if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"voc2012 {split}: {missing[0]} not found"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]
