"""Custom-op registration (``torch.ops.fastkd.*``) and backend dispatch. Importing registers the ops."""
from fastkd.ops import binary_kl, pairwise_huber  # noqa: F401
