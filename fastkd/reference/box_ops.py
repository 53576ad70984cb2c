"""References for LGD's mask pooling (appearance embeddings) and box painting (knowledge mapper), one pyramid
level at a time, with dense (N, H, W) box masks as the official code builds them."""
import torch


def box_masks(boxes, image_size, level_size):
    """(N, H, W) bool masks of boxes (N, 4) = x1 y1 x2 y2 in input pixels at a level of size (H, W).

    Boxes are clamped to [0, W_pad - 1] x [0, H_pad - 1] of image_size = (H_pad, W_pad); with rw = W / W_pad and
    rh = H / H_pad, pixel (y, x) is inside iff x1 rw <= x <= x2 rw and y1 rh <= y <= y2 rh. A box of zero width
    or height after clamping is empty. All in float32, as the official code on float32 boxes (and the kernels).
    """
    (pad_height, pad_width), (height, width) = image_size, level_size
    b = boxes.float()
    x1, x2 = b[:, 0].clamp(0, pad_width - 1), b[:, 2].clamp(0, pad_width - 1)
    y1, y2 = b[:, 1].clamp(0, pad_height - 1), b[:, 3].clamp(0, pad_height - 1)
    # W / W_pad rounded to float32 is the float32 quotient (double rounding is exact for division, 53 >= 2 * 24 + 2)
    rw = torch.tensor(width / pad_width, dtype=torch.float32, device=b.device)
    rh = torch.tensor(height / pad_height, dtype=torch.float32, device=b.device)
    xs = torch.arange(width, dtype=torch.float32, device=b.device)
    ys = torch.arange(height, dtype=torch.float32, device=b.device)
    inside_x = (x1[:, None] * rw <= xs) & (xs <= x2[:, None] * rw)
    inside_y = (y1[:, None] * rh <= ys) & (ys <= y2[:, None] * rh)
    nonempty = (x2 > x1) & (y2 > y1)
    return inside_y[:, :, None] & inside_x[:, None, :] & nonempty[:, None, None]


def dense_pool(features, masks, batch_idx, reduction="mean"):
    """(N, C): per mask n (N, H, W) of image batch_idx[n], the sum of that image's features (B, C, H, W) over the
    mask, divided by max(count, 1) for "mean", not for "sum". One einsum over every (image, mask) pair (B times
    the work of the pairs that count, but no host sync), then each mask's own image. fp16/bf16 in fp32."""
    compute_dtype = torch.promote_types(features.dtype, torch.float32)
    pooled = torch.einsum("bchw,nhw->bnc", features.to(compute_dtype), masks.to(compute_dtype))
    pooled = pooled[batch_idx, torch.arange(masks.shape[0], device=masks.device)]
    if reduction == "mean":
        pooled = pooled / masks.flatten(1).sum(1).clamp_min(1)[:, None]
    return pooled.to(features.dtype)


def box_pool(features, boxes, batch_idx, image_size, reduction="mean"):
    """(N, C) appearance embeddings of one level (B, C, H, W): a_n = sum of F[batch_idx[n]] over box n's mask,
    divided by max(count, 1) for "mean" (official), not for "sum". Dense masks, one einsum."""
    return dense_pool(features, box_masks(boxes, image_size, features.shape[2:]), batch_idx, reduction)


def box_paint(values, boxes, batch_idx, image_size, out_shape):
    """(B, C, H, W) = sum over boxes n of values[n] (N, C) times box n's mask in image batch_idx[n] (a plain sum,
    overlaps add: the official knowledge mapper). Dense masks and one einsum."""
    batch, _, height, width = out_shape
    masks = box_masks(boxes, image_size, (height, width))
    image_of_box = (batch_idx == torch.arange(batch, device=boxes.device)[:, None]).to(values.dtype)  # (B, N)
    return torch.einsum("bnc,nhw->bchw", image_of_box[:, :, None] * values, masks.to(values.dtype))


def resize_masks(masks, size):
    """Bool masks (N, Hm, Wm) resized to size = (H, W) with nearest interpolation (the official segmentation variant)."""
    return torch.nn.functional.interpolate(masks[:, None].float(), size=tuple(size), mode="nearest")[:, 0] > 0


def _pool_one_image(features, masks, reduction):
    """(n, C) from one image's features (C, H, W) and its masks (n, H, W): masks times features, as a matmul."""
    weights = masks.flatten(1).to(features.dtype)
    pooled = weights @ features.flatten(1).t()
    return pooled / weights.sum(1).clamp_min(1)[:, None] if reduction == "mean" else pooled


def box_pool_official(features, boxes, batch_idx, image_size, reduction="mean"):
    """Official style: per image, the (n_b, H W) masks of its boxes times its (C, H W) features."""
    out = features.new_zeros(boxes.shape[0], features.shape[1])
    for b in range(features.shape[0]):
        index = (batch_idx == b).nonzero()[:, 0]
        masks = box_masks(boxes[index], image_size, features.shape[2:])
        out = out.index_copy(0, index, _pool_one_image(features[b], masks, reduction))
    return out


def box_paint_official(values, boxes, batch_idx, image_size, out_shape):
    """Official style: per image, its (C, n_b) values times the (n_b, H W) masks of its boxes."""
    batch, channels, height, width = out_shape
    maps = []
    for b in range(batch):
        index = (batch_idx == b).nonzero()[:, 0]
        masks = box_masks(boxes[index], image_size, (height, width)).flatten(1).to(values.dtype)
        maps.append((values[index].t() @ masks).view(channels, height, width))
    return torch.stack(maps)


def mask_pool_official(features, masks, batch_idx, reduction="mean"):
    """Segmentation-mask variant, official style: bool masks (N, Hm, Wm) resized nearest to the level (H, W), then
    per image its masks times its features."""
    resized = resize_masks(masks, features.shape[2:])
    out = features.new_zeros(masks.shape[0], features.shape[1])
    for b in range(features.shape[0]):
        index = (batch_idx == b).nonzero()[:, 0]
        out = out.index_copy(0, index, _pool_one_image(features[b], resized[index], reduction))
    return out
