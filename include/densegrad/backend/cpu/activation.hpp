// densegrad/backend/cpu/activation.hpp: fast GELU forward and backward over contiguous tensors,
// in chunks of 4096 elements spread over OpenMP threads. float and bfloat16 run vectorized, one
// SIMD register of floats at a time (Eigen's native packet: 16 floats with AVX-512, 8 with AVX2,
// 4 with SSE or NEON): erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, the formula of ATen's
// own vectorized float erf), its exp(-z^2) by exp_nonpositive below; double runs the exact libm
// math of ref::gelu_scalar, and so does a build without SIMD.
// Not other activations (they are cheap; the ref kernels serve them). ref::gelu is the oracle.
// Shape legend: x, dy, y, dx: any shape, contiguous, all the same.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "parallel.hpp"
#include "../ref/activation.hpp"


#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // Eigen's packet types as template arguments
#endif

namespace dg::cpu {

namespace detail {
namespace ei = Eigen::internal;
/// Below this many elements one thread is faster than waking the others.
constexpr int64_t kActivationParallelMin = int64_t(1) << 15;
/// Elements per task: 16 KB of floats, so a task is worth a thread's scheduling.
constexpr int64_t kGeluChunk = 4096;
/// One SIMD register of floats, operated on by Eigen's packet functions (ei::pmadd, ...): every
/// step below is one instruction on registers, no temporaries in memory.
using GeluPacket = ei::packet_traits<float>::type;
constexpr int64_t kGeluLanes = ei::unpacket_traits<GeluPacket>::size;
inline GeluPacket splat(float v) { return ei::pset1<GeluPacket>(v); }

/// Calls f(begin, length) for consecutive chunks of [0, n), in parallel when n is large.
template <class F>
void for_each_chunk(int64_t n, F f) {
  const int64_t chunks = (n + kGeluChunk - 1) / kGeluChunk;
  DENSEGRAD_OMP(parallel for schedule(static) if (n >= kActivationParallelMin))
  for (int64_t c = 0; c < chunks; ++c) f(c * kGeluChunk, std::min(kGeluChunk, n - c * kGeluChunk));
}
/// len <= kGeluLanes elements of T as a packet of floats (the lanes past len are 0), and back.
template <class T>
GeluPacket load(const T* p, int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    if (len == kGeluLanes) return ei::ploadu<GeluPacket>(p);
  }
  if constexpr (std::is_same_v<T, bfloat16>) {  // a bfloat16 is the top half of its float
#if defined(EIGEN_VECTORIZE_AVX512)
    if constexpr (kGeluLanes == 16) {  // 16 halves widened to 32 bits and shifted into place
      if (len == kGeluLanes)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
    }
#elif defined(EIGEN_VECTORIZE_AVX2)
    if constexpr (kGeluLanes == 8) {
      if (len == kGeluLanes)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
    }
#endif
    if (len == kGeluLanes) {
      alignas(64) float v[kGeluLanes];
      for (int64_t j = 0; j < kGeluLanes; ++j) {
        const uint32_t u = uint32_t(p[j].bits) << 16;
        std::memcpy(v + j, &u, 4);
      }
      return ei::pload<GeluPacket>(v);
    }
  }
  alignas(64) float v[kGeluLanes] = {};
  for (int64_t j = 0; j < len; ++j) v[j] = float(p[j]);
  return ei::pload<GeluPacket>(v);
}
template <class T>
void store(const GeluPacket& v, T* p, int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    if (len == kGeluLanes) return ei::pstoreu(p, v);
  }
  alignas(64) float o[kGeluLanes];
  ei::pstore(o, v);
  for (int64_t j = 0; j < len; ++j) p[j] = T(o[j]);
}
/// out[i, i + m) = f(p[i, i + m) as a packet, i, m) for the packets of [0, len); m = kGeluLanes
/// but for a partial last packet (f sees the offset and length to load its other inputs alike).
/// p may hold bfloat16 where out holds float.
template <class X, class T, class F>
void map_packets(const X* p, T* out, int64_t len, F f) {
  for (int64_t i = 0; i < len; i += kGeluLanes) {
    const int64_t m = std::min<int64_t>(kGeluLanes, len - i);
    store(f(load(p + i, m), i, m), out + i, m);
  }
}

