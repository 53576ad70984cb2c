"""Custom-op registration (``torch.ops.fastkd.*``) and backend dispatch. Importing registers the ops."""
from fastkd.ops import binary_kl, box_ops, pairwise_huber  # noqa: F401
from fastkd.ops import tat_attention  # noqa: F401
