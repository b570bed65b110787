// densegrad/data/augment.hpp: training augmentation with torchvision/timm semantics: per sample
// random crop with zero padding, horizontal flip, normalization, random erasing; per batch mixup
// and cutmix with (label-smoothed) soft targets. Every random draw comes from a dg::Generator.
// Not bit-identical to torchvision/timm (their random streams differ); same distributions and rules.
#pragma once

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "../core/tensor.hpp"

namespace dg::data {

// Shapes: img (C, H, W) contiguous floats; images (B, C, H, W); labels (B); soft targets (B, K).

/// How random erasing fills its box (timm RandomErasing `mode`).
enum class EraseMode {
  Pixel,    // a standard normal value per pixel ('pixel')
  Channel,  // one standard normal value per channel ('rand')
  Zero,     // zeros ('const')
};

/// The augmentation pipeline, in the order applied: crop, flip, normalize, erase (per sample),
/// then mixup/cutmix (per batch). Everything is off by default; chain the setters:
///   auto aug = AugmentOptions().crop(4).flip().normalize({0.286f}, {0.353f}).mixup(0.8).cutmix(1.0);
struct AugmentOptions {
  int64_t crop_padding = 0;  // torchvision RandomCrop((H, W), padding=p): pad with zeros, crop back
  double hflip_prob = 0;     // RandomHorizontalFlip(p)
  std::vector<float> norm_mean, norm_std;  // Normalize(mean, std), one value per channel; empty: off
  double erase_prob = 0;     // timm RandomErasing(probability, min_area, max_area, min_aspect, mode)
  double erase_min_area = 0.02, erase_max_area = 1.0 / 3.0, erase_min_aspect = 0.3;
  EraseMode erase_mode = EraseMode::Pixel;
  double mixup_alpha = 0, cutmix_alpha = 0;  // timm Mixup(mixup_alpha, cutmix_alpha, ...); 0: off
  double mix_prob = 1.0, switch_prob = 0.5, label_smoothing = 0.0;
  bool correct_lam = true;  // cutmix: lambda = 1 - (clipped box area) / (H * W)

  AugmentOptions& crop(int64_t padding) { crop_padding = padding; return *this; }
  AugmentOptions& flip(double p = 0.5) { hflip_prob = p; return *this; }
  AugmentOptions& normalize(std::vector<float> mean, std::vector<float> stdev) {
    norm_mean = std::move(mean);
    norm_std = std::move(stdev);
    return *this;
  }
  AugmentOptions& random_erasing(double p, EraseMode mode = EraseMode::Pixel) {
    erase_prob = p;
    erase_mode = mode;
    return *this;
  }
  AugmentOptions& mixup(double alpha = 0.8) { mixup_alpha = alpha; return *this; }
  AugmentOptions& cutmix(double alpha = 1.0) { cutmix_alpha = alpha; return *this; }
  AugmentOptions& smoothing(double s) { label_smoothing = s; return *this; }
  AugmentOptions& mix(double prob, double switch_p = 0.5) { mix_prob = prob; switch_prob = switch_p; return *this; }

  bool mix_enabled() const { return mixup_alpha > 0 || cutmix_alpha > 0; }

