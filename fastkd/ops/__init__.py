"""The ops' fake, autograd and Python device kernels (schemas: csrc/ops.cpp) and their eager entry points.
Importing registers them (when fastkd._C is built: fastkd._extension says how)."""
from fastkd.ops import binary_kl, box_ops, pairwise_huber, tat_attention  # noqa: F401
