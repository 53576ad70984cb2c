// Argument checks of LGD's box ops (shared with CUDA) and their CPU kernels. One task per (image, channel) runs
// every level and every box of that image over the channel's planes (NCHW: each plane is contiguous and stays
// in cache while the image's boxes read or write it), so each output element is written by one task, summed in
// a fixed order: results do not depend on the number of threads.
#include "box_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>

namespace fastkd {
namespace {

void check_boxes(BoxCall& call, const at::Tensor& boxes, const at::Tensor& batch_idx, c10::IntArrayRef image_size,
                 const at::Device& device) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "boxes must have shape (N, 4), got ", boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), "boxes must be floating-point, got ", boxes.scalar_type());
  TORCH_CHECK(batch_idx.dim() == 1 && batch_idx.size(0) == boxes.size(0), "batch_idx must have shape (",
              boxes.size(0), ",), got ", batch_idx.sizes());
  TORCH_CHECK(at::isIntegralType(batch_idx.scalar_type(), /*includeBool=*/false),
              "batch_idx must be an integer tensor, got ", batch_idx.scalar_type());
  TORCH_CHECK(boxes.device() == device && batch_idx.device() == device, "boxes and batch_idx must be on ", device,
              ", got ", boxes.device(), " and ", batch_idx.device());
  TORCH_CHECK(image_size.size() == 2 && image_size[0] > 0 && image_size[1] > 0,
              "image_size must be (H_pad, W_pad) > 0, got ", image_size);
  call.boxes = boxes.to(at::kFloat).contiguous();
  call.batch_idx = batch_idx.to(at::kLong).contiguous();
  call.pad_height = image_size[0];
  call.pad_width = image_size[1];
}

std::vector<at::Tensor> contiguous_levels(at::TensorList levels, const char* name, int64_t dim) {
  TORCH_CHECK(!levels.empty(), name, " must hold at least one level");
  std::vector<at::Tensor> out;
  for (const at::Tensor& level : levels) {
    TORCH_CHECK(level.dim() == dim, name, " must hold ", dim, "-d tensors, got shape ", level.sizes());
    TORCH_CHECK(at::isFloatingType(level.scalar_type()), name, " must be floating-point, got ", level.scalar_type());
    TORCH_CHECK(level.scalar_type() == levels[0].scalar_type() && level.device() == levels[0].device(), name,
                " must share one dtype and device, got ", level.scalar_type(), " on ", level.device(), " and ",
                levels[0].scalar_type(), " on ", levels[0].device());
    out.push_back(level.contiguous());
  }
  return out;
}

}  // namespace

BoxCall prepare_pool(at::TensorList features, const at::Tensor& boxes, const at::Tensor& batch_idx,
                     c10::IntArrayRef image_size) {
  BoxCall call;
  call.maps = contiguous_levels(features, "features", 4);
  check_boxes(call, boxes, batch_idx, image_size, call.maps[0].device());
  for (const at::Tensor& level : call.maps) {
    TORCH_CHECK(level.size(0) == call.maps[0].size(0), "features levels must share the batch size, got ",
                call.maps[0].size(0), " and ", level.size(0));
    call.rows.push_back(at::empty({boxes.size(0), level.size(1)}, level.options()));
  }
  return call;
}

BoxCall prepare_paint(at::TensorList values, const at::Tensor& boxes, const at::Tensor& batch_idx,
                      c10::IntArrayRef image_size, int64_t batch_size, c10::IntArrayRef level_sizes) {
  BoxCall call;
  call.rows = contiguous_levels(values, "values", 2);
  check_boxes(call, boxes, batch_idx, image_size, call.rows[0].device());
  TORCH_CHECK(batch_size >= 0, "batch_size must be >= 0, got ", batch_size);
  TORCH_CHECK(level_sizes.size() == 2 * call.rows.size(), "level_sizes must hold (H, W) for each of the ",
              call.rows.size(), " levels, got ", level_sizes);
  for (size_t l = 0; l < call.rows.size(); ++l) {
    const at::Tensor& level = call.rows[l];
    TORCH_CHECK(level.size(0) == boxes.size(0), "values must have one row per box (", boxes.size(0), "), got ",
                level.sizes());
    TORCH_CHECK(level_sizes[2 * l] >= 0 && level_sizes[2 * l + 1] >= 0, "level_sizes must be >= 0, got ",
                level_sizes);
    call.maps.push_back(at::empty({batch_size, level.size(1), level_sizes[2 * l], level_sizes[2 * l + 1]},
                                  level.options()));
  }
  return call;
}

