"""References for TaT (target-aware transformer distillation): the attention loss with the softmax
materialised, and the official regroupings written out step by step. Semantics: shared/design/official-semantics.md."""
import torch
import torch.nn.functional as F


def tat_attention_loss(query, key, value, target, scale=1.0, reduction="mean"):
    """softmax(scale * query key^T, over keys) value against target: mse_loss ("mean"), "sum", or "none"
    (per batch item sums). query (B, N, Cq), key (B, M, Cq), value (B, M, Cv), target (B, N, Cv)."""
    attention = torch.softmax(scale * query @ key.transpose(1, 2), dim=-1)  # (B, N, M), materialised
    out = attention @ value
    if reduction == "mean":
        return F.mse_loss(out, target)
    squared = (out - target) ** 2
    return squared.sum() if reduction == "sum" else squared.sum((1, 2))


def sdpa_attention_loss(query, key, value, target):
    """The same "mean" loss through torch's scaled_dot_product_attention (scale 1): a benchmark baseline."""
    return F.mse_loss(F.scaled_dot_product_attention(query, key, value, scale=1.0), target)


def patch_group_official(x, grid, groups):
    """The official patch-group regrouping, step by step: (B, C, H, W) -> (B * groups, kh * kw, P * C).

    1. unfold H and W into windows of kh = H // n and kw = W // m (stride = size): (B, C, n', m', kh, kw), with
       n' = H // kh (= n in the official configs; fastkd.patch_group always uses n);
    2. number the patches row-major p = i * m' + j and stack their channels: channel p * C + c of (B, n' m' C, kh, kw);
    3. split the channels into `groups` heads of P * C (P = n' m' / groups patches each) and flatten each
       head's kh x kw map row-major into tokens: (B, groups, kh * kw, P * C), batch index b * groups + g."""
    n, m = grid
    B, C, H, W = x.shape
    kh, kw = H // n, W // m
    patches = x.unfold(2, kh, kh).unfold(3, kw, kw)                          # (B, C, n', m', kh, kw)
    patches = patches.reshape(B, C, -1, kh, kw)                                # (B, C, n' m', kh, kw)
    stacked = patches.permute(0, 2, 1, 3, 4).reshape(B, -1, kh, kw)           # channel p * C + c
    heads = stacked.reshape(B, groups, -1, kh * kw).transpose(2, 3)           # (B, groups, kh kw, P C)
    return heads.reshape(B * groups, kh * kw, -1)


def anchor_pool_official(x, grid):
    """The official anchor points: AvgPool2d(kernel = stride = (H // ah, W // aw)), tokens row-major (B, h w, C)."""
    kernel = (x.shape[2] // grid[0], x.shape[3] // grid[1])
    return torch.nn.AvgPool2d(kernel, kernel)(x).flatten(2).transpose(1, 2)


def hierarchical_tat_loss(query, key, value, target, grid, groups, anchor_grid, beta, gamma, scale=1.0):
    """Official segmentation TaT loss on embedded (B, C, H, W) maps: beta * patch-group term + gamma *
    anchor-point term, each an mse_loss of the attention output against the regrouped target (attention logits
    times scale; official 1)."""
    patch = tat_attention_loss(*(patch_group_official(x, grid, groups) for x in (query, key, value, target)), scale)
    anchor = tat_attention_loss(*(anchor_pool_official(x, anchor_grid) for x in (query, key, value, target)), scale)
    return beta * patch + gamma * anchor
