"""fastkd.ops.registry: which kernels run, and the test-only switch that runs Triton on CPU tensors."""
import os

import pytest
import torch

import fastkd
from fastkd.ops.registry import kernels, triton_on_cpu


def test_cpu_and_other_devices():
    assert kernels("binary_kl_div", torch.zeros(1)).__name__ == "fastkd.kernels.binary_kl_div_cpu"
    with pytest.raises(ValueError, match="fastkd runs on CUDA and CPU tensors, got a meta tensor"):
        kernels("binary_kl_div", torch.zeros(1, device="meta"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
def test_triton_on_cpu_switch_reaches_eager_calls_and_torch_ops(monkeypatch):
    x = torch.zeros(2, 3)
    calls = []
    triton_on_cpu(True)
    try:
        module = kernels("binary_kl_div", x)
        assert module.__name__ == "fastkd.kernels.binary_kl_div_triton"
        monkeypatch.setattr(module, "binary_kl_div_forward", lambda *args: calls.append(args) or x.new_zeros(()))
        fastkd.binary_kl_div(x, x, reduction="sum")
        torch.ops.fastkd.binary_kl_div(x, x, 1.0, "sum")  # the C++ CPU kernel is overridden meanwhile
        assert len(calls) == 2
    finally:
        triton_on_cpu(False)
    torch.ops.fastkd.binary_kl_div(x, x, 1.0, "sum")  # back to C++
    assert len(calls) == 2 and kernels("binary_kl_div", x).__name__ == "fastkd.kernels.binary_kl_div_cpu"
