"""fastkd.tat_attention_loss, patch_group / patch_ungroup / anchor_pool and the TaT modules against the
plain references (softmax materialised, official regroupings), on every kernel path.

Interpreted Triton is slow: shapes stay small but reach every kernel layout (one key tile or several, one
query tile or several, channel chunks and channel tiles split over the grid)."""
import pytest
import torch

import fastkd
import fastkd.kernels.tat_attention_loss_cpu as tat_cpu
from fastkd import reference
from tests.conftest import NORM_TOLERANCES, assert_close, assert_close_norm, assert_cuda_graph_replays

# (B, N, M, Cq, Cv): one tile each way (7x7 maps); N != M over two query and key tiles; one key tile with two
# query tiles (forward) and Cq over two channel tiles (backward); a single token; patch-group-like 16 tokens
SHAPES = [(2, 49, 49, 48, 48), (2, 65, 70, 48, 40), (2, 70, 33, 130, 40), (1, 1, 1, 8, 8), (3, 16, 16, 64, 64)]
# channels above the widest channel tile: one tile each way (every gradient chunked), and several key tiles
# (forward Cv split over the grid, backward over channel tiles)
WIDE_SHAPES = [(1, 49, 49, 520, 520), (1, 20, 65, 48, 520)]
REDUCTIONS = ["mean", "sum", "none"]


def make_inputs(shape, dtype, device, logit_scale=1.0, seed=0):
    B, N, M, Cq, Cv = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, Cq, generator=gen) * logit_scale / Cq ** 0.25
    k = torch.randn(B, M, Cq, generator=gen) * logit_scale / Cq ** 0.25
    v, t = torch.randn(B, M, Cv, generator=gen), torch.randn(B, N, Cv, generator=gen)
    return [x.to(dtype).to(device).requires_grad_() for x in (q, k, v, t)]


def reference_loss_and_grads(inputs, grad, **kwargs):
    leaves = [x.detach().double().cpu().requires_grad_() for x in inputs]
    loss = reference.tat_attention_loss(*leaves, **kwargs)
    loss.backward(grad.double().cpu())
    return loss.detach(), [x.grad for x in leaves]


def assert_grads_close(actual, expected, dtype, tol=None):
    """Relative norm error within the dtype's tolerance; gradients that are zero in exact arithmetic (a single
    key; a bias added to every key, which softmax ignores) only need to be zero up to rounding (O(1) inputs)."""
    for a, e in zip(actual, expected):
        if e.norm() <= 1e-6:
            assert a.abs().max() <= NORM_TOLERANCES[dtype], a.abs().max()
        else:
            assert_close_norm(a, e, dtype) if tol is None else _assert_relative_norm(a, e, tol)


def _assert_relative_norm(actual, expected, tol):
    error = (actual.detach().double().cpu() - expected).norm() / expected.norm()
    assert error <= tol, f"relative error {error:.3g} > {tol:g}"


def check_against_reference(device, dtype, shape, reduction="mean", scale=1.0, logit_scale=1.0, grad_tol=None):
    inputs = make_inputs(shape, dtype, device, logit_scale)
    loss = fastkd.tat_attention_loss(*inputs, scale=scale, reduction=reduction)
    assert loss.dtype == dtype and loss.shape == ((shape[0],) if reduction == "none" else ())
    grad = (torch.randn(loss.shape, generator=torch.Generator().manual_seed(5)) + 2).to(dtype).to(device)  # != 1
    loss.backward(grad)
    ref_loss, ref_grads = reference_loss_and_grads(inputs, grad, scale=scale, reduction=reduction)
    assert_close(loss, ref_loss)
    assert_grads_close([x.grad for x in inputs], ref_grads, dtype, grad_tol)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, dtype, shape):
    check_against_reference(device, dtype, shape)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_and_scale(device, reduction):
    check_against_reference(device, torch.float32, (2, 65, 70, 48, 40), reduction, scale=0.3)


