"""fastkd: fused Triton and C++/CUDA kernels for knowledge-distillation losses, as autograd ops."""
from fastkd import functional, nn
from fastkd._extension import extension_info
from fastkd.functional import binary_kl_div

__version__ = "0.1.0"

__all__ = ["binary_kl_div", "extension_info", "functional", "nn", "__version__"]
