"""Built-in detection data: canvases of scikit-learn's handwritten digits with one box per placed digit.

Each canvas (1, S, S) holds 1-4 digits of distinct classes, each a real 8x8 digit image scaled to a random
size and placed at a random position (overlaps allowed) over background strokes and Gaussian noise; its box
bounds the digit's ink (pixel edges x1 y1 x2 y2), its label is the digit + 1 (torchvision numbers classes
1..K, 0 is background). The source digit images are split into train/val/test once (digit_canvases.
source_splits), so no digit image appears in two splits. Deterministic in the seed. `coco_ground_truth()`
writes the split as a COCO instances dict for pycocotools' COCOeval.
"""
from dataclasses import dataclass

import torch

from fastkd.data.digit_canvases import NUM_CLASSES, SPLITS, _digits, place_digits, source_splits


@dataclass(frozen=True)
class DetectionCanvasConfig:
    size: int = 96                   # canvas side in pixels
    min_digits: int = 1
    max_digits: int = 4
    digit_sizes: tuple = (16, 40)    # side of a placed digit (before the ink box is taken), inclusive range
    strokes: int = 3                 # background clutter: short random line segments
    noise: float = 0.15              # std of the Gaussian pixel noise
    cooccurrence: float = 0.5        # chance the next class is the partner of one already present


def generate_detection_canvases(split: str, num_samples: int, config: DetectionCanvasConfig = DetectionCanvasConfig(),
                                seed: int = 0):
    """(images (n, 1, S, S) float32, targets [{"boxes": (k, 4) float32, "labels": (k,) int64 in 1..10}],
    sources [list of source digit indices per canvas])."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if config.digit_sizes[1] > config.size:
        raise ValueError(f"digit_sizes {config.digit_sizes} must fit the canvas size {config.size}")
    images, labels = _digits()
    pool = source_splits(seed)[split]
    by_class = [pool[labels[pool] == c] for c in range(NUM_CLASSES)]
    gen = torch.Generator().manual_seed(seed * 1000 + 100 + SPLITS.index(split))
    canvases = torch.zeros(num_samples, config.size, config.size)
    targets, sources = [], []
    for i in range(num_samples):
        placed = place_digits(canvases[i], gen, config, images, by_class)
        targets.append({"boxes": torch.tensor([box for _, _, box in placed], dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor([c + 1 for c, _, _ in placed], dtype=torch.int64)})
        sources.append([source for _, source, _ in placed])
    canvases += config.noise * torch.randn(canvases.shape, generator=gen)
    return canvases[:, None], targets, sources


class DigitDetection(torch.utils.data.Dataset):
    """generate_detection_canvases as a Dataset of (image (1, S, S), target dict); image ids are 1..n."""

    in_channels, num_classes = 1, NUM_CLASSES
    class_names = [str(d) for d in range(NUM_CLASSES)]

    def __init__(self, split: str, num_samples: int, config: DetectionCanvasConfig = DetectionCanvasConfig(),
                 seed: int = 0):
        self.images, self.targets, self.sources = generate_detection_canvases(split, num_samples, config, seed)
        self.image_ids = list(range(1, num_samples + 1))
        self.category_ids = list(range(1, NUM_CLASSES + 1))  # label l is COCO category category_ids[l - 1]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], {**self.targets[index], "image_id": torch.tensor(self.image_ids[index])}

    def coco_ground_truth(self) -> dict:
        """The split as a COCO instances dict (boxes as x, y, w, h; area = w h; no crowd)."""
        size = self.images.shape[-1]
        annotations = []
        for image_id, target in zip(self.image_ids, self.targets):
            for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                    "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        return {"images": [{"id": i, "width": size, "height": size} for i in self.image_ids],
                "annotations": annotations,
                "categories": [{"id": c, "name": n} for c, n in zip(self.category_ids, self.class_names)]}