@pytest.mark.parametrize("shape", WIDE_SHAPES, ids=str)
def test_wide_channels(device, shape):
    check_against_reference(device, torch.float32, shape, "sum")


@pytest.mark.parametrize("keys", [40, 70], ids=["one key tile", "online softmax"])
def test_large_logits_do_not_overflow(device, keys):
    # logits of order 1e3 (exp overflows fp32 at 88), attention nearly one-hot; rounding the logits to fp32
    # (any fp32 computation does) moves P by ~|S| * 6e-8 relative, hence the gradient tolerance
    check_against_reference(device, torch.float32, (2, 33, keys, 48, 24), logit_scale=12.0, grad_tol=1e-3)


def test_cpu_path_chunks_queries(device, monkeypatch):
    if device.type != "cpu":
        pytest.skip("the CPU path's query chunks")
    monkeypatch.setattr(tat_cpu, "CHUNK_ELEMENTS", 200)  # 2 x 70 keys per chunk row: one query per chunk
    check_against_reference(device, torch.float32, (2, 65, 70, 48, 40), "none")


def test_strided_views_and_frozen_target(device):
    # (B, C, H, W) maps read as (B, H * W, C) token views, no copy; the target gets no gradient
    gen = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, c, 7, 9, generator=gen).to(device) for c in (12, 12, 10, 10)]
    tokens = [x.flatten(2).transpose(1, 2) for x in maps]
    for x in tokens[:3]:
        x.requires_grad_()
    loss = fastkd.tat_attention_loss(*tokens)
    loss.backward()
    ref_loss, ref_grads = reference_loss_and_grads(tokens, torch.tensor(1.0))
    assert_close(loss, ref_loss)
    assert_grads_close([x.grad for x in tokens[:3]], ref_grads[:3], torch.float32)
    assert tokens[3].grad is None


