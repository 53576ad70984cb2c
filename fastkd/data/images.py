"""Shared image loading for the real multi-label datasets (VOC2007, COCO2014, image lists).

load_image: PIL open -> RGB -> bilinear resize to (S, S) -> float32 (3, S, S) normalised with the ImageNet
mean/std, optionally with a random horizontal flip (torch's global RNG) for training.
MultiLabelImages: the Dataset the loaders share, over a list of image paths and a (n, K) 0/1 target matrix
built up front (no image is decoded until indexed).
"""
import os

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def load_image(path: str | os.PathLike, image_size: int, augment: bool = False) -> torch.Tensor:
    """The image at path as float32 (3, image_size, image_size), ImageNet-normalised; flipped left-right with
    probability 1/2 when augment."""
    from PIL import Image  # imported here so that fastkd.data (digit canvases) does not need Pillow
    with Image.open(path) as image:
        image = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    out = (pixels.float() / 255.0 - _MEAN) / _STD
    if augment and torch.rand(()) < 0.5:
        out = out.flip(-1)
    return out


class MultiLabelImages(torch.utils.data.Dataset):
    """(image float32 (3, S, S), target float32 (K,)) over image paths and their 0/1 targets (n, K).

    Every path is checked to exist at construction, so a missing file fails here rather than mid-epoch."""

    in_channels = 3

    def __init__(self, paths: list[str], targets: torch.Tensor, class_names: list[str], image_size: int,
                 augment: bool, name: str, split: str):
        if targets.shape != (len(paths), len(class_names)):
            raise ValueError(f"{name}: targets must be (n images, n classes) = ({len(paths)}, {len(class_names)}), "
                             f"got {tuple(targets.shape)}")
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{name} {split}: image not found: {missing[0]}"
                                    + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""))
        self.paths = paths
        self.targets = targets.float()
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.image_size = check_image_size(image_size)
        self.augment = augment
        self.name, self.split = name, split

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return load_image(self.paths[index], self.image_size, self.augment), self.targets[index]

    def describe(self) -> str:
        mean = self.targets.sum(1).mean().item() if len(self) else 0.0
        return (f"{self.name} {self.split}: {len(self)} images, {self.num_classes} classes, "
                f"{mean:.2f} labels/image")