  /// Throws dg::Error naming the first bad field (images with `channels` channels).
  void check(int64_t channels) const {
    auto prob = [](double p) { return p >= 0 && p <= 1; };
    DG_CHECK(crop_padding >= 0, "augment: crop padding must be >= 0, got ", crop_padding);
    DG_CHECK(prob(hflip_prob) && prob(erase_prob) && prob(mix_prob) && prob(switch_prob),
             "augment: probabilities must be in [0, 1], got hflip ", hflip_prob, ", erase ", erase_prob, ", mix ",
             mix_prob, ", switch ", switch_prob);
    DG_CHECK(norm_mean.size() == norm_std.size() &&
                 (norm_mean.empty() || static_cast<int64_t>(norm_mean.size()) == channels),
             "augment: normalize expects one mean and one std per channel (", channels, "), got ", norm_mean.size(),
             " means and ", norm_std.size(), " stds");
    for (float s : norm_std) DG_CHECK(s > 0, "augment: normalize std must be > 0, got ", s);
    DG_CHECK(erase_min_area > 0 && erase_min_area <= erase_max_area && erase_max_area <= 1 && erase_min_aspect > 0,
             "augment: random erasing expects 0 < min_area <= max_area <= 1 and min_aspect > 0, got ",
             erase_min_area, ", ", erase_max_area, ", ", erase_min_aspect);
    DG_CHECK(mixup_alpha >= 0 && cutmix_alpha >= 0, "augment: mixup/cutmix alpha must be >= 0, got ", mixup_alpha,
             ", ", cutmix_alpha);
    DG_CHECK(label_smoothing >= 0 && label_smoothing < 1, "augment: label smoothing must be in [0, 1), got ",
             label_smoothing);
  }
};

// ---------------------------------------------------------------- per sample, in place

/// torchvision RandomCrop((H, W), padding=p): zero-pad by p on each side, then take the HxW window
/// at a uniform offset in [0, 2p] x [0, 2p]. padding 0 leaves img unchanged (and draws nothing).
inline void random_crop_(float* img, int64_t C, int64_t H, int64_t W, int64_t padding, Generator& gen) {
  if (padding <= 0) return;
  const auto range = static_cast<uint64_t>(2 * padding + 1);
  const int64_t dy = static_cast<int64_t>(gen.randint(range)) - padding;  // out[y][x] = img[y + dy][x + dx]
  const int64_t dx = static_cast<int64_t>(gen.randint(range)) - padding;
  std::vector<float> src(img, img + C * H * W);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x) {
        const int64_t sy = y + dy, sx = x + dx;
        img[(c * H + y) * W + x] = sy >= 0 && sy < H && sx >= 0 && sx < W ? src[(c * H + sy) * W + sx] : 0.0f;
      }
}

/// torchvision.transforms.functional.hflip: mirrors every row.
inline void hflip_(float* img, int64_t C, int64_t H, int64_t W) {
  for (int64_t r = 0; r < C * H; ++r) std::reverse(img + r * W, img + (r + 1) * W);
}

/// torchvision.transforms.functional.normalize: (img - mean[c]) / std[c]. mean, std: (C)
inline void normalize_(float* img, int64_t C, int64_t H, int64_t W, const float* mean, const float* stdev) {
  for (int64_t c = 0; c < C; ++c)
    for (float *p = img + c * H * W, *e = p + H * W; p != e; ++p) *p = (*p - mean[c]) / stdev[c];
}

/// timm RandomErasing (one box): with probability erase_prob, up to 10 tries to draw a box of area
/// U(min_area, max_area) * H * W and log-uniform aspect ratio in [min_aspect, 1/min_aspect] that fits;
/// the first that fits is filled per erase_mode. Applied after normalization, as timm does.
inline void random_erasing_(float* img, int64_t C, int64_t H, int64_t W, const AugmentOptions& o, Generator& gen) {
  if (o.erase_prob <= 0 || gen.uniform() >= o.erase_prob) return;
  const double log_lo = std::log(o.erase_min_aspect), log_hi = -log_lo;
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double area = (o.erase_min_area + (o.erase_max_area - o.erase_min_area) * gen.uniform()) * double(H * W);
    const double aspect = std::exp(log_lo + (log_hi - log_lo) * gen.uniform());
    const auto h = static_cast<int64_t>(std::lround(std::sqrt(area * aspect)));
    const auto w = static_cast<int64_t>(std::lround(std::sqrt(area / aspect)));
    if (!(w < W && h < H)) continue;
    const auto top = static_cast<int64_t>(gen.randint(static_cast<uint64_t>(H - h + 1)));  // randint(0, H-h)
    const auto left = static_cast<int64_t>(gen.randint(static_cast<uint64_t>(W - w + 1)));
    for (int64_t c = 0; c < C; ++c) {
      const float channel_value = o.erase_mode == EraseMode::Channel ? static_cast<float>(gen.normal()) : 0.0f;
      for (int64_t y = top; y < top + h; ++y)
        for (int64_t x = left; x < left + w; ++x)
          img[(c * H + y) * W + x] = o.erase_mode == EraseMode::Pixel ? static_cast<float>(gen.normal()) : channel_value;
    }
    return;
  }
}