def test_deterministic_and_no_residual_without_grad(device):
    inputs = make_inputs((2, 65, 70, 48, 40), torch.float32, device)
    runs = []
    for _ in range(2):
        loss = fastkd.tat_attention_loss(*inputs, reduction="none")
        runs.append([loss.detach(), *torch.autograd.grad(loss.sum(), inputs)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    with torch.no_grad():
        outputs = torch.ops.fastkd.tat_attention_loss(*inputs, 1.0, "none", False)
    assert outputs[2].numel() == outputs[3].numel() == 0 and torch.equal(outputs[0], runs[0][0])


def test_gradcheck_float64(device):
    inputs = make_inputs((2, 5, 7, 4, 3), torch.float64, device)
    for reduction in ("mean", "none"):  # fast mode: random projections of the Jacobian (the interpreter is slow)
        assert torch.autograd.gradcheck(
            lambda *x: fastkd.tat_attention_loss(*x, scale=0.7, reduction=reduction), inputs, fast_mode=True)


@pytest.mark.parametrize("path", ["public", "registered op"])
def test_double_backward_raises(device, path):
    """Differentiable once: create_graph=True gives the right gradient, and differentiating it raises."""
    inputs = make_inputs((2, 5, 7, 4, 3), torch.float64, device)
    loss = (fastkd.tat_attention_loss(*inputs) if path == "public"
            else torch.ops.fastkd.tat_attention_loss(*inputs, 1.0, "mean", True)[0])
    grads = torch.autograd.grad(loss, inputs[:3], create_graph=True)
    expected = torch.autograd.grad(reference.tat_attention_loss(*inputs), inputs[:3])
    torch.testing.assert_close(grads, expected)
    with pytest.raises(RuntimeError, match="differentiable once"):
        grads[0].square().sum().backward()


def test_opcheck(device):
    inputs = make_inputs((2, 9, 11, 6, 5), torch.float32, device)
    torch.library.opcheck(torch.ops.fastkd.tat_attention_loss.default, (*inputs, 1.0, "mean", True))
    detached = [x.detach() for x in inputs]
    _, lse, rowdot, residual = torch.ops.fastkd.tat_attention_loss(*detached, 1.0, "none", True)
    for target_grad in (False, True):
        torch.library.opcheck(torch.ops.fastkd.tat_attention_loss_backward.default,
                              (torch.randn(2, device=device), *detached[:3], residual, lse, rowdot, 1.0, "none",
                               target_grad))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def loss_fn(student, teacher):  # patch-group and anchor terms on raw maps, as in HierarchicalTaTLoss
        patch = [fastkd.patch_group(x, (2, 2), 2) for x in (student, teacher, student, teacher)]
        anchor = [fastkd.anchor_pool(x, (3, 3)) for x in (student, teacher, student, teacher)]
        return fastkd.tat_attention_loss(*patch) + 0.5 * fastkd.tat_attention_loss(*anchor, reduction="sum")

    gen = torch.Generator().manual_seed(2)
    student, teacher = (torch.randn(2, 4, 8, 6, generator=gen).to(device) for _ in range(2))
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    eager, compiled = loss_fn(s1, teacher), torch.compile(loss_fn, fullgraph=True)(s2, teacher)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(s2.grad, s1.grad)


# (H, W, grid, groups): official segmentation geometry (129 -> 128, one group per row segment of 4 patches);
# P = 3 with m = 3 (one group per patch row); P = 2 with m = 3 (groups straddle rows); one group; one patch each
REGROUPINGS = [(129, 129, (16, 16), 64), (13, 11, (4, 3), 4), (13, 11, (4, 3), 6), (13, 11, (4, 3), 1),
               (13, 11, (4, 3), 12)]


@pytest.mark.parametrize("H, W, grid, groups", REGROUPINGS, ids=str)
def test_patch_group_is_the_official_order_and_ungroup_inverts_it(H, W, grid, groups):
    x = torch.randn(2, 3, H, W)
    grouped = fastkd.patch_group(x, grid, groups)
    torch.testing.assert_close(grouped, reference.patch_group_official(x, grid, groups), rtol=0, atol=0)
    kh, kw = H // grid[0], W // grid[1]
    restored = fastkd.patch_ungroup(grouped, grid, groups, (kh, kw))
    torch.testing.assert_close(restored, x[:, :, :grid[0] * kh, :grid[1] * kw], rtol=0, atol=0)


@pytest.mark.parametrize("H, W, grid", [(129, 129, (32, 32)), (129, 129, (64, 64)), (13, 11, (4, 3))], ids=str)
def test_anchor_pool_is_avgpool2d(H, W, grid):
    x = torch.randn(2, 5, H, W, requires_grad=True)
    tokens = fastkd.anchor_pool(x, grid)
    assert tokens.shape == (2, grid[0] * grid[1], 5)
    torch.testing.assert_close(tokens, reference.anchor_pool_official(x, grid))


def test_anchor_pool_keeps_exactly_the_grid():
    x = torch.randn(1, 2, 11, 11)  # kernel 11 // 4 = 2: AvgPool2d gives 5 x 5 cells, the grid 4 x 4
    official = reference.anchor_pool_official(x, (4, 4)).reshape(1, 5, 5, 2)
    torch.testing.assert_close(fastkd.anchor_pool(x, (4, 4)), official[:, :4, :4].reshape(1, 16, 2))


@pytest.mark.parametrize("roles, teacher_embed", [("official", False), ("paper", False), ("official", True)])
def test_tat_loss_module_end_to_end(device, roles, teacher_embed):
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 6, 7, 7, generator=gen).to(device).requires_grad_()
    teacher = torch.randn(2, 10, 7, 7, generator=gen).to(device)
    module = fastkd.nn.TaTLoss(6, 10, roles=roles, teacher_embed=teacher_embed).to(device)
    loss = module(student, teacher)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(loss, [student, *params])

    def tokens(x):
        return x.flatten(2).transpose(1, 2)

    s_side, t_side = tokens(module.gamma(student)), tokens(module.theta(teacher))
    q, k = (s_side, t_side) if roles == "official" else (t_side, s_side)
    ref = reference.tat_attention_loss(q, k, tokens(module.phi(student)), tokens(teacher))
    ref_grads = torch.autograd.grad(ref, [student, *params])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert len(params) == (9 if teacher_embed else 6)  # conv weight, BN weight and bias per embedding
    assert_grads_close(grads, ref_grads, torch.float32)


def test_hierarchical_tat_loss_module_end_to_end(device):
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(2, 6, 17, 17, generator=gen).to(device).requires_grad_()
    teacher = torch.randn(2, 8, 17, 17, generator=gen).to(device)
    module = fastkd.nn.HierarchicalTaTLoss(6, 8, grid=(4, 4), groups=4, anchor_grid=(8, 8), alpha=0.5, beta=1.0,
                                           gamma=0.4).to(device)
    loss = module(student, teacher)
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, [student, *params])
    q, k, v = module.query_embed(student), module.key_embed(teacher), module.value_embed(student)
    ref = 0.5 * reference.hierarchical_tat_loss(q, k, v, teacher, (4, 4), 4, (8, 8), beta=1.0, gamma=0.4)
    ref_grads = torch.autograd.grad(ref, [student, *params])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    by_name = dict(zip((name for name, _ in module.named_parameters()), grads[1:]))
    for embed in ("query_embed", "key_embed", "value_embed"):  # every embedding's convolution learns
        assert by_name[f"{embed}.0.weight"].norm() > 1e-3
    assert_grads_close(grads, ref_grads, torch.float32)


