"""fastkd.binary_kl_div (MLD) against the float64 plain-PyTorch reference, on every kernel path."""
import pytest
import torch

import fastkd
from fastkd import reference
from tests.conftest import assert_close, assert_cuda_graph_replays

SHAPES = [(1, 1), (3, 7), (64, 80), (5, 4, 13), (40, 1000)]  # (40, 1000): multi-program reduction
REDUCTIONS = ["none", "sum", "mean", "batchmean"]


def make_logits(shape, dtype, device, scale=4.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=gen) * scale).to(dtype)
    t = (torch.randn(shape, generator=gen) * scale).to(dtype)
    return s.to(device), t.to(device)


def reference_loss_and_grads(s, t, grad, temperature, reduction):
    s64 = s.detach().double().cpu().requires_grad_()
    t64 = t.detach().double().cpu().requires_grad_()
    loss = reference.binary_kl_div(s64, t64, temperature=temperature, reduction=reduction)
    loss.backward(grad.double().cpu())
    return loss.detach(), s64.grad, t64.grad


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_reference(device, dtype, shape, reduction, temperature):
    s, t = make_logits(shape, dtype, device)
    s.requires_grad_()
    t.requires_grad_()
    loss = fastkd.binary_kl_div(s, t, temperature=temperature, reduction=reduction)
    assert loss.dtype == dtype and loss.device.type == device.type
    grad = torch.randn(loss.shape, dtype=dtype, device=device) * 3  # upstream gradient != 1
    loss.backward(grad)
    ref_loss, ref_ds, ref_dt = reference_loss_and_grads(s, t, grad, temperature, reduction)
    assert_close(loss, ref_loss)
    assert_close(s.grad, ref_ds)
    assert_close(t.grad, ref_dt)


def test_teacher_gets_no_gradient_unless_it_requires_grad(device):
    s, t = make_logits((3, 7), torch.float32, device)
    s.requires_grad_()
    fastkd.binary_kl_div(s, t).backward()
    assert t.grad is None
    _, ref_ds, _ = reference_loss_and_grads(s, t, torch.tensor(1.0), 1.0, "batchmean")
    assert_close(s.grad, ref_ds)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extreme_logits_stay_finite_and_exact(device, reduction):
    # every sign combination of |z| in {0, 1e-3, 20, 1e2, 1e4}: the official clamp saturates past ~18.4
    mags = torch.tensor([0.0, 1e-3, 20.0, 1e2, 1e4])
    vals = torch.cat([mags, -mags[1:]])
    s, t = torch.meshgrid(vals, vals, indexing="ij")
    s, t = s.reshape(9, 9).to(device).requires_grad_(), t.reshape(9, 9).to(device).requires_grad_()
    loss = fastkd.binary_kl_div(s, t, reduction=reduction)
    loss.backward(torch.ones_like(loss))
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    ref_loss, ref_ds, ref_dt = reference_loss_and_grads(s, t, torch.ones(loss.shape), 1.0, reduction)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-5)
    assert_close(s.grad, ref_ds)
    assert_close(t.grad, ref_dt)


