"""TaT (target-aware transformer): one-to-all attention fused with its MSE, and the official regroupings of
feature maps into token sequences (patch groups, anchor points). Semantics: shared/design/official-semantics.md."""
import math
import numbers

import torch

from fastkd import ops
from fastkd._checks import check_choice, check_float_tensor, check_int_sequence, check_same_device_and_dtype
from fastkd._extension import require_extension

REDUCTIONS = ("mean", "sum", "none")


def _check_tokens(name: str, x, batch: int, shape_text: str, **sizes) -> None:
    """x must be (B, ., .) with the given sizes at dims 1 and 2 (None: any)."""
    check_float_tensor(name, x)
    expected = (batch, *sizes.values())
    if x.dim() != 3 or any(e is not None and s != e for s, e in zip(x.shape, expected)):
        wanted = ", ".join(f"{k}={v}" for k, v in {"B": batch, **sizes}.items() if v is not None)
        raise ValueError(f"{name} must be {shape_text} with {wanted}, got {tuple(x.shape)}")


def tat_attention_loss(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, target: torch.Tensor, *,
                       scale: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """TaT's one-to-all attention loss: out = softmax(scale * query key^T over the keys) value, compared with
    target by squared error, without materialising the (N, M) attention or out.

    query (B, N, Cq), key (B, M, Cq), value (B, M, Cv), target (B, N, Cv): one dtype and device, any strides
    (e.g. ``x.flatten(2).transpose(1, 2)`` of a (B, C, H, W) map is read in place); M >= 1, channels of any width.
    reduction: "mean" over B * N * Cv elements (= ``F.mse_loss(out, target)``, the official default), "sum",
    or "none" (per batch item sums, shape (B,)). scale = 1.0 is the official choice (no 1 / sqrt(d)).
    Gradients reach query, key, value, and target when it requires grad (detach the teacher otherwise).
    Differentiable once: differentiating the gradient (create_graph=True) raises.
    fp16/bf16 accumulate in fp32. Official roles (classification): query = gamma(student), key = teacher,
    value = phi(student), target = teacher; see fastkd.nn.TaTLoss. No host sync.
    """
    check_float_tensor("query", query)
    if query.dim() != 3:
        raise ValueError(f"query must be (B, N, Cq), got {tuple(query.shape)}")
    B, N, Cq = query.shape
    _check_tokens("key", key, B, "(B, M, Cq)", M=None, Cq=Cq)
    M = key.shape[1]
    if M == 0:
        raise ValueError(f"key must have at least one token (M >= 1), got shape {tuple(key.shape)}")
    _check_tokens("value", value, B, "(B, M, Cv)", M=M, Cv=None)
    _check_tokens("target", target, B, "(B, N, Cv)", N=N, Cv=value.shape[2])
    for name, x in (("key", key), ("value", value), ("target", target)):
        check_same_device_and_dtype(name, x, "query", query)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    check_choice("reduction", reduction, REDUCTIONS)
    require_extension()
    return ops.tat_attention_loss.tat_attention_loss(query, key, value, target, float(scale), reduction)


def _check_map(name: str, x) -> None:
    check_float_tensor(name, x)
    if x.dim() != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) feature map, got shape {tuple(x.shape)}")


def _check_grid(name: str, grid, map_size) -> tuple:
    grid = check_int_sequence(name, grid, 2, min_value=1)
    if grid[0] > map_size[0] or grid[1] > map_size[1]:
        raise ValueError(f"{name} {grid} must not exceed the feature map size (H, W) = {tuple(map_size)}")
    return grid


def _patches_per_group(grid, groups) -> int:
    patches = grid[0] * grid[1]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or patches % groups:
        raise ValueError(f"groups must be a positive integer dividing the n * m = {patches} patches, got {groups!r}")
    return patches // groups


