"""MITr's two attentions over a (B, H, W, C) feature map, both through F.scaled_dot_product_attention.

- WindowAttention (the paper's pixel attention, Swin's W-MSA / SW-MSA): the map is cut into ws x ws windows
  (padded to a multiple of ws, padding masked out of the keys) and multi-head self-attention runs inside each
  window over its N = ws^2 pixels: softmax(q k^T / sqrt(d) + bias) v with an optional learned relative position
  bias B[dy, dx] ((2 ws - 1)^2 entries per head). With shift s = ws // 2 the map is rolled by (-s, -s) first
  and rolled back after; pixels that the roll brought together from opposite borders do not attend to each
  other (the mask of window_mask).
- CrossWindowAttention: per channel, every window's ws^2 values of that channel form one token (length N), and
  self-attention runs among the windows of one map: qkv = Linear(N, 3N), heads of N / heads values, output
  Linear(N, N); no position bias (CAT's cross-patch attention, the authors' sibling model). A map of one window
  gives one token: the attention weights are 1 and the layer is the per-channel linear map proj(v(.)) over the
  window's positions.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def padded_size(size: int, window: int) -> int:
    return -(-size // window) * window


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B, nW, window^2, C), windows row-major, pixels
    row-major inside each window."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // window) * (w // window), window * window, c)


def window_merge(windows: Tensor, height: int, width: int) -> Tensor:
    """The inverse of window_partition: (B, nW, window^2, C) -> (B, height, width, C)."""
    b, _, n, c = windows.shape
    window = int(round(n ** 0.5))
    x = windows.view(b, height // window, width // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def window_mask(height: int, width: int, window: int, shift: int, device=None):
    """Which key each query may attend to, (nW, N, N) bool (True = attend), for the map of real size
    (height, width) padded to multiples of `window` and rolled by (-shift, -shift); None when every pair may.

    In rolled coordinates a row r belongs to region r // window, except the last `shift` rows, which the roll
    brought from the top (region -1); columns alike. A pair attends when both its regions agree and the key is a
    real (unpadded) pixel; every query may attend to itself, so a window of padding alone stays finite."""
    hp, wp = padded_size(height, window), padded_size(width, window)
    if shift == 0 and (hp, wp) == (height, width):
        return None

    def regions(size, padded):
        r = torch.arange(padded, device=device)
        region = torch.where(r >= padded - shift, -1, r // window) if shift else r // window
        original = (r + shift) % padded  # where the rolled row was before the roll
        return region, original < size

    region_y, real_y = regions(height, hp)
    region_x, real_x = regions(width, wp)
    region = window_partition((region_y[:, None] * (wp + 1) + region_x[None, :])[None, :, :, None], window)[0, ..., 0]
    real = window_partition((real_y[:, None] & real_x[None, :])[None, :, :, None], window)[0, ..., 0]
    same = region[:, :, None] == region[:, None, :]
    eye = torch.eye(window * window, dtype=torch.bool, device=device)
    return (same & real[:, None, :]) | eye


def relative_position_index(window: int) -> Tensor:
    """(N, N) index into the (2 window - 1)^2 bias table of the offset (dy, dx) from key j to query i."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offset = coords[:, :, None] - coords[:, None, :] + window - 1
    return offset[0] * (2 * window - 1) + offset[1]


