"""Per-device kernels of fastkd's ops, and the test-only switch that runs the Triton kernels on CPU tensors.

Every op has one schema (csrc/ops.cpp) and, in fastkd/ops/<op>.py, one fake kernel, one autograd formula and one
eager entry. Device kernels: C++ ones register themselves (TORCH_LIBRARY_IMPL); the Python ones,
``fastkd.kernels.<op>_triton`` (CUDA) and ``<op>_cpu`` (CPU), are attached here with register_kernel, and the
eager path calls the same functions directly through `kernels` (no dispatcher, no environment lookup): an
autograd.Function over them, or, for MLD and LED on CPU, the C++ autograd node that ``<op>_cpu`` exposes.
"""
import functools
import importlib
import warnings

import torch

_state = {"triton_on_cpu": None}  # None, or the Library holding the Triton kernels registered for CPU
_python_kernels = []  # (op name, family, function(kernel module, *args), whether CPU has a C++ kernel)


@functools.lru_cache(maxsize=None)
def _module(family: str, kind: str):
    return importlib.import_module(f"fastkd.kernels.{family}_{kind}")


def kernels(family: str, x: torch.Tensor):
    """The kernel module of `family` for x's device: ``<family>_triton`` on CUDA (and on CPU under
    `triton_on_cpu`), else ``<family>_cpu``."""
    if x.is_cuda or (_state["triton_on_cpu"] is not None and x.is_cpu):
        return _module(family, "triton")
    if x.is_cpu:
        return _module(family, "cpu")
    raise ValueError(f"fastkd runs on CUDA and CPU tensors, got a {x.device.type} tensor")


def register(name: str, family: str, function, cpu_is_native: bool = False) -> None:
    """Attach function(kernel module, *op args) as the CUDA (Triton) kernel of fastkd::<name>, and as its CPU
    kernel unless that one is C++ (`cpu_is_native`)."""
    _python_kernels.append((name, family, function, cpu_is_native))
    for device in ("cuda",) if cpu_is_native else ("cuda", "cpu"):
        torch.library.register_kernel(f"fastkd::{name}", device,
                                      lambda *args, _f=function: _f(kernels(family, args[0]), *args))


def triton_on_cpu(enabled: bool) -> None:
    """Test-only switch: run the Triton kernels on CPU tensors, in eager calls and through torch.ops (C++ CPU
    kernels are overridden meanwhile). Needs TRITON_INTERPRET=1 set before triton is first imported."""
    if enabled and _state["triton_on_cpu"] is None:
        from fastkd.kernels.triton_utils import INTERPRETED
        if not INTERPRETED:
            raise RuntimeError("Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                               "before triton is first imported")
        library = torch.library.Library("fastkd", "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel": that is the point
            for name, family, function, cpu_is_native in _python_kernels:
                if cpu_is_native:
                    library.impl(name, lambda *args, _f=function, _fam=family: _f(_module(_fam, "triton"), *args),
                                 "CPU")
        _state["triton_on_cpu"] = library
    elif not enabled and _state["triton_on_cpu"] is not None:
        _state["triton_on_cpu"]._destroy()
        _state["triton_on_cpu"] = None
