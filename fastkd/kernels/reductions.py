"""Loss reductions shared by every backend (no Triton import)."""
import math


def loss_scale(shape, reduction: str) -> float:
    """Factor turning a sum of elementwise losses over `shape` into `reduction`:
    sum -> 1, mean -> 1 / numel, batchmean -> 1 / shape[0]; NaN when that count is 0 (as torch)."""
    if reduction == "mean":
        count = math.prod(shape)
    elif reduction == "batchmean":
        count = shape[0]
    else:
        return 1.0
    return 1.0 / count if count else float("nan")
