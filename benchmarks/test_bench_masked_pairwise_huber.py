"""LED (100 * CD + 1000 * ID, the official weights) against the official Python loops, a vectorised
padded eager (batched distance matrices over all N members of every group, masked) and torch.compile
of it. Shapes from shared/design/benchmark-shapes.md: embeddings (64, 80, 768) with COCO-like labels and
the stress shape (256, 10000, 768) with ~5 positives per image on a GPU; (64, 1000, 768) on a CPU."""
import pytest
import torch

import fastkd
from benchmarks.conftest import full_run
from benchmarks.harness import measure
from benchmarks.labels import coco_like_targets
from fastkd import reference


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        coco = dict(mean_positives=2.9)
        stress = dict(min_positives=3, max_positives=7, mean_positives=5.0)
        if not full_run(metafunc.config):
            cases = [((4, 6, 8), coco)]
        elif torch.cuda.is_available():
            cases = [((64, 80, 768), coco), ((256, 10000, 768), stress)]
        else:
            cases = [((64, 80, 768), coco), ((64, 1000, 768), stress)]
        metafunc.parametrize("case", cases, ids=lambda c: "x".join(map(str, c[0])))


def official_loops(s, t, y):
    return 100 * reference.led_cd_loss(s, t, y) + 1000 * reference.led_id_loss(s, t, y)


def vectorized_eager(s, t, y):
    return (100 * reference.masked_pairwise_huber_padded(s.transpose(0, 1), t.transpose(0, 1), y.T)
            + 1000 * reference.masked_pairwise_huber_padded(s, t, y))


IMPLEMENTATIONS = {
    "fastkd": fastkd.nn.LEDLoss(),
    "official_loops": official_loops,
    "vectorized_eager": vectorized_eager,
    "torch_compile": torch.compile(vectorized_eager, dynamic=False),
}


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_masked_pairwise_huber(benchmark, bench_device, record, case, impl, mode):
    (B, Q, D), label_stats = case
    loss_fn = IMPLEMENTATIONS[impl]
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(B, Q, D, generator=gen).to(bench_device).requires_grad_(mode != "forward")
    teacher = torch.randn(B, Q, D, generator=gen).to(bench_device)
    targets = coco_like_targets(B, Q, **label_stats).to(bench_device)
    expected = fastkd.nn.LEDLoss()(student.detach(), teacher, targets)

    def step():
        student.grad = None
        loss = loss_fn(student, teacher, targets)
        if mode != "forward":
            loss.backward()
        return loss

    measure(benchmark, record, "masked_pairwise_huber", step,
            check=lambda loss: torch.testing.assert_close(loss.detach(), expected, rtol=2e-4, atol=1e-4),
            device=bench_device, group=f"led {mode} {(B, Q, D)}", shape=[B, Q, D], positives=int(targets.sum()),
            dtype="float32", impl=impl, mode=mode, input_bytes=2 * student.numel() * student.element_size())
