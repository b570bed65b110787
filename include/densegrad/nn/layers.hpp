// densegrad/nn/layers.hpp: the layers RDNet is built from (torch.nn names and defaults):
// Conv2d, Linear, LayerNorm, LayerNorm2d, GELU, ReLU, Hardsigmoid, Identity, Dropout,
// DropPath, Sequential. Each is options + parameters + forward calling the functional op.
#pragma once

#include <cmath>

#include "../ops/activation.hpp"
#include "../ops/conv.hpp"
#include "../ops/dropout.hpp"
#include "../ops/linear.hpp"
#include "../ops/norm.hpp"
#include "init.hpp"
#include "../core/options.hpp"
#include "module.hpp"


namespace dg::nn {

// ---------------------------------------------------------------- Conv2d
struct Conv2dOptions {
  Conv2dOptions(int64_t in_channels, int64_t out_channels, Pair2 kernel_size)
      : in_channels_(in_channels), out_channels_(out_channels), kernel_size_(kernel_size) {}
  DENSEGRAD_ARG(int64_t, in_channels);
  DENSEGRAD_ARG(int64_t, out_channels);
  DENSEGRAD_ARG(Pair2, kernel_size);
  DENSEGRAD_ARG(Pair2, stride) = 1;
  DENSEGRAD_ARG(Pair2, padding) = 0;
  DENSEGRAD_ARG(Pair2, dilation) = 1;
  DENSEGRAD_ARG(int64_t, groups) = 1;
  DENSEGRAD_ARG(bool, bias) = true;
};

/// torch.nn.Conv2d: weight (out, in/groups, kH, kW), optional bias (out).
/// Example: nn::Conv2d<> conv(nn::Conv2dOptions(3, 64, 4).stride(4));
template <class T = float>
class Conv2d : public Layer<T> {
 public:
  explicit Conv2d(const Conv2dOptions& o, Generator& gen = default_generator()) : options(o) {
    DG_CHECK(o.in_channels() > 0 && o.out_channels() > 0 && o.groups() > 0 && o.in_channels() % o.groups() == 0 &&
                 o.out_channels() % o.groups() == 0,
             "Conv2d: in_channels ", o.in_channels(), " and out_channels ", o.out_channels(),
             " must be positive multiples of groups ", o.groups());
    weight = this->register_parameter(
        "weight", Tensor<T>::empty({o.out_channels(), o.in_channels() / o.groups(), o.kernel_size().h, o.kernel_size().w}));
    if (o.bias()) bias = this->register_parameter("bias", Tensor<T>::empty({o.out_channels()}));
    reset_parameters(gen);
  }
  /// torch's default: kaiming_uniform_(a=sqrt(5)) weight, uniform(+-1/sqrt(fan_in)) bias.
  void reset_parameters(Generator& gen) {
    init::kaiming_uniform_(weight, gen, std::sqrt(5.0));
    if (bias.defined()) {
      double b = 1.0 / std::sqrt(static_cast<double>(init::fans(weight).first));
      init::uniform_(bias, -b, b, gen);
    }
  }
  Tensor<T> forward(const Tensor<T>& x) override {
    return conv2d(x, weight, bias, options.stride(), options.padding(), options.dilation(), options.groups());
  }
  Conv2dOptions options;
  Tensor<T> weight, bias;
};

// ---------------------------------------------------------------- Linear
/// torch.nn.Linear: weight (out, in), optional bias (out), torch's default init.
template <class T = float>
class Linear : public Layer<T> {
 public:
  Linear(int64_t in_features, int64_t out_features, bool with_bias = true, Generator& gen = default_generator()) {
    DG_CHECK(in_features > 0 && out_features > 0, "Linear: features must be positive, got ", in_features, " -> ",
             out_features);
    weight = this->register_parameter("weight", Tensor<T>::empty({out_features, in_features}));
    if (with_bias) bias = this->register_parameter("bias", Tensor<T>::empty({out_features}));
    init::kaiming_uniform_(weight, gen, std::sqrt(5.0));
    if (bias.defined()) init::uniform_(bias, -1.0 / std::sqrt(double(in_features)), 1.0 / std::sqrt(double(in_features)), gen);
  }
  Tensor<T> forward(const Tensor<T>& x) override { return linear(x, weight, bias); }
  Tensor<T> weight, bias;
};

// ---------------------------------------------------------------- norms
/// torch.nn.LayerNorm over the last dims `normalized_shape`; weight 1, bias 0.
template <class T = float>
class LayerNorm : public Layer<T> {
 public:
  explicit LayerNorm(Shape normalized_shape, double eps = 1e-5, bool affine = true)
      : normalized_shape(std::move(normalized_shape)), eps(eps) {
    if (affine) {
      weight = this->register_parameter("weight", ones<T>(this->normalized_shape));
      bias = this->register_parameter("bias", zeros<T>(this->normalized_shape));
    }
  }
  Tensor<T> forward(const Tensor<T>& x) override { return layer_norm(x, normalized_shape, weight, bias, eps); }
  Shape normalized_shape;
  double eps;
  Tensor<T> weight, bias;
};

/// timm's LayerNorm2d: LayerNorm over the channels of an NCHW tensor.
template <class T = float>
class LayerNorm2d : public Layer<T> {
 public:
  explicit LayerNorm2d(int64_t num_channels, double eps = 1e-6) : eps(eps) {
    weight = this->register_parameter("weight", ones<T>({num_channels}));
    bias = this->register_parameter("bias", zeros<T>({num_channels}));
  }
  Tensor<T> forward(const Tensor<T>& x) override { return layer_norm2d(x, weight, bias, eps); }
  double eps;
  Tensor<T> weight, bias;
};

// ---------------------------------------------------------------- parameter-free layers
/// torch.nn.GELU (exact erf by default).
template <class T = float>
class GELU : public Layer<T> {
 public:
  explicit GELU(bool tanh_approximation = false) : tanh_approximation(tanh_approximation) {}
  Tensor<T> forward(const Tensor<T>& x) override { return gelu(x, tanh_approximation); }
  bool tanh_approximation;
};
/// torch.nn.ReLU
template <class T = float>
class ReLU : public Layer<T> {
 public:
  Tensor<T> forward(const Tensor<T>& x) override { return relu(x); }
};
/// torch.nn.Hardsigmoid: relu6(x + 3) / 6.
template <class T = float>
class Hardsigmoid : public Layer<T> {
 public:
  Tensor<T> forward(const Tensor<T>& x) override { return hard_sigmoid(x); }
};
/// torch.nn.Identity
template <class T = float>
class Identity : public Layer<T> {
 public:
  Tensor<T> forward(const Tensor<T>& x) override { return x; }
};
/// torch.nn.Dropout(p): active in training mode only; draws from this thread's default generator.
template <class T = float>
class Dropout : public Layer<T> {
 public:
  explicit Dropout(double p = 0.5) : p(p) { DG_CHECK(p >= 0 && p <= 1, "Dropout: p must be in [0, 1], got ", p); }
  Tensor<T> forward(const Tensor<T>& x) override { return dropout(x, p, this->is_training(), default_generator()); }
  double p;
};
/// timm's DropPath: drops whole samples (stochastic depth) in training mode.
template <class T = float>
class DropPath : public Layer<T> {
 public:
  explicit DropPath(double drop_prob = 0.0, bool scale_by_keep = true) : drop_prob(drop_prob), scale_by_keep(scale_by_keep) {
    DG_CHECK(drop_prob >= 0 && drop_prob <= 1, "DropPath: drop_prob must be in [0, 1], got ", drop_prob);
  }
  Tensor<T> forward(const Tensor<T>& x) override {
    return drop_path(x, drop_prob, this->is_training(), default_generator(), scale_by_keep);
  }
  double drop_prob;
  bool scale_by_keep;
};

// ---------------------------------------------------------------- Sequential
/// torch.nn.Sequential: children named "0", "1", ... run in order.
template <class T = float>
class Sequential : public Layer<T> {
 public:
  Sequential() = default;
  explicit Sequential(std::vector<std::shared_ptr<Layer<T>>> layers) {
    for (auto& l : layers) push_back(l);
  }
  /// Appends a layer under the next index; returns it.
  template <class L>
  std::shared_ptr<L> push_back(std::shared_ptr<L> layer) {
    layers_.push_back(layer);
    return this->register_module(std::to_string(layers_.size() - 1), layer);
  }
  Tensor<T> forward(const Tensor<T>& x) override {
    Tensor<T> h = x;
    for (auto& l : layers_) h = l->forward(h);
    return h;
  }
  size_t size() const { return layers_.size(); }
  Layer<T>& operator[](size_t i) { return *layers_.at(i); }

 private:
  std::vector<std::shared_ptr<Layer<T>>> layers_;
};

}  // namespace dg::nn
