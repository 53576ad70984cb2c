"""Helpers shared by every backend (no Triton import)."""
import math

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
