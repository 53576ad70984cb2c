"""Digits on fixed slots: the canvas is cut into a g x g grid of cells; each of the canvas's digits takes its own
cell (drawn at random among the g^2), centred in it with a uniform jitter of up to `jitter` px per axis (clamped
to the canvas). digit_canvases.place_digits draws strokes, classes and digits as for random positions and takes
the positions from here, so the labels, the co-occurrence prior and the split of the source digits are the
same."""
import torch


def check_grid(config) -> None:
    """ValueError unless config's grid can hold max_digits digits, one a cell."""
    if config.grid < 0:
        raise ValueError(f"grid must be >= 0 (0 = random positions), got {config.grid}")
    if config.grid and config.max_digits > config.grid ** 2:
        raise ValueError(f"max_digits {config.max_digits} needs a grid of at least that many cells, got "
                         f"{config.grid} x {config.grid}")
    if config.jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {config.jitter}")


def grid_cells(gen: torch.Generator, config, count: int) -> list:
    """`count` distinct cells of config's grid, drawn at random (cell i = row i // g, column i % g)."""
    return torch.randperm(config.grid * config.grid, generator=gen)[:count].tolist()


def grid_position(cell: int, side: int, gen: torch.Generator, config) -> tuple:
    """(y, x) of a digit of side `side` in `cell`: the cell's centre - side / 2 + U{-jitter..jitter} on each axis,
    clamped to the canvas."""
    size, grid = config.size, config.grid
    shift = torch.randint(-config.jitter, config.jitter + 1, (2,), generator=gen).tolist()
    return tuple(min(max(round((i + 0.5) * size / grid - side / 2) + s, 0), size - side)
                 for i, s in zip(divmod(cell, grid), shift))
