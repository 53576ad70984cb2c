"""Which backend runs an op: its Triton kernels or its CPU path.

FASTKD_BACKEND (read at every call):
  auto (default)  CUDA tensors -> fastkd/kernels/<op>_triton.py, CPU tensors -> <op>_cpu.py (C++ or vectorised)
  triton          always Triton; CPU tensors need TRITON_INTERPRET=1 set before triton is imported
                  (how the tests run the GPU kernels on a machine without a GPU)
"""
import functools
import importlib
import os

BACKENDS = ("auto", "triton")


@functools.lru_cache(maxsize=None)
def _kernel_module(op: str, kind: str):
    return importlib.import_module(f"fastkd.kernels.{op}_{kind}")


def backend_module(op: str, tensor):
    """The module ``fastkd.kernels.<op>_<triton|cpu>`` that should run `op` on `tensor`."""
    backend = os.environ.get("FASTKD_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"FASTKD_BACKEND must be one of {BACKENDS}, got {backend!r}")
    use_triton = tensor.is_cuda or backend == "triton"
    if use_triton and not tensor.is_cuda:
        from fastkd.kernels.triton_utils import INTERPRETED
        if not INTERPRETED:
            raise RuntimeError(
                f"FASTKD_BACKEND=triton got a {tensor.device.type} tensor: Triton runs CPU tensors only under "
                "its interpreter; set TRITON_INTERPRET=1 before triton is first imported")
    elif not use_triton and tensor.device.type != "cpu":
        raise ValueError(f"fastkd runs on CUDA and CPU tensors, got a {tensor.device.type} tensor")
    return _kernel_module(op, "triton" if use_triton else "cpu")
