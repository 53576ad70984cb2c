"""Loads the compiled extension ``fastkd._C`` (C++/CUDA ops registered under torch.ops.fastkd).

Nothing is compiled at import: the extension is built by ``pip install``. Ops that need it raise a
clear error when it is missing; the Triton ops work without it.
"""
try:
    from fastkd import _C  # noqa: F401
    EXTENSION_ERROR = None
except ImportError as error:  # pragma: no cover - only when the package was not built
    EXTENSION_ERROR = error


def extension_info() -> str:
    """What the installed extension was built with, e.g. 'cpu' or 'cpu+cuda13000'."""
    if EXTENSION_ERROR is not None:
        raise RuntimeError(f"fastkd._C is not built ({EXTENSION_ERROR}); reinstall with "
                           "`pip install --no-build-isolation -e .`")
    import torch
    return torch.ops.fastkd._build_info()