#if defined(EIGEN_VECTORIZE)
/// exp(y) for y <= 0 (the density's exp(-x^2 / 2)), within 1e-7 relative: y = n ln 2 + r with n =
/// round(y / ln 2) and |r| <= ln(2) / 2, exp(r) by its Taylor series to r^7 (remainder below
/// 6e-9), times 2^n made by writing n + 127 into the exponent bits. Below y = -87 (where n < -126
/// would leave the normal floats) and for NaN the result is 0, as libm's would be to within 1.6e-38.
/// Half the work of Eigen's general pexp, which also handles overflow and denormal results.
inline GeluPacket exp_nonpositive(const GeluPacket& y) {
  using Int = ei::unpacket_traits<GeluPacket>::integer_packet;
  const GeluPacket in_range = ei::pcmp_le(splat(-87.0f), y);  // all ones where y >= -87 (false for NaN)
  const GeluPacket round = splat(12582912.0f);  // 1.5 * 2^23: adding then subtracting it rounds to an integer
  const GeluPacket n = ei::psub(ei::pmadd(y, splat(1.44269504088896341f), round), round);
  // r = y - n ln 2 with ln 2 in two parts: n * 0.693359375 (9 significant bits) is exact
  const GeluPacket r = ei::pmadd(n, splat(2.12194440e-4f), ei::pmadd(n, splat(-0.693359375f), y));
  GeluPacket p = splat(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = ei::pmadd(p, r, splat(c));
  const Int bits = ei::plogical_shift_left<23>(ei::padd(ei::pcast<GeluPacket, Int>(n), ei::pset1<Int>(127)));
  return ei::pand(in_range, ei::pmul(p, ei::preinterpret<GeluPacket>(bits)));  // out of range: whatever bits, 0
}

/// Phi(x) = (1 + erf(x / sqrt 2)) / 2 and phi(x) = exp(-x^2 / 2) / sqrt(2 pi) for a packet.
/// erf(z) = sign(z) (1 - t (a1 + t (a2 + ... + t a5)) exp(-z^2)), t = 1 / (1 + p |z|), z = x / sqrt 2,
/// so exp(-z^2) = exp(-x^2 / 2) serves the density too: one exp per element.
inline void gelu_cdf_pdf(const GeluPacket& x, GeluPacket& cdf, GeluPacket& pdf) {
  const GeluPacket z = ei::pmul(x, splat(float(ref::kSqrt1_2)));
  const GeluPacket t = ei::pdiv(splat(1.0f), ei::pmadd(splat(0.3275911f), ei::pabs(z), splat(1.0f)));
  const GeluPacket e = exp_nonpositive(ei::pnegate(ei::pmul(z, z)));
  GeluPacket poly = splat(1.061405429f);
  for (float a : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f}) poly = ei::pmadd(poly, t, splat(a));
  poly = ei::pmul(poly, t);
  // erf(|z|) / 2, then z's sign bit on it: (1 + erf(z)) / 2
  const GeluPacket half_erf = ei::pmul(splat(0.5f), ei::psub(splat(1.0f), ei::pmul(poly, e)));
  cdf = ei::padd(splat(0.5f), ei::pxor(half_erf, ei::pand(z, splat(-0.0f))));
  pdf = ei::pmul(splat(float(ref::kInvSqrt2Pi)), e);
}
/// The tanh form through 1 + tanh(u) = 2 sigmoid(2u): s = 1 / (1 + exp(-2u)),
/// u = sqrt(2/pi) (x + 0.044715 x^3); no cancellation in either tail (Eigen's exp: -2u may be > 0).
inline GeluPacket gelu_tanh_sigmoid(const GeluPacket& x) {
  const GeluPacket x3 = ei::pmul(ei::pmul(x, x), x);
  const GeluPacket u = ei::pmul(splat(float(ref::kSqrt2OverPi)), ei::pmadd(splat(float(ref::kGeluTanhCubic)), x3, x));
  return ei::pdiv(splat(1.0f), ei::padd(splat(1.0f), ei::pexp(ei::pmul(splat(-2.0f), u))));
}
/// gelu'(x) in the tanh form from s = gelu_tanh_sigmoid(x): s + x s (1 - s) q with
/// q = 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2).
inline GeluPacket gelu_tanh_grad(const GeluPacket& x, const GeluPacket& s) {
  const GeluPacket q = ei::pmadd(splat(float(6 * ref::kGeluTanhCubic * ref::kSqrt2OverPi)), ei::pmul(x, x),
                                 splat(float(2 * ref::kSqrt2OverPi)));
  const GeluPacket ds = ei::pmul(ei::pmul(x, s), ei::psub(splat(1.0f), s));
  return ei::pmadd(ds, q, s);
}
/// gelu(x) of a packet, erf form and tanh form.
inline GeluPacket gelu_erf_packet(const GeluPacket& v) {
  GeluPacket cdf, pdf;
  gelu_cdf_pdf(v, cdf, pdf);
  return ei::pmul(v, cdf);
}
inline GeluPacket gelu_tanh_packet(const GeluPacket& v) { return ei::pmul(v, gelu_tanh_sigmoid(v)); }

