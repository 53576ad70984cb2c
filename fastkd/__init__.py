"""fastkd: fused Triton and C++/CUDA kernels for knowledge-distillation losses, as autograd ops."""
from fastkd import functional, nn
from fastkd._extension import extension_info
from fastkd.functional import (binary_kl_div, box_paint, box_pool, led_cd_loss, led_id_loss, led_loss, mask_pool,
                               masked_pairwise_huber)
from fastkd.functional import anchor_pool, patch_group, patch_ungroup, tat_attention_loss
from fastkd.functional import asymmetric_loss, count_targets, object_count_loss

__version__ = "0.1.0"

__all__ = ["binary_kl_div", "box_paint", "box_pool", "extension_info", "functional", "led_cd_loss", "led_id_loss",
           "led_loss", "mask_pool", "masked_pairwise_huber", "nn", "__version__"]
__all__ += ["anchor_pool", "patch_group", "patch_ungroup", "tat_attention_loss"]
__all__ += ["asymmetric_loss", "count_targets", "object_count_loss"]