/// The per-sample pipeline: crop, flip, normalize, erase (timm's train transform order).
inline void augment_sample_(float* img, int64_t C, int64_t H, int64_t W, const AugmentOptions& o, Generator& gen) {
  random_crop_(img, C, H, W, o.crop_padding, gen);
  if (o.hflip_prob > 0 && gen.uniform() < o.hflip_prob) hflip_(img, C, H, W);
  if (!o.norm_mean.empty()) normalize_(img, C, H, W, o.norm_mean.data(), o.norm_std.data());
  random_erasing_(img, C, H, W, o, gen);
}

namespace detail {
// A contiguous copy of x (C, H, W) or (N, C, H, W), with fn(img, C, H, W) applied to each image.
template <class Fn>
Tensor<float> map_images(const Tensor<float>& x, const char* op, Fn fn) {
  DG_CHECK(x.dim() == 3 || x.dim() == 4, op, ": expected an image (C, H, W) or a batch (N, C, H, W), got shape ",
           shape_str(x.shape()));
  Tensor<float> out = tensor<float>(x.to_vector(), x.shape());
  const int64_t n = x.dim() == 4 ? x.size(0) : 1, C = x.size(-3), H = x.size(-2), W = x.size(-1);
  for (int64_t i = 0; i < n; ++i) fn(out.data() + i * C * H * W, C, H, W);
  return out;
}
}  // namespace detail

/// torchvision RandomCrop(size=(H, W), padding) on an image (C, H, W) or each image of (N, C, H, W).
inline Tensor<float> random_crop(const Tensor<float>& x, int64_t padding, Generator& gen) {
  DG_CHECK(padding >= 0, "random_crop: padding must be >= 0, got ", padding);
  return detail::map_images(x, "random_crop", [&](float* p, int64_t C, int64_t H, int64_t W) {
    random_crop_(p, C, H, W, padding, gen);
  });
}
/// torchvision.transforms.functional.hflip on (C, H, W) or (N, C, H, W).
inline Tensor<float> hflip(const Tensor<float>& x) {
  return detail::map_images(x, "hflip", [](float* p, int64_t C, int64_t H, int64_t W) { hflip_(p, C, H, W); });
}
/// torchvision.transforms.functional.normalize on (C, H, W) or (N, C, H, W). mean, std: (C)
inline Tensor<float> normalize(const Tensor<float>& x, const std::vector<float>& mean,
                               const std::vector<float>& stdev) {
  return detail::map_images(x, "normalize", [&](float* p, int64_t C, int64_t H, int64_t W) {
    AugmentOptions().normalize(mean, stdev).check(C);
    normalize_(p, C, H, W, mean.data(), stdev.data());
  });
}
/// timm RandomErasing on (C, H, W) or each image of (N, C, H, W), with the erase_* fields of `o`.
inline Tensor<float> random_erasing(const Tensor<float>& x, const AugmentOptions& o, Generator& gen) {
  AugmentOptions e = o;
  e.norm_mean.clear();  // only the erase_* fields matter here
  e.norm_std.clear();
  e.check(0);
  return detail::map_images(x, "random_erasing", [&](float* p, int64_t C, int64_t H, int64_t W) {
    random_erasing_(p, C, H, W, o, gen);
  });
}

// ---------------------------------------------------------------- Gamma and Beta

/// Gamma(alpha, 1) by Marsaglia and Tsang (2000); for alpha < 1, Gamma(alpha + 1) * U^(1/alpha).
/// Matches numpy.random.gamma(alpha) in distribution.
inline double sample_gamma(double alpha, Generator& gen) {
  DG_CHECK(alpha > 0 && std::isfinite(alpha), "sample_gamma: alpha must be positive, got ", alpha);
  if (alpha < 1) {
    double u = gen.uniform();
    while (u <= 0) u = gen.uniform();
    return sample_gamma(alpha + 1, gen) * std::pow(u, 1.0 / alpha);
  }
  const double d = alpha - 1.0 / 3.0, c = 1.0 / std::sqrt(9.0 * d);
  for (;;) {
    double x, v;
    do {
      x = gen.normal();
      v = 1.0 + c * x;
    } while (v <= 0);
    v = v * v * v;
    const double u = gen.uniform();
    if (u < 1.0 - 0.0331 * x * x * x * x) return d * v;  // fast squeeze test
    if (u > 0 && std::log(u) < 0.5 * x * x + d * (1.0 - v + std::log(v))) return d * v;
  }
}

