"""Fake and autograd kernels of the native ops ``fastkd::box_pool`` and ``fastkd::box_paint`` (schemas in
csrc/ops.cpp, CPU kernels in csrc/cpu/box_ops.cpp, CUDA kernels in csrc/cuda/box_ops.cu).

box_pool(features[l] (B, C_l, H_l, W_l)) -> [(N, C_l)] and box_paint([(N, C_l)]) -> [(B, C_l, H_l, W_l)] are
adjoint for the same `mean`: each one's backward is the other (so double backward works as well).
Features and values get gradients; boxes and batch_idx do not. Host syncs: none (a batch_idx out of range is
a device-side assert on CUDA).
"""
import torch

from fastkd._extension import EXTENSION_ERROR


def _box_pool_fake(features, boxes, batch_idx, image_size, mean):
    return [level.new_empty(boxes.shape[0], level.shape[1]) for level in features]


def _box_paint_fake(values, boxes, batch_idx, image_size, batch_size, level_sizes, mean):
    return [level.new_empty(batch_size, level.shape[1], level_sizes[2 * i], level_sizes[2 * i + 1])
            for i, level in enumerate(values)]


def _box_pool_setup_context(ctx, inputs, output):
    features, boxes, batch_idx, ctx.image_size, ctx.mean = inputs
    ctx.save_for_backward(boxes, batch_idx)
    ctx.batch_size = features[0].shape[0]
    ctx.level_sizes = [size for level in features for size in level.shape[2:]]


def _box_pool_backward(ctx, grads):
    boxes, batch_idx = ctx.saved_tensors
    grad_features = torch.ops.fastkd.box_paint(list(grads), boxes, batch_idx, ctx.image_size, ctx.batch_size,
                                               ctx.level_sizes, ctx.mean)
    return grad_features, None, None, None, None


def _box_paint_setup_context(ctx, inputs, output):
    _, boxes, batch_idx, ctx.image_size, _, _, ctx.mean = inputs
    ctx.save_for_backward(boxes, batch_idx)


def _box_paint_backward(ctx, grads):
    boxes, batch_idx = ctx.saved_tensors
    grad_values = torch.ops.fastkd.box_pool(list(grads), boxes, batch_idx, ctx.image_size, ctx.mean)
    return grad_values, None, None, None, None, None, None


if EXTENSION_ERROR is None:  # the ops exist only when fastkd._C is built (fastkd.functional says how)
    torch.library.register_fake("fastkd::box_pool", _box_pool_fake)
    torch.library.register_fake("fastkd::box_paint", _box_paint_fake)
    torch.library.register_autograd("fastkd::box_pool", _box_pool_backward, setup_context=_box_pool_setup_context)
    torch.library.register_autograd("fastkd::box_paint", _box_paint_backward,
                                    setup_context=_box_paint_setup_context)
