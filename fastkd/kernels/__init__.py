"""Compute backends of each op, same signatures: ``<op>_triton.py`` (fused Triton kernels and their
launchers: CUDA, or CPU under the Triton interpreter) and ``<op>_cpu.py`` (the CPU kernels of fastkd._C)."""
