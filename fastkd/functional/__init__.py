"""Public ops with torch-style signatures (student first, teacher second, ``reduction=``)."""
from fastkd.functional.binary_kl import binary_kl_div

__all__ = ["binary_kl_div"]