/// Beta(a, b) = X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b) (numpy.random.beta in distribution).
inline double sample_beta(double a, double b, Generator& gen) {
  const double x = sample_gamma(a, gen), y = sample_gamma(b, gen);
  if (x + y == 0) return gen.uniform() < a / (a + b) ? 1.0 : 0.0;  // both underflowed (tiny alphas)
  return x / (x + y);
}

// ---------------------------------------------------------------- mixup and cutmix (per batch)

/// A box of rows [y0, y1) and columns [x0, x1).
struct Box {
  int64_t y0 = 0, y1 = 0, x0 = 0, x1 = 0;
  int64_t area() const { return (y1 - y0) * (x1 - x0); }
};

/// timm rand_bbox: a box of about (1 - lam) of the image: sides int(H*sqrt(1-lam)) and
/// int(W*sqrt(1-lam)), centred at a uniform pixel, clipped to the image (so it may be smaller).
inline Box cutmix_box(int64_t H, int64_t W, double lam, Generator& gen) {
  DG_CHECK(H > 0 && W > 0 && lam >= 0 && lam <= 1, "cutmix_box: expected H, W > 0 and lam in [0, 1], got ", H, ", ",
           W, ", ", lam);
  const double ratio = std::sqrt(1.0 - lam);
  const auto cut_h = static_cast<int64_t>(static_cast<double>(H) * ratio);
  const auto cut_w = static_cast<int64_t>(static_cast<double>(W) * ratio);
  const auto cy = static_cast<int64_t>(gen.randint(static_cast<uint64_t>(H)));
  const auto cx = static_cast<int64_t>(gen.randint(static_cast<uint64_t>(W)));
  Box b;
  b.y0 = std::clamp<int64_t>(cy - cut_h / 2, 0, H);
  b.y1 = std::clamp<int64_t>(cy + cut_h / 2, 0, H);
  b.x0 = std::clamp<int64_t>(cx - cut_w / 2, 0, W);
  b.x1 = std::clamp<int64_t>(cx + cut_w / 2, 0, W);
  return b;
}

/// What mix_batch_ did: lam is the weight of each sample's own image and label
/// (1 when nothing was mixed); for cutmix, `box` is the pasted region.
struct MixInfo {
  double lam = 1.0;
  bool cutmix = false;
  Box box;
};

