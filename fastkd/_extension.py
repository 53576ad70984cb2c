"""Loads the compiled extension ``fastkd._C`` (C++/CUDA ops registered under torch.ops.fastkd).

Nothing is compiled at import: ``pip install`` builds the extension. It holds every op's schema: if it is
missing, importing fastkd still works and the ops raise a clear error.
"""
import torch

try:
    from fastkd import _C  # noqa: F401
    EXTENSION_ERROR = None
except ImportError as error:  # only when the package was not built, or built against another torch
    EXTENSION_ERROR = error


def require_extension() -> None:
    if EXTENSION_ERROR is not None:
        raise RuntimeError(f"fastkd._C could not be loaded ({EXTENSION_ERROR}); build it against your torch "
                           "with `pip install --no-build-isolation -e .`")


def extension_info() -> str:
    """What the installed extension was built with, e.g. 'cpu' or 'cpu+cuda13000'."""
    require_extension()
    return torch.ops.fastkd._build_info()
