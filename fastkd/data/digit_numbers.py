"""Built-in data for the TaT recipes, composed from scikit-learn's handwritten digits (no download).

Classification (`TwoDigitNumbers`): 55 classes, the unordered pairs {a, b} of digits (a <= b; "00" to "99"). A
canvas shows the pair's two digits side by side in a random order, each a real 8x8 digit image scaled to a
random size and jittered, plus smaller distractor digits anywhere (they do not count), random strokes and
Gaussian noise. (Unordered: a classifier that averages its last feature map over space hardly sees which digit
is left; the pair is what it must recognise.) Segmentation
(`DigitSegmentation`): canvases holding 1-4 digits at random places and sizes over the same clutter, with a
per-pixel class mask: 0 background, 1 + d for the pixels of a digit d (where its ink exceeds `ink`; a later
digit covers an earlier one); `distractors` smaller digits, drawn first, stay background (a model must tell
them from the labelled digits by their size). Both draw every digit image from one split of the 1797 source images
(`source_splits`: train/val/test disjoint), so no source digit appears in two splits, and both are
deterministic functions of (split, size, config, seed).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastkd.data.digit_canvases import SPLITS, _add_strokes, _digits, source_splits

NUM_NUMBERS = 55
PAIRS = tuple((a, b) for a in range(10) for b in range(a, 10))  # class index -> digit pair
SEGMENTATION_CLASSES = 11  # background + digits 0-9


@dataclass(frozen=True)
class NumberCanvasConfig:
    size: int = 24                   # canvas side in pixels
    digit_sizes: tuple = (9, 12)     # side of each of the pair's two digits, inclusive range
    jitter: int = 2                  # random vertical / horizontal offset of each digit, pixels
    distractors: int = 2             # smaller digits placed anywhere, not part of the label
    distractor_sizes: tuple = (4, 6)
    strokes: int = 3                 # background clutter: random line segments
    noise: float = 0.2               # std of the Gaussian pixel noise


@dataclass(frozen=True)
class SegmentationCanvasConfig:
    size: int = 32
    min_digits: int = 1
    max_digits: int = 3
    digit_sizes: tuple = (10, 18)
    strokes: int = 4
    noise: float = 0.2
    ink: float = 0.3                 # a digit's pixel belongs to it where its (resized) ink exceeds this
    distractors: int = 0             # smaller digits drawn first, under the others, and labelled background
    distractor_sizes: tuple = (5, 8)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _pools(split: str, seed: int):
    images, labels = _digits()
    pool = source_splits(seed)[split]
    return _Resized(images), [pool[labels[pool] == c] for c in range(10)]


class _Resized(dict):
    """side -> every source image resized to (side, side), computed once per side."""

    def __init__(self, images):
        super().__init__()
        self.images = images

    def __missing__(self, side: int):
        self[side] = F.interpolate(self.images[:, None], size=(side, side), mode="bilinear",
                                   align_corners=False)[:, 0].clamp(0, 1)
        return self[side]


def _draw(images: _Resized, by_class, digit: int, side: int, gen):
    source = int(by_class[digit][torch.randint(len(by_class[digit]), (), generator=gen)])
    return images[side][source], source


def _randint(low: int, high: int, gen) -> int:
    """An integer in [low, high], inclusive."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def _add_distractors(canvas: torch.Tensor, gen, config, images: _Resized, by_class) -> None:
    """Draw config.distractors digits of random class, side in config.distractor_sizes (at most the canvas) and
    place onto canvas (S, S) in place (pixel-wise max); they are part of no label."""
    size = canvas.shape[-1]
    for _ in range(config.distractors):
        side = min(_randint(*config.distractor_sizes, gen), size)
        digit, _ = _draw(images, by_class, _randint(0, 9, gen), side, gen)
        y, x = _randint(0, size - side, gen), _randint(0, size - side, gen)
        canvas[y:y + side, x:x + side] = torch.maximum(canvas[y:y + side, x:x + side], digit)