@pytest.mark.parametrize("name, tokens, channels, anchors", [
    ("voc_resnet18", 64, 1024, 32 * 32), ("voc_mobilenet", 16, 256, 64 * 64),
    ("cocostuff_resnet18", 16, 512, 32 * 32), ("cocostuff_mobilenet", 64, 1024, 32 * 32)])
def test_official_segmentation_configs(name, tokens, channels, anchors):
    module = fastkd.nn.HierarchicalTaTLoss.from_config(name, student_channels=64)
    feature = torch.empty(12, 256, 129, 129, device="meta")  # shapes only: the table of official-semantics.md
    groups = module.groups
    assert fastkd.patch_group(feature, module.grid, groups).shape == (12 * groups, tokens, channels)
    assert fastkd.anchor_pool(feature, module.anchor_grid).shape == (12, anchors, 256)
    assert (module.alpha, module.beta, module.gamma) == {"voc_resnet18": (0.1, 1.0, 0.4),
                                                         "voc_mobilenet": (0.1, 1.0, 0.5),
                                                         "cocostuff_resnet18": (0.6, 1.0, 1.0),
                                                         "cocostuff_mobilenet": (0.4, 1.0, 1.0)}[name]


def _tat(q=(2, 3, 4), k=(2, 5, 4), v=(2, 5, 6), t=(2, 3, 6), **kwargs):
    return fastkd.tat_attention_loss(*(torch.zeros(s) for s in (q, k, v, t)), **kwargs)


