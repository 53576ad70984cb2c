"""Digits on fixed slots: the canvas is cut into a g x g grid of cells; each of the canvas's digits takes its own
cell (drawn at random among the g^2), centred in it with a uniform jitter of up to `jitter` px per axis (clamped
to the canvas). Strokes and classes are drawn as for random positions (digit_canvases.place_digits), so the
labels, the co-occurrence prior and the split of the source digits are the same."""
import torch
import torch.nn.functional as F

INK = 0.1  # as digit_canvases.INK: a digit pixel above this value is ink


def check_grid(config) -> None:
    """ValueError unless config's grid can hold max_digits digits, one a cell."""
    if config.grid < 0:
        raise ValueError(f"grid must be >= 0 (0 = random positions), got {config.grid}")
    if config.grid and config.max_digits > config.grid ** 2:
        raise ValueError(f"max_digits {config.max_digits} needs a grid of at least that many cells, got "
                         f"{config.grid} x {config.grid}")
    if config.jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {config.jitter}")


def place_digits_on_grid(canvas: torch.Tensor, gen: torch.Generator, config, images: torch.Tensor, by_class: list,
                         classes: list) -> list:
    """Draw `classes` (one digit each, after the canvas's strokes) into distinct cells of canvas (S, S) in place;
    [(class, source image index, box (x1, y1, x2, y2) of the digit's ink)] in drawing order. A digit of side d
    in cell (r, c) of side S / g starts at the cell's centre - d / 2 + U{-jitter..jitter} on each axis."""
    size, grid = config.size, config.grid
    cells = torch.randperm(grid * grid, generator=gen)[:len(classes)].tolist()
    placed = []
    for c, cell in zip(classes, cells):
        source = int(by_class[c][torch.randint(len(by_class[c]), (), generator=gen)])
        side = int(torch.randint(config.digit_sizes[0], config.digit_sizes[1] + 1, (), generator=gen))
        digit = F.interpolate(images[source][None, None], size=(side, side), mode="bilinear",
                              align_corners=False)[0, 0]
        shift = torch.randint(-config.jitter, config.jitter + 1, (2,), generator=gen).tolist()
        y, x = (min(max(round((i + 0.5) * size / grid - side / 2) + s, 0), size - side)
                for i, s in zip(divmod(cell, grid), shift))
        canvas[y:y + side, x:x + side] = torch.maximum(canvas[y:y + side, x:x + side], digit)
        rows, cols = (digit > INK).any(1).nonzero()[:, 0], (digit > INK).any(0).nonzero()[:, 0]
        box = (x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1) if len(rows) else (
            x, y, x + side, y + side)
        placed.append((c, source, box))
    return placed