def generate_numbers(split: str, num_samples: int, config: NumberCanvasConfig = NumberCanvasConfig(),
                     seed: int = 0):
    """(images (n, 1, S, S) float32, labels (n,) long in [0, 55) (PAIRS[label] = the digits), sources (n, 2)
    long: the source image of the left and the right digit). Labels are balanced: sample i has label
    (i + offset) % 55 with a seeded offset, then the order is shuffled."""
    _check_split(split)
    images, by_class = _pools(split, seed)
    gen = torch.Generator().manual_seed(seed * 1000 + 100 + SPLITS.index(split))
    size, half = config.size, config.size // 2
    labels = (torch.arange(num_samples) + int(torch.randint(NUM_NUMBERS, (), generator=gen))) % NUM_NUMBERS
    labels = labels[torch.randperm(num_samples, generator=gen)]
    canvases = torch.zeros(num_samples, size, size)
    sources = torch.zeros(num_samples, 2, dtype=torch.long)
    for i in range(num_samples):
        canvas = canvases[i]
        _add_strokes(canvas, gen, config)
        _add_distractors(canvas, gen, config, images, by_class)
        pair = PAIRS[int(labels[i])]
        if torch.rand((), generator=gen) < 0.5:
            pair = pair[::-1]
        for slot, digit_class in enumerate(pair):
            side = min(_randint(*config.digit_sizes, gen), half + config.jitter, size)
            digit, sources[i, slot] = _draw(images, by_class, digit_class, side, gen)
            x0 = slot * half + (half - side) // 2
            x = min(max(x0 + _randint(-config.jitter, config.jitter, gen), 0), size - side)
            y = min(max((size - side) // 2 + _randint(-config.jitter, config.jitter, gen), 0), size - side)
            canvas[y:y + side, x:x + side] = torch.maximum(canvas[y:y + side, x:x + side], digit)
    canvases += config.noise * torch.randn(canvases.shape, generator=gen)
    return canvases[:, None], labels, sources


def generate_segmentation(split: str, num_samples: int,
                          config: SegmentationCanvasConfig = SegmentationCanvasConfig(), seed: int = 0):
    """(images (n, 1, S, S) float32, masks (n, S, S) long in [0, 11), sources (n, max_digits) long, -1 for none)."""
    _check_split(split)
    images, by_class = _pools(split, seed)
    gen = torch.Generator().manual_seed(seed * 1000 + 200 + SPLITS.index(split))
    size = config.size
    canvases = torch.zeros(num_samples, size, size)
    masks = torch.zeros(num_samples, size, size, dtype=torch.long)
    sources = torch.full((num_samples, config.max_digits), -1, dtype=torch.long)
    for i in range(num_samples):
        canvas = canvases[i]
        _add_strokes(canvas, gen, config)
        _add_distractors(canvas, gen, config, images, by_class)
        for slot in range(_randint(config.min_digits, config.max_digits, gen)):
            digit_class = _randint(0, 9, gen)
            side = min(_randint(*config.digit_sizes, gen), size)
            digit, sources[i, slot] = _draw(images, by_class, digit_class, side, gen)
            y, x = _randint(0, size - side, gen), _randint(0, size - side, gen)
            canvas[y:y + side, x:x + side] = torch.maximum(canvas[y:y + side, x:x + side], digit)
            window = masks[i, y:y + side, x:x + side]
            window[digit > config.ink] = 1 + digit_class
    canvases += config.noise * torch.randn(canvases.shape, generator=gen)
    return canvases[:, None], masks, sources


class TwoDigitNumbers(torch.utils.data.Dataset):
    """generate_numbers as a Dataset of (image (1, S, S), label long)."""

    in_channels, num_classes = 1, NUM_NUMBERS

    def __init__(self, split: str, num_samples: int, config: NumberCanvasConfig = NumberCanvasConfig(),
                 seed: int = 0):
        self.images, self.targets, self.sources = generate_numbers(split, num_samples, config, seed)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


class DigitSegmentation(torch.utils.data.Dataset):
    """generate_segmentation as a Dataset of (image (1, S, S), mask (S, S) long)."""

    in_channels, num_classes, ignore_index = 1, SEGMENTATION_CLASSES, 255
    class_names = ("background", *(str(d) for d in range(10)))

    def __init__(self, split: str, num_samples: int,
                 config: SegmentationCanvasConfig = SegmentationCanvasConfig(), seed: int = 0):
        self.images, self.masks, self.sources = generate_segmentation(split, num_samples, config, seed)

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, index):
        return self.images[index], self.masks[index]
