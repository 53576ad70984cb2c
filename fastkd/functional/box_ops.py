"""LGD's mask pooling (appearance embeddings) and box painting (knowledge mapper) over pyramid levels.

Box rule (shared/design/official-semantics.md, in float32 like the official code): boxes x1 y1 x2 y2 in input
pixels are clamped to [0, W_pad - 1] x [0, H_pad - 1]; at a level of size (H, W), with rw = W / W_pad and
rh = H / H_pad, pixel (y, x) is inside iff x1 rw <= x <= x2 rw and y1 rh <= y <= y2 rh (integer indices, no
+0.5, inclusive). A box of zero width or height after clamping (so also inverted or off-image) is empty.
"""
import torch

import fastkd.ops  # noqa: F401  (registers torch.ops.fastkd.*)
from fastkd import reference
from fastkd._checks import (check_binary_mask, check_choice, check_float_tensor, check_int_sequence,
                            check_int_tensor, check_same_device, check_same_device_and_dtype)
from fastkd._extension import require_extension

REDUCTIONS = ("mean", "sum")


def _levels(name: str, x, dim: int, layout: str) -> list:
    """x (a tensor, or a non-empty list of them) as a list of `dim`-d float tensors of one dtype, device and size(0)."""
    is_list = isinstance(x, (list, tuple))
    levels = list(x) if is_list else [x]
    if not levels:
        raise ValueError(f"{name} must be a tensor or a non-empty list of tensors, got an empty {type(x).__name__}")
    for i, level in enumerate(levels):
        label = f"{name}[{i}]" if is_list else name
        check_float_tensor(label, level)
        if level.dim() != dim:
            raise ValueError(f"{label} must have shape {layout}, got {tuple(level.shape)}")
        check_same_device_and_dtype(label, level, f"{name}[0]", levels[0])
        if level.shape[0] != levels[0].shape[0]:
            raise ValueError(f"{label} must have the size(0) of {name}[0] ({levels[0].shape[0]}), got {level.shape[0]}")
    return levels


def _check_batch_idx(batch_idx, boxes_name: str, num_boxes: int, device_of) -> None:
    check_int_tensor("batch_idx", batch_idx, (num_boxes,))
    check_same_device("batch_idx", batch_idx, boxes_name, device_of)


def _check_boxes(boxes, batch_idx, image_size, features_name: str, level) -> tuple:
    check_float_tensor("boxes", boxes)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) (x1, y1, x2, y2 in input pixels), got {tuple(boxes.shape)}")
    check_same_device("boxes", boxes, features_name, level)
    _check_batch_idx(batch_idx, "boxes", boxes.shape[0], boxes)
    return check_int_sequence("image_size", image_size, 2, min_value=1)


def box_pool(features, boxes: torch.Tensor, batch_idx: torch.Tensor, image_size, *, reduction: str = "mean"):
    """Mask pooling (LGD's appearance embeddings): per box, the features inside it, averaged or summed.

    features: (B, C, H, W), or a list of pyramid levels (B, C_l, H_l, W_l) of one dtype and device, pooled in
    one native call; boxes: (N, 4) x1 y1 x2 y2 in input pixels (any float dtype, tested in float32);
    batch_idx: (N,) integer image index of each box, in [0, B); image_size: (H_pad, W_pad) of the padded batch.
    out[n, c] = sum over pixels (y, x) inside box n of features[batch_idx[n], c, y, x], divided by
    max(count, 1) for reduction="mean" (official; an empty box gives zeros), not for "sum".
    Returns (N, C), or a list of (N, C_l), one per level (torch.stack gives (L, N, C)).
    Gradients reach the features (the backward is box_paint of the gradient); boxes get none.
    fp16/bf16 accumulate in fp32; deterministic; CPU (C++) and CUDA kernels, no dense masks.
    """
    levels = _levels("features", features, 4, "(B, C, H, W)")
    image_size = _check_boxes(boxes, batch_idx, image_size, "features", levels[0])
    check_choice("reduction", reduction, REDUCTIONS)
    require_extension()
    pooled = torch.ops.fastkd.box_pool(levels, boxes, batch_idx, image_size, reduction == "mean")
    return pooled if isinstance(features, (list, tuple)) else pooled[0]


