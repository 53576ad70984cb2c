"""Which backend runs an op: the Triton kernels or the vectorised PyTorch path.

FASTKD_BACKEND (read at every call):
  auto (default)  CUDA tensors -> Triton, other tensors -> PyTorch
  triton          always Triton; CPU tensors need TRITON_INTERPRET=1 set before triton is imported
  torch           always the vectorised PyTorch path
"""
import importlib
import os

BACKENDS = ("auto", "triton", "torch")


def backend_module(op: str, tensor):
    """The module ``fastkd.kernels.<op>_<backend>`` that should run `op` on `tensor`."""
    backend = os.environ.get("FASTKD_BACKEND", "auto").lower()
    if backend not in BACKENDS:
        raise ValueError(f"FASTKD_BACKEND must be one of {BACKENDS}, got {backend!r}")
    use_triton = tensor.is_cuda if backend == "auto" else backend == "triton"
    if use_triton and not tensor.is_cuda:
        from fastkd.kernels.triton_utils import INTERPRETED
        if not INTERPRETED:
            raise RuntimeError(
                f"FASTKD_BACKEND=triton got a {tensor.device.type} tensor: Triton runs CPU tensors only under "
                "its interpreter; set TRITON_INTERPRET=1 before triton is first imported")
    return importlib.import_module(f"fastkd.kernels.{op}_{'triton' if use_triton else 'torch'}")
