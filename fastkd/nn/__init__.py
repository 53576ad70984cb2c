"""Loss modules (and, later, models) built on fastkd.functional."""
from fastkd.nn.losses import LEDLoss, MLDLoss
from fastkd.nn.tat import HierarchicalTaTLoss, TaTLoss

__all__ = ["HierarchicalTaTLoss", "LEDLoss", "MLDLoss", "TaTLoss"]