def box_paint(values, boxes: torch.Tensor, batch_idx: torch.Tensor, image_size, out_shape):
    """Box painting (LGD's knowledge mapper): the sum over boxes of each box's value vector times its mask.

    values: (N, C), or a list of (N, C_l), one per level; boxes, batch_idx, image_size as in box_pool;
    out_shape: (B, C, H, W), or a list of them, one per level of values.
    out[b, c, y, x] = sum over boxes n of image b that contain (y, x) of values[n, c]: a plain sum, overlaps
    add, no normalisation (official). Returns (B, C, H, W) or a list of them.
    The adjoint of box_pool(reduction="sum"): gradients reach the values (the backward is the sum-pool of the
    gradient); boxes get none. fp16/bf16 accumulate in fp32; deterministic (each output pixel sums its boxes
    in index order, no atomics).
    """
    is_list = isinstance(values, (list, tuple))
    levels = _levels("values", values, 2, "(N, C)")
    if is_list and (not isinstance(out_shape, (list, tuple)) or len(out_shape) != len(levels)):
        raise ValueError(f"out_shape must be a list of {len(levels)} (B, C, H, W) shapes, one per level of values, "
                         f"got {out_shape!r}")
    shapes = [check_int_sequence(f"out_shape[{i}]" if is_list else "out_shape", shape, 4)
              for i, shape in enumerate(out_shape if is_list else [out_shape])]
    image_size = _check_boxes(boxes, batch_idx, image_size, "values", levels[0])
    if levels[0].shape[0] != boxes.shape[0]:
        raise ValueError(f"values must have one row per box ({boxes.shape[0]}), got {levels[0].shape[0]}")
    for i, (shape, level) in enumerate(zip(shapes, levels)):
        label = f"out_shape[{i}]" if is_list else "out_shape"
        if shape[1] != level.shape[1] or shape[0] != shapes[0][0]:
            raise ValueError(f"{label} must be (B, C, H, W) with C = {level.shape[1]} (the channels of values) and "
                             f"the batch size of out_shape[0] ({shapes[0][0]}), got {shape}")
    require_extension()
    level_sizes = [size for shape in shapes for size in shape[2:]]
    maps = torch.ops.fastkd.box_paint(levels, boxes, batch_idx, image_size, shapes[0][0], level_sizes, False)
    return maps if is_list else maps[0]


def mask_pool(features, masks: torch.Tensor, batch_idx: torch.Tensor, *, reduction: str = "mean"):
    """Mask pooling with segmentation masks: masks (N, Hm, Wm) of 0/1 (bool, integer or float) are resized with
    nearest interpolation to each level, then pooled like box_pool (mean over the mask, or sum).

    features: (B, C, H, W) or a list of levels; batch_idx: (N,) image of each mask. Returns (N, C) or a list.
    Composed from torch ops (interpolate, one einsum, an index), which is already the right tool: with dense
    masks given, pooling is a matmul of masks (N, H W) with features (H W, C), and the matmul kernels are
    faster than a hand-written loop. The einsum pairs every mask with every image (B times the useful FLOPs,
    B = 2 per GPU in LGD) so that there is no per-image split and no host sync.
    """
    levels = _levels("features", features, 4, "(B, C, H, W)")
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
        raise ValueError(f"masks must be a (N, Hm, Wm) tensor, got {getattr(masks, 'shape', type(masks).__name__)}")
    masks = check_binary_mask("masks", masks, masks.shape)
    check_same_device("masks", masks, "features", levels[0])
    _check_batch_idx(batch_idx, "masks", masks.shape[0], masks)
    check_choice("reduction", reduction, REDUCTIONS)
    in_range = ((batch_idx >= 0) & (batch_idx < levels[0].shape[0])).all()
    torch._assert_async(in_range, f"batch_idx must be in [0, {levels[0].shape[0]}) (the batch size)")
    pooled = [reference.dense_pool(level, reference.resize_masks(masks, level.shape[2:]), batch_idx, reduction)
              for level in levels]
    return pooled if isinstance(features, (list, tuple)) else pooled[0]
