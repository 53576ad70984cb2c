"""The ops' fake, autograd and Python device kernels (schemas: csrc/ops.cpp) and their eager entry points.
Importing registers them (when fastkd._C is built: fastkd._extension says how)."""
from fastkd.ops import binary_kl_div, box_ops, masked_pairwise_huber, tat_attention_loss  # noqa: F401