/// The m <= kGeluLanes floats of x rounded to bfloat16 as dg::bfloat16 rounds (nearest, ties to
/// even; any NaN to the quiet NaN 0x7fc0): their bits stored to hs[0, m), the rounded values
/// returned as floats. A whole AVX-512 packet in integer lanes; otherwise element by element.
inline GeluPacket round_bf16_packet(const GeluPacket& x, bfloat16* hs, int64_t m) {
#if defined(EIGEN_VECTORIZE_AVX512)
  if (m == kGeluLanes) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan =
        _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hs), _mm512_cvtepi32_epi16(r));
    return _mm512_castsi512_ps(_mm512_slli_epi32(r, 16));
  }
#endif
  alignas(64) float v[kGeluLanes];
  ei::pstore(v, x);
  for (int64_t j = 0; j < m; ++j) {
    hs[j] = bfloat16(v[j]);
    v[j] = float(hs[j]);
  }
  return ei::pload<GeluPacket>(v);
}
#endif
}  // namespace detail

/// y[0, n) = gelu(x[0, n)) on the calling thread (no OpenMP): the work of cpu::gelu for one
/// range, so every value is the one cpu::gelu gives. y may be x (in place).
template <class T>
void gelu_range(const T* px, T* py, int64_t n, bool tanh_approximation) {
#if defined(EIGEN_VECTORIZE)
  if constexpr (!std::is_same_v<T, double>) {
    using detail::GeluPacket;
    namespace ei = Eigen::internal;
    if (tanh_approximation)  // s = (1 + tanh(u)) / 2
      detail::map_packets(px, py, n, [](const GeluPacket& v, int64_t, int64_t) { return detail::gelu_tanh_packet(v); });
    else
      detail::map_packets(px, py, n, [](const GeluPacket& v, int64_t, int64_t) { return detail::gelu_erf_packet(v); });
    return;
  }
#endif
  // double, or no SIMD: the exact libm math
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  for (int64_t i = 0; i < n; ++i) py[i] = T(ref::gelu_scalar(A(px[i]), tanh_approximation));
}