namespace cpu {
namespace {

// ranges[l * N + n]: box n at level l; checks batch_idx against the batch size.
std::vector<BoxRange> box_ranges(const BoxCall& call) {
  const int64_t boxes = call.boxes.size(0), batch = call.maps[0].size(0);
  const float* box = call.boxes.const_data_ptr<float>();
  const int64_t* image = call.batch_idx.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < boxes; ++n) {
    TORCH_CHECK(image[n] >= 0 && image[n] < batch, "batch_idx must be in [0, ", batch, ") (the batch size), got ",
                image[n], " at box ", n);
  }
  std::vector<BoxRange> ranges;
  ranges.reserve(call.maps.size() * boxes);
  for (const at::Tensor& level : call.maps) {
    for (int64_t n = 0; n < boxes; ++n) {
      ranges.push_back(box_range(box + 4 * n, static_cast<int32_t>(image[n]), call.pad_height, call.pad_width,
                                 level.size(2), level.size(3)));
    }
  }
  return ranges;
}

int64_t max_channels(const std::vector<at::Tensor>& maps) {
  int64_t channels = 0;
  for (const at::Tensor& level : maps) channels = std::max(channels, level.size(1));
  return channels;
}

// Runs body(level, image, channel) for every plane, one task per (image, channel) over all levels.
template <typename Body>
void for_each_plane(const std::vector<at::Tensor>& maps, Body&& body) {
  const int64_t channels = max_channels(maps);
  at::parallel_for(0, maps[0].size(0) * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / channels, channel = task % channels;
      for (size_t l = 0; l < maps.size(); ++l) {
        if (channel < maps[l].size(1)) body(l, image, channel);
      }
    }
  });
}

// 16-byte GCC / Clang generic vectors (an SSE or NEON register, the baseline the extension is built for).
template <typename acc_t>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(16)));
};

// Sum of plane[y, x] over the box's rectangle, in a fixed order: four register accumulators over each row
// (fp32 / fp64; fp16 / bf16 convert element by element), so boxes that re-read a cached plane store nothing.
template <typename scalar_t, typename acc_t>
acc_t rect_sum(const scalar_t* plane, int64_t width, const BoxRange& r) {
  using vec_t = typename Simd<acc_t>::type;
  constexpr int64_t lanes = sizeof(vec_t) / sizeof(acc_t), kAccumulators = 4;
  const int64_t box_width = r.x1 - r.x0 + 1;
  vec_t acc[kAccumulators] = {};
  acc_t sum = 0;
  for (int64_t y = r.y0; y <= r.y1; ++y) {
    const scalar_t* row = plane + y * width + r.x0;
    int64_t i = 0;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (; i + kAccumulators * lanes <= box_width; i += kAccumulators * lanes) {
        for (int64_t k = 0; k < kAccumulators; ++k) {
          vec_t chunk;
          std::memcpy(&chunk, row + i + k * lanes, sizeof(vec_t));
          acc[k] += chunk;
        }
      }
      for (; i + lanes <= box_width; i += lanes) {
        vec_t chunk;
        std::memcpy(&chunk, row + i, sizeof(vec_t));
        acc[0] += chunk;
      }
    }
    for (; i < box_width; ++i) sum += static_cast<acc_t>(row[i]);
  }
  for (int64_t k = 0; k < kAccumulators; ++k) {
    for (int64_t lane = 0; lane < lanes; ++lane) sum += acc[k][lane];
  }
  return sum;
}

// Box indices of each level, largest box first: that one streams the plane from memory in long rows (the
// context box reads all of it), the others then find it in cache. Each box's sum does not depend on the order.
std::vector<int64_t> largest_first(const std::vector<BoxRange>& ranges, int64_t boxes) {
  std::vector<int64_t> order(ranges.size());
  for (size_t first = 0; first < ranges.size(); first += boxes) {
    std::iota(order.begin() + first, order.begin() + first + boxes, int64_t(0));
    std::stable_sort(order.begin() + first, order.begin() + first + boxes,
                     [&](int64_t a, int64_t b) { return ranges[first + a].count > ranges[first + b].count; });
  }
  return order;
}

