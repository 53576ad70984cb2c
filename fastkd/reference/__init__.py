"""Plain-PyTorch references: the test oracle and the baselines benchmarks compare against.

Nothing here imports the rest of fastkd. Formulas follow ``shared/design/official-semantics.md``.
"""
from fastkd.reference.binary_kl import binary_kl_div, binary_kl_div_official

__all__ = ["binary_kl_div", "binary_kl_div_official"]