/// torch.nn.functional.gelu on a contiguous x (= ref::gelu up to the erf approximation for float).
template <class T>
Tensor<T> gelu(const Tensor<T>& x, bool tanh_approximation) {
  DG_CHECK(x.is_contiguous(), "cpu::gelu: expected a contiguous input, got shape ", shape_str(x.shape()),
           " strides ", shape_str(x.strides()));
  Tensor<T> y = Tensor<T>::empty(x.shape());
  const T* px = x.data();
  T* py = y.data();
  detail::for_each_chunk(x.numel(), [&](int64_t i0, int64_t len) { gelu_range(px + i0, py + i0, len, tanh_approximation); });
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
#if defined(EIGEN_VECTORIZE)
  if constexpr (!std::is_same_v<T, double>) {
    using detail::GeluPacket;
    namespace ei = Eigen::internal;
    detail::for_each_chunk(x.numel(), [&](int64_t i0, int64_t len) {
      const T* g = pdy + i0;  // dy of the packet at offset i of this chunk: g + i
      if (tanh_approximation)
        detail::map_packets(px + i0, pdx + i0, len, [g](const GeluPacket& v, int64_t i, int64_t m) {
          return ei::pmul(detail::load(g + i, m), detail::gelu_tanh_grad(v, detail::gelu_tanh_sigmoid(v)));
        });
      else
        detail::map_packets(px + i0, pdx + i0, len, [g](const GeluPacket& v, int64_t i, int64_t m) {
          GeluPacket cdf, pdf;
          detail::gelu_cdf_pdf(v, cdf, pdf);
          return ei::pmul(detail::load(g + i, m), ei::pmadd(v, pdf, cdf));
        });
    });
    return dx;
  }
#endif
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t n = x.numel();
  DENSEGRAD_OMP(parallel for schedule(static) if (n >= detail::kActivationParallelMin))
  for (int64_t i = 0; i < n; ++i) pdx[i] = T(A(pdy[i]) * ref::gelu_grad_scalar(A(px[i]), tanh_approximation));
  return dx;
}

/// gelu_and_backward_ on a contiguous range, the calling thread only: y[0, n) <- gelu(x), dy[0, n)
/// <- dy * gelu'(x); the same bits as gelu_and_backward_ (every element on its own).
template <class T, class X>
void gelu_and_backward_range(T* dy, const X* x, T* y, int64_t n, bool tanh_approximation) {
#if defined(EIGEN_VECTORIZE)
  if constexpr (!std::is_same_v<T, double>) {
    using detail::GeluPacket;
    namespace ei = Eigen::internal;
    T* g = dy;  // dy of the packet at offset i: g + i, overwritten with dx
    if (tanh_approximation)
      detail::map_packets(x, y, n, [g](const GeluPacket& v, int64_t i, int64_t m) {
        const GeluPacket s = detail::gelu_tanh_sigmoid(v);
        detail::store(ei::pmul(detail::load(g + i, m), detail::gelu_tanh_grad(v, s)), g + i, m);
        return ei::pmul(v, s);
      });
    else
      detail::map_packets(x, y, n, [g](const GeluPacket& v, int64_t i, int64_t m) {
        GeluPacket cdf, pdf;
        detail::gelu_cdf_pdf(v, cdf, pdf);
        detail::store(ei::pmul(detail::load(g + i, m), ei::pmadd(v, pdf, cdf)), g + i, m);
        return ei::pmul(v, cdf);
      });
    return;
  }
#endif
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  for (int64_t i = 0; i < n; ++i) {
    y[i] = T(ref::gelu_scalar(A(x[i]), tanh_approximation));
    dy[i] = T(A(dy[i]) * ref::gelu_grad_scalar(A(x[i]), tanh_approximation));
  }
}

/// Both halves of gelu_conv2d's backward over contiguous x and dy of one shape, in one pass:
/// returns y = gelu(x) (made again for the weight's gradient) and overwrites dy with dy * gelu'(x).
/// One erf and one exp per element serve both, where cpu::gelu and cpu::gelu_backward evaluate
/// them once each; the values are those two functions' to the bit (the same packet steps).
/// x may also be bfloat16 for float dy (gelu_conv2d's input kept in bfloat16): the values are
/// then those of the float x = widen(x), without making that tensor.
template <class T, class X>
Tensor<T> gelu_and_backward_(Tensor<T>& dy, const Tensor<X>& x, bool tanh_approximation) {
  static_assert(std::is_same_v<X, T> || (std::is_same_v<X, bfloat16> && std::is_same_v<T, float>),
                "cpu::gelu_and_backward_: x must have dy's type, or be bfloat16 for float dy");
  DG_CHECK(dy.is_contiguous() && x.is_contiguous() && dy.shape() == x.shape(),
           "cpu::gelu_and_backward_: expected contiguous dy and x of one shape, got ", shape_str(dy.shape()), " and ",
           shape_str(x.shape()));
  Tensor<T> y = Tensor<T>::empty(x.shape());
  const X* px = x.data();
  T *py = y.data(), *pdy = dy.data();
  detail::for_each_chunk(x.numel(), [&](int64_t i0, int64_t len) {
    gelu_and_backward_range(pdy + i0, px + i0, py + i0, len, tanh_approximation);
  });
  return y;
}

