// CUDA kernels of LGD's box ops fastkd::box_pool and fastkd::box_paint (see ../cpu/box_ops.h), all levels in one
// launch each. Levels are NCHW-contiguous, the layout FPN features come in (other layouts are made contiguous
// by prepare_pool / prepare_paint), so the coalesced axis is x inside a channel plane: pooling lanes read
// consecutive pixels of a box row, painting threads write consecutive pixels of an output row.
// Deterministic: pooling sums each (box, channel) in one warp with a fixed shuffle tree; painting is a gather
// (each output pixel adds the boxes that contain it in index order), no atomics. fp16 / bf16 accumulate in fp32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../cpu/box_ops.h"

namespace fastkd::cuda {
namespace {

constexpr int kMaxLevels = 16;
constexpr int kWarpSize = 32;
constexpr int kPoolWarps = 8;        // warps per pooling block: one channel each, same box
constexpr int kPaintThreads = 256;   // threads per painting block, and boxes staged in shared memory at a time
constexpr int kPaintChannels = 8;    // channels per painting thread, which share its pixel's box tests
constexpr int kRangeThreads = 256;

// Pointers and sizes of every level, passed by value. maps[l] is (batch, channels, height, width); pooling reads
// `in` = maps and writes `out` = rows (N, channels), painting the other way round.
template <typename scalar_t>
struct Levels {
  const scalar_t* in[kMaxLevels];
  scalar_t* out[kMaxLevels];
  int64_t channels[kMaxLevels], height[kMaxLevels], width[kMaxLevels];
  int64_t first_block[kMaxLevels + 1];  // painting: the blocks of level l are [first_block[l], first_block[l + 1])
  int64_t batch;
  int count;
};

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t>
Levels<scalar_t> make_levels(const BoxCall& call, bool paint) {
  TORCH_CHECK(call.maps.size() <= kMaxLevels, "fastkd box ops take at most ", kMaxLevels,
              " levels per call on CUDA, got ", call.maps.size());
  Levels<scalar_t> levels{};
  levels.batch = call.maps[0].size(0);
  levels.count = static_cast<int>(call.maps.size());
  for (int l = 0; l < levels.count; ++l) {
    const at::Tensor& map = call.maps[l];
    const at::Tensor& row = call.rows[l];
    levels.in[l] = (paint ? row : map).const_data_ptr<scalar_t>();
    levels.out[l] = (paint ? map : row).mutable_data_ptr<scalar_t>();
    levels.channels[l] = map.size(1);
    levels.height[l] = map.size(2);
    levels.width[l] = map.size(3);
    const int64_t threads = levels.batch * ceil_div(map.size(1), kPaintChannels) * map.size(2) * map.size(3);
    levels.first_block[l + 1] = levels.first_block[l] + ceil_div(threads, kPaintThreads);
  }
  return levels;
}

// ranges[l * N + n] = box n at level l. An out-of-range batch_idx fails a device assert (no host sync) and the
// box is left empty, so the kernels never read or write outside the tensors.
template <typename scalar_t>
__global__ void box_ranges_kernel(const float* boxes, const int64_t* batch_idx, int64_t num_boxes, int64_t pad_height,
                                  int64_t pad_width, Levels<scalar_t> levels, BoxRange* ranges) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= levels.count * num_boxes) return;
  const int l = static_cast<int>(i / num_boxes);
  const int64_t n = i % num_boxes, image = batch_idx[n];
  const bool valid = image >= 0 && image < levels.batch;
  CUDA_KERNEL_ASSERT_MSG(valid, "batch_idx must be in [0, batch size)");
  ranges[i] = valid ? box_range(boxes + 4 * n, static_cast<int32_t>(image), pad_height, pad_width, levels.height[l],
                                levels.width[l])
                    : BoxRange{-1, 0, -1, 0, -1, 0};
}

