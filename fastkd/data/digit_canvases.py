"""Built-in multi-label data: canvases composed from scikit-learn's handwritten digits (no download).

Each canvas holds 1-4 distinct digit classes (labels: which of the 10 classes appear), each drawn from a
real 8x8 digit image, scaled to a random size and placed at a random position (overlaps allowed; or, with
grid g > 0, each in its own cell of a g x g grid, centred with a small jitter: digit_grid.py), over
background strokes and Gaussian noise. A label co-occurrence prior makes some classes appear together
(class c's partner is (3c + 1) mod 10). The 1797 source digit images are split into train/val/test once,
so no digit image appears in two splits. Everything is a deterministic function of the seed.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastkd.data.digit_grid import check_grid, grid_cells, grid_position

NUM_CLASSES = 10
SPLITS = ("train", "val", "test")
INK = 0.1  # a digit pixel above this value is ink (the box of a placed digit bounds its ink)


@dataclass(frozen=True)
class CanvasConfig:
    size: int = 48                   # canvas side in pixels
    min_digits: int = 1
    max_digits: int = 4
    digit_sizes: tuple = (12, 22)    # side of a placed digit, inclusive range
    strokes: int = 3                 # background clutter: short random line segments
    noise: float = 0.15              # std of the Gaussian pixel noise
    cooccurrence: float = 0.5        # chance the next class is the partner of one already present
    grid: int = 0                    # 0: random positions; g: a g x g grid of cells, one digit a cell (digit_grid)
    jitter: int = 2                  # grid only: max shift (px, each axis) of a digit from its cell's centre


def _digits():
    from sklearn.datasets import load_digits  # ships its images with scikit-learn
    digits = load_digits()
    return torch.tensor(digits.images, dtype=torch.float32) / 16.0, torch.tensor(digits.target)


def source_splits(seed: int = 0, fractions=(0.6, 0.2, 0.2)) -> dict:
    """Disjoint index sets of the source digit images per split (a seeded permutation, cut by fractions)."""
    n = len(_digits()[1])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cuts = [0, round(fractions[0] * n), round((fractions[0] + fractions[1]) * n), n]
    return {name: order[cuts[i]:cuts[i + 1]] for i, name in enumerate(SPLITS)}


def _draw_classes(gen, config):
    count = int(torch.randint(config.min_digits, config.max_digits + 1, (), generator=gen))
    classes = [int(torch.randint(NUM_CLASSES, (), generator=gen))]
    while len(classes) < count:
        if torch.rand((), generator=gen) < config.cooccurrence:
            candidate = (3 * classes[int(torch.randint(len(classes), (), generator=gen))] + 1) % NUM_CLASSES
        else:
            candidate = int(torch.randint(NUM_CLASSES, (), generator=gen))
        if candidate not in classes:
            classes.append(candidate)
    return classes


def _add_strokes(canvas, gen, config):
    size = config.size
    for _ in range(config.strokes):
        start, end = torch.rand(2, 2, generator=gen) * (size - 1)
        points = start + torch.linspace(0, 1, 2 * size)[:, None] * (end - start)
        y, x = points.round().long().unbind(1)
        canvas[y, x] = torch.maximum(canvas[y, x], 0.3 + 0.5 * torch.rand((), generator=gen))


def generate_canvases(split: str, num_samples: int, config: CanvasConfig = CanvasConfig(), seed: int = 0):
    """(images (n, 1, S, S) float32 in about [0, 1], targets (n, 10) bool, sources (n, max_digits) long with
    the source image index of each placed digit, -1 for none)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_grid(config)
    images, labels = _digits()
    pool = source_splits(seed)[split]
    by_class = [pool[labels[pool] == c] for c in range(NUM_CLASSES)]
    gen = torch.Generator().manual_seed(seed * 1000 + SPLITS.index(split))
    canvases = torch.zeros(num_samples, config.size, config.size)
    targets = torch.zeros(num_samples, NUM_CLASSES, dtype=torch.bool)
    sources = torch.full((num_samples, config.max_digits), -1, dtype=torch.long)
    for i in range(num_samples):
        for slot, (c, source, _) in enumerate(place_digits(canvases[i], gen, config, images, by_class)):
            targets[i, c] = True
            sources[i, slot] = source
    canvases += config.noise * torch.randn(canvases.shape, generator=gen)
    return canvases[:, None], targets, sources


def place_digits(canvas: torch.Tensor, gen: torch.Generator, config, images: torch.Tensor, by_class: list) -> list:
    """Draw the background strokes and the digits of one canvas (S, S) in place; [(class, source image index,
    box (x1, y1, x2, y2) of the digit's ink in pixel edges)] per placed digit, in drawing order. `config` needs
    size, digit_sizes, strokes, min/max_digits and cooccurrence (CanvasConfig or alike); a config with grid > 0
    puts the digits on the grid's cells instead of random positions (digit_grid)."""
    _add_strokes(canvas, gen, config)
    classes = _draw_classes(gen, config)
    cells = grid_cells(gen, config, len(classes)) if getattr(config, "grid", 0) else None
    placed = []
    for i, c in enumerate(classes):
        source = int(by_class[c][torch.randint(len(by_class[c]), (), generator=gen)])
        side = int(torch.randint(config.digit_sizes[0], config.digit_sizes[1] + 1, (), generator=gen))
        digit = F.interpolate(images[source][None, None], size=(side, side), mode="bilinear",
                              align_corners=False)[0, 0]
        if cells is None:
            y, x = torch.randint(config.size - side + 1, (2,), generator=gen).tolist()
        else:
            y, x = grid_position(cells[i], side, gen, config)
        canvas[y:y + side, x:x + side] = torch.maximum(canvas[y:y + side, x:x + side], digit)
        rows, cols = (digit > INK).any(1).nonzero()[:, 0], (digit > INK).any(0).nonzero()[:, 0]
        box = (x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1) if len(rows) else (
            x, y, x + side, y + side)
        placed.append((c, source, box))
    return placed


class DigitCanvases(torch.utils.data.Dataset):
    """generate_canvases as a Dataset of (image (1, S, S), target (10,) float)."""

    in_channels, num_classes = 1, NUM_CLASSES

    def __init__(self, split: str, num_samples: int, config: CanvasConfig = CanvasConfig(), seed: int = 0):
        self.images, targets, self.sources = generate_canvases(split, num_samples, config, seed)
        self.targets = targets.float()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]
