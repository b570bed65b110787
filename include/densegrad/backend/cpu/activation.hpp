// densegrad/backend/cpu/activation.hpp: fast GELU forward and backward over contiguous tensors,
// in chunks of 1024 elements spread over OpenMP threads. float and bfloat16 run vectorized
// (Eigen packets): erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, the formula of ATen's
// own vectorized float erf) and Eigen's exp; double runs the exact libm math of ref::gelu_scalar.
// Not other activations (they are cheap; the ref kernels serve them). ref::gelu is the oracle.
// Shape legend: x, dy, y, dx: any shape, contiguous, all the same.
#pragma once

#include <Eigen/Core>
#include <algorithm>

#include "parallel.hpp"
#include "../ref/activation.hpp"


namespace dg::cpu {

namespace detail {
/// Below this many elements one thread is faster than waking the others.
constexpr int64_t kActivationParallelMin = int64_t(1) << 14;
/// Elements per task; a chunk of floats lives on the stack (4 KB) and in L1.
constexpr int64_t kGeluChunk = 1024;
using GeluChunk = Eigen::Array<float, Eigen::Dynamic, 1, 0, kGeluChunk, 1>;

/// Calls f(begin, length) for consecutive chunks of [0, n), in parallel when n is large.
template <class F>
void for_each_chunk(int64_t n, F f) {
  const int64_t chunks = (n + kGeluChunk - 1) / kGeluChunk;
  DENSEGRAD_OMP(parallel for schedule(static) if (n >= kActivationParallelMin))
  for (int64_t c = 0; c < chunks; ++c) f(c * kGeluChunk, std::min(kGeluChunk, n - c * kGeluChunk));
}
/// A chunk of T as floats (a vectorized copy for float, a conversion loop for bfloat16), and back.
template <class T>
GeluChunk load(const T* p, int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    return Eigen::Map<const Eigen::ArrayXf>(p, len);
  } else {
    GeluChunk v(len);
    for (int64_t j = 0; j < len; ++j) v[j] = float(p[j]);
    return v;
  }
}
template <class T>
void store(const GeluChunk& v, T* p) {
  if constexpr (std::is_same_v<T, float>) {
    Eigen::Map<Eigen::ArrayXf>(p, v.size()) = v;
  } else {
    for (Eigen::Index j = 0; j < v.size(); ++j) p[j] = T(v[j]);
  }
}

/// Phi(x) = (1 + erf(x / sqrt 2)) / 2 and phi(x) = exp(-x^2 / 2) / sqrt(2 pi) for a chunk.
/// erf(z) = sign(z) (1 - t (a1 + t (a2 + ... + t a5)) exp(-z^2)), t = 1 / (1 + p |z|), z = x / sqrt 2,
/// so exp(-z^2) = exp(-x^2 / 2) serves the density too: one exp per element.
inline void gelu_cdf_pdf(const GeluChunk& x, GeluChunk& cdf, GeluChunk& pdf) {
  const GeluChunk z = x * float(ref::kSqrt1_2);
  const GeluChunk t = (1.0f + 0.3275911f * z.abs()).inverse();
  const GeluChunk e = (-(z * z)).exp();
  // sign(z) by clamping z * 1e30 to [-1, 1]: Eigen's sign() has no packet version and would make
  // the whole expression scalar; |z| < 1e-30 (a ramp instead of a step) changes nothing in float
  const GeluChunk sign = (z * 1e30f).max(-1.0f).min(1.0f);
  const GeluChunk poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  cdf = 0.5f + 0.5f * sign * (1.0f - poly * e);  // (1 + erf(z)) / 2
  pdf = float(ref::kInvSqrt2Pi) * e;
}
/// The tanh form through 1 + tanh(u) = 2 sigmoid(2u): s = 1 / (1 + exp(-2u)),
/// u = sqrt(2/pi) (x + 0.044715 x^3); no cancellation in either tail.
inline GeluChunk gelu_tanh_sigmoid(const GeluChunk& x) {
  const GeluChunk u = float(ref::kSqrt2OverPi) * (x + float(ref::kGeluTanhCubic) * x * x * x);
  return (1.0f + (-2.0f * u).exp()).inverse();
}
}  // namespace detail

/// torch.nn.functional.gelu on a contiguous x (= ref::gelu up to the erf approximation for float).
template <class T>
Tensor<T> gelu(const Tensor<T>& x, bool tanh_approximation) {
  DG_CHECK(x.is_contiguous(), "cpu::gelu: expected a contiguous input, got shape ", shape_str(x.shape()),
           " strides ", shape_str(x.strides()));
  Tensor<T> y = Tensor<T>::empty(x.shape());
  const T* px = x.data();
  T* py = y.data();
  if constexpr (std::is_same_v<T, double>) {  // exact libm math, threads only
    const int64_t n = x.numel();
    DENSEGRAD_OMP(parallel for schedule(static) if (n >= detail::kActivationParallelMin))
    for (int64_t i = 0; i < n; ++i) py[i] = ref::gelu_scalar(px[i], tanh_approximation);
  } else {
    detail::for_each_chunk(x.numel(), [&](int64_t i0, int64_t len) {
      const detail::GeluChunk v = detail::load(px + i0, len);
      detail::GeluChunk cdf, pdf;
      if (tanh_approximation) cdf = detail::gelu_tanh_sigmoid(v);  // = (1 + tanh(u)) / 2
      else detail::gelu_cdf_pdf(v, cdf, pdf);
      detail::store(detail::GeluChunk(v * cdf), py + i0);
    });
  }
  return y;
}

/// dx = dy * gelu'(x) for contiguous dy and x of one shape (= ref::gelu_backward, as above):
/// erf form: Phi(x) + x phi(x); tanh form: s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 x^2).
template <class T>
Tensor<T> gelu_backward(const Tensor<T>& dy, const Tensor<T>& x, bool tanh_approximation) {
  DG_CHECK(dy.is_contiguous() && x.is_contiguous() && dy.shape() == x.shape(),
           "cpu::gelu_backward: expected contiguous dy and x of one shape, got ", shape_str(dy.shape()), " and ",
           shape_str(x.shape()));
  Tensor<T> dx = Tensor<T>::empty(x.shape());
  const T *pdy = dy.data(), *px = x.data();
  T* pdx = dx.data();
  if constexpr (std::is_same_v<T, double>) {
    const int64_t n = x.numel();
    DENSEGRAD_OMP(parallel for schedule(static) if (n >= detail::kActivationParallelMin))
    for (int64_t i = 0; i < n; ++i) pdx[i] = pdy[i] * ref::gelu_grad_scalar(px[i], tanh_approximation);
  } else {
    detail::for_each_chunk(x.numel(), [&](int64_t i0, int64_t len) {
      const detail::GeluChunk v = detail::load(px + i0, len), g = detail::load(pdy + i0, len);
      detail::GeluChunk d;
      if (tanh_approximation) {
        const detail::GeluChunk s = detail::gelu_tanh_sigmoid(v);
        d = s + 2.0f * v * s * (1.0f - s) * float(ref::kSqrt2OverPi) *
                    (1.0f + float(3 * ref::kGeluTanhCubic) * v * v);
      } else {
        detail::GeluChunk cdf, pdf;
        detail::gelu_cdf_pdf(v, cdf, pdf);
        d = cdf + v * pdf;
      }
      detail::store(detail::GeluChunk(g * d), pdx + i0);
    });
  }
  return dx;
}

}  // namespace dg::cpu