class WindowAttention(nn.Module):
    """Pixel attention: forward(x (B, H, W, C), shift) -> (B, H, W, C) (see the module docstring).

    attend_token(token (B, 1, C), x (B, H, W, C)) -> (B, 1, C): a token's query over the keys of itself and
    every real pixel of the map (not windowed, no position bias), with this layer's projections; the pixels do
    not attend to the token. MITr's object-aware token reads the last stage this way."""

    def __init__(self, dim: int, heads: int, window: int, position_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide the channels ({dim})")
        self.dim, self.heads, self.window = dim, heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if position_bias:
            self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
            nn.init.trunc_normal_(self.bias_table, std=0.02)
            self.register_buffer("bias_index", relative_position_index(window), persistent=False)
        else:
            self.bias_table = None

    def position_bias(self) -> Tensor:
        """(heads, N, N) bias added to the attention logits."""
        n = self.window * self.window
        return self.bias_table[self.bias_index.reshape(-1)].view(n, n, self.heads).permute(2, 0, 1)

    def forward(self, x: Tensor, shift: int = 0) -> Tensor:
        b, h, w, c = x.shape
        ws, heads = self.window, self.heads
        hp, wp = padded_size(h, ws), padded_size(w, ws)
        if (hp, wp) != (h, w):
            x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        if shift:
            x = torch.roll(x, (-shift, -shift), dims=(1, 2))
        windows = window_partition(x, ws)                                   # (B, nW, N, C)
        nw, n = windows.shape[1], windows.shape[2]
        qkv = self.qkv(windows).view(b, nw, n, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = (t.reshape(b, nw * heads, n, c // heads) for t in qkv)     # windows x heads as one axis
        mask = self.attention_mask(h, w, shift, q.dtype, x.device)  # under autocast: q's dtype, not x's
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.view(b, nw, heads, n, c // heads).transpose(2, 3).reshape(b, nw, n, c)
        x = window_merge(self.proj(out), hp, wp)
        if shift:
            x = torch.roll(x, (shift, shift), dims=(1, 2))
        return x[:, :h, :w] if (hp, wp) != (h, w) else x

    def attention_mask(self, height: int, width: int, shift: int, dtype, device):
        """None, or the (1, nW * heads, N, N) additive mask: position bias, -inf where window_mask forbids."""
        allowed = window_mask(height, width, self.window, shift, device)
        if self.bias_table is None and allowed is None:
            return None
        nw = (padded_size(height, self.window) // self.window) * (padded_size(width, self.window) // self.window)
        n = self.window * self.window
        mask = torch.zeros(nw, self.heads, n, n, dtype=dtype, device=device)
        if self.bias_table is not None:
            mask = mask + self.position_bias().to(dtype)
        if allowed is not None:
            mask = mask.masked_fill(~allowed[:, None], float("-inf"))
        return mask.reshape(1, nw * self.heads, n, n)

    def attend_token(self, token: Tensor, x: Tensor) -> Tensor:
        b, _, c = token.shape
        heads = self.heads
        keys = torch.cat([token, x.reshape(b, -1, c)], 1)                    # (B, 1 + HW, C)
        q = F.linear(token, self.qkv.weight[:c], self.qkv.bias[:c])
        kv = F.linear(keys, self.qkv.weight[c:], self.qkv.bias[c:])
        q = q.view(b, 1, heads, c // heads).transpose(1, 2)
        k, v = kv.view(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, 1, c))


class CrossWindowAttention(nn.Module):
    """Cross-window attention: forward(x (B, H, W, C)) -> (B, H, W, C) (see the module docstring)."""

    def __init__(self, window: int, heads: int = 1):
        super().__init__()
        n = window * window
        if n % heads:
            raise ValueError(f"cross-window heads ({heads}) must divide window^2 ({n})")
        self.window, self.heads = window, heads
        self.qkv = nn.Linear(n, 3 * n)
        self.proj = nn.Linear(n, n)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        ws, heads = self.window, self.heads
        hp, wp = padded_size(h, ws), padded_size(w, ws)
        if (hp, wp) != (h, w):
            x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        tokens = window_partition(x, ws).permute(0, 3, 1, 2)                 # (B, C, nW, N): per channel
        nw, n = tokens.shape[2], tokens.shape[3]
        qkv = self.qkv(tokens).view(b, c, nw, 3, heads, n // heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = (t.reshape(b, c * heads, nw, n // heads) for t in qkv)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.view(b, c, heads, nw, n // heads).transpose(2, 3).reshape(b, c, nw, n)
        x = window_merge(self.proj(out).permute(0, 2, 3, 1), hp, wp)
        return x[:, :h, :w] if (hp, wp) != (h, w) else x
