"""Plain-PyTorch references: the test oracle and the baselines benchmarks compare against.

Nothing here imports the rest of fastkd. Formulas follow ``shared/design/official-semantics.md``.
"""
from fastkd.reference.binary_kl import binary_kl_div, binary_kl_div_official
from fastkd.reference.led import led_cd_loss, led_id_loss, masked_pairwise_huber, masked_pairwise_huber_padded

__all__ = ["binary_kl_div", "binary_kl_div_official", "led_cd_loss", "led_id_loss", "masked_pairwise_huber",
           "masked_pairwise_huber_padded"]
