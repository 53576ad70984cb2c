"""TaT's attention + MSE loss against eager (softmax(q k^T) v materialised, then mse_loss) and against
torch's scaled_dot_product_attention (scale 1, its fastest backend for the shape) + mse_loss. Shapes (B, N, C)
from shared/design/benchmark-shapes.md with N = M tokens and Cq = Cv = C, float32: classification (256, 49,
512) and its stress shape (256, 196, 1024), patch groups (1024, 64, 1024) and (8192, 16, 512), anchor points
(16, 1024, 256) and (12, 4096, 256), the full 129 x 129 map (16, 16641, 256) on a GPU; smaller batches and
maps on a CPU."""
import pytest
import torch

import fastkd
from benchmarks.conftest import full_run
from benchmarks.harness import measure
from fastkd import reference


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        if not full_run(metafunc.config):
            shapes = [(2, 16, 32)]
        elif torch.cuda.is_available():
            shapes = [(256, 49, 512), (256, 196, 1024), (1024, 64, 1024), (8192, 16, 512), (16, 1024, 256),
                      (12, 4096, 256), (16, 16641, 256)]
        else:
            shapes = [(64, 49, 512), (64, 64, 1024), (512, 16, 512), (4, 1024, 256), (2, 4096, 256)]
        metafunc.parametrize("shape", shapes, ids=lambda s: "x".join(map(str, s)))


IMPLEMENTATIONS = {
    "fastkd": fastkd.tat_attention_loss,
    "eager": reference.tat_attention_loss,
    "sdpa": reference.sdpa_attention_loss,
}


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_tat_attention_loss(benchmark, bench_device, record, shape, impl, mode):
    B, N, C = shape
    loss_fn = IMPLEMENTATIONS[impl]
    gen = torch.Generator().manual_seed(0)
    # q, k of norm ~ C^(1/4): logits of order 1 at every width (scale 1, as in TaT)
    q, k = (torch.randn(B, N, C, generator=gen) / C ** 0.25 for _ in range(2))
    v, t = (torch.randn(B, N, C, generator=gen) for _ in range(2))
    q, k, v = (x.to(bench_device).requires_grad_(mode != "forward") for x in (q, k, v))
    t = t.to(bench_device)
    with torch.no_grad():
        expected = fastkd.tat_attention_loss(q, k, v, t)

    def step():
        for x in (q, k, v):
            x.grad = None
        loss = loss_fn(q, k, v, t)
        if mode != "forward":
            loss.backward()
        return loss

    measure(benchmark, record, "tat_attention_loss", step,
            check=lambda loss: torch.testing.assert_close(loss.detach(), expected, rtol=2e-4, atol=1e-5),
            device=bench_device, group=f"tat {mode} {shape}", shape=[B, N, C], dtype="float32", impl=impl,
            mode=mode, input_bytes=4 * q.numel() * q.element_size())
