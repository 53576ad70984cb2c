"""Learning-rate schedules stepped once per optimizer step (the engine's iteration), built from a name."""
from typing import Optional, Sequence

import torch

SCHEDULES = ("onecycle", "constant", "warmup-multistep", "cosine", "poly")


def lr_schedule(kind: str, optimizer: torch.optim.Optimizer, total_steps: int, *, peak_lr: Optional[float] = None,
                pct_start: float = 0.2, warmup_steps: int = 0, warmup_factor: float = 0.001,
                milestones: Sequence[int] = (), gamma: float = 0.1):
    """A per-iteration scheduler, or None for "constant".

    onecycle: OneCycleLR to `peak_lr` over total_steps, `pct_start` of them rising (ML-Decoder / ASL).
    warmup-multistep: the optimizer's lr times a factor rising linearly from `warmup_factor` to 1 over
    warmup_steps, then times gamma at each of `milestones` (iterations), as detectron2's WarmupMultiStepLR.
    """
    if kind == "constant":
        return None
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, peak_lr, total_steps=max(total_steps, 1),
                                                   pct_start=pct_start)
    if kind == "warmup-multistep":
        milestones = sorted(milestones)

        def factor(step: int) -> float:
            warm = 1.0 if step >= warmup_steps else warmup_factor + (1 - warmup_factor) * step / warmup_steps
            return warm * gamma ** sum(step >= m for m in milestones)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if kind in ("cosine", "poly"):
        import math
        total = max(total_steps, 1)

        def decay(step: int) -> float:
            t = min(step, total) / total
            return (1 + math.cos(math.pi * t)) / 2 if kind == "cosine" else (1 - t) ** 0.9
        return torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
