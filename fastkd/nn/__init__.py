"""Loss modules (and, later, models) built on fastkd.functional."""
from fastkd.nn.losses import LEDLoss, MLDLoss

__all__ = ["LEDLoss", "MLDLoss"]
