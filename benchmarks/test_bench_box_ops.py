"""LGD's box_pool and box_paint against the official-style code (per image, per level: dense masks + matmul) and
an einsum with dense masks (per level, all images at once).

Shapes from shared/design/benchmark-shapes.md: B = 2 images, C = 256 channels, P3-P7 of an 800 x 1344 input
(100x168, 50x84, 25x42, 13x21, 7x11), 16 boxes + 1 context box (the whole image) per image, fp32. fastkd runs all
levels in one native call; the baselines loop over the levels.
"""
import pytest
import torch

import fastkd
from benchmarks.conftest import full_run
from benchmarks.harness import measure
from fastkd import reference

ELEMENT_BYTES = 4
LGD = dict(batch=2, channels=256, image_size=(800, 1344), levels=[(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)],
           boxes_per_image=16)
SMOKE = dict(batch=2, channels=8, image_size=(64, 96), levels=[(8, 12), (4, 6)], boxes_per_image=3)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        case = LGD if full_run(metafunc.config) else SMOKE
        metafunc.parametrize("case", [case], ids=lambda c: f"B{c['batch']}-C{c['channels']}-{len(c['levels'])}levels")


def make_boxes(case, device):
    """boxes_per_image random boxes per image (sides 5% to 60% of the image), then one context box per image."""
    gen = torch.Generator().manual_seed(0)
    height, width = case["image_size"]
    n = case["boxes_per_image"] * case["batch"]
    scale = torch.tensor([width, height], dtype=torch.float32)
    size = (torch.rand(n, 2, generator=gen) * 0.55 + 0.05) * scale
    corner = torch.rand(n, 2, generator=gen) * (scale - size)
    boxes = torch.cat([torch.cat([corner, corner + size], 1), torch.tensor([[0.0, 0.0, width, height]] * case["batch"])])
    batch_idx = torch.cat([torch.arange(case["batch"]).repeat_interleave(case["boxes_per_image"]),
                           torch.arange(case["batch"])])
    return boxes.to(device), batch_idx.to(device)


def pool_impls(boxes, batch_idx, image_size):
    return {
        "fastkd": lambda levels: fastkd.box_pool(levels, boxes, batch_idx, image_size),
        "official_eager": lambda levels: [reference.box_pool_official(f, boxes, batch_idx, image_size) for f in levels],
        "einsum_dense": lambda levels: [reference.box_pool(f, boxes, batch_idx, image_size) for f in levels],
    }


def paint_impls(boxes, batch_idx, image_size, shapes):
    return {
        "fastkd": lambda levels: fastkd.box_paint(levels, boxes, batch_idx, image_size, shapes),
        "official_eager": lambda levels: [reference.box_paint_official(v, boxes, batch_idx, image_size, s)
                                          for v, s in zip(levels, shapes)],
        "einsum_dense": lambda levels: [reference.box_paint(v, boxes, batch_idx, image_size, s)
                                        for v, s in zip(levels, shapes)],
    }


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["fastkd", "official_eager", "einsum_dense"])
@pytest.mark.parametrize("op", ["box_pool", "box_paint"])
def test_box_ops(benchmark, bench_device, record, case, op, impl, mode):
    boxes, batch_idx = make_boxes(case, bench_device)
    batch, channels, image_size = case["batch"], case["channels"], case["image_size"]
    shapes = [(batch, channels, h, w) for h, w in case["levels"]]
    gen = torch.Generator().manual_seed(1)
    if op == "box_pool":
        inputs = [torch.randn(s, generator=gen).to(bench_device) for s in shapes]
        fn = pool_impls(boxes, batch_idx, image_size)[impl]
        expected = [reference.box_pool(f.double(), boxes, batch_idx, image_size) for f in inputs]
    else:
        inputs = [torch.randn(boxes.shape[0], channels, generator=gen).to(bench_device) for _ in shapes]
        fn = paint_impls(boxes, batch_idx, image_size, shapes)[impl]
        expected = [reference.box_paint(v.double(), boxes, batch_idx, image_size, s) for v, s in zip(inputs, shapes)]
    for x in inputs:
        x.requires_grad_(mode != "forward")

    def step():
        for x in inputs:
            x.grad = None
        outputs = fn(inputs)
        if mode != "forward":
            torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
        return outputs

    def check(outputs):
        for out, ref in zip(outputs, expected):
            torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)

    # the fewest bytes any implementation must move: read the levels (pool) or write them (paint), the (N, C)
    # rows the other way; the backward moves both again
    map_elements = sum(batch * channels * h * w for h, w in case["levels"])
    row_elements = boxes.shape[0] * channels * len(case["levels"])
    moved = (map_elements + row_elements) * ELEMENT_BYTES * (1 if mode == "forward" else 2)
    measure(benchmark, record, op, step, check, bench_device, f"{op} {mode} {case['levels'][0]}",
            min_bytes_moved=moved, shape=[batch, channels, *case["levels"][0]], levels=len(case["levels"]),
            boxes=boxes.shape[0], dtype="float32", impl=impl, mode=mode)
