"""Fused Triton kernels for MLD, the per-label binary KL of L2D.

With a = z_s / T and b = z_t / T (scaled logits, any layout flattened to n elements):
    kl      = p_t (logsig(b) - logsig(a)) + (1 - p_t) (logsig(-b) - logsig(-a)),   p_t = sigmoid(b)
    dkl/da  = sigmoid(a) - sigmoid(b)
    dkl/db  = sigmoid(b) sigmoid(-b) (b - a)

Forward is one kernel: elementwise for reduction="none", else a persistent grid where each program
sums a contiguous chunk in fp32 (fp64 for fp64 inputs) and writes one pre-scaled partial; small
inputs use a single program whose partial is the loss itself. Partials are summed in a fixed order,
so results are deterministic.

Backward recomputes from the logits in one kernel instead of storing the gradient in the forward:
the loss is elementwise (no row statistic to save), so both designs move 5n elements for
forward + backward (read s, t; read s, t, write ds -- versus read s, t, write ds; read ds, write
ds * g) while storing would keep an extra n-element tensor alive from forward to backward, and
with teacher gradients it would move more. The upstream gradient is read inside the kernel (a
scalar pointer for reduced losses), so there is no host sync.
"""
import torch
import triton
import triton.language as tl

from fastkd.kernels.common import loss_scale
from fastkd.kernels.triton_utils import compute_dtype, max_programs, sigmoid_pair, softplus_neg_abs

BLOCK = 1024
NUM_WARPS = 4
SINGLE_PROGRAM_TILES = 32  # up to 32 * BLOCK elements: one program, one launch, no partial sum


@triton.jit
def _binary_kl_div(a, b):
    # log-sigmoid differences from input differences, not from two rounded log-sigmoids:
    # logsig(b) - logsig(a) = (min(b, 0) - min(a, 0)) - (sp(b) - sp(a)), sp(x) = log1p(exp(-|x|))
    d_sp = softplus_neg_abs(b) - softplus_neg_abs(a)
    d_pos = (tl.where(b < 0, b, 0.0) - tl.where(a < 0, a, 0.0)) - d_sp
    d_neg = (tl.where(b > 0, -b, 0.0) - tl.where(a > 0, -a, 0.0)) - d_sp
    p_t, q_t = sigmoid_pair(b)
    return p_t * d_pos + q_t * d_neg


@triton.jit
def _binary_kl_div_forward_none_kernel(s_ptr, t_ptr, out_ptr, n, temperature,
                             BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC) / temperature
    b = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC) / temperature
    tl.store(out_ptr + offs, _binary_kl_div(a, b).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _binary_kl_div_forward_reduce_kernel(s_ptr, t_ptr, partial_ptr, n, temperature, scale, tiles_per_program,
                               BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for i in range(tiles_per_program):
        offs = (pid * tiles_per_program + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC) / temperature
        b = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC) / temperature
        acc += tl.where(mask, _binary_kl_div(a, b), 0.0)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0) * scale)


@triton.jit
def _binary_kl_div_backward_kernel(s_ptr, t_ptr, g_ptr, ds_ptr, dt_ptr, n, temperature, scale,
                         BLOCK: tl.constexpr, ACC: tl.constexpr,
                         GRAD_IS_SCALAR: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC) / temperature
    b = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC) / temperature
    if GRAD_IS_SCALAR:
        g = tl.load(g_ptr).to(ACC) * scale
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC) * scale
    sig_a, _ = sigmoid_pair(a)
    sig_b, sig_nb = sigmoid_pair(b)
    tl.store(ds_ptr + offs, (g * (sig_a - sig_b)).to(ds_ptr.dtype.element_ty), mask=mask)
    if TEACHER_GRAD:
        tl.store(dt_ptr + offs, (g * sig_b * sig_nb * (b - a)).to(dt_ptr.dtype.element_ty), mask=mask)


def binary_kl_div_forward(student, teacher, temperature: float, reduction: str):
    s, t = student.contiguous(), teacher.contiguous()
    n = s.numel()
    acc = compute_dtype(s.dtype)
    if reduction == "none":
        out = torch.empty_like(s)
        if n:
            _binary_kl_div_forward_none_kernel[(triton.cdiv(n, BLOCK),)](
                s, t, out, n, temperature, BLOCK=BLOCK, ACC=acc, num_warps=NUM_WARPS)
        return out
    scale = loss_scale(s.shape, reduction)
    if n == 0:
        return torch.full((), 0.0 if reduction == "sum" else float("nan"), dtype=s.dtype, device=s.device)
    tiles = triton.cdiv(n, BLOCK)
    programs = 1 if tiles <= SINGLE_PROGRAM_TILES else min(tiles, max_programs(s.device))
    tiles_per_program = triton.cdiv(tiles, programs)
    programs = triton.cdiv(tiles, tiles_per_program)
    partial_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    partials = torch.empty(programs, dtype=partial_dtype, device=s.device)
    _binary_kl_div_forward_reduce_kernel[(programs,)](
        s, t, partials, n, temperature, scale, tiles_per_program, BLOCK=BLOCK, ACC=acc, num_warps=NUM_WARPS)
    loss = partials[0] if programs == 1 else partials.sum()
    return loss.to(s.dtype)


def binary_kl_div_backward(grad, student, teacher, temperature: float, reduction: str, teacher_grad: bool):
    s, t = student.contiguous(), teacher.contiguous()
    n = s.numel()
    grad_is_scalar = reduction != "none"
    g = grad.reshape(()) if grad_is_scalar else grad.expand_as(s).contiguous()
    ds = torch.empty_like(s)
    dt = torch.empty_like(t) if teacher_grad else ds  # dt_ptr is unused without TEACHER_GRAD
    if n:
        scale = loss_scale(s.shape, reduction) / temperature
        _binary_kl_div_backward_kernel[(triton.cdiv(n, BLOCK),)](
            s, t, g, ds, dt, n, temperature, scale, BLOCK=BLOCK, ACC=compute_dtype(s.dtype),
            GRAD_IS_SCALAR=grad_is_scalar, TEACHER_GRAD=teacher_grad, num_warps=NUM_WARPS)
    return [ds, dt] if teacher_grad else [ds]