/// timm Mixup._mix_batch (mode 'batch'): with probability mix_prob, picks cutmix with probability
/// switch_prob when both are enabled, draws lam ~ Beta(alpha, alpha), and mixes every sample i with
/// sample B-1-i (x.flip(0)): mixup blends whole images, cutmix pastes a box and corrects lam to the
/// box's true area. images: (B, C, H, W), contiguous, changed in place.
inline MixInfo mix_batch_(Tensor<float>& images, const AugmentOptions& o, Generator& gen) {
  DG_CHECK(images.dim() == 4 && images.is_contiguous(), "mix_batch_: expected contiguous images (B, C, H, W), got ",
           images.dim(), "-D", images.is_contiguous() ? "" : " non-contiguous", " shape ", shape_str(images.shape()));
  MixInfo info;
  if (!o.mix_enabled() || gen.uniform() >= o.mix_prob) return info;
  if (o.mixup_alpha > 0 && o.cutmix_alpha > 0) info.cutmix = gen.uniform() < o.switch_prob;
  else info.cutmix = o.cutmix_alpha > 0;
  const double alpha = info.cutmix ? o.cutmix_alpha : o.mixup_alpha;
  info.lam = sample_beta(alpha, alpha, gen);
  if (info.lam == 1.0) return MixInfo{};
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3), n = C * H * W;
  float* x = images.data();
  if (info.cutmix) {
    info.box = cutmix_box(H, W, info.lam, gen);
    if (o.correct_lam) info.lam = 1.0 - static_cast<double>(info.box.area()) / static_cast<double>(H * W);
    const Box& b = info.box;
    for (int64_t i = 0; i < B / 2; ++i)  // x[:, :, box] = x.flip(0)[:, :, box]: swap each pair's box
      for (int64_t c = 0; c < C; ++c)
        for (int64_t y = b.y0; y < b.y1; ++y) {
          float* p = x + i * n + (c * H + y) * W;
          float* q = x + (B - 1 - i) * n + (c * H + y) * W;
          std::swap_ranges(p + b.x0, p + b.x1, q + b.x0);
        }
  } else {
    const auto lam = static_cast<float>(info.lam), rest = static_cast<float>(1.0 - info.lam);
    for (int64_t i = 0; i < B / 2; ++i) {  // x = lam * x + (1 - lam) * x.flip(0), pair by pair
      float *p = x + i * n, *q = x + (B - 1 - i) * n;
      for (int64_t j = 0; j < n; ++j) {
        const float a = p[j], b = q[j];
        p[j] = lam * a + rest * b;
        q[j] = lam * b + rest * a;
      }
    }  // an odd batch's middle sample mixes with itself: unchanged
  }
  return info;
}

/// timm mixup_target: lam * onehot(y) + (1 - lam) * onehot(y.flip(0)), where onehot puts
/// 1 - smoothing + smoothing/K on the class and smoothing/K elsewhere. labels: (B) -> (B, K)
inline Tensor<float> mixup_target(const Tensor<int64_t>& labels, int64_t num_classes, double lam, double smoothing) {
  DG_CHECK(labels.dim() == 1, "mixup_target: expected labels (B), got shape ", shape_str(labels.shape()));
  DG_CHECK(num_classes > 0, "mixup_target: num_classes must be positive, got ", num_classes);
  const std::vector<int64_t> y = labels.to_vector();
  const auto B = static_cast<int64_t>(y.size());
  for (int64_t i = 0; i < B; ++i)
    DG_CHECK(y[i] >= 0 && y[i] < num_classes, "mixup_target: label ", i, " is ", y[i], ", expected in [0, ",
             num_classes, ")");
  const double off = smoothing / static_cast<double>(num_classes), on = 1.0 - smoothing + off;
  // float arithmetic as torch does it: y1 * lam + y2 * (1 - lam) on float32 tensors
  const auto f_on = static_cast<float>(on), f_off = static_cast<float>(off);
  const auto f_lam = static_cast<float>(lam), f_rest = static_cast<float>(1.0 - lam);
  Tensor<float> t = Tensor<float>::empty({B, num_classes});
  for (int64_t i = 0; i < B; ++i)
    for (int64_t k = 0; k < num_classes; ++k) {
      const float a = y[i] == k ? f_on : f_off, b = y[B - 1 - i] == k ? f_on : f_off;
      t.data()[i * num_classes + k] = a * f_lam + b * f_rest;
    }
  return t;
}

/// timm Mixup.__call__: mixes images in place (mix_batch_) and returns the soft targets (B, K).
/// images: (B, C, H, W) contiguous; labels: (B). `info`, if given, receives what was done.
inline Tensor<float> mixup_(Tensor<float>& images, const Tensor<int64_t>& labels, int64_t num_classes,
                            const AugmentOptions& o, Generator& gen, MixInfo* info = nullptr) {
  DG_CHECK(labels.dim() == 1 && images.dim() == 4 && labels.size(0) == images.size(0), "mixup_: expected images (B, C, H, W) and labels (B), got shapes ",
           shape_str(images.shape()), " and ", shape_str(labels.shape()));
  MixInfo m = mix_batch_(images, o, gen);
  if (info) *info = m;
  return mixup_target(labels, num_classes, m.lam, o.label_smoothing);
}

}  // namespace dg::data
