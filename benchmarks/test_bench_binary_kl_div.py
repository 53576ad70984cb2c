"""MLD (binary_kl_div) against the official-style eager code, a vectorised eager and torch.compile of it.

Shapes from shared/design/benchmark-shapes.md: logits (64, 80), (64, 20), (64, 81) and the stress shape
(4096, 10000) on a GPU; the stress shape is cut to (512, 10000) on a CPU. fp32, as the official recipe
casts logits to fp32 before the losses.
"""
import pytest
import torch

import fastkd
from benchmarks.conftest import full_run
from benchmarks.harness import measure
from fastkd import reference

ELEMENT_BYTES = 4
# the fewest fp32 elements any implementation must move: read s, t (forward); + read s, t, write ds (backward)
ELEMENTS_MOVED = {"forward": 2, "forward+backward": 5}


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        if not full_run(metafunc.config):
            shapes = [(8, 10)]
        elif torch.cuda.is_available():
            shapes = [(64, 80), (64, 20), (64, 81), (4096, 10000)]
        else:
            shapes = [(64, 80), (64, 20), (64, 81), (512, 10000)]
        metafunc.parametrize("shape", shapes, ids=lambda s: "x".join(map(str, s)))


def official_eager(s, t):
    return reference.binary_kl_div_official(s, t)


def vectorized_eager(s, t):
    return reference.binary_kl_div(s, t)


IMPLEMENTATIONS = {
    "fastkd": lambda s, t: fastkd.binary_kl_div(s, t),
    "official_eager": official_eager,
    "vectorized_eager": vectorized_eager,
    "torch_compile": torch.compile(vectorized_eager, dynamic=False),
}


@pytest.mark.parametrize("mode", list(ELEMENTS_MOVED))
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_binary_kl_div(benchmark, bench_device, record, shape, impl, mode):
    loss_fn = IMPLEMENTATIONS[impl]
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(shape, generator=gen) * 3).to(bench_device).requires_grad_(mode != "forward")
    teacher = (torch.randn(shape, generator=gen) * 3).to(bench_device)
    expected = reference.binary_kl_div(student.detach().double(), teacher.double())

    def step():
        student.grad = None
        loss = loss_fn(student, teacher)
        if mode != "forward":
            loss.backward()
        return loss

    measure(benchmark, record, "binary_kl_div", step,
            check=lambda loss: torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5),
            device=bench_device, group=f"binary_kl_div {mode} {shape}",
            min_bytes_moved=ELEMENTS_MOVED[mode] * student.numel() * ELEMENT_BYTES,
            shape=list(shape), dtype="float32", impl=impl, mode=mode)
