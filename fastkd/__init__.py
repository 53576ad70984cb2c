"""fastkd: fused Triton and C++/CUDA kernels for knowledge-distillation losses, as autograd ops."""
from fastkd import functional, nn
from fastkd._extension import extension_info
from fastkd.functional import binary_kl_div, led_cd_loss, led_id_loss, masked_pairwise_huber

__version__ = "0.1.0"

__all__ = ["binary_kl_div", "extension_info", "functional", "led_cd_loss", "led_id_loss", "masked_pairwise_huber",
           "nn", "__version__"]
