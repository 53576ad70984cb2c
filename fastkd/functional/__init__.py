"""Public ops with torch-style signatures (student first, teacher second, ``reduction=``)."""
from fastkd.functional.binary_kl import binary_kl_div
from fastkd.functional.led import led_cd_loss, led_id_loss, masked_pairwise_huber

__all__ = ["binary_kl_div", "led_cd_loss", "led_id_loss", "masked_pairwise_huber"]
