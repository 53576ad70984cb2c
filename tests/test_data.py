"""Built-in digit canvases: deterministic, labels right, no source digit shared between splits."""
import pytest
import torch

pytest.importorskip("sklearn")
from fastkd.data import CanvasConfig, DigitCanvases, generate_canvases, source_splits  # noqa: E402


def test_source_splits_are_disjoint_and_cover_all_digits():
    splits = source_splits(seed=3)
    sets = [set(v.tolist()) for v in splits.values()]
    assert sum(len(s) for s in sets) == 1797 and len(set().union(*sets)) == 1797


def test_generation_is_deterministic_and_seeded():
    a = generate_canvases("val", 20, seed=1)
    b = generate_canvases("val", 20, seed=1)
    c = generate_canvases("val", 20, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_canvases_use_only_their_split_and_labels_match_their_digits():
    from sklearn.datasets import load_digits
    digit_labels = torch.tensor(load_digits().target)
    splits = source_splits(seed=0)
    for split in ("train", "test"):
        images, targets, sources = generate_canvases(split, 50, seed=0)
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
