"""The calls the ops make into ``fastkd.kernels.<op>_triton`` at the benchmark shapes, on meta tensors, for the
ahead-of-time compile check (benchmarks/aot.py): every dtype, every input layout the public ops produce, forward
with and without a gradient to come, and backward.

Layouts: MLD flattens its inputs (contiguous). LED reads (G, N, D) through strides: ``led_id_loss`` passes the
(B, Q, D) embeddings as they are ("groups-major"), ``led_cd_loss`` their (Q, B, D) transpose ("members-major").
TaT reads (B, tokens, C) through strides: patch groups are contiguous ("channels-last"), while ``TaTLoss`` and
the anchor points pass ``x.flatten(2).transpose(1, 2)`` of a (B, C, H, W) map ("tokens-last": stride 1 along
tokens). Backward inputs the op creates itself (residual, gradients) are contiguous.
"""
import functools
from contextlib import contextmanager

import torch

from benchmarks.aot import Case
from benchmarks.labels import coco_like_targets
from fastkd.kernels import binary_kl_div_triton as mld
from fastkd.kernels import masked_pairwise_huber_triton as led
from fastkd.kernels import tat_attention_loss_triton as tat

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MLD_SHAPES = [(64, 80), (64, 20), (64, 81), (4096, 10000)]
LED_SHAPES = [((64, 80, 768), dict(mean_positives=2.9)),
              ((256, 10000, 768), dict(min_positives=3, max_positives=7, mean_positives=5.0))]
TAT_SHAPES = [(256, 49, 512), (256, 196, 1024), (1024, 64, 1024), (8192, 16, 512), (16, 1024, 256),
              (12, 4096, 256), (16, 16641, 256)]


def meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _mld(shape, dtype):
    s, t = meta(*shape, dtype=dtype), meta(*shape, dtype=dtype)
    for reduction in ("none", "batchmean"):
        mld.binary_kl_div_forward(s, t, 2.0, reduction)
        grad = meta(*shape, dtype=dtype) if reduction == "none" else meta(dtype=dtype)
        for teacher_grad in (False, True):
            mld.binary_kl_div_backward(grad, s, t, 2.0, reduction, teacher_grad)


@contextmanager
def _packing_of(mask):
    """The kernels pack groups on the device with a host sync; here the real mask is packed on the CPU and the
    packing handed to the kernels as meta tensors."""
    real = led.pack_groups

    def packed_on_meta(_mask, local=None):
        p = real(mask)
        return led.Packed(p.members.to("meta"), p.counts.to("meta"), p.queries.to("meta"), p.max_n, p.total_queries)

    led.pack_groups = packed_on_meta
    try:
        yield
    finally:
        led.pack_groups = real


@functools.lru_cache(maxsize=None)
def _targets(shape, stats):
    B, Q, _ = shape
    return coco_like_targets(B, Q, **dict(stats))


def _led(shape, stats, dtype, layout):
    B, Q, D = shape
    targets = _targets(shape, tuple(sorted(stats.items())))
    if layout == "members-major":  # led_cd_loss: groups are classes, (Q, B, D) views of (B, Q, D)
        student, teacher, mask = meta(B, Q, D, dtype=dtype).transpose(0, 1), meta(B, Q, D, dtype=dtype).transpose(
            0, 1), targets.T
    else:  # led_id_loss: groups are images
        student, teacher, mask = meta(B, Q, D, dtype=dtype), meta(B, Q, D, dtype=dtype), targets
    with _packing_of(mask):
        _, stats_, packed = led.forward(student, teacher, mask.to("meta"), 1.0, True, "official", 0.0)
        led.backward(meta(dtype=dtype), student, teacher, mask.to("meta"), stats_, 1.0, "official", packed)


def _tokens_last(B, N, C, dtype):
    """(B, N, C) view with stride 1 along tokens: x.flatten(2).transpose(1, 2) of a (B, C, H, W) map."""
    return meta(B, C, N, dtype=dtype).transpose(1, 2)


def _tat(shape, dtype, layout, without_grad=True):
    B, N, C = shape
    make = _tokens_last if layout == "tokens-last" else (lambda *s, dtype: meta(*s, dtype=dtype))
    q, k, v, t = (make(B, N, C, dtype=dtype) for _ in range(4))
    if without_grad:
        tat.tat_forward(q, k, v, t, 1.0, False)  # no gradient to come
    _, lse, rowdot, residual = tat.tat_forward(q, k, v, t, 1.0, True)
    weight = meta(B, dtype=lse.dtype)
    tat.tat_backward(weight, q, k, v, residual, lse, rowdot, 1.0)


def _name(dtype):
    return str(dtype).replace("torch.", "")


def all_cases():
    """Every case; `quick` marks a subset for the default test command: fp32 (tf32x3, the heaviest) launches of every
    kernel at one shape each, in the layout that spilled first (tokens-last, members-major)."""
    cases = []
    for dtype in DTYPES:
        fp32 = dtype == torch.float32
        for i, shape in enumerate(MLD_SHAPES):
            cases.append(Case("binary_kl_div", dtype, "contiguous", "x".join(map(str, shape)),
                              functools.partial(_mld, shape, dtype), quick=fp32 and i == 0))
        for i, (shape, stats) in enumerate(LED_SHAPES):
            for layout in ("groups-major", "members-major"):
                cases.append(Case("masked_pairwise_huber", dtype, layout, "x".join(map(str, shape)),
                                  functools.partial(_led, shape, stats, dtype, layout),
                                  quick=fp32 and i == 0 and layout == "members-major"))
        for shape in TAT_SHAPES:
            for layout in ("channels-last", "tokens-last"):
                cases.append(Case("tat_attention_loss", dtype, layout, "x".join(map(str, shape)),
                                  functools.partial(_tat, shape, dtype, layout)))
                if fp32 and layout == "tokens-last" and shape in ((256, 49, 512), (16, 1024, 256)):
                    # quick: the one-tile layout (7x7 maps) and the online-softmax one (anchor points), training
                    # launches only (the full sweep's case above launches the same and more)
                    cases.append(Case("tat_attention_loss", dtype, layout, "x".join(map(str, shape)),
                                      functools.partial(_tat, shape, dtype, layout, without_grad=False), quick=True))
    return cases
