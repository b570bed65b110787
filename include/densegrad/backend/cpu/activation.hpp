// densegrad/backend/cpu/activation.hpp: fast GELU forward and backward over contiguous tensors,
// in chunks of 4096 elements spread over OpenMP threads. float and bfloat16 run vectorized, 16
// floats at a time in registers (fixed-size Eigen arrays, no temporaries in memory): erf by
// Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, the formula of ATen's own vectorized float erf)
// and Eigen's exp; double runs the exact libm math of ref::gelu_scalar.
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
constexpr int64_t kActivationParallelMin = int64_t(1) << 15;
/// Elements per task: 16 KB of floats, so a task is worth a thread's scheduling.
constexpr int64_t kGeluChunk = 4096;
/// 16 floats: one AVX-512 register. Fixed size, so every expression below is evaluated in
/// registers, packet by packet, with no temporary arrays in memory.
using GeluPacket = Eigen::Array<float, 16, 1>;

/// Calls f(begin, length) for consecutive chunks of [0, n), in parallel when n is large.
template <class F>
void for_each_chunk(int64_t n, F f) {
  const int64_t chunks = (n + kGeluChunk - 1) / kGeluChunk;
  DENSEGRAD_OMP(parallel for schedule(static) if (n >= kActivationParallelMin))
  for (int64_t c = 0; c < chunks; ++c) f(c * kGeluChunk, std::min(kGeluChunk, n - c * kGeluChunk));
}
/// len <= 16 elements of T as a packet of floats (the lanes past len are 0), and back.
template <class T>
GeluPacket load(const T* p, int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    if (len == 16) return Eigen::Map<const GeluPacket>(p);
  }
  GeluPacket v = GeluPacket::Zero();
  for (int64_t j = 0; j < len; ++j) v[j] = float(p[j]);
  return v;
}
template <class T>
void store(const GeluPacket& v, T* p, int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    if (len == 16) {
      Eigen::Map<GeluPacket> o(p);
      o = v;
      return;
    }
  }
  for (int64_t j = 0; j < len; ++j) p[j] = T(v[j]);
}
/// out[i, i + m) = f(p[i, i + m) as a packet, i, m) for the packets of [0, len); m = 16 but for
/// a partial last packet (f sees the offset and length to load its other inputs alike).
template <class T, class F>
void map_packets(const T* p, T* out, int64_t len, F f) {
  for (int64_t i = 0; i < len; i += 16) {
    const int64_t m = std::min<int64_t>(16, len - i);
    store(f(load(p + i, m), i, m), out + i, m);
  }
}

/// Phi(x) = (1 + erf(x / sqrt 2)) / 2 and phi(x) = exp(-x^2 / 2) / sqrt(2 pi) for a packet.
/// erf(z) = sign(z) (1 - t (a1 + t (a2 + ... + t a5)) exp(-z^2)), t = 1 / (1 + p |z|), z = x / sqrt 2,
/// so exp(-z^2) = exp(-x^2 / 2) serves the density too: one exp per element.
inline void gelu_cdf_pdf(const GeluPacket& x, GeluPacket& cdf, GeluPacket& pdf) {
  const GeluPacket z = x * float(ref::kSqrt1_2);
  const GeluPacket t = (1.0f + 0.3275911f * z.abs()).inverse();
  const GeluPacket e = (-(z * z)).exp();
  // sign(z) by clamping z * 1e30 to [-1, 1]: Eigen's sign() has no packet version and would make
  // the whole expression scalar; |z| < 1e-30 (a ramp instead of a step) changes nothing in float
  const GeluPacket sign = (z * 1e30f).max(-1.0f).min(1.0f);
  const GeluPacket poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  cdf = 0.5f + 0.5f * sign * (1.0f - poly * e);  // (1 + erf(z)) / 2
  pdf = float(ref::kInvSqrt2Pi) * e;
}
/// The tanh form through 1 + tanh(u) = 2 sigmoid(2u): s = 1 / (1 + exp(-2u)),
/// u = sqrt(2/pi) (x + 0.044715 x^3); no cancellation in either tail.
inline GeluPacket gelu_tanh_sigmoid(const GeluPacket& x) {
  const GeluPacket u = float(ref::kSqrt2OverPi) * (x + float(ref::kGeluTanhCubic) * x * x * x);
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
    using detail::GeluPacket;
    detail::for_each_chunk(x.numel(), [&](int64_t i0, int64_t len) {
      if (tanh_approximation)  // s = (1 + tanh(u)) / 2
        detail::map_packets(px + i0, py + i0, len, [](const GeluPacket& v, int64_t, int64_t) -> GeluPacket {
          return v * detail::gelu_tanh_sigmoid(v);
        });
      else
        detail::map_packets(px + i0, py + i0, len, [](const GeluPacket& v, int64_t, int64_t) -> GeluPacket {
          GeluPacket cdf, pdf;
          detail::gelu_cdf_pdf(v, cdf, pdf);
          return v * cdf;
        });
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
    using detail::GeluPacket;
    detail::for_each_chunk(x.numel(), [&](int64_t i0, int64_t len) {
      const T* g = pdy + i0;  // dy of the packet at offset i of this chunk: g + i
      if (tanh_approximation)
        detail::map_packets(px + i0, pdx + i0, len, [g](const GeluPacket& v, int64_t i, int64_t m) -> GeluPacket {
          const GeluPacket s = detail::gelu_tanh_sigmoid(v);
          return detail::load(g + i, m) * (s + 2.0f * v * s * (1.0f - s) * float(ref::kSqrt2OverPi) *
                                                   (1.0f + float(3 * ref::kGeluTanhCubic) * v * v));
        });
      else
        detail::map_packets(px + i0, pdx + i0, len, [g](const GeluPacket& v, int64_t i, int64_t m) -> GeluPacket {
          GeluPacket cdf, pdf;
          detail::gelu_cdf_pdf(v, cdf, pdf);
          return detail::load(g + i, m) * (cdf + v * pdf);
        });
    });
  }
  return dx;
}

}  // namespace dg::cpu
