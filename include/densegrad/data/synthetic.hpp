// densegrad/data/synthetic.hpp: a seeded synthetic classification dataset of any size and shape,
// for tests, examples and benchmarks that must run without downloads. Each class is a smooth
// pattern (a plane wave per channel plus a bright square); each sample adds noise and brightness.
// Not a benchmark of anything: it is learnable by design, even by a linear model.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "dataset.hpp"

namespace dg::data {

/// What make_synthetic builds; the chainable setters read like PyTorch C++ options.
struct SyntheticOptions {
  int64_t num_samples = 1000;
  int64_t channels = 1, height = 28, width = 28;
  int64_t num_classes = 10;
  uint64_t seed = 0;
  double noise = 0.2;  // std of the per-pixel Gaussian noise (pixels are in [0, 1])

  SyntheticOptions& samples(int64_t n) { num_samples = n; return *this; }
  SyntheticOptions& image(int64_t c, int64_t h, int64_t w) { channels = c; height = h; width = w; return *this; }
  SyntheticOptions& classes(int64_t k) { num_classes = k; return *this; }
  SyntheticOptions& with_seed(uint64_t s) { seed = s; return *this; }
  SyntheticOptions& with_noise(double s) { noise = s; return *this; }
};

/// N float images (N, C, H, W) in [0, 1] with balanced labels (sample i has label i % K).
/// The same options give the same dataset on every platform (dg::Generator is portable).
///   auto ds = dg::data::make_synthetic(dg::data::SyntheticOptions().samples(512).image(3, 16, 16));
inline Dataset make_synthetic(const SyntheticOptions& o) {
  DG_CHECK(o.num_samples >= 0 && o.channels > 0 && o.height > 0 && o.width > 0 && o.num_classes > 0,
           "make_synthetic: expected num_samples >= 0 and positive channels, height, width, num_classes; got ",
           o.num_samples, ", ", o.channels, ", ", o.height, ", ", o.width, ", ", o.num_classes);
  DG_CHECK(o.noise >= 0 && std::isfinite(o.noise), "make_synthetic: noise must be >= 0, got ", o.noise);
  const int64_t C = o.channels, H = o.height, W = o.width, K = o.num_classes, n = C * H * W;
  const int64_t numel = shape_numel({o.num_samples, C, H, W});  // throws on overflow
  Generator gen(o.seed);
  constexpr double kTwoPi = 6.283185307179586476925;
  // class prototypes: (K, C, H, W)
  std::vector<float> proto(static_cast<size_t>(K * n));
  for (int64_t k = 0; k < K; ++k) {
    const int64_t side = std::max<int64_t>(1, std::min(H, W) / 3);  // the class's bright square
    const int64_t y0 = static_cast<int64_t>(gen.randint(static_cast<uint64_t>(H - side + 1)));
    const int64_t x0 = static_cast<int64_t>(gen.randint(static_cast<uint64_t>(W - side + 1)));
    for (int64_t c = 0; c < C; ++c) {
      const double fy = static_cast<double>(gen.randint(4)), fx = 1.0 + static_cast<double>(gen.randint(3));
      const double phase = kTwoPi * gen.uniform();
      float* p = proto.data() + (k * C + c) * H * W;
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x) {
          double v = 0.5 + 0.25 * std::sin(kTwoPi * (fy * y / H + fx * x / W) + phase);
          if (y >= y0 && y < y0 + side && x >= x0 && x < x0 + side) v += 0.25;
          p[y * W + x] = static_cast<float>(v);
        }
    }
  }
  std::vector<float> pixels(static_cast<size_t>(numel));
  std::vector<int64_t> labels(static_cast<size_t>(o.num_samples));
  for (int64_t i = 0; i < o.num_samples; ++i) {
    const int64_t k = i % K;
    labels[static_cast<size_t>(i)] = k;
    const double brightness = 0.1 * (2.0 * gen.uniform() - 1.0);
    const float* p = proto.data() + k * n;
    float* dst = pixels.data() + i * n;
    for (int64_t j = 0; j < n; ++j)
      dst[j] = static_cast<float>(std::clamp(p[j] + brightness + o.noise * gen.normal(), 0.0, 1.0));
  }
  return Dataset::from_float(std::move(pixels), {o.num_samples, C, H, W}, std::move(labels), K,
                             "synthetic(seed " + std::to_string(o.seed) + ")");
}

}  // namespace dg::data
