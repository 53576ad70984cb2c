"""Loss modules (and, later, models) built on fastkd.functional."""
from fastkd.nn.losses import MLDLoss

__all__ = ["MLDLoss"]