@pytest.mark.parametrize("call, error, match", [
    (lambda: _tat(q=(2, 3)), ValueError, r"query must be \(B, N, Cq\), got \(2, 3\)"),
    (lambda: _tat(k=(2, 5, 3)), ValueError, r"key must be \(B, M, Cq\) with B=2, Cq=4, got \(2, 5, 3\)"),
    (lambda: _tat(k=(2, 0, 4), v=(2, 0, 6)), ValueError, r"key must have at least one token \(M >= 1\), got shape \(2, 0, 4\)"),
    (lambda: _tat(v=(2, 4, 6)), ValueError, r"value must be \(B, M, Cv\) with B=2, M=5, got \(2, 4, 6\)"),
    (lambda: _tat(t=(2, 3, 7)), ValueError, r"target must be \(B, N, Cv\) with B=2, N=3, Cv=6, got \(2, 3, 7\)"),
    (lambda: _tat(t=(1, 3, 6)), ValueError, r"target must be \(B, N, Cv\) with B=2, N=3, Cv=6, got \(1, 3, 6\)"),
    (lambda: fastkd.tat_attention_loss(torch.zeros(1, 2, 3, dtype=torch.long), *[torch.zeros(1, 2, 3)] * 3),
     TypeError, r"query must be a floating-point tensor .* got dtype torch.int64"),
    (lambda: fastkd.tat_attention_loss(*[torch.zeros(1, 2, 3)] * 3, torch.zeros(1, 2, 3).double()),
     TypeError, r"target must have the dtype of query \(torch.float32\), got torch.float64"),
    (lambda: fastkd.tat_attention_loss(*[torch.zeros(1, 2, 3)] * 2, torch.zeros(1, 2, 3, device="meta"),
                                       torch.zeros(1, 2, 3)),
     ValueError, r"value must be on the device of query \(cpu\), got meta"),
    (lambda: _tat(scale=float("inf")), ValueError, r"scale must be a finite real number, got inf"),
    (lambda: _tat(reduction="batchmean"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'batchmean'"),
    (lambda: fastkd.patch_group(torch.zeros(2, 3, 8), (2, 2), 1), ValueError, r"x must be a \(B, C, H, W\) feature map, got shape \(2, 3, 8\)"),
    (lambda: fastkd.patch_group(torch.zeros(1, 3, 8, 8).long(), (2, 2), 1), TypeError, r"x must be a floating-point tensor"),
    (lambda: fastkd.patch_group(torch.zeros(1, 3, 8, 8), (2, 2), 3), ValueError, r"groups must be a positive integer dividing the n \* m = 4 patches, got 3"),
    (lambda: fastkd.patch_group(torch.zeros(1, 3, 8, 8), (9, 2), 1), ValueError, r"grid \(9, 2\) must not exceed the feature map size \(H, W\) = \(8, 8\)"),
    (lambda: fastkd.patch_group(torch.zeros(1, 3, 8, 8), (0, 2), 1), ValueError, r"grid must be 2 integers >= 1, got \(0, 2\)"),
    (lambda: fastkd.patch_ungroup(torch.zeros(4, 16, 6), (2, 2), 2, (4, 3)), ValueError, r"x must be \(B \* groups, kh \* kw, P \* C\) with groups=2, kh \* kw=12, P=2, got \(4, 16, 6\)"),
    (lambda: fastkd.anchor_pool(torch.zeros(1, 3, 8, 8), (4, 16)), ValueError, r"grid \(4, 16\) must not exceed the feature map size \(H, W\) = \(8, 8\)"),
    (lambda: fastkd.nn.TaTLoss(4, 8, roles="teacher"), ValueError, r"roles must be one of \('official', 'paper'\), got 'teacher'"),
    (lambda: fastkd.nn.TaTLoss(4, 8)(torch.zeros(2, 4, 7, 7), torch.zeros(2, 8, 6, 6)), ValueError, r"student and teacher must be \(B, Cs, H, W\) and \(B, Ct, H, W\) feature maps with the same B, H, W, got \(2, 4, 7, 7\) and \(2, 8, 6, 6\)"),
    (lambda: fastkd.nn.TaTLoss(4, 8)(torch.zeros(2, 4, 7, 7), torch.zeros(2, 6, 7, 7)), ValueError, r"student and teacher must have \(Cs, Ct\) = \(4, 8\) channels, got \(4, 6\)"),
    (lambda: fastkd.nn.HierarchicalTaTLoss.from_config("ade20k", 64), ValueError, r"name must be one of \('voc_resnet18', 'voc_mobilenet', 'cocostuff_resnet18', 'cocostuff_mobilenet'\), got 'ade20k'"),
])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(2, 49, 64), (2, 200, 64)], ids=str)  # one-tile and tiled kernels
def test_cuda_graph_capture_forward_and_backward(shape):
    B, N, C = shape
    q, k, v, t = (torch.randn(B, N, C, device="cuda") for _ in range(4))
    inputs = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_())

    def step():
        loss = fastkd.tat_attention_loss(q, k, v, t)
        return (loss, *torch.autograd.grad(loss, inputs))

    assert_cuda_graph_replays(step)
