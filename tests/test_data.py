"""Built-in digit canvases: deterministic, labels right, no source digit shared between splits."""
import pytest
import torch

pytest.importorskip("sklearn")
from fastkd.data import CanvasConfig, DigitCanvases, generate_canvases, source_splits  # noqa: E402
from fastkd.data.digit_canvases import _digits, place_digits  # noqa: E402

GRID = CanvasConfig(size=48, digit_sizes=(18, 24), grid=2)  # the mltr recipe's canvases


def test_source_splits_are_disjoint_and_cover_all_digits():
    splits = source_splits(seed=3)
    sets = [set(v.tolist()) for v in splits.values()]
    assert sum(len(s) for s in sets) == 1797 and len(set().union(*sets)) == 1797


@pytest.mark.parametrize("config", [CanvasConfig(), GRID], ids=["random", "grid"])
def test_generation_is_deterministic_and_seeded(config):
    a = generate_canvases("val", 20, config, seed=1)
    b = generate_canvases("val", 20, config, seed=1)
    c = generate_canvases("val", 20, config, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("config", [CanvasConfig(), GRID], ids=["random", "grid"])
def test_canvases_use_only_their_split_and_labels_match_their_digits(config):
    from sklearn.datasets import load_digits
    digit_labels = torch.tensor(load_digits().target)
    splits = source_splits(seed=0)
    for split in ("train", "test"):
        images, targets, sources = generate_canvases(split, 50, config, seed=0)
        used = sources[sources >= 0]
        assert set(used.tolist()) <= set(splits[split].tolist())
        for i in range(50):
            placed = sources[i][sources[i] >= 0]
            expected = torch.zeros(10, dtype=torch.bool)
            expected[digit_labels[placed]] = True
            assert torch.equal(targets[i], expected)
        assert images.shape == (50, 1, 48, 48) and 1 <= targets.sum(1).min() and targets.sum(1).max() <= 4


def test_dataset_and_config():
    data = DigitCanvases("train", 8, CanvasConfig(size=32, digit_sizes=(8, 12), max_digits=2))
    image, target = data[3]
    assert image.shape == (1, 32, 32) and target.shape == (10,) and len(data) == 8
    with pytest.raises(ValueError, match="split must be one of"):
        generate_canvases("dev", 1)
    with pytest.raises(ValueError, match="max_digits 4 needs a grid of at least that many cells"):
        generate_canvases("train", 1, CanvasConfig(grid=1))
    assert CanvasConfig().grid == 0  # L2D's canvases keep random positions


def test_grid_puts_each_digit_in_its_own_cell():
    images, labels = _digits()
    by_class = [torch.arange(len(labels))[labels == c] for c in range(10)]
    config = CanvasConfig(size=48, digit_sizes=(16, 24), grid=2, jitter=0, strokes=0)  # a digit fits its cell
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        canvas = torch.zeros(48, 48)
        placed = place_digits(canvas, gen, config, images, by_class)
        cells = [(x1 // 24, y1 // 24) for _, _, (x1, y1, x2, y2) in placed]
        assert all((x2 - 1) // 24 == cx and (y2 - 1) // 24 == cy
                   for (cx, cy), (_, _, (x1, y1, x2, y2)) in zip(cells, placed))  # the ink stays in one cell
        assert len(set(cells)) == len(placed) and 1 <= len(placed) <= 4  # one digit a cell
        assert len({c for c, _, _ in placed}) == len(placed)  # distinct classes