def test_agrees_with_official_clamped_formula_where_clamp_is_inactive(device):
    s, t = make_logits((64, 80), torch.float32, device, scale=3.0)
    s = s.clamp(-15, 15).requires_grad_()
    t = t.clamp(-15, 15)
    ours = fastkd.binary_kl_div(s, t)
    official = reference.binary_kl_div_official(s.double(), t.double())
    torch.testing.assert_close(ours.double(), official, rtol=1e-5, atol=1e-6)
    # past the clamp the official gradient vanishes; the exact one does not. The official formula in float64: in
    # float32 its bound 1 - 1e-8 rounds to 1, log(1 - p) is -inf, and whether clamp's backward passes a gradient
    # at its bound changed between torch versions (2.11: NaN here).
    official_far = torch.full((2, 3), 30.0, dtype=torch.float64, device=device, requires_grad=True)
    reference.binary_kl_div_official(official_far, torch.zeros_like(official_far)).backward()
    assert official_far.grad.abs().max() == 0
    far = torch.full((2, 3), 30.0, device=device, requires_grad=True)
    fastkd.binary_kl_div(far, torch.zeros(2, 3, device=device)).backward()
    torch.testing.assert_close(far.grad, torch.full((2, 3), 0.5 / 2, device=device), rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, under the interpreter
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_propagates(device, reduction):
    s, t = make_logits((4, 5), torch.float32, device)
    s[1, 2] = float("nan")
    loss = fastkd.binary_kl_div(s, t, reduction=reduction)
    if reduction == "none":
        assert torch.isnan(loss[1, 2]) and torch.isnan(loss).sum() == 1
    else:
        assert torch.isnan(loss)


@pytest.mark.parametrize("reduction, expected", [("none", None), ("sum", 0.0), ("mean", float("nan")),
                                                  ("batchmean", float("nan"))])
def test_empty_input_matches_reference(device, reduction, expected):
    s = torch.zeros(0, 5, device=device, requires_grad=True)
    loss = fastkd.binary_kl_div(s, torch.zeros(0, 5, device=device), reduction=reduction)
    ref = reference.binary_kl_div(s.detach(), torch.zeros(0, 5, device=device), reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    loss.sum().backward()
    assert s.grad.shape == (0, 5)


def test_non_contiguous_inputs(device):
    s, t = make_logits((13, 6), torch.float32, device)
    s, t = s.t().requires_grad_(), t.t()  # (6, 13) views with strides (1, 6)
    loss = fastkd.binary_kl_div(s, t, reduction="none")
    loss.backward(torch.ones_like(loss))
    ref_loss, ref_ds, _ = reference_loss_and_grads(s, t, torch.ones(6, 13), 1.0, "none")
    assert_close(loss, ref_loss)
    assert_close(s.grad, ref_ds)


def test_gradcheck_float64(device):
    s, t = make_logits((3, 5), torch.float64, device)
    s.requires_grad_()
    t.requires_grad_()
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda a, b: fastkd.binary_kl_div(a, b, temperature=1.5, reduction=reduction), (s, t))


@pytest.mark.parametrize("path", ["public", "registered op"])
def test_gradgradcheck_float64(device, path):
    """Double backward (create_graph=True) is exact: the eager paths and the registered op's autograd recompute
    the gradient in differentiable torch ops."""
    s, t = make_logits((3, 5), torch.float64, device)
    for reduction in REDUCTIONS:
        def loss(a, b):
            if path == "public":
                return fastkd.binary_kl_div(a, b, temperature=1.5, reduction=reduction)
            return torch.ops.fastkd.binary_kl_div(a, b, 1.5, reduction)
        assert torch.autograd.gradgradcheck(loss, (s.clone().requires_grad_(), t.clone().requires_grad_()))


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_opcheck(device, reduction):
    s, t = make_logits((3, 7), torch.float32, device)
    torch.library.opcheck(torch.ops.fastkd.binary_kl_div.default,
                          (s.requires_grad_(), t.requires_grad_(), 2.0, reduction))
    grad = torch.randn((3, 7) if reduction == "none" else (), device=device)
    for teacher_grad in (False, True):
        torch.library.opcheck(torch.ops.fastkd.binary_kl_div_backward.default,
                              (grad, s.detach(), t.detach(), 2.0, reduction, teacher_grad))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpu_autograd_node_matches_forward_and_backward_ops(reduction):
    """The eager CPU node (C++: stored gradient x upstream) = the forward op and the backward op, for a random
    upstream gradient, with and without the teacher's gradient."""
    s, t = make_logits((5, 4, 13), torch.float32, "cpu", scale=20.0)  # |z| up to ~80: every branch
    upstream = torch.randn(s.shape if reduction == "none" else ())
    for teacher_grad in (False, True):
        s_, t_ = s.clone().requires_grad_(), t.clone().requires_grad_(teacher_grad)
        loss = fastkd._C.binary_kl_div_autograd(s_, t_, 1.5, reduction)
        torch.testing.assert_close(loss, torch.ops.fastkd.binary_kl_div(s, t, 1.5, reduction), rtol=1e-6, atol=1e-6)
        loss.backward(upstream)
        expected = torch.ops.fastkd.binary_kl_div_backward(upstream, s, t, 1.5, reduction, teacher_grad)
        torch.testing.assert_close(s_.grad, expected[0], rtol=1e-6, atol=1e-7)
        if teacher_grad:
            torch.testing.assert_close(t_.grad, expected[1], rtol=1e-6, atol=1e-7)
        else:
            assert len(expected) == 1 and t_.grad is None


@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_cpu_autograd_node_unit_upstream_keeps_stored_gradient(reduction):
    """loss.backward() (upstream exactly 1) passes the stored gradients on without multiplying: over a retained
    graph, an in-place change of .grad must not reach them."""
    s, t = make_logits((5, 13), torch.float32, "cpu", scale=5.0)
    expected = torch.ops.fastkd.binary_kl_div_backward(torch.ones(()), s, t, 1.0, reduction, True)
    s_, t_ = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss = fastkd._C.binary_kl_div_autograd(s_, t_, 1.0, reduction)
    loss.backward(retain_graph=True)
    s_.grad.mul_(10)
    t_.grad.mul_(10)
    loss.backward(retain_graph=True)
    loss.backward(torch.tensor(3.0))
    torch.testing.assert_close(s_.grad, expected[0] * 14, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(t_.grad, expected[1] * 14, rtol=1e-6, atol=1e-7)


def test_torch_compile_fullgraph_forward_and_backward(device):
    torch._dynamo.reset()

    def mixed_loss(s, t):
        return fastkd.binary_kl_div(s, t, temperature=2.0) + 0.5 * fastkd.binary_kl_div(s, t, reduction="sum")

    compiled = torch.compile(mixed_loss, fullgraph=True)
    s, t = make_logits((5, 4, 13), torch.float32, device)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    eager_loss, compiled_loss = mixed_loss(s1, t), compiled(s2, t)
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(s2.grad, s1.grad)


def test_mld_loss_module(device):
    s, t = make_logits((6, 9), torch.float32, device)
    module = fastkd.nn.MLDLoss(temperature=3.0, reduction="sum")
    torch.testing.assert_close(module(s, t), fastkd.binary_kl_div(s, t, temperature=3.0, reduction="sum"))
    assert "temperature=3.0" in repr(module)


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((torch.zeros(2, 3), torch.zeros(2, 4)), {}, ValueError, r"teacher_logits must have the shape of student_logits \(2, 3\), got \(2, 4\)"),
    ((torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)), {}, TypeError, r"student_logits must be a floating-point tensor .* got dtype torch.int64"),
    ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32)), {}, TypeError, r"teacher_logits must be a floating-point tensor .* got dtype torch.int32"),
    ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)), {}, TypeError, r"teacher_logits must have the dtype of student_logits \(torch.float32\), got torch.float64"),
    ((torch.zeros(2, 3), torch.zeros(2, 3, device="meta")), {}, ValueError, r"teacher_logits must be on the device of student_logits \(cpu\), got meta"),
    ((torch.zeros(()), torch.zeros(())), {}, ValueError, r"student_logits must have at least 1 dimension\(s\), got shape \(\)"),
    (([0.0], torch.zeros(1)), {}, TypeError, r"student_logits must be a torch.Tensor, got list"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"temperature": 0.0}, ValueError, r"temperature must be a finite number > 0, got 0.0"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"temperature": -1}, ValueError, r"temperature must be a finite number > 0, got -1"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"temperature": float("nan")}, ValueError, r"temperature must be a finite number > 0, got nan"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"temperature": torch.tensor(2.0)}, TypeError, r"temperature must be a real number, got Tensor"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"reduction": "avg"}, ValueError, r"reduction must be one of \('none', 'sum', 'mean', 'batchmean'\), got 'avg'"),
])
def test_bad_input_raises_clear_error(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastkd.binary_kl_div(*args, **kwargs)


PORTABLE_BUILD_CHECK = """
import torch, fastkd
from fastkd import reference
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for shape in ((1, 1), (37, 19)):
        for reduction in ("none", "sum", "batchmean"):
            s = (torch.randn(shape) * 4).to(dtype).requires_grad_()
            t = (torch.randn(shape) * 4).to(dtype).requires_grad_()
            loss = fastkd.binary_kl_div(s, t, temperature=1.5, reduction=reduction)
            loss.backward(torch.ones_like(loss))
            s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
            ref = reference.binary_kl_div(s64, t64, temperature=1.5, reduction=reduction)
            ref.backward(torch.ones_like(ref))
            tol = dict(rtol=2e-2, atol=1e-3) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-5, atol=1e-6)
            for got, want in ((loss, ref), (s.grad, s64.grad), (t.grad, t64.grad)):
                torch.testing.assert_close(got.double(), want.detach(), **tol)
print("portable build ok")
"""


def test_portable_cpu_build_matches_reference():
    # The C++ kernels are built twice (portable and AVX2); ATEN_CPU_CAPABILITY=default selects the portable one.
    import os
    import subprocess
    import sys
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    result = subprocess.run([sys.executable, "-c", PORTABLE_BUILD_CHECK], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "portable build ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_forward_and_backward():
    s, t = make_logits((64, 80), torch.float32, "cuda")
    s.requires_grad_()

    def step():
        loss = fastkd.binary_kl_div(s, t, temperature=2.0)
        return (loss, *torch.autograd.grad(loss, s))

    assert_cuda_graph_replays(step)
