// ctest: fastkd::box_pool and fastkd::box_paint (CPU) against brute-force loops over every pixel of every box,
// over three levels in one call, with boxes on pixel edges, empty, inverted and off-image boxes.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <algorithm>
#include <iostream>

namespace {

constexpr int64_t kPadH = 64, kPadW = 96, kBatch = 2, kChannels = 3;
const std::vector<std::pair<int64_t, int64_t>> kLevels = {{16, 24}, {8, 12}, {5, 7}};

std::vector<at::Tensor> call_op(const char* name, std::vector<c10::IValue> args) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  torch::jit::Stack stack(args.begin(), args.end());
  op.callBoxed(&stack);
  return stack[0].toTensorVector();
}

// The box rule of shared/design/official-semantics.md, written out for one pixel (float32 products).
bool inside(const float* box, int64_t y, int64_t x, int64_t height, int64_t width) {
  const auto clamp = [](float v, int64_t size) { return std::min(std::max(v, 0.f), static_cast<float>(size - 1)); };
  const float x1 = clamp(box[0], kPadW), y1 = clamp(box[1], kPadH), x2 = clamp(box[2], kPadW), y2 = clamp(box[3], kPadH);
  const float rw = static_cast<float>(width) / kPadW, rh = static_cast<float>(height) / kPadH;
  const float fx = static_cast<float>(x), fy = static_cast<float>(y);
  return x2 > x1 && y2 > y1 && x1 * rw <= fx && fx <= x2 * rw && y1 * rh <= fy && fy <= y2 * rh;
}

bool check(const char* what, const at::Tensor& actual, const at::Tensor& expected) {
  const double error = (actual - expected).abs().max().item<double>();
  std::cout << what << ": max abs error " << error << std::endl;
  return error < 1e-10;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  // x1 y1 x2 y2: random, on pixel edges at every level (multiples of 8 = 96 / 12), whole image, zero-area,
  // inverted, left of the image
  at::Tensor boxes = torch::cat({torch::rand({6, 2}) * 60, torch::rand({6, 2}) * 60 + 30}, 1);
  boxes = torch::cat({boxes, torch::tensor({8.f, 16.f, 48.f, 40.f, 0.f, 0.f, 95.f, 63.f, 10.f, 10.f, 10.f, 30.f,
                                            50.f, 40.f, 20.f, 50.f, -30.f, 5.f, -1.f, 20.f}).view({5, 4})});
  const int64_t num_boxes = boxes.size(0);
  const at::Tensor batch_idx = torch::randint(kBatch, {num_boxes}, torch::kLong);
  const float* box = boxes.const_data_ptr<float>();
  const int64_t* image = batch_idx.const_data_ptr<int64_t>();

  std::vector<at::Tensor> features, values;
  std::vector<int64_t> level_sizes;
  for (const auto& [height, width] : kLevels) {
    features.push_back(torch::randn({kBatch, kChannels, height, width}, f64));
    values.push_back(torch::randn({num_boxes, kChannels}, f64));
    level_sizes.insert(level_sizes.end(), {height, width});
  }
  const std::vector<int64_t> image_size = {kPadH, kPadW};
  bool ok = true;
  for (const bool mean : {true, false}) {
    const auto pooled = call_op("fastkd::box_pool", {features, boxes, batch_idx, image_size, mean});
    const auto painted = call_op("fastkd::box_paint", {values, boxes, batch_idx, image_size, kBatch, level_sizes, mean});
    for (size_t l = 0; l < kLevels.size(); ++l) {
      const auto [height, width] = kLevels[l];
      at::Tensor pool_expected = torch::zeros({num_boxes, kChannels}, f64);
      at::Tensor paint_expected = torch::zeros({kBatch, kChannels, height, width}, f64);
      for (int64_t n = 0; n < num_boxes; ++n) {
        at::Tensor mask = torch::zeros({height, width}, f64);
        for (int64_t y = 0; y < height; ++y) {
          for (int64_t x = 0; x < width; ++x) mask[y][x] = inside(box + 4 * n, y, x, height, width) ? 1.0 : 0.0;
        }
        const double divisor = mean ? std::max(mask.sum().item<double>(), 1.0) : 1.0;
        pool_expected[n] = (features[l][image[n]] * mask).sum({1, 2}) / divisor;
        paint_expected[image[n]] += values[l][n].view({kChannels, 1, 1}) * mask / divisor;
      }
      const std::string level = " level " + std::to_string(l) + (mean ? " mean" : " sum");
      ok = check(("box_pool" + level).c_str(), pooled[l], pool_expected) && ok;
      ok = check(("box_paint" + level).c_str(), painted[l], paint_expected) && ok;
    }
  }
  std::cout << (ok ? "box ops match the brute-force loops" : "MISMATCH") << std::endl;
  return ok ? 0 : 1;
}
