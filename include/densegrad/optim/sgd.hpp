// densegrad/optim/sgd.hpp: stochastic gradient descent with momentum, dampening, Nesterov
// momentum and coupled L2 weight decay, step for step as torch.optim.SGD (single-tensor path).
// Not decoupled weight decay (that is AdamW's) and no maximize / sparse gradients.
#pragma once

#include "optimizer.hpp"

namespace dg::optim {

/// Options of SGD; lr and weight_decay are the defaults for groups that leave them NaN.
struct SGDOptions {
  DENSEGRAD_ARG(double, lr) = 1e-3;
  DENSEGRAD_ARG(double, momentum) = 0.0;
  DENSEGRAD_ARG(double, dampening) = 0.0;
  DENSEGRAD_ARG(double, weight_decay) = 0.0;
  DENSEGRAD_ARG(bool, nesterov) = false;
};

/// torch.optim.SGD. Per element, with g the gradient and b the momentum buffer:
///   g = g + weight_decay * p                                  (coupled L2)
///   b = g on a parameter's first update, else momentum * b + (1 - dampening) * g
///   g = nesterov ? g + momentum * b : b                        (when momentum != 0)
///   p = p - lr * g
/// State per parameter: "momentum_buffer" (only when momentum != 0, as in torch).
/// Example: optim::SGD<float> opt(model.parameters(), SGDOptions().lr(0.1).momentum(0.9).nesterov(true));
template <class T = float>
class SGD : public Optimizer<T> {
  using Base = Optimizer<T>;
  using S = typename Base::S;

 public:
  SGD(std::vector<Tensor<T>> params, const SGDOptions& o = {})
      : SGD(std::vector<ParamGroup<T>>{ParamGroup<T>{std::move(params)}}, o) {}
  SGD(std::vector<ParamGroup<T>> groups, const SGDOptions& o = {})
      : Base("SGD", std::move(groups), o.lr(), o.weight_decay()),
        momentum_(o.momentum()), dampening_(o.dampening()), nesterov_(o.nesterov()) {
    this->register_option("momentum", &momentum_);
    this->register_option("dampening", &dampening_);
    check_options();
    this->init_state(momentum_ != 0 ? std::vector<std::string>{"momentum_buffer"} : std::vector<std::string>{});
  }

 protected:
  void check_options() const override {
    DG_CHECK(momentum_ >= 0 && std::isfinite(momentum_), "SGD: invalid momentum ", momentum_, " (expected >= 0)");
    DG_CHECK(std::isfinite(dampening_), "SGD: invalid dampening ", dampening_);
    DG_CHECK(!nesterov_ || (momentum_ > 0 && dampening_ == 0),
             "SGD: Nesterov momentum requires momentum > 0 and dampening 0 (got momentum ", momentum_,
             ", dampening ", dampening_, ")");
  }

  void update(const ParamGroup<T>& group, Tensor<T>& p, const Tensor<T>& grad,
              typename Base::ParamState& st) override {
    // Like torch, the double hyperparameters are cast to the compute type once: S(...).
    const S lr = S(group.lr), wd = S(group.weight_decay), mom = S(momentum_), keep = S(1 - dampening_);
    const bool decay = group.weight_decay != 0, first = st.step == 1, nesterov = nesterov_;
    if (p.device().is_cuda()) {  // one fused kernel, same formulas (backend/cuda/optim.cuh)
      cuda_kernels<T>("SGD").sgd_update(p, grad, momentum_ != 0 ? st.buffers[0].second : Tensor<S>(),
                                        SGDScalars{double(lr), double(wd), double(mom), double(keep), decay, first,
                                                   nesterov});
      return;
    }
    T* pp = p.data();
    const T* pg = grad.data();
    S* buf = momentum_ != 0 ? st.buffer(0) : nullptr;
    detail::parallel_for(p.numel(), [&](int64_t k) {
      S w = S(pp[k]), g = S(pg[k]);
      if (decay) g = g + wd * w;
      if (buf) {
        buf[k] = first ? g : buf[k] * mom + keep * g;
        g = nesterov ? g + mom * buf[k] : buf[k];
      }
      pp[k] = T(w + (-lr) * g);
    });
  }

 private:
  double momentum_, dampening_;
  bool nesterov_;
};

}  // namespace dg::optim
