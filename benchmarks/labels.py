"""Multi-label targets with COCO-like statistics for benchmarks."""
import torch


def coco_like_targets(batch: int, classes: int, min_positives: int = 1, max_positives: int = 5,
                      mean_positives: float = 2.9, zipf: float = 0.8, seed: int = 0) -> torch.Tensor:
    """(batch, classes) bool: per image min..max positives (binomial, the given mean; COCO ~2.9), classes
    drawn without replacement with Zipf-skewed frequencies (a few very common classes, a long tail)."""
    gen = torch.Generator().manual_seed(seed)
    spread = max_positives - min_positives
    p = (mean_positives - min_positives) / spread if spread else 0.0
    counts = min_positives + torch.binomial(torch.full((batch,), float(spread)), torch.full((batch,), p),
                                            generator=gen).long()
    weights = 1.0 / torch.arange(1, classes + 1, dtype=torch.float64) ** zipf
    targets = torch.zeros(batch, classes, dtype=torch.bool)
    for b in range(batch):
        targets[b, torch.multinomial(weights, int(counts[b]), generator=gen)] = True
    return targets
