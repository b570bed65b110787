// densegrad/backend/cuda/optim.cuh: the fused optimizer updates. AdamW: one kernel reads p, g,
// m, v (and v_max with amsgrad) once and writes p, m, v back, with the formulas and rounding
// order of optim/adamw.hpp (torch's single-tensor AdamW). SGD: one kernel reads p, g and the
// momentum buffer and writes p and the buffer, as optim/sgd.hpp.
#pragma once

#include "common.cuh"

namespace dg::cuda {

namespace optim_detail {
template <class T, class S>
__global__ void adamw_kernel(T* p, const T* g, S* m, S* v, S* vmax, int64_t n, S decay, S w1, S b2, S w2,
                             S neg_step_size, S bc2_sqrt, S eps, bool decoupled) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    S w = S(p[k]), gk = S(g[k]), mk = m[k];
    if (decoupled) w = w * decay;
    mk = w1 < S(0.5) ? mk + w1 * (gk - mk) : gk - (gk - mk) * (S(1) - w1);  // lerp(m, g, 1 - beta1)
    const S vk = v[k] * b2 + w2 * gk * gk;
    S v_hat = vk;
    if (vmax) v_hat = vmax[k] = vmax[k] > vk ? vmax[k] : vk;
    const S denom = ::sqrt(v_hat) / bc2_sqrt + eps;
    m[k] = mk;
    v[k] = vk;
    p[k] = T(w + neg_step_size * mk / denom);
  }
}

template <class T, class S>
__global__ void sgd_kernel(T* p, const T* g, S* buf, int64_t n, S lr, S wd, S mom, S keep, bool decay, bool first,
                           bool nesterov) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    const S w = S(p[k]);
    S gk = S(g[k]);
    if (decay) gk = gk + wd * w;
    if (buf) {
      const S b = first ? gk : buf[k] * mom + keep * gk;
      buf[k] = b;
      gk = nesterov ? gk + mom * b : b;
    }
    p[k] = T(w + (-lr) * gk);
  }
}
}  // namespace optim_detail

/// One AdamW step of p in place (all tensors contiguous, on one device; vmax undefined unless amsgrad).
template <class T>
void adamw_update(const Tensor<T>& p, const Tensor<T>& g, const Tensor<acc_t<T>>& m, const Tensor<acc_t<T>>& v,
                  const Tensor<acc_t<T>>& vmax, const AdamWScalars& s) {
  using S = acc_t<T>;
  check_device<T>("AdamW", p.device(), {&g});
  DG_CHECK(m.device() == p.device() && v.device() == p.device() && (!vmax.defined() || vmax.device() == p.device()),
           "AdamW: optimizer state is on ", m.device().str(), " but the parameter is on ", p.device().str(),
           " (create the optimizer after moving the model)");
  const int64_t n = p.numel();
  if (n == 0) return;
  optim_detail::adamw_kernel<T, S><<<blocks_for(n), kThreads, 0, stream()>>>(
      p.data(), g.data(), m.data(), v.data(), vmax.defined() ? vmax.data() : nullptr, n, S(s.decay), S(s.w1),
      S(s.b2), S(s.w2), S(s.neg_step_size), S(s.bc2_sqrt), S(s.eps), s.decoupled);
  check_launch("AdamW");
}

/// One SGD step of p in place (p, g and buf contiguous on one device; buf undefined without momentum).
template <class T>
void sgd_update(const Tensor<T>& p, const Tensor<T>& g, const Tensor<acc_t<T>>& buf, const SGDScalars& s) {
  using S = acc_t<T>;
  check_device<T>("SGD", p.device(), {&g});
  DG_CHECK(!buf.defined() || buf.device() == p.device(), "SGD: the momentum buffer is on ", buf.device().str(),
           " but the parameter is on ", p.device().str(), " (create the optimizer after moving the model)");
  const int64_t n = p.numel();
  if (n == 0) return;
  optim_detail::sgd_kernel<T, S><<<blocks_for(n), kThreads, 0, stream()>>>(
      p.data(), g.data(), buf.defined() ? buf.data() : nullptr, n, S(s.lr), S(s.weight_decay), S(s.momentum),
      S(s.keep), s.decay, s.first, s.nesterov);
  check_launch("SGD");
}

template <class T>
void register_optim(DeviceKernels<T>& k) {
  k.adamw_update = DG_CUDA_ON_DEVICE(adamw_update<T>);
  k.sgd_update = DG_CUDA_ON_DEVICE(sgd_update<T>);
}

}  // namespace dg::cuda
