// densegrad/nn/init.hpp: parameter initializers (torch.nn.init), in place, from a Generator.
// Same formulas and defaults as torch; the random streams differ (ours are portable).
#pragma once

#include <cmath>
#include <string>

#include "../core/tensor.hpp"
#include "../autograd/grad_mode.hpp"

namespace dg::nn::init {

enum class FanMode { FanIn, FanOut };

/// (fan_in, fan_out) of a weight: dims 1 and 0 times the receptive field (torch's rule).
template <class T>
std::pair<int64_t, int64_t> fans(const Tensor<T>& w) {
  DG_CHECK(w.dim() >= 2, "init: fan in/out need a weight with at least 2 dims, got ", shape_str(w.shape()));
  int64_t rf = 1;
  for (int64_t i = 2; i < w.dim(); ++i) rf *= w.shape()[i];
  return {w.shape()[1] * rf, w.shape()[0] * rf};
}

/// torch.nn.init.calculate_gain for "linear", "relu", "leaky_relu" (slope a), "tanh", "sigmoid".
inline double calculate_gain(const std::string& nonlinearity, double a = 0.01) {
  if (nonlinearity == "linear" || nonlinearity == "conv2d" || nonlinearity == "sigmoid") return 1.0;
  if (nonlinearity == "tanh") return 5.0 / 3.0;
  if (nonlinearity == "relu") return std::sqrt(2.0);
  if (nonlinearity == "leaky_relu") return std::sqrt(2.0 / (1.0 + a * a));
  DG_THROW("calculate_gain: unknown nonlinearity '", nonlinearity, "' (linear, relu, leaky_relu, tanh, sigmoid)");
}

/// Fills t elementwise from sample() (with recording off, as torch.nn.init does).
template <class T, class F>
Tensor<T>& fill_with(Tensor<T>& t, F&& sample) {
  DG_CHECK(t.is_contiguous(), "init: expected a contiguous parameter, got shape ", shape_str(t.shape()),
           " with strides ", shape_str(t.strides()));
  DG_CHECK(t.device().is_cpu(), "init: parameters are initialized on the CPU (then moved with .to()), got one on ",
           t.device().str());
  T* p = t.data();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = T(sample());
  return t;
}

/// torch.nn.init.constant_
template <class T> Tensor<T>& constant_(Tensor<T>& t, double v) { return fill_with(t, [v] { return v; }); }
template <class T> Tensor<T>& zeros_(Tensor<T>& t) { return constant_(t, 0.0); }
template <class T> Tensor<T>& ones_(Tensor<T>& t) { return constant_(t, 1.0); }
/// torch.nn.init.uniform_
template <class T> Tensor<T>& uniform_(Tensor<T>& t, double lo, double hi, Generator& gen) {
  return fill_with(t, [&] { return lo + (hi - lo) * gen.uniform(); });
}
/// torch.nn.init.normal_
template <class T> Tensor<T>& normal_(Tensor<T>& t, double mean, double std, Generator& gen) {
  return fill_with(t, [&] { return mean + std * gen.normal(); });
}
/// torch.nn.init.trunc_normal_: normal(mean, std) redrawn until inside [a, b].
template <class T> Tensor<T>& trunc_normal_(Tensor<T>& t, double mean, double std, double a, double b, Generator& gen) {
  DG_CHECK(a < b && mean + 6 * std > a && mean - 6 * std < b, "trunc_normal_: [", a, ", ", b,
           "] must be an interval that holds a non-negligible part of normal(", mean, ", ", std, ")");
  return fill_with(t, [&] {
    double v;
    do v = mean + std * gen.normal(); while (v < a || v > b);
    return v;
  });
}
/// torch.nn.init.kaiming_normal_: std = gain / sqrt(fan), gain from the nonlinearity.
template <class T>
Tensor<T>& kaiming_normal_(Tensor<T>& t, Generator& gen, double a = 0, FanMode mode = FanMode::FanIn,
                           const std::string& nonlinearity = "leaky_relu") {
  auto [fi, fo] = fans(t);
  double fan = static_cast<double>(mode == FanMode::FanIn ? fi : fo);
  return normal_(t, 0.0, calculate_gain(nonlinearity, a) / std::sqrt(fan), gen);
}
/// torch.nn.init.kaiming_uniform_: bound = gain * sqrt(3 / fan).
template <class T>
Tensor<T>& kaiming_uniform_(Tensor<T>& t, Generator& gen, double a = 0, FanMode mode = FanMode::FanIn,
                            const std::string& nonlinearity = "leaky_relu") {
  auto [fi, fo] = fans(t);
  double fan = static_cast<double>(mode == FanMode::FanIn ? fi : fo);
  double bound = calculate_gain(nonlinearity, a) * std::sqrt(3.0 / fan);
  return uniform_(t, -bound, bound, gen);
}

}  // namespace dg::nn::init
