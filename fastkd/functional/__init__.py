"""Public ops with torch-style signatures (student first, teacher second, ``reduction=``)."""
from fastkd.functional.binary_kl_div import binary_kl_div
from fastkd.functional.box_ops import box_paint, box_pool, mask_pool
from fastkd.functional.masked_pairwise_huber import led_cd_loss, led_id_loss, led_loss, masked_pairwise_huber
from fastkd.functional.multilabel_losses import asymmetric_loss, count_targets, object_count_loss
from fastkd.functional.tat_attention_loss import anchor_pool, patch_group, patch_ungroup, tat_attention_loss

__all__ = ["binary_kl_div", "box_paint", "box_pool", "led_cd_loss", "led_id_loss", "led_loss", "mask_pool",
           "masked_pairwise_huber"]
__all__ += ["anchor_pool", "patch_group", "patch_ungroup", "tat_attention_loss"]
__all__ += ["asymmetric_loss", "count_targets", "object_count_loss"]