def patch_group(x: torch.Tensor, grid, groups: int) -> torch.Tensor:
    """TaT's patch-group regrouping: (B, C, H, W) -> (B * groups, kh * kw, P * C).

    The map is cut into grid = (n, m) patches of kh = H // n by kw = W // m (remainder rows and columns
    dropped, e.g. 129 -> 128), numbered row-major p = i * m + j; groups of P = n * m / groups consecutive patches
    form one sequence each: token x * kw + y of group g holds, at channel pp * C + c, x[b, c, i * kh + x,
    j * kw + y] for patch p = g * P + pp (the official order; batch index b * groups + g).
    One copy when a group lies within one row of patches (m % P == 0, every official config), else two.
    """
    _check_map("x", x)
    B, C, H, W = x.shape
    n, m = _check_grid("grid", grid, (H, W))
    P = _patches_per_group((n, m), groups)
    kh, kw = H // n, W // m
    x = x[:, :, :n * kh, :m * kw]
    if m % P == 0:  # patch p = g * P + pp lies in row i = g // (m / P), column j = (g % (m / P)) * P + pp
        x = x.reshape(B, C, n, kh, m // P, P, kw).permute(0, 2, 4, 3, 6, 5, 1)  # (B, n, m / P, kh, kw, P, C)
    else:
        x = x.reshape(B, C, n, kh, m, kw).permute(0, 2, 4, 3, 5, 1).reshape(B, groups, P, kh, kw, C)
        x = x.permute(0, 1, 3, 4, 2, 5)  # (B, groups, kh, kw, P, C)
    return x.reshape(B * groups, kh * kw, P * C)


def patch_ungroup(x: torch.Tensor, grid, groups: int, patch_size) -> torch.Tensor:
    """Inverse of patch_group: (B * groups, kh * kw, P * C) -> (B, C, n * kh, m * kw) (the dropped remainder
    rows and columns are not restored)."""
    check_float_tensor("x", x)
    n, m = check_int_sequence("grid", grid, 2, min_value=1)
    P = _patches_per_group((n, m), groups)
    kh, kw = check_int_sequence("patch_size", patch_size, 2, min_value=1)
    if x.dim() != 3 or x.shape[0] % groups or x.shape[1] != kh * kw or x.shape[2] % P:
        raise ValueError(f"x must be (B * groups, kh * kw, P * C) with groups={groups}, kh * kw={kh * kw}, "
                         f"P={P}, got {tuple(x.shape)}")
    B, C = x.shape[0] // groups, x.shape[2] // P
    if m % P == 0:
        x = x.reshape(B, n, m // P, kh, kw, P, C).permute(0, 6, 1, 3, 2, 5, 4)  # (B, C, n, kh, m / P, P, kw)
    else:
        x = x.reshape(B, groups, kh, kw, P, C).permute(0, 1, 4, 2, 3, 5).reshape(B, n, m, kh, kw, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, n, kh, m, kw)
    return x.reshape(B, C, n * kh, m * kw)


def anchor_pool(x: torch.Tensor, grid) -> torch.Tensor:
    """TaT's anchor points: (B, C, H, W) -> (B, ah * aw, C) tokens (row-major), the means of the
    kh = H // ah by kw = W // aw cells of a grid = (ah, aw) (remainder rows and columns dropped).

    Equal to AvgPool2d(kernel = stride = (kh, kw)) of the official code wherever that gives ah x aw cells
    (H // kh == ah: all official configs, e.g. 129 -> 32 x 32 or 64 x 64); where it gives more (H = 11,
    ah = 4: kh = 2, five rows), the extra cells are dropped here. A view of the pooled map (no copy).
    """
    _check_map("x", x)
    ah, aw = _check_grid("grid", grid, x.shape[2:])
    kh, kw = x.shape[2] // ah, x.shape[3] // aw
    pooled = torch.nn.functional.avg_pool2d(x[:, :, :ah * kh, :aw * kw], (kh, kw), (kh, kw))
    return pooled.flatten(2).transpose(1, 2)
