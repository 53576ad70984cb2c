"""Vectorised PyTorch path of MLD (CPU tensors, or FASTKD_BACKEND=torch): same math and signatures
as ``binary_kl_triton``, in fp32 (fp64 for fp64 inputs)."""
import torch

from fastkd.kernels.reductions import loss_scale


def _upcast(x):
    return x if x.dtype == torch.float64 else x.float()


def binary_kl_div_forward(student, teacher, temperature: float, reduction: str):
    a = _upcast(student) / temperature
    b = _upcast(teacher) / temperature
    # same cancellation-free form as the Triton kernel: see binary_kl_triton._binary_kl
    d_sp = torch.log1p(torch.exp(-b.abs())) - torch.log1p(torch.exp(-a.abs()))
    d_pos = (b.clamp(max=0) - a.clamp(max=0)) - d_sp
    d_neg = (a.clamp(min=0) - b.clamp(min=0)) - d_sp
    kl = torch.sigmoid(b) * d_pos + torch.sigmoid(-b) * d_neg
    if reduction != "none":
        kl = kl.sum() * loss_scale(student.shape, reduction)
    return kl.to(student.dtype)


def binary_kl_div_backward(grad, student, teacher, temperature: float, reduction: str, teacher_grad: bool):
    a = _upcast(student) / temperature
    b = _upcast(teacher) / temperature
    g = _upcast(grad) * (loss_scale(student.shape, reduction) / temperature)
    sig_b = torch.sigmoid(b)
    ds = (g * (torch.sigmoid(a) - sig_b)).to(student.dtype)
    dt = (g * sig_b * torch.sigmoid(-b) * (b - a)).to(teacher.dtype) if teacher_grad else None
    return ds, dt