template <typename scalar_t>
void pool(const BoxCall& call, const std::vector<BoxRange>& ranges, bool mean) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t boxes = call.boxes.size(0);
  const std::vector<int64_t> order = largest_first(ranges, boxes);
  for_each_plane(call.maps, [&](size_t l, int64_t image, int64_t channel) {
    const at::Tensor& level = call.maps[l];
    const int64_t channels = level.size(1), height = level.size(2), width = level.size(3);
    const scalar_t* plane = level.const_data_ptr<scalar_t>() + (image * channels + channel) * height * width;
    scalar_t* out = call.rows[l].mutable_data_ptr<scalar_t>();
    for (auto n = order.begin() + l * boxes; n != order.begin() + (l + 1) * boxes; ++n) {
      const BoxRange& r = ranges[l * boxes + *n];
      if (r.image != image) continue;
      const acc_t sum = rect_sum<scalar_t, acc_t>(plane, width, r);
      out[*n * channels + channel] = static_cast<scalar_t>(mean ? sum / std::max(r.count, 1) : sum);
    }
  });
}

// Each plane accumulates in acc_t (in place for fp32 / fp64, in a per-thread buffer for fp16 / bf16).
template <typename scalar_t>
void paint(const BoxCall& call, const std::vector<BoxRange>& ranges, bool mean) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t boxes = call.boxes.size(0);
  for_each_plane(call.maps, [&](size_t l, int64_t image, int64_t channel) {
    const at::Tensor& level = call.maps[l];
    const int64_t channels = level.size(1), height = level.size(2), width = level.size(3);
    scalar_t* out = level.mutable_data_ptr<scalar_t>() + (image * channels + channel) * height * width;
    thread_local std::vector<acc_t> buffer;
    acc_t* plane;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      plane = out;
    } else {
      buffer.resize(height * width);
      plane = buffer.data();
    }
    std::fill(plane, plane + height * width, acc_t(0));
    const scalar_t* values = call.rows[l].const_data_ptr<scalar_t>();
    for (int64_t n = 0; n < boxes; ++n) {
      const BoxRange& r = ranges[l * boxes + n];
      if (r.image != image || r.count == 0) continue;
      const acc_t value = static_cast<acc_t>(values[n * channels + channel]);
      const acc_t add = mean ? value / r.count : value;
      for (int64_t y = r.y0; y <= r.y1; ++y) {
        acc_t* row = plane + y * width;
        for (int64_t x = r.x0; x <= r.x1; ++x) row[x] += add;
      }
    }
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      for (int64_t i = 0; i < height * width; ++i) out[i] = static_cast<scalar_t>(plane[i]);
    }
  });
}

std::vector<at::Tensor> box_pool(at::TensorList features, const at::Tensor& boxes, const at::Tensor& batch_idx,
                                 c10::IntArrayRef image_size, bool mean) {
  const BoxCall call = prepare_pool(features, boxes, batch_idx, image_size);
  const std::vector<BoxRange> ranges = box_ranges(call);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.maps[0].scalar_type(), "box_pool_cpu",
                                  [&] { pool<scalar_t>(call, ranges, mean); });
  return call.rows;
}

std::vector<at::Tensor> box_paint(at::TensorList values, const at::Tensor& boxes, const at::Tensor& batch_idx,
                                  c10::IntArrayRef image_size, int64_t batch_size, c10::IntArrayRef level_sizes,
                                  bool mean) {
  const BoxCall call = prepare_paint(values, boxes, batch_idx, image_size, batch_size, level_sizes);
  const std::vector<BoxRange> ranges = box_ranges(call);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.rows[0].scalar_type(), "box_paint_cpu",
                                  [&] { paint<scalar_t>(call, ranges, mean); });
  return call.maps;
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("box_pool", &fastkd::cpu::box_pool);
  m.impl("box_paint", &fastkd::cpu::box_paint);
}
