"""Loss modules (and, later, models) built on fastkd.functional."""
from fastkd.nn.binary_kl_div import MLDLoss
from fastkd.nn.masked_pairwise_huber import LEDLoss
from fastkd.nn.multilabel_losses import AsymmetricLoss, ObjectCountLoss
from fastkd.nn.tat_attention_loss import HierarchicalTaTLoss, TaTLoss

__all__ = ["AsymmetricLoss", "HierarchicalTaTLoss", "LEDLoss", "MLDLoss", "ObjectCountLoss", "TaTLoss"]
