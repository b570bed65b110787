// densegrad/optim/adamw.hpp: AdamW (Adam with decoupled weight decay, optional AMSGrad), step
// for step as torch.optim.AdamW's single-tensor (non-foreach, non-fused) path.
// Not Adam's coupled L2 decay; no maximize, capturable or differentiable modes.
#pragma once

#include <algorithm>

#include "optimizer.hpp"

namespace dg::optim {

/// Options of AdamW (torch's defaults); lr and weight_decay are the defaults for groups that
/// leave them NaN.
struct AdamWOptions {
  DENSEGRAD_ARG(double, lr) = 1e-3;
  DENSEGRAD_ARG(double, beta1) = 0.9;
  DENSEGRAD_ARG(double, beta2) = 0.999;
  DENSEGRAD_ARG(double, eps) = 1e-8;
  DENSEGRAD_ARG(double, weight_decay) = 1e-2;
  DENSEGRAD_ARG(bool, amsgrad) = false;
};

/// torch.optim.AdamW. Per element, at this parameter's update number t (1, 2, ...):
///   p = p * (1 - lr * weight_decay)                           (decoupled decay, before the step)
///   m = lerp(m, g, 1 - beta1)       v = beta2 * v + (1 - beta2) * g^2
///   v_hat = amsgrad ? (v_max = max(v_max, v)) : v
///   p = p - lr / (1 - beta1^t) * m / (sqrt(v_hat) / sqrt(1 - beta2^t) + eps)
/// The bias corrections are computed in double, everything else in S (fp32 for fp32/bf16).
/// State per parameter: "exp_avg" (m), "exp_avg_sq" (v) and, with amsgrad, "max_exp_avg_sq".
/// Example: optim::AdamW<float> opt(optim::timm_param_groups(model, 0.05), AdamWOptions().lr(1e-3));
template <class T = float>
class AdamW : public Optimizer<T> {
  using Base = Optimizer<T>;
  using S = typename Base::S;

 public:
  AdamW(std::vector<Tensor<T>> params, const AdamWOptions& o = {})
      : AdamW(std::vector<ParamGroup<T>>{ParamGroup<T>{std::move(params)}}, o) {}
  AdamW(std::vector<ParamGroup<T>> groups, const AdamWOptions& o = {})
      : Base("AdamW", std::move(groups), o.lr(), o.weight_decay()),
        beta1_(o.beta1()), beta2_(o.beta2()), eps_(o.eps()), amsgrad_(o.amsgrad()) {
    this->register_option("beta1", &beta1_);
    this->register_option("beta2", &beta2_);
    this->register_option("eps", &eps_);
    check_options();
    std::vector<std::string> buffers{"exp_avg", "exp_avg_sq"};
    if (amsgrad_) buffers.push_back("max_exp_avg_sq");
    this->init_state(buffers);
  }

 protected:
  void check_options() const override {
    DG_CHECK(beta1_ >= 0 && beta1_ < 1 && beta2_ >= 0 && beta2_ < 1, "AdamW: invalid betas (", beta1_, ", ",
             beta2_, "), expected each in [0, 1)");
    DG_CHECK(eps_ >= 0 && std::isfinite(eps_), "AdamW: invalid eps ", eps_, " (expected >= 0)");
  }

  void update(const ParamGroup<T>& group, Tensor<T>& p, const Tensor<T>& grad,
              typename Base::ParamState& st) override {
    const double t = static_cast<double>(st.step);
    const double bias_correction1 = 1 - std::pow(beta1_, t), bias_correction2 = 1 - std::pow(beta2_, t);
    // Like torch, the double scalars are cast to the compute type once: S(...).
    const S decay = S(1 - group.lr * group.weight_decay), w1 = S(1 - beta1_), b2 = S(beta2_), w2 = S(1 - beta2_);
    const S neg_step_size = S(-(group.lr / bias_correction1)), bc2_sqrt = S(std::sqrt(bias_correction2));
    const S eps = S(eps_);
    const bool decoupled = group.weight_decay != 0;
    if (p.device().is_cuda()) {  // one fused kernel, same formulas (backend/cuda/optim.cuh)
      auto& b = st.buffers;
      cuda_kernels<T>("AdamW").adamw_update(p, grad, b[0].second, b[1].second, amsgrad_ ? b[2].second : Tensor<S>(),
                                            AdamWScalars{double(decay), double(w1), double(b2), double(w2),
                                                         double(neg_step_size), double(bc2_sqrt), double(eps),
                                                         decoupled});
      return;
    }
    T* pp = p.data();
    const T* pg = grad.data();
    S *m = st.buffer(0), *v = st.buffer(1), *vmax = amsgrad_ ? st.buffer(2) : nullptr;
    detail::parallel_for(p.numel(), [&](int64_t k) {
      S w = S(pp[k]), g = S(pg[k]);
      if (decoupled) w = w * decay;
      // exp_avg.lerp_(grad, 1 - beta1), with ATen's lerp: exact at both ends of the weight
      m[k] = w1 < S(0.5) ? m[k] + w1 * (g - m[k]) : g - (g - m[k]) * (S(1) - w1);
      v[k] = v[k] * b2 + w2 * g * g;  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
      S v_hat = v[k];
      if (vmax) v_hat = vmax[k] = std::max(vmax[k], v[k]);
      S denom = std::sqrt(v_hat) / bc2_sqrt + eps;
      pp[k] = T(w + neg_step_size * m[k] / denom);  // param.addcdiv_(exp_avg, denom, -step_size)
    });
  }

 private:
  double beta1_, beta2_, eps_;
  bool amsgrad_;
};

}  // namespace dg::optim