/// hs[0, n) <- x[0, n) rounded to bfloat16 (dg::bfloat16: nearest even), r[0, n) <- the rounded
/// values as float (r may be x); the calling thread only. gelu_conv2d's input under bf16 products.
inline void round_bf16_range(const float* x, bfloat16* hs, float* r, int64_t n) {
#if defined(EIGEN_VECTORIZE)
  detail::map_packets(x, r, n, [hs](const detail::GeluPacket& v, int64_t i, int64_t m) {
    return detail::round_bf16_packet(v, hs + i, m);
  });
#else
  for (int64_t i = 0; i < n; ++i) {
    hs[i] = bfloat16(x[i]);
    r[i] = float(hs[i]);
  }
#endif
}

/// round_bf16_range then gelu_range on its rounded values in one pass, a packet at a time: hs[0,
/// n) <- x rounded to bfloat16, y[0, n) <- gelu of those values (y may be x). The same bits as the
/// two in turn. gelu_conv2d's forward under bf16 products, per chunk of images.
inline void round_bf16_gelu_range(const float* x, bfloat16* hs, float* y, int64_t n, bool tanh_approximation) {
#if defined(EIGEN_VECTORIZE)
  using detail::GeluPacket;
  if (tanh_approximation)
    detail::map_packets(x, y, n, [hs](const GeluPacket& v, int64_t i, int64_t m) {
      return detail::gelu_tanh_packet(detail::round_bf16_packet(v, hs + i, m));
    });
  else
    detail::map_packets(x, y, n, [hs](const GeluPacket& v, int64_t i, int64_t m) {
      return detail::gelu_erf_packet(detail::round_bf16_packet(v, hs + i, m));
    });
#else
  round_bf16_range(x, hs, y, n);
  gelu_range(y, y, n, tanh_approximation);
#endif
}

/// hs <- the contiguous x rounded to bfloat16 (hs contiguous, x's shape); returns the rounded values as float.
inline Tensor<float> round_to_bf16(const Tensor<float>& x, const Tensor<bfloat16>& hs) {
  DG_CHECK(x.is_contiguous() && hs.is_contiguous() && hs.shape() == x.shape(),
           "cpu::round_to_bf16: expected contiguous tensors of one shape, got ", shape_str(x.shape()), " and ",
           shape_str(hs.shape()));
  Tensor<float> r = Tensor<float>::empty(x.shape());
  const float* px = x.data();
  bfloat16* ph = hs.data();
  float* pr = r.data();
  detail::for_each_chunk(x.numel(), [&](int64_t i0, int64_t len) { round_bf16_range(px + i0, ph + i0, pr + i0, len); });
  return r;
}

/// The contiguous bfloat16 hs as float (exact).
inline Tensor<float> widen_bf16(const Tensor<bfloat16>& hs) {
  DG_CHECK(hs.is_contiguous(), "cpu::widen_bf16: expected a contiguous tensor, got strides ", shape_str(hs.strides()));
  Tensor<float> r = Tensor<float>::empty(hs.shape());
  const bfloat16* ph = hs.data();
  float* pr = r.data();
  detail::for_each_chunk(hs.numel(), [&](int64_t i0, int64_t len) {
    for (int64_t i = i0; i < i0 + len; ++i) pr[i] = float(ph[i]);
  });
  return r;
}

}  // namespace dg::cpu

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