// One warp per (box n = blockIdx.x, channel, level = blockIdx.z): lane i visits pixels i, i + 32, ... of the box
// in row-major order, then a shuffle tree sums the lanes.
template <typename scalar_t, typename acc_t>
__global__ void pool_kernel(Levels<scalar_t> levels, const BoxRange* ranges, int64_t num_boxes, bool mean) {
  const int l = blockIdx.z, lane = threadIdx.x % kWarpSize;
  const int64_t n = blockIdx.x, channels = levels.channels[l];
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kPoolWarps + threadIdx.x / kWarpSize;
  if (c >= channels) return;  // whole warps only
  const BoxRange r = ranges[l * num_boxes + n];
  acc_t sum = 0;
  if (r.count > 0) {
    const int64_t width = levels.width[l];
    const scalar_t* plane = levels.in[l] + (r.image * channels + c) * levels.height[l] * width;
    const int box_width = r.x1 - r.x0 + 1, step_y = kWarpSize / box_width, step_x = kWarpSize % box_width;
    int y = r.y0 + lane / box_width, x = r.x0 + lane % box_width;
    while (y <= r.y1) {
      sum += static_cast<acc_t>(plane[y * width + x]);
      x += step_x;
      y += step_y;
      if (x > r.x1) {
        x -= box_width;
        ++y;
      }
    }
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (lane == 0) levels.out[l][n * channels + c] = static_cast<scalar_t>(mean ? sum / max(r.count, 1) : sum);
}

// One thread per (level, image, group of kPaintChannels channels, y, x), x fastest: stores are coalesced in NCHW.
// The level's box ranges go through shared memory kPaintThreads at a time (broadcast reads).
template <typename scalar_t, typename acc_t>
__global__ void paint_kernel(Levels<scalar_t> levels, const BoxRange* ranges, int64_t num_boxes, bool mean) {
  __shared__ BoxRange staged[kPaintThreads];
  int l = 0;
  while (blockIdx.x >= levels.first_block[l + 1]) ++l;
  const int64_t channels = levels.channels[l], height = levels.height[l], width = levels.width[l];
  const int64_t groups = ceil_div(channels, kPaintChannels);
  const int64_t i = (blockIdx.x - levels.first_block[l]) * kPaintThreads + threadIdx.x;
  const int64_t x = i % width, y = i / width % height, c0 = i / (width * height) % groups * kPaintChannels;
  const int64_t image = i / (width * height * groups);
  const bool active = image < levels.batch;
  acc_t acc[kPaintChannels] = {};
  for (int64_t first = 0; first < num_boxes; first += kPaintThreads) {
    __syncthreads();
    if (first + threadIdx.x < num_boxes) staged[threadIdx.x] = ranges[l * num_boxes + first + threadIdx.x];
    __syncthreads();
    const int64_t staged_count = min(static_cast<int64_t>(kPaintThreads), num_boxes - first);
    for (int k = 0; k < staged_count; ++k) {
      const BoxRange r = staged[k];
      if (!active || r.image != image || y < r.y0 || y > r.y1 || x < r.x0 || x > r.x1) continue;
      const scalar_t* value = levels.in[l] + (first + k) * channels + c0;
#pragma unroll
      for (int j = 0; j < kPaintChannels; ++j) {
        if (c0 + j < channels) acc[j] += mean ? static_cast<acc_t>(value[j]) / r.count : static_cast<acc_t>(value[j]);
      }
    }
  }
  if (!active) return;
  scalar_t* out = levels.out[l] + ((image * channels + c0) * height + y) * width + x;
#pragma unroll
  for (int j = 0; j < kPaintChannels; ++j) {
    if (c0 + j < channels) out[j * height * width] = static_cast<scalar_t>(acc[j]);
  }
}

// Launches ranges + pool or paint for one checked call on the current stream.
void run(const BoxCall& call, bool paint, bool mean) {
  const c10::cuda::CUDAGuard guard(call.boxes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t num_boxes = call.boxes.size(0);
  at::Tensor ranges = at::empty({static_cast<int64_t>(call.maps.size()) * num_boxes * 6},
                                call.boxes.options().dtype(at::kInt));
  BoxRange* range_ptr = reinterpret_cast<BoxRange*>(ranges.mutable_data_ptr<int32_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.maps[0].scalar_type(), "box_ops_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Levels<scalar_t> levels = make_levels<scalar_t>(call, paint);
    const int64_t range_count = levels.count * num_boxes;
    if (range_count > 0) {
      box_ranges_kernel<scalar_t><<<ceil_div(range_count, kRangeThreads), kRangeThreads, 0, stream>>>(
          call.boxes.const_data_ptr<float>(), call.batch_idx.const_data_ptr<int64_t>(), num_boxes, call.pad_height,
          call.pad_width, levels, range_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (paint && levels.first_block[levels.count] > 0) {
      paint_kernel<scalar_t, acc_t><<<levels.first_block[levels.count], kPaintThreads, 0, stream>>>(
          levels, range_ptr, num_boxes, mean);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    int64_t max_channels = 0;
    for (const at::Tensor& map : call.maps) max_channels = std::max(max_channels, map.size(1));
    if (!paint && num_boxes > 0 && max_channels > 0) {
      const dim3 grid(num_boxes, ceil_div(max_channels, kPoolWarps), levels.count);
      pool_kernel<scalar_t, acc_t><<<grid, kPoolWarps * kWarpSize, 0, stream>>>(levels, range_ptr, num_boxes, mean);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::vector<at::Tensor> box_pool(at::TensorList features, const at::Tensor& boxes, const at::Tensor& batch_idx,
                                 c10::IntArrayRef image_size, bool mean) {
  const BoxCall call = prepare_pool(features, boxes, batch_idx, image_size);
  run(call, /*paint=*/false, mean);
  return call.rows;
}

std::vector<at::Tensor> box_paint(at::TensorList values, const at::Tensor& boxes, const at::Tensor& batch_idx,
                                  c10::IntArrayRef image_size, int64_t batch_size, c10::IntArrayRef level_sizes,
                                  bool mean) {
  const BoxCall call = prepare_paint(values, boxes, batch_idx, image_size, batch_size, level_sizes);
  run(call, /*paint=*/true, mean);
  return call.maps;
}

}  // namespace
}  // namespace fastkd::cuda

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("box_pool", &fastkd::cuda::box_pool);
  m.impl("box_paint", &fastkd::cuda::box_paint);
}
