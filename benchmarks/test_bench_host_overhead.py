"""Host overhead: microseconds per call at the papers' tiny shapes, where the kernels take microseconds and the
Python / dispatcher cost around them shows. Per op and pass (forward, forward+backward, forward under no_grad):
fastkd's public function, the plain eager code it replaces, and the bare kernel calls (the device kernels of the
op, forward and backward, called directly: no checks, no autograd). Writes benchmarks/results/host_overhead-*.json.

Shapes: MLD logits (64, 80); TaT (2, 49, 64) and (8, 49, 512) (7 x 7 maps); LED CD + ID on embeddings (8, 20, 32)
with COCO-like labels (~2.9 positives per image), as one `led_loss` call and as two calls (`led_cd_loss` +
`led_id_loss`)."""
import pytest
import torch

import fastkd
from benchmarks.harness import measure
from benchmarks.labels import coco_like_targets
from fastkd import reference
from fastkd.ops.registry import kernels

PASSES = ["forward", "forward+backward", "no_grad"]


def mld(device):
    gen = torch.Generator().manual_seed(0)
    s, t = ((torch.randn(64, 80, generator=gen) * 3).to(device) for _ in range(2))
    k = kernels("binary_kl_div", s)

    def kernel_backward(loss):
        k.binary_kl_div_backward(torch.ones_like(loss), s, t, 1.0, "batchmean", False)

    return dict(shape=[64, 80], inputs=(s, t), grads=(s,), fastkd=fastkd.binary_kl_div,
                eager=reference.binary_kl_div_official,
                kernel=lambda s, t: k.binary_kl_div_forward(s, t, 1.0, "batchmean"), kernel_backward=kernel_backward)


def tat(shape):
    def case(device):
        B, N, C = shape
        gen = torch.Generator().manual_seed(0)
        q, k_, v, t = ((torch.randn(B, N, C, generator=gen) / (C ** 0.25 if i < 2 else 1)).to(device)
                       for i in range(4))
        k = kernels("tat_attention_loss", q)
        saved = {}

        def kernel(q, k_, v, t):
            losses, *saved["out"] = k.tat_forward(q, k_, v, t, 1.0, torch.is_grad_enabled())
            return losses.sum() / t.numel()

        def kernel_backward(loss):
            lse, rowdot, residual = saved["out"]
            weight = torch.full((B,), 2.0 / t.numel(), device=q.device)
            k.tat_backward(weight, q, k_, v, residual, lse, rowdot, 1.0)

        return dict(shape=list(shape), inputs=(q, k_, v, t), grads=(q, k_, v), fastkd=fastkd.tat_attention_loss,
                    eager=reference.tat_attention_loss, kernel=kernel, kernel_backward=kernel_backward)
    return case


def led(device):
    gen = torch.Generator().manual_seed(0)
    s, t = (torch.randn(8, 20, 32, generator=gen).to(device) for _ in range(2))
    y = coco_like_targets(8, 20, mean_positives=2.9).to(device)
    k = kernels("masked_pairwise_huber", s)
    groups = [(s.transpose(0, 1), t.transpose(0, 1), y.T), (s, t, y)]
    saved = {}

    def kernel(s, t, y):  # the forward kernels of CD and ID
        outputs = [k.forward(*g, 1.0, True, "official", 0.0) for g in groups]
        saved["outputs"] = outputs
        return outputs[0][0] + outputs[1][0]

    def kernel_backward(loss):
        for g, (_, stats, packed) in zip(groups, saved["outputs"]):
            k.backward(loss.new_ones(()), *g, stats, 1.0, "official", packed)

    return dict(shape=[8, 20, 32], inputs=(s, t, y), grads=(s,),
                fastkd=lambda s, t, y: fastkd.led_loss(s, t, y),  # CD + ID in one call
                fastkd_two_calls=lambda s, t, y: fastkd.led_cd_loss(s, t, y) + fastkd.led_id_loss(s, t, y),
                eager=lambda s, t, y: reference.led_cd_loss(s, t, y) + reference.led_id_loss(s, t, y),
                kernel=kernel, kernel_backward=kernel_backward)


CASES = {"binary_kl_div": mld, "tat_attention_loss-2x49x64": tat((2, 49, 64)),
         "tat_attention_loss-8x49x512": tat((8, 49, 512)), "led_cd+id": led}


@pytest.mark.parametrize("mode", PASSES)
@pytest.mark.parametrize("impl", ["fastkd", "fastkd_two_calls", "eager", "kernel"])
@pytest.mark.parametrize("name", list(CASES))
def test_host_overhead(benchmark, bench_device, record, name, impl, mode):
    case = CASES[name](bench_device)
    if impl not in case:
        pytest.skip(f"{name} has no {impl} variant")
    inputs, fn = case["inputs"], case[impl]
    for x in case["grads"]:
        x.requires_grad_(impl != "kernel")  # the bare kernels take plain tensors
    with torch.no_grad():
        expected = case["fastkd"](*inputs)

    def step():
        for x in case["grads"]:
            x.grad = None
        if mode == "no_grad":
            with torch.no_grad():
                return fn(*inputs)
        loss = fn(*inputs)
        if mode == "forward+backward":
            if impl == "kernel":
                case["kernel_backward"](loss)
            else:
                loss.backward()
        return loss

    tolerance = dict(rtol=1e-3, atol=1e-4) if impl == "eager" else dict(rtol=1e-4, atol=1e-5)  # official clamps
    measure(benchmark, record, "host_overhead", step,
            check=lambda loss: torch.testing.assert_close(loss.detach(), expected, **tolerance),
            device=bench_device, group=f"host overhead {name} {mode}", shape=case["shape"], family=name.split("-")[0],
            dtype="float32", impl=impl, mode=mode)
