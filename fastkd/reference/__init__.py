"""Plain-PyTorch references: the test oracle and the baselines benchmarks compare against.

Nothing here imports the rest of fastkd. Formulas follow ``shared/design/official-semantics.md``.
"""
from fastkd.reference.binary_kl_div import binary_kl_div, binary_kl_div_official
from fastkd.reference.box_ops import (box_masks, box_paint, box_paint_official, box_pool, box_pool_official,
                                     dense_pool, mask_pool_official, resize_masks)
from fastkd.reference.masked_pairwise_huber import led_cd_loss, led_id_loss, masked_pairwise_huber, masked_pairwise_huber_padded
from fastkd.reference.tat_attention_loss import (anchor_pool_official, hierarchical_tat_loss, patch_group_official,
                                 sdpa_attention_loss, tat_attention_loss)

__all__ = ["binary_kl_div", "binary_kl_div_official", "box_masks", "box_paint", "box_paint_official", "box_pool",
           "box_pool_official", "dense_pool", "mask_pool_official", "resize_masks", "led_cd_loss", "led_id_loss", "masked_pairwise_huber",
           "masked_pairwise_huber_padded"]
__all__ += ["anchor_pool_official", "hierarchical_tat_loss", "patch_group_official", "sdpa_attention_loss",
            "tat_attention_loss"]
