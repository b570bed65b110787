// densegrad/optim/ema.hpp: ModelEMA, an exponential moving average of a model's parameters
// and buffers (timm's ModelEmaV2), kept as a state dict, not as a second model.
// Not a warmup of the decay (timm's ModelEmaV3): call set_decay() for that.
#pragma once

#include <map>
#include <string>

#include "optimizer.hpp"

namespace dg::optim {

/// timm.utils.ModelEmaV2: after each optimizer step, ema = decay * ema + (1 - decay) * value
/// for every parameter and buffer of the model. The averages are kept in acc_t<T> (fp32 for a
/// bfloat16 model: decay 0.9999 moves a value by 1e-4 of the gap, far below bf16's 2^-8).
/// Example:
///     optim::ModelEMA<float> ema(model, 0.9998);
///     ...  opt.step(); ema.update(model);
///     ema.copy_to(eval_model);   // or io::save_safetensors(path, ema.state_dict())
template <class T = float>
class ModelEMA {
 public:
  using S = acc_t<T>;

  /// Starts from a copy of the model's state dict (timm deep-copies the model).
  ModelEMA(const nn::Module<T>& model, double decay) {
    set_decay(decay);
    NoGradGuard no_grad;
    for (auto& [name, t] : model.state_dict()) {
      const Tensor<T> c = t.contiguous().to(Device::cpu());  // converted on the host, kept on t's device
      Tensor<S> e = Tensor<S>::empty(t.shape());
      for (int64_t k = 0; k < c.numel(); ++k) e.data()[k] = S(c.data()[k]);
      e = e.to(t.device());
      ema_.emplace(name, e);
    }
  }

  /// ema = decay * ema + (1 - decay) * model, for every parameter and buffer.
  void update(const nn::Module<T>& model) {
    NoGradGuard no_grad;
    auto sd = model.state_dict();
    check_keys(sd, "update");
    const S d = S(decay_), w = S(1 - decay_);  // timm: self.decay * e + (1. - self.decay) * m
    for (auto& [name, e] : ema_) {
      const Tensor<T> m = sd.at(name).contiguous();
      if (m.device().is_cuda()) {
        if constexpr (std::is_same_v<S, T>) {  // e = d * e + w * m with the pointwise kernels
          const DeviceKernels<T>& k = cuda_kernels<T>("ModelEMA");
          e.copy_(k.binary(BinaryFn::Add, k.unary(UnaryFn::MulScalar, e, double(d), 0),
                           k.unary(UnaryFn::MulScalar, m, double(w), 0), 0, 0));
          continue;
        }
        DG_THROW("ModelEMA: ", dtype_name(dtype_of<T>()), " models on CUDA are not supported");
      }
      const T* pm = m.data();
      S* pe = e.data();
      detail::parallel_for(e.numel(), [&](int64_t k) { pe[k] = d * pe[k] + w * S(pm[k]); });
    }
  }

  /// Writes the averages into a model with the same state dict keys (for evaluation).
  void copy_to(nn::Module<T>& model) const {
    check_keys(model.state_dict(), "copy_to");
    model.load_state_dict(ema_);
  }

  /// The averages by the model's own names: saved as is, it loads into the model.
  const std::map<std::string, Tensor<S>>& state_dict() const { return ema_; }
  /// Restores averages saved by state_dict(); same keys and shapes required.
  void load_state_dict(const std::map<std::string, Tensor<S>>& sd) {
    check_keys(sd, "load_state_dict");
    for (auto& [name, e] : ema_) e.copy_(sd.at(name));
  }

  double decay() const { return decay_; }
  void set_decay(double decay) {
    DG_CHECK(decay >= 0 && decay <= 1, "ModelEMA: decay must be in [0, 1], got ", decay);
    decay_ = decay;
  }

 private:
  /// The same names and shapes as the averages, or a dg::Error listing the differences.
  template <class U>
  void check_keys(const std::map<std::string, Tensor<U>>& sd, const char* where) const {
    nn::LoadResult r;
    for (auto& [name, e] : ema_) {
      auto it = sd.find(name);
      if (it == sd.end()) r.missing.push_back(name);
      else if (it->second.shape() != e.shape())
        r.mismatched.push_back(name + ": " + shape_str(it->second.shape()) + " vs EMA " + shape_str(e.shape()));
    }
    for (auto& [name, t] : sd)
      if (!ema_.count(name)) r.unexpected.push_back(name);
    DG_CHECK(r.ok(), "ModelEMA ", where, ": the state dict does not match the EMA's: ", r.str());
  }

  std::map<std::string, Tensor<S>> ema_;
  double decay_ = 0;
};

}  // namespace dg::optim
