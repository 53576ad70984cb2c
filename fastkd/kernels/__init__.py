"""Compute backends of each op: ``*_triton.py`` (fused Triton kernels + launchers, CUDA or the
Triton interpreter) and ``*_torch.py`` (vectorised PyTorch, the CPU path). Same signatures."""
