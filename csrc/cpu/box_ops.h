// LGD's box ops fastkd::box_pool and fastkd::box_paint (schemas in ../ops.cpp), shared by the CPU kernels
// (box_ops.cpp) and the CUDA kernels (../cuda/box_ops.cu): the box rule and the host-side argument checks.
//
// box_pool:  out[l][n, c] = sum over (y, x) in box n at level l of F_l[image(n), c, y, x]  (/ count if mean)
// box_paint: out[l][b, c, y, x] = sum over boxes n of image b covering (y, x) of V_l[n, c]  (/ count if mean)
// The two are adjoint for the same `mean`, so each one's backward is the other.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace fastkd {

// The pixels box n covers at one level: rows [y0, y1] x columns [x0, x1] (inclusive), `count` of them, in
// image `image` of the batch. An empty box has count 0 and y0 > y1, x0 > x1.
struct BoxRange {
  int32_t image, y0, y1, x0, x1, count;
};

// min(max(v, 0), hi) that keeps NaN (as torch.clamp does): a NaN coordinate makes the box empty below.
C10_HOST_DEVICE inline float clamp_coordinate(float v, float hi) {
  v = v < 0.f ? 0.f : v;
  return v > hi ? hi : v;
}

// LGD's box rule (shared/design/official-semantics.md), in float32 like the official code on float32 boxes:
// clamp x1 y1 x2 y2 to [0, W_pad - 1] x [0, H_pad - 1]; with rw = W / W_pad and rh = H / H_pad (float32
// quotients), pixel (y, x) is inside iff x1 rw <= x <= x2 rw and y1 rh <= y <= y2 rh, i.e. x in
// [ceil(x1 rw), floor(x2 rw)]. Zero width or height after clamping (also inverted or NaN boxes): empty.
// fastkd/reference/box_ops.py does the same float32 products, so both select the same pixels bit for bit.
C10_HOST_DEVICE inline BoxRange box_range(const float* box, int32_t image, int64_t pad_height, int64_t pad_width,
                                          int64_t height, int64_t width) {
  const float x1 = clamp_coordinate(box[0], static_cast<float>(pad_width - 1));
  const float y1 = clamp_coordinate(box[1], static_cast<float>(pad_height - 1));
  const float x2 = clamp_coordinate(box[2], static_cast<float>(pad_width - 1));
  const float y2 = clamp_coordinate(box[3], static_cast<float>(pad_height - 1));
  BoxRange r{image, 0, -1, 0, -1, 0};
  if (!(x2 > x1 && y2 > y1)) return r;
  const float rw = static_cast<float>(width) / static_cast<float>(pad_width);
  const float rh = static_cast<float>(height) / static_cast<float>(pad_height);
  const int32_t x0 = static_cast<int32_t>(ceilf(x1 * rw)), y0 = static_cast<int32_t>(ceilf(y1 * rh));
  const int32_t xe = static_cast<int32_t>(floorf(x2 * rw)), ye = static_cast<int32_t>(floorf(y2 * rh));
  const int32_t x_end = xe < width - 1 ? xe : static_cast<int32_t>(width - 1);
  const int32_t y_end = ye < height - 1 ? ye : static_cast<int32_t>(height - 1);
  if (x0 > x_end || y0 > y_end) return r;
  return BoxRange{image, y0, y_end, x0, x_end, (y_end - y0 + 1) * (x_end - x0 + 1)};
}

// One checked box_pool or box_paint call, all tensors contiguous on one device: `maps` are the levels
// (B, C_l, H_l, W_l) (pool's input, paint's output), `rows` the per-box vectors (N, C_l) (pool's output, paint's
// input), boxes (N, 4) float32, batch_idx (N,) int64, and the padded input size. Outputs are allocated, not filled.
struct BoxCall {
  std::vector<at::Tensor> maps, rows;
  at::Tensor boxes, batch_idx;
  int64_t pad_height, pad_width;
};

BoxCall prepare_pool(at::TensorList features, const at::Tensor& boxes, const at::Tensor& batch_idx,
                     c10::IntArrayRef image_size);

// level_sizes = [H0, W0, H1, W1, ...], one pair per level of `values`.
BoxCall prepare_paint(at::TensorList values, const at::Tensor& boxes, const at::Tensor& batch_idx,
                      c10::IntArrayRef image_size, int64_t batch_size, c10::IntArrayRef level_sizes);

}  // namespace fastkd
