// densegrad/backend/cpu/conv.hpp: fast CPU conv2d kernels. With AVX-512 or AVX2, ungrouped convs are
// register-blocked GEMMs of their own over several images at a time (pointwise convs read x and
// write y in place, im2col convs gather G images' columns side by side); without it, and for
// grouped convs, im2col + Eigen GEMM per (image, group), pointwise convs without im2col and, on
// tiny maps, several images side by side in one GEMM. Stride-1 depthwise convs copy the planes
// of several images side by side into one zero-bordered buffer and run register-blocked vector
// loops over it (row blocks, or flat sweeps under dilation along H); other depthwise convs are
// direct loops over output rows. OpenMP splits images and channels. Not oneDNN (its batched
// matmul measured no faster on these shapes), not Winograd/FFT; bfloat16 is widened to float,
// computed in float and rounded once.
// x and dout may be batch-strided views (cpu::batch_stride: a dense stage's prefix), read in
// place: every kernel finds image n at n * (its image stride), never at n * C * H * W.
// Tested against backend/ref/conv.hpp.
// Shape legend: as in backend/ref/conv.hpp; K = Cg*kH*kW (one column of im2col), P = Ho*Wo.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif


#include "gemm_bf16.hpp"
#include "norm.hpp"  // batch_stride
#include "parallel.hpp"
#include "../ref/conv.hpp"


namespace dg::cpu {

namespace conv_detail {

/// Below this many multiply-adds a GEMM conv runs on one thread: waking the others (and, on a
/// busy machine, waiting for them at the barrier) costs more than it saves.
constexpr int64_t kParallelMinMacs = int64_t(1) << 18;


/// A tensor's elements as one C-order array of A: borrows the tensor's memory when it already
/// is one, otherwise owns a converted copy (non-contiguous views, bfloat16 -> float).
template <class A>
struct DenseArray {
  const A* borrowed = nullptr;
  scratch_vector<A> own;
  int64_t image = 0;  // for images(): elements from image n to image n + 1
  const A* data() const { return borrowed ? borrowed : own.data(); }
};
template <class A, class T>
DenseArray<A> dense(const Tensor<T>& t) {
  DenseArray<A> d;
  if constexpr (std::is_same_v<A, T>) {
    if (t.is_contiguous()) {
      d.borrowed = t.data();
      return d;
    }
  }
  d.own.reserve(static_cast<size_t>(t.numel()));
  const T* p = t.data();
  for_each_strided<1>(t.shape(), {t.strides().data()}, {0}, [&](auto o) { d.own.push_back(A(p[o[0]])); });
  return d;
}

/// (N, C, H, W) planes as N dense images: image n at data() + n * image. Borrows a contiguous or
/// batch-strided tensor's memory (a dense stage's prefix: no copy); copies any other layout, and
/// bfloat16, into a contiguous array (image = C*H*W).
template <class A, class T>
DenseArray<A> images(const Tensor<T>& t) {
  if constexpr (std::is_same_v<A, T>) {
    if (const int64_t s = batch_stride(t); s >= 0) {
      DenseArray<A> d;
      d.borrowed = t.data();
      d.image = s;
      return d;
    }
  }
  DenseArray<A> d = dense<A>(t);
  d.image = t.size(1) * t.size(2) * t.size(3);
  return d;
}

/// Read-only NCHW planes: image n starts at p + n * image, its channel c at + c * (plane size).
template <class A>
struct Planes {
  const A* p;
  int64_t image;
  const A* at(int64_t n) const { return p + n * image; }
};
template <class A>
Planes<A> planes(const DenseArray<A>& d) { return {d.data(), d.image}; }

/// The result as T: a no-op unless T is bfloat16, which rounds each float once here.
template <class T, class A>
Tensor<T> rounded(const Tensor<A>& t) {
  if constexpr (std::is_same_v<A, T>) {
    return t;
  } else {
    Tensor<T> out = Tensor<T>::empty(t.shape());
    for (int64_t i = 0; i < t.numel(); ++i) out.data()[i] = T(t.data()[i]);
    return out;
  }
}

template <class A> using RowMat = Eigen::Matrix<A, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class A> using MatMap = Eigen::Map<RowMat<A>>;
template <class A> using ConstMatMap = Eigen::Map<const RowMat<A>>;
template <class A> using ConstVecMap = Eigen::Map<const Eigen::Matrix<A, Eigen::Dynamic, 1>>;

/// Output columns [lo, hi) whose input column ow*s + off falls inside [0, W); the others read
/// zero padding. off = kw*d - p is where tap kw of output column 0 lands.
inline void valid_cols(int64_t off, int64_t s, int64_t W, int64_t Wo, int64_t& lo, int64_t& hi) {
  lo = off >= 0 ? 0 : std::min(Wo, (-off + s - 1) / s);
  hi = W - 1 - off < 0 ? 0 : std::min(Wo, (W - 1 - off) / s + 1);
  hi = std::max(hi, lo);
}

/// True for groups == C_in == C_out: each channel convolved with its own kH x kW filter.
inline bool is_depthwise(const Conv2dGeometry& g) { return g.groups == g.C_in && g.C_out == g.C_in; }
/// True when the image is its own im2col matrix (Cg, H*W): 1x1 kernel, stride 1, no padding.
inline bool is_pointwise(const Conv2dGeometry& g) {
  return g.kH == 1 && g.kW == 1 && g.sH == 1 && g.sW == 1 && g.pH == 0 && g.pW == 0;
}

// ---------------------------------------------------------------- im2col / col2im

/// True when a conv's windows tile its input: kernel == stride, no padding, no dilation, and more
/// than one tap (patchify stems, RDNet's k2 s2 transitions). Each input element then falls in at
/// most one window: im2col only rearranges x, and col2im writes each element of dx once.
inline bool is_patch_conv(const Conv2dGeometry& g) {
  return g.kH == g.sH && g.kW == g.sW && g.kH * g.kW > 1 && g.pH == 0 && g.pW == 0 && g.dH == 1 && g.dW == 1;
}

/// dst[kw * ld + ow] = src[ow * s + kw] for kw < s, ow < wo: one input row of a patch conv split
/// into its s taps' output rows (ld apart). With AVX-512 and s = 2, 16 outputs of each tap per
/// step (two masked loads, two lane permutes); element by element otherwise.
template <class A>
inline void split_row(const A* src, int64_t s, int64_t wo, A* dst, int64_t ld) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<A, float>) {
    if (s == 2) {
      const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
      for (int64_t o = 0; o < wo; o += 16) {
        const int64_t n = std::min<int64_t>(16, wo - o), in = 2 * n;  // outputs of each tap, inputs read
        const __mmask16 mo = static_cast<__mmask16>((1u << n) - 1);
        const __mmask16 ma = static_cast<__mmask16>(in >= 16 ? 0xffffu : (1u << in) - 1);
        const __mmask16 mb = static_cast<__mmask16>(in > 16 ? (1u << (in - 16)) - 1 : 0u);
        const __m512 a = _mm512_maskz_loadu_ps(ma, src + 2 * o), b = _mm512_maskz_loadu_ps(mb, src + 2 * o + 16);
        _mm512_mask_storeu_ps(dst + o, mo, _mm512_permutex2var_ps(a, even, b));
        _mm512_mask_storeu_ps(dst + ld + o, mo, _mm512_permutex2var_ps(a, odd, b));
      }
      return;
    }
  }
#endif
  for (int64_t kw = 0; kw < s; ++kw)
    for (int64_t ow = 0; ow < wo; ++ow) dst[kw * ld + ow] = src[ow * s + kw];
}

/// The adjoint of split_row: dst[wo * s, w) = 0 (columns no window reads), then dst[ow * s + kw]
/// = src[kw * ld + ow] + 0 (the + 0 makes -0 into +0, as col2im's 0 += v does).
template <class A>
inline void merge_row(const A* src, int64_t ld, int64_t s, int64_t wo, A* dst, int64_t w) {
  std::fill(dst + wo * s, dst + w, A(0));
#ifdef __AVX512F__
  if constexpr (std::is_same_v<A, float>) {
    if (s == 2) {
      const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      const __m512 zero = _mm512_setzero_ps();
      for (int64_t o = 0; o < wo; o += 16) {
        const int64_t n = std::min<int64_t>(16, wo - o), out = 2 * n;
        const __mmask16 mi = static_cast<__mmask16>((1u << n) - 1);
        const __mmask16 ma = static_cast<__mmask16>(out >= 16 ? 0xffffu : (1u << out) - 1);
        const __mmask16 mb = static_cast<__mmask16>(out > 16 ? (1u << (out - 16)) - 1 : 0u);
        const __m512 a = _mm512_add_ps(_mm512_maskz_loadu_ps(mi, src + o), zero);
        const __m512 b = _mm512_add_ps(_mm512_maskz_loadu_ps(mi, src + ld + o), zero);
        _mm512_mask_storeu_ps(dst + 2 * o, ma, _mm512_permutex2var_ps(a, lo, b));
        _mm512_mask_storeu_ps(dst + 2 * o + 16, mb, _mm512_permutex2var_ps(a, hi, b));
      }
      return;
    }
  }
#endif
  for (int64_t kw = 0; kw < s; ++kw)
    for (int64_t ow = 0; ow < wo; ++ow) dst[ow * s + kw] = src[kw * ld + ow] + A(0);
}

/// im2col of a patch conv (is_patch_conv): row (c, kh, kw), pixel (oh, ow) = x[c, oh*kH + kh,
/// ow*kW + kw]; each input row that a window reads is split into its kW taps' rows at once.
template <class A>
void patch_im2col(const A* x, A* col, const Conv2dGeometry& g, int64_t P) {
  for (int64_t c = 0; c < g.cin_g(); ++c)
    for (int64_t oh = 0; oh < g.Ho; ++oh)
      for (int64_t kh = 0; kh < g.kH; ++kh)
        split_row(x + (c * g.H + oh * g.kH + kh) * g.W, g.kW, g.Wo, col + (c * g.kH + kh) * g.kW * P + oh * g.Wo, P);
}

/// col2im of a patch conv: every dx element written once (rows and columns past the last
/// window: 0), the same values as col2im's zero fill and +=.
template <class A>
void patch_col2im(const A* col, A* dx, const Conv2dGeometry& g, int64_t P) {
  const int64_t rows = g.Ho * g.kH;  // input rows some window reads
  for (int64_t c = 0; c < g.cin_g(); ++c) {
    for (int64_t oh = 0; oh < g.Ho; ++oh)
      for (int64_t kh = 0; kh < g.kH; ++kh)
        merge_row(col + (c * g.kH + kh) * g.kW * P + oh * g.Wo, P, g.kW, g.Wo, dx + (c * g.H + oh * g.kH + kh) * g.W,
                  g.W);
    std::fill(dx + (c * g.H + rows) * g.W, dx + (c + 1) * g.H * g.W, A(0));
  }
}

/// col (K, P) from one group's input planes x (Cg, H, W): row (c, kh, kw) of col holds, for
/// every output position, the input that tap (kh, kw) of channel c sees (0 in the padding).
/// Rows of col lie ld apart (ld = P: a dense matrix; more: this image's columns of a wider one).
template <class A>
void im2col(const A* x, A* col, const Conv2dGeometry& g, int64_t ld = 0) {
  const int64_t P = ld > 0 ? ld : g.Ho * g.Wo;
  if (is_patch_conv(g)) return patch_im2col(x, col, g, P);
  for (int64_t c = 0; c < g.cin_g(); ++c)
    for (int64_t kh = 0; kh < g.kH; ++kh)
      for (int64_t kw = 0; kw < g.kW; ++kw) {
        A* row = col + ((c * g.kH + kh) * g.kW + kw) * P;
        const int64_t off = kw * g.dW - g.pW;
        int64_t lo, hi;
        valid_cols(off, g.sW, g.W, g.Wo, lo, hi);
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          A* r = row + oh * g.Wo;
          const int64_t ih = oh * g.sH - g.pH + kh * g.dH;
          if (ih < 0 || ih >= g.H) {
            for (int64_t ow = 0; ow < g.Wo; ++ow) r[ow] = A(0);
            continue;
          }
          const A* xr = x + (c * g.H + ih) * g.W + off;
          for (int64_t ow = 0; ow < lo; ++ow) r[ow] = A(0);
          // rows are short (3 to 56): plain loops, the common strides spelled out so they vectorize
          if (g.sW == 1) for (int64_t ow = lo; ow < hi; ++ow) r[ow] = xr[ow];
          else if (g.sW == 2) for (int64_t ow = lo; ow < hi; ++ow) r[ow] = xr[2 * ow];
          else for (int64_t ow = lo; ow < hi; ++ow) r[ow] = xr[ow * g.sW];
          for (int64_t ow = hi; ow < g.Wo; ++ow) r[ow] = A(0);
        }
      }
}

/// The adjoint of im2col: dx (Cg, H, W) = 0, then every col entry is added back to the input
/// position it was copied from (+= : overlapping windows read one input several times). Rows of
/// col lie ld apart, as in im2col.
template <class A>
void col2im(const A* col, A* dx, const Conv2dGeometry& g, int64_t ld = 0) {
  const int64_t P = ld > 0 ? ld : g.Ho * g.Wo;
  if (is_patch_conv(g)) return patch_col2im(col, dx, g, P);
  std::fill(dx, dx + g.cin_g() * g.H * g.W, A(0));
  for (int64_t c = 0; c < g.cin_g(); ++c)
    for (int64_t kh = 0; kh < g.kH; ++kh)
      for (int64_t kw = 0; kw < g.kW; ++kw) {
        const A* row = col + ((c * g.kH + kh) * g.kW + kw) * P;
        const int64_t off = kw * g.dW - g.pW;
        int64_t lo, hi;
        valid_cols(off, g.sW, g.W, g.Wo, lo, hi);
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          const int64_t ih = oh * g.sH - g.pH + kh * g.dH;
          if (ih < 0 || ih >= g.H) continue;
          A* xr = dx + (c * g.H + ih) * g.W + off;
          const A* r = row + oh * g.Wo;
          if (g.sW == 1) for (int64_t ow = lo; ow < hi; ++ow) xr[ow] += r[ow];
          else if (g.sW == 2) for (int64_t ow = lo; ow < hi; ++ow) xr[2 * ow] += r[ow];
          else for (int64_t ow = lo; ow < hi; ++ow) xr[ow * g.sW] += r[ow];
        }
      }
}

// ---------------------------------------------------------------- dense and grouped: GEMM
// One job per (image n, group gi); Eigen runs each GEMM on one thread inside the parallel
// loop, and on all threads when there is a single job (the OpenMP region is then inactive).

/// y[n, group] (OCg, P) = W_group (OCg, K) @ col (K, P) + bias.
template <class A>
void gemm_forward(Planes<A> x, const A* w, const A* b, A* y, const Conv2dGeometry& g) {
  const int64_t Cg = g.cin_g(), OCg = g.cout_g(), K = Cg * g.kH * g.kW, P = g.Ho * g.Wo, jobs = g.N * g.groups;
  const bool pointwise = is_pointwise(g);
  DENSEGRAD_OMP(parallel if (jobs > 1 && jobs * OCg * K * P >= kParallelMinMacs)) {
    scratch_vector<A> col(pointwise ? 0 : static_cast<size_t>(K * P));
    DENSEGRAD_OMP(for)
    for (int64_t j = 0; j < jobs; ++j) {
      const int64_t n = j / g.groups, gi = j % g.groups;
      const A* xg = x.at(n) + gi * Cg * g.H * g.W;
      if (!pointwise) im2col(xg, col.data(), g);
      MatMap<A> Y(y + (n * g.C_out + gi * OCg) * P, OCg, P);
      // the bias first, then the product added to it: one pass over Y fewer than = then +=
      if (b) Y.colwise() = ConstVecMap<A>(b + gi * OCg, OCg);
      else Y.setZero();
      Y.noalias() += ConstMatMap<A>(w + gi * OCg * K, OCg, K) * ConstMatMap<A>(pointwise ? xg : col.data(), K, P);
    }
  }
}

/// dx[n, group]: dcol (K, P) = W_group^T @ dout[n, group], then col2im; a pointwise conv
/// writes W^T @ dout straight into dx.
template <class A>
void gemm_backward_input(Planes<A> dout, const A* w, A* dx, const Conv2dGeometry& g) {
  const int64_t Cg = g.cin_g(), OCg = g.cout_g(), K = Cg * g.kH * g.kW, P = g.Ho * g.Wo, jobs = g.N * g.groups;
  const bool pointwise = is_pointwise(g);
  DENSEGRAD_OMP(parallel if (jobs > 1 && jobs * OCg * K * P >= kParallelMinMacs)) {
    scratch_vector<A> col(pointwise ? 0 : static_cast<size_t>(K * P));
    DENSEGRAD_OMP(for)
    for (int64_t j = 0; j < jobs; ++j) {
      const int64_t n = j / g.groups, gi = j % g.groups;
      A* dxg = dx + (n * g.C_in + gi * Cg) * g.H * g.W;
      MatMap<A> dcol(pointwise ? dxg : col.data(), K, P);
      dcol.noalias() = ConstMatMap<A>(w + gi * OCg * K, OCg, K).transpose() *
                       ConstMatMap<A>(dout.at(n) + gi * OCg * P, OCg, P);
      if (!pointwise) col2im(col.data(), dxg, g);
    }
  }
}

/// dW_group (OCg, K) = sum over images of dout[n, group] (OCg, P) @ col^T (P, K). Each thread
/// sums its images into a private copy of dweight (one weight-sized buffer per thread: weights
/// are small next to activations), then the copies are added: no two threads share an element.
template <class A>
void gemm_backward_weight(Planes<A> dout, Planes<A> x, A* dw, const Conv2dGeometry& g) {
  const int64_t Cg = g.cin_g(), OCg = g.cout_g(), K = Cg * g.kH * g.kW, P = g.Ho * g.Wo, jobs = g.N * g.groups;
  const bool pointwise = is_pointwise(g);
  const int64_t wsize = g.C_out * K, copies = std::max<int64_t>(1, std::min<int64_t>(max_threads(), jobs));
  scratch_vector<A> part(static_cast<size_t>(copies * wsize), A(0));
  DENSEGRAD_OMP(parallel if (copies > 1 && jobs * OCg * K * P >= kParallelMinMacs) num_threads(static_cast<int>(copies))) {
    scratch_vector<A> col(pointwise ? 0 : static_cast<size_t>(K * P));
    A* mine = part.data() + thread_num() * wsize;
    DENSEGRAD_OMP(for)
    for (int64_t j = 0; j < jobs; ++j) {
      const int64_t n = j / g.groups, gi = j % g.groups;
      const A* xg = x.at(n) + gi * Cg * g.H * g.W;
      if (!pointwise) im2col(xg, col.data(), g);
      MatMap<A>(mine + gi * OCg * K, OCg, K).noalias() +=
          ConstMatMap<A>(dout.at(n) + gi * OCg * P, OCg, P) *
          ConstMatMap<A>(pointwise ? xg : col.data(), K, P).transpose();
    }
  }
  for (int64_t i = 0; i < wsize; ++i) {
    A s = 0;
    for (int64_t t = 0; t < copies; ++t) s += part[t * wsize + i];
    dw[i] = s;
  }
}

// ---------------------------------------------------------------- pointwise on small maps: images side by side
// A 1x1 conv on a 3x3 map is a GEMM only P = 9 columns wide per image: Eigen then re-packs the
// weight for every image and runs short panels. Gathering G images' (rows, P) planes side by
// side into one (rows, G*P) matrix makes one GEMM G times wider (about 256 columns); the result
// is scattered back per image. Same sums, in Eigen's order for the wider shape. Measured on
// RDNet nano (batch 128): 10-35% faster forward and dx at P = 9; no gain at P = 49, nor for the
// weight gradient (its per-image GEMMs already run deep), nor at P = 1 (Eigen's GEMV path).

/// Images per GEMM for a pointwise conv on a small map, 1 when folding does not pay (P = 1,
/// P > 16, groups, im2col convs). Chunks are balanced over the threads.
inline int64_t images_per_gemm(const Conv2dGeometry& g) {
  const int64_t P = g.Ho * g.Wo;
  if (!is_pointwise(g) || g.groups != 1 || P <= 1 || P > 16 || g.N < 2) return 1;
  const int64_t chunks = std::max<int64_t>(max_threads(), (g.N * P + 255) / 256);
  return std::max<int64_t>(1, (g.N + chunks - 1) / chunks);
}

/// dst (R, G*P) <- images n0 .. n0+G-1 of src, each (R, P): image i fills columns [i*P, (i+1)*P).
template <class A>
void gather_images(Planes<A> src, int64_t n0, int64_t R, int64_t P, int64_t G, A* dst) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < G; ++i) {
      const A* row = src.at(n0 + i) + r * P;
      std::copy(row, row + P, dst + (r * G + i) * P);
    }
}
/// The inverse: G images of dst, each (R, P), from src (R, G*P).
template <class A>
void scatter_images(const A* src, int64_t R, int64_t P, int64_t G, A* dst) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < G; ++i) std::copy(src + (r * G + i) * P, src + (r * G + i + 1) * P, dst + (i * R + r) * P);
}

/// y = W @ x + bias for G images at a time (see above).
template <class A>
void folded_forward(Planes<A> x, const A* w, const A* b, A* y, const Conv2dGeometry& g, int64_t G) {
  const int64_t C = g.C_in, OC = g.C_out, P = g.Ho * g.Wo, chunks = (g.N + G - 1) / G;
  DENSEGRAD_OMP(parallel if (chunks > 1)) {
    scratch_vector<A> xs(static_cast<size_t>(C * G * P)), ys(static_cast<size_t>(OC * G * P));
    DENSEGRAD_OMP(for)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t n0 = ch * G, gn = std::min(G, g.N - n0);
      gather_images(x, n0, C, P, gn, xs.data());
      MatMap<A> Y(ys.data(), OC, gn * P);
      if (b) Y.colwise() = ConstVecMap<A>(b, OC);
      else Y.setZero();
      Y.noalias() += ConstMatMap<A>(w, OC, C) * ConstMatMap<A>(xs.data(), C, gn * P);
      scatter_images(ys.data(), OC, P, gn, y + n0 * OC * P);
    }
  }
}

/// dx = W^T @ dout for G images at a time.
template <class A>
void folded_backward_input(Planes<A> dout, const A* w, A* dx, const Conv2dGeometry& g, int64_t G) {
  const int64_t C = g.C_in, OC = g.C_out, P = g.Ho * g.Wo, chunks = (g.N + G - 1) / G;
  DENSEGRAD_OMP(parallel if (chunks > 1)) {
    scratch_vector<A> ds(static_cast<size_t>(OC * G * P)), xs(static_cast<size_t>(C * G * P));
    DENSEGRAD_OMP(for)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t n0 = ch * G, gn = std::min(G, g.N - n0);
      gather_images(dout, n0, OC, P, gn, ds.data());
      MatMap<A>(xs.data(), C, gn * P).noalias() =
          ConstMatMap<A>(w, OC, C).transpose() * ConstMatMap<A>(ds.data(), OC, gn * P);
      scatter_images(xs.data(), C, P, gn, dx + n0 * C * P);
    }
  }
}

// ---------------------------------------------------------------- dense convs as panel GEMMs over several images
// With AVX-512 or AVX2, an ungrouped conv runs as register-blocked GEMMs of its own
// (gemm_panels): the micro-kernel holds a block of the product in registers while the contraction
// runs. AVX-512 (32 registers): 8 x 48 floats in 24 registers (8 x 24 doubles); each step loads 3
// vectors of one row of B, broadcasts 8 elements of A and issues 24 FMAs. AVX2 + FMA (16
// registers): 6 x 16 floats in 12 (gemm_tile_avx2), 2 loads of B and 6 broadcasts per 12 FMAs.
// B's rows must hold whole vectors; A is read by elements, so it may be any strided matrix, even
// one split over images (segments).
//   forward and dx: out (C_out, P) = W (C_out, K) @ col (K, P) per image. A pointwise conv's image
// is its own col, read in place: its first P - P % 16 columns go straight from x to y, and the
// last P % 16 columns of G images are gathered side by side into one matrix (16 images of 7x7:
// 16 columns, one vector) whose product is scattered back. An im2col conv gathers all of its
// columns that way (G images' im2col matrices side by side, about 768 columns). dx is the same
// with W^T; an im2col conv's dcol then goes back through col2im.
//   dweight: dW (C_out, K) = sum over images of dout (C_out, P) @ col^T: a contraction over
// the pixels of G images, read as G segments in place. One operand becomes B, gathered transposed
// (the one with fewer rows): x for a pointwise conv with C_in < C_out (giving dW), else dout
// (giving dW^T). Each thread sums its chunks into its own copy, added up in thread order.
// Measured on RDNet nano (batch 128, one core of a Zen 4): the pointwise GEMMs about 25% faster
// than the per-image Eigen GEMMs and on par with oneDNN's batched matmul (brgemm) on these shapes,
// and no copies of x, y, dout or dx in and out of the GEMM but the tails. On 2 cores of a Zen 3
// (AVX2), against the per-image Eigen GEMMs: the nano training step 308-366 -> 353-372 img/s,
// RDNet-T inference about 12% faster (docs/performance.md); the weight gradient on large maps
// stays with Eigen (panel_weight_ok).

#if defined(EIGEN_VECTORIZE_AVX512)
constexpr bool kPanelGemm = true;
constexpr int64_t kVecBytes = 64;
constexpr int kTileRows = 8, kTileVecs = 3;
constexpr int64_t kPanelCacheBytes = 0, kPanelKBlock = 0;  // no column or K blocks (see gemm_panels)
#define DENSEGRAD_AVX2_TILE 0
#elif defined(__AVX2__) && defined(__FMA__)
constexpr bool kPanelGemm = true;
constexpr int64_t kVecBytes = 32;
constexpr int kTileRows = 6, kTileVecs = 2;
constexpr int64_t kPanelCacheBytes = 192 << 10, kPanelKBlock = 256;
#define DENSEGRAD_AVX2_TILE 1
#else
constexpr bool kPanelGemm = false;
constexpr int64_t kVecBytes = 16;
constexpr int kTileRows = 6, kTileVecs = 2;
constexpr int64_t kPanelCacheBytes = 0, kPanelKBlock = 0;
#define DENSEGRAD_AVX2_TILE 0
#endif
/// Rows per block of a packed operand: one full tile's rows.
constexpr int64_t kPackRows = kTileRows;
/// With AVX2 (L2 of 512 KiB on a Zen 3), gemm_panels blocks what would not stay in cache: a B over
/// kPanelCacheBytes goes by column blocks that fit, and a packed operand's contraction over
/// kPanelKBlock by K blocks. This many items of item_bytes each fit kPanelCacheBytes, rounded down
/// to a multiple of unit (at least one unit).
inline int64_t fitting(int64_t item_bytes, int64_t unit) {
  return std::max<int64_t>(unit, kPanelCacheBytes / item_bytes / unit * unit);
}
/// Columns per chunk of images: a (K, 768) panel of B stays in L2 for K up to a few hundred.
constexpr int64_t kPanelCols = 768;
/// Elements of A in one vector register: 16 floats or 8 doubles with AVX-512, 8 or 4 with AVX2.
template <class A> constexpr int64_t kLanes = kVecBytes / static_cast<int64_t>(sizeof(A));
template <class A> using LaneVec = Eigen::Array<A, kLanes<A>, 1>;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/// A (M, K) operand read by elements: row i at a + i*lda, its contraction index k = s*seg_len + j
/// (segment s, element j) at + s*seg_stride + j. One segment: a plain row-major matrix; several:
/// the pixels of several images, each image's plane in place. Packed (pack_rows): blocks of R =
/// kPackRows rows, each k-major (element (i, k) at a + (i/R)*R*K + k*R + i%R), so the R elements a
/// tile broadcasts at each step share one cache line.
template <class A>
struct Operand {
  const A* a;
  int64_t lda, seg_stride, seg_len, segs;
  bool packed = false;
  int64_t block_stride = 0;  // packed: elements from one block of rows to the next (0: kPackRows * seg_len)
};

/// Where a packed operand's block of rows starting at row0 (a multiple of kPackRows) begins.
template <class A>
const A* packed_block(const Operand<A>& op, int64_t row0) {
  return op.a + row0 / kPackRows * (op.block_stride ? op.block_stride : kPackRows * op.seg_len);
}

#if DENSEGRAD_AVX2_TILE
/// The full AVX2 + FMA tile for floats: 6 rows x 2 vectors of 8 in twelve named registers (GCC
/// kept an array of them on the stack, storing it at every step), B's two vectors loaded once
/// per step, one broadcast per row. Partial tiles take the generic gemm_tile.
template <TileInit Init>
void gemm_tile_avx2(const Operand<float>& op, int64_t row0, const float* b, int64_t ldb, float* c, int64_t ldc,
                    const float* row_init) {
  auto start = [&](int i, int v) {
    if constexpr (Init == TileInit::Load) return _mm256_loadu_ps(c + i * ldc + v * 8);
    else if constexpr (Init == TileInit::Row) return _mm256_set1_ps(row_init ? row_init[i] : 0.0f);
    else return _mm256_setzero_ps();
  };
  __m256 c00 = start(0, 0), c01 = start(0, 1), c10 = start(1, 0), c11 = start(1, 1), c20 = start(2, 0),
         c21 = start(2, 1), c30 = start(3, 0), c31 = start(3, 1), c40 = start(4, 0), c41 = start(4, 1),
         c50 = start(5, 0), c51 = start(5, 1);
  // packed: element (i, k) at a + k*kPackRows + i; else at a + i*lda + k within each segment, whose
  // B rows follow each other: one flat loop over all K steps, a jumping to each segment's start
  const bool packed = op.packed;
  const int64_t ka = packed ? kPackRows : 1, ia = packed ? 1 : op.lda;
  const int64_t steps = op.segs * op.seg_len;  // a packed operand is one segment
  const float* a0 = packed ? packed_block(op, row0) : op.a + row0 * op.lda;
  const float* a = a0;
  const float* bs = b;
  for (int64_t k = 0, left = op.seg_len, seg = 0; k < steps; ++k, bs += ldb) {
    const __m256 b0 = _mm256_loadu_ps(bs), b1 = _mm256_loadu_ps(bs + 8);
    __m256 e = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(e, b0, c00), c01 = _mm256_fmadd_ps(e, b1, c01);
    e = _mm256_broadcast_ss(a + ia);
    c10 = _mm256_fmadd_ps(e, b0, c10), c11 = _mm256_fmadd_ps(e, b1, c11);
    e = _mm256_broadcast_ss(a + 2 * ia);
    c20 = _mm256_fmadd_ps(e, b0, c20), c21 = _mm256_fmadd_ps(e, b1, c21);
    e = _mm256_broadcast_ss(a + 3 * ia);
    c30 = _mm256_fmadd_ps(e, b0, c30), c31 = _mm256_fmadd_ps(e, b1, c31);
    e = _mm256_broadcast_ss(a + 4 * ia);
    c40 = _mm256_fmadd_ps(e, b0, c40), c41 = _mm256_fmadd_ps(e, b1, c41);
    e = _mm256_broadcast_ss(a + 5 * ia);
    c50 = _mm256_fmadd_ps(e, b0, c50), c51 = _mm256_fmadd_ps(e, b1, c51);
    a += ka;
    if (--left == 0 && k + 1 < steps) {  // the next segment
      left = op.seg_len;
      a = a0 + (++seg) * op.seg_stride;
    }
  }
  const __m256 out[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int i = 0; i < 6; ++i)
    for (int v = 0; v < 2; ++v) _mm256_storeu_ps(c + i * ldc + v * 8, out[i][v]);
}
#endif

/// c[MR rows ldc apart, NV vectors] = init + a (MR rows, K) @ b (K rows ldb apart, NV vectors),
/// K = segs * seg_len: the block of c stays in registers for the whole contraction.
template <int MR, int NV, TileInit Init, class A>
void gemm_tile(const Operand<A>& op, int64_t row0, const A* b, int64_t ldb, A* c, int64_t ldc, const A* row_init) {
#if DENSEGRAD_AVX2_TILE
  if constexpr (std::is_same_v<A, float> && MR == 6 && NV == 2)
    return gemm_tile_avx2<Init>(op, row0, b, ldb, c, ldc, row_init);
#endif
  using V = LaneVec<A>;
  constexpr int64_t L = kLanes<A>;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) {
      if constexpr (Init == TileInit::Load) acc[i][v] = Eigen::Map<const V>(c + i * ldc + v * L);
      else if constexpr (Init == TileInit::Row) acc[i][v] = V::Constant(row_init ? row_init[i] : A(0));
      else acc[i][v] = V::Zero();
    }
  if (op.packed) {  // row0 is a multiple of kPackRows
    const A* a = packed_block(op, row0);
    for (int64_t k = 0; k < op.seg_len; ++k) {
      V bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = Eigen::Map<const V>(b + k * ldb + v * L);
      for (int i = 0; i < MR; ++i) {
        const A e = a[k * kPackRows + i];
        for (int v = 0; v < NV; ++v) acc[i][v] += e * bv[v];
      }
    }
  }
  for (int64_t s = 0; s < op.segs && !op.packed; ++s) {
    const A* a = op.a + row0 * op.lda + s * op.seg_stride;
    const A* bs = b + s * op.seg_len * ldb;
    for (int64_t k = 0; k < op.seg_len; ++k) {
      V bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = Eigen::Map<const V>(bs + k * ldb + v * L);
      for (int i = 0; i < MR; ++i) {
        const A e = a[i * op.lda + k];
        for (int v = 0; v < NV; ++v) acc[i][v] += e * bv[v];
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) {
      Eigen::Map<V> o(c + i * ldc + v * L);
      o = acc[i][v];
    }
}

/// c (M, N) = init + a (M, K) @ b (K, N): b and c row-major (row strides ldb, ldc), N a multiple
/// of kLanes<A>; row_init: M per-row start values for TileInit::Row (null: 0). Tiles of kTileRows
/// rows x kTileVecs vectors, in the order that re-reads the smaller operand: when a is the larger
/// (M > N, as for a 1x1 conv's weight times 48 pixels), row blocks go outside and each stays in L1
/// while it meets every column panel of b (of one column block, with kPanelCacheBytes); otherwise
/// column panels go outside and each panel of b stays in cache while every row block of a meets it.
template <TileInit Init, class A>
void gemm_panels(const Operand<A>& a, const A* b, int64_t ldb, A* c, int64_t ldc, int64_t M, int64_t N,
                 const A* row_init = nullptr) {
  constexpr int64_t L = kLanes<A>, NC = kTileVecs * L;  // columns per tile
  auto tile = [&](auto init, const Operand<A>& op, const A* bb, const A* ri0, int64_t i, int64_t j) {
    constexpr TileInit I = decltype(init)::value;
    const int64_t mr = std::min<int64_t>(kTileRows, M - i), nv = std::min<int64_t>(kTileVecs, (N - j) / L);
    const A* ri = ri0 ? ri0 + i : nullptr;
    A* cij = c + i * ldc + j;
    with_rows<kTileRows>(mr, [&](auto rows) {
      constexpr int MR = decltype(rows)::value;
      if constexpr (kTileVecs >= 3) {
        if (nv == 3) return gemm_tile<MR, 3, I>(op, i, bb + j, ldb, cij, ldc, ri);
      }
      if (nv == 2) gemm_tile<MR, 2, I>(op, i, bb + j, ldb, cij, ldc, ri);
      else gemm_tile<MR, 1, I>(op, i, bb + j, ldb, cij, ldc, ri);
    });
  };
  using First = std::integral_constant<TileInit, Init>;                  // the only or first K block
  using Accumulate = std::integral_constant<TileInit, TileInit::Load>;  // a later K block adds to c
  const int64_t K = a.segs * a.seg_len;
  if (kPanelKBlock > 0 && a.packed && K > kPanelKBlock) {
    // With kPanelKBlock (AVX2), a long contraction goes by blocks of kc steps, each over chunks
    // of mc rows of a (mc x kc, about kPanelCacheBytes, stays in L2) that meet one column panel of
    // b (kc x NC, stays in L1) after the other; the blocks after the first add to c.
    const int64_t kc = kPanelKBlock;
    const int64_t mc = fitting(kc * int64_t(sizeof(A)), kTileRows);
    Operand<A> sub = a;
    sub.block_stride = kPackRows * K;
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      sub.a = a.a + k0 * kPackRows;
      sub.seg_len = std::min(kc, K - k0);
      const A* bk = b + k0 * ldb;
      for (int64_t i0 = 0; i0 < M; i0 += mc)
        for (int64_t j = 0; j < N; j += NC)
          for (int64_t i = i0; i < std::min(M, i0 + mc); i += kTileRows) {
            if (k0 == 0) tile(First{}, sub, bk, row_init, i, j);
            else tile(Accumulate{}, sub, bk, static_cast<const A*>(nullptr), i, j);
          }
    }
  } else if (M > N) {
    // with kPanelCacheBytes, B goes by blocks of columns that fit that much cache (each row block
    // of a meets one block, not all of a B that would be re-read from L3 for every row block)
    const int64_t nc = kPanelCacheBytes > 0 && K * N * int64_t(sizeof(A)) > kPanelCacheBytes
                           ? fitting(K * int64_t(sizeof(A)), NC)
                           : N;
    for (int64_t j0 = 0; j0 < N; j0 += nc)
      for (int64_t i = 0; i < M; i += kTileRows)
        for (int64_t j = j0; j < std::min(N, j0 + nc); j += NC) tile(First{}, a, b, row_init, i, j);
  } else {
    for (int64_t j = 0; j < N; j += NC)
      for (int64_t i = 0; i < M; i += kTileRows) tile(First{}, a, b, row_init, i, j);
  }
}

/// A row-major (M, K) matrix as a GEMM operand.
template <class A>
Operand<A> matrix(const A* a, int64_t lda, int64_t K) { return {a, lda, 0, K, 1}; }

/// The (M, K) matrix whose element (i, k) is at(i, k), packed for gemm_tile (see Operand) into
/// buf, which it resizes; rows past M in the last block are 0. For operands used many times (a
/// conv's weight, once per image).
template <class A, class F>
Operand<A> pack_rows(int64_t M, int64_t K, F at, scratch_vector<A>& buf) {
  buf.assign(static_cast<size_t>(round_up(M, kPackRows) * K), A(0));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) buf[(i / kPackRows) * kPackRows * K + k * kPackRows + i % kPackRows] = at(i, k);
  return {buf.data(), 0, 0, K, 1, true};
}

// Products in bfloat16 (g.bf16: dg::MatmulPrecision::bf16): the same panel GEMMs through
// gemm_bf16 (backend/cpu/gemm_bf16.hpp). The A operand is rounded to bf16 rows once per conv (a
// weight) or per chunk of images (dW's pixels); each B panel is rounded into pairs of rows just
// before its GEMM. Results, saved tensors and gradients stay float32.

/// True when conv g's panel GEMMs take their products in bfloat16: asked for, a float conv, and a
/// build with AVX512-BF16 (elsewhere the request is ignored: float32 products).
template <class A>
constexpr bool bf16_products(const Conv2dGeometry& g) {
  return std::is_same_v<A, float> && kBf16Gemm && g.bf16;
}

/// An A operand packed in bfloat16 (gemm_bf16.hpp's layout); empty: not used.
struct HalfRows {
  scratch_buffer<uint32_t> buf, row;  // row: pack_a's scratch (pack_a writes every element it reads)
  const uint32_t* data() const { return buf.empty() ? nullptr : buf.data(); }
};

/// h <- the unpacked operand op (M rows) packed in bfloat16.
template <class A>
void round_operand(const Operand<A>& op, int64_t M, HalfRows& h) {
#if DENSEGRAD_BF16_GEMM
  if constexpr (std::is_same_v<A, float>) {
    h.buf.resize(static_cast<size_t>(bf16_a_pairs(M, op.seg_len * op.segs)));
    pack_a(op.a, op.lda, op.seg_stride, op.seg_len, op.segs, M, h.buf.data(), h.row);
  }
#else
  (void)op, (void)M, (void)h;  // never called: bf16_products is false in this build
#endif
}

/// c (M, N) = init + a (M, K) @ b (K rows ldb apart): float32 products (gemm_panels on a), or
/// bf16 products when ah holds a in bf16 (b is rounded into pairs in scratch first).
template <TileInit Init, class A>
void panel_gemm(const Operand<A>& a, const HalfRows& ah, const A* b, int64_t ldb, A* c, int64_t ldc, int64_t M,
                int64_t N, int64_t K, scratch_buffer<uint32_t>& scratch, const A* row_init = nullptr) {
#if DENSEGRAD_BF16_GEMM
  if constexpr (std::is_same_v<A, float>) {
    if (ah.data()) {
      scratch.resize(static_cast<size_t>(bf16_b_pairs(K, N)));
      pack_b(b, ldb, K, N, scratch.data());
      gemm_bf16<Init>(ah.data(), scratch.data(), c, ldc, M, N, bf16_pairs(K), row_init);
      return;
    }
  }
#else
  (void)ah, (void)K, (void)scratch;
#endif
  gemm_panels<Init>(a, b, ldb, c, ldc, M, N, row_init);
}

/// Asks for n elements from p on to be brought into L2 ahead of use, for reading or (write)
/// writing: an image's planes, one prefetch per cache line.
template <class A>
void prefetch_l2(const A* p, int64_t n, bool write) {
  constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(A));
  if (write)
    for (int64_t i = 0; i < n; i += line) __builtin_prefetch(p + i, 1, 2);
  else
    for (int64_t i = 0; i < n; i += line) __builtin_prefetch(p + i, 0, 2);
}

/// Images per chunk: about kPanelCols columns, and at least one chunk per thread.
inline int64_t panel_images(const Conv2dGeometry& g) {
  const int64_t P = std::max<int64_t>(1, g.Ho * g.Wo), T = max_threads();
  const int64_t G = std::min((kPanelCols + P / 2) / P, (g.N + T - 1) / T);
  return std::max<int64_t>(1, G);
}

/// True when a conv runs as panel GEMMs: AVX-512, no groups (depthwise convs are dispatched
/// before), and at least one image per thread (a single image on several threads is left to
/// Eigen's own threading).
inline bool panel_ok(const Conv2dGeometry& g) {
  return kPanelGemm && g.groups == 1 && g.N >= max_threads();
}

/// True when a conv's weight gradient runs as panel GEMMs. With AVX2 only on maps of up to 256
/// pixels: on 56x56 maps (RDNet-T's first stage) Eigen's per-image GEMMs measured faster on a Zen 3
/// (about 30 against 35-45 ms for (8, 128, 56, 56) -> 512 and (8, 512, 56, 56) -> 128).
inline bool panel_weight_ok(const Conv2dGeometry& g) {
  return panel_ok(g) && (kTileRows == 8 || g.Ho * g.Wo <= 256);
}

/// Columns of each image that the GEMMs read in place: whole vectors of a pointwise conv's
/// pixels; none for an im2col conv (its columns are all gathered).
template <class A>
int64_t inplace_cols(const Conv2dGeometry& g) {
  return is_pointwise(g) ? g.Ho * g.Wo / kLanes<A> * kLanes<A> : 0;
}

/// dst rows ld apart <- columns [c0, P) of the (K, P) im2col matrices of images n0 .. n0+G-1 side
/// by side: image i fills columns [i*(P-c0), (i+1)*(P-c0)). A pointwise conv's image is its own
/// (C, P) matrix: a copy of each plane's last P - c0 pixels.
template <class A>
void gather_cols(Planes<A> x, int64_t n0, int64_t G, const Conv2dGeometry& g, int64_t c0, A* dst, int64_t ld) {
  const int64_t P = g.Ho * g.Wo, w = P - c0;
  for (int64_t i = 0; i < G; ++i) {
    if (is_pointwise(g)) {
      const A* src = x.at(n0 + i) + c0;
      for (int64_t r = 0; r < g.C_in; ++r)
        for (int64_t j = 0; j < w; ++j) dst[r * ld + i * w + j] = src[r * P + j];
    } else {
      im2col(x.at(n0 + i), dst + i * P, g, ld);  // c0 = 0 here
    }
  }
}

/// dst rows ld apart <- columns [c0, P) of the (R, P) planes of images n0 .. n0+G-1 side by side.
template <class A>
void gather_planes(Planes<A> src, int64_t n0, int64_t G, int64_t R, int64_t P, int64_t c0, A* dst, int64_t ld) {
  const int64_t w = P - c0;
  for (int64_t i = 0; i < G; ++i) {
    const A* s = src.at(n0 + i) + c0;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < w; ++j) dst[r * ld + i * w + j] = s[r * P + j];
  }
}

/// The (R, P) planes of images n0 .. n0+G-1, transposed: dst (G*P rows ld apart, R) with
/// dst[i*P + p][r] = image n0+i's [r][p]. Square blocks of kLanes planes x kLanes pixels go
/// through registers (Eigen's packet transpose); the edges element by element.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // Eigen's packet types as template arguments
#endif
template <class A>
void gather_planes_transposed(Planes<A> src, int64_t n0, int64_t G, int64_t R, int64_t P, A* dst, int64_t ld) {
  constexpr int64_t L = kLanes<A>;
  using Pk = typename Eigen::internal::packet_traits<A>::type;
  // the register blocks need one packet of L elements (AVX-512); elsewhere all goes element-wise
  constexpr bool blocks = Eigen::internal::unpacket_traits<Pk>::size == L;
  const int64_t Rb = blocks ? R / L * L : 0, Pb = blocks ? P / L * L : 0;
  for (int64_t i = 0; i < G; ++i) {
    const A* s = src.at(n0 + i);
    A* d = dst + i * P * ld;
    if constexpr (blocks) {
      for (int64_t r0 = 0; r0 < Rb; r0 += L)
        for (int64_t p0 = 0; p0 < Pb; p0 += L) {
          Eigen::internal::PacketBlock<Pk, L> blk;
          for (int64_t r = 0; r < L; ++r) blk.packet[r] = Eigen::internal::ploadu<Pk>(s + (r0 + r) * P + p0);
          Eigen::internal::ptranspose(blk);
          for (int64_t q = 0; q < L; ++q) Eigen::internal::pstoreu(d + (p0 + q) * ld + r0, blk.packet[q]);
        }
    }
    for (int64_t p = Pb; p < P; ++p)  // the last P % L pixels, all planes
      for (int64_t r = 0; r < Rb; ++r) d[p * ld + r] = s[r * P + p];
    for (int64_t p = 0; p < P; ++p)  // the last R % L planes, all pixels
      for (int64_t r = Rb; r < R; ++r) d[p * ld + r] = s[r * P + p];
  }
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

/// out (rows, P) of images n0 .. n0+G-1 = m (rows, G*(P-c0), ld) scattered into the images'
/// columns [c0, P), plus row_add[r] when given; image i's planes start at out + i*image.
template <class A>
void scatter_cols(const A* m, int64_t ld, int64_t G, int64_t R, int64_t P, int64_t c0, A* out, int64_t image,
                  const A* row_add) {
  const int64_t w = P - c0;
  for (int64_t i = 0; i < G; ++i)
    for (int64_t r = 0; r < R; ++r) {
      const A* s = m + r * ld + i * w;
      A* o = out + i * image + r * P + c0;
      const A add = row_add ? row_add[r] : A(0);
      for (int64_t j = 0; j < w; ++j) o[j] = s[j] + add;
    }
}

/// y = W @ col + bias. Per chunk of G images: each image's in-place columns straight into y, then
/// the gathered rest (a pointwise conv's tails, an im2col conv's all) through one GEMM. With a
/// prep (a callable prep(src, dst, n)), the conv reads prep's dst for each image instead: the
/// chunk's images go through it into a buffer of the thread's own first (gelu_conv2d: GELU), so
/// the transformed input never exists for the whole batch at once.
template <class A, class Prep = std::nullptr_t>
void panel_forward(Planes<A> x, const A* w, const A* b, A* y, const Conv2dGeometry& g, Prep prep = nullptr) {
  constexpr bool kPrep = !std::is_same_v<Prep, std::nullptr_t>;
  const int64_t img = g.C_in * g.H * g.W;  // of a prepped image, dense
  const int64_t K = g.C_in * g.kH * g.kW, OC = g.C_out, P = g.Ho * g.Wo, G = panel_images(g);
  const int64_t chunks = (g.N + G - 1) / G, c0 = inplace_cols<A>(g), ld = round_up(G * (P - c0), kLanes<A>);
  scratch_vector<A> packed;
  HalfRows wh;  // bf16 products: the weight rounded, instead of packed
  Operand<A> a{};
  if (bf16_products<A>(g)) round_operand(matrix(w, K, K), OC, wh);
  else a = pack_rows<A>(OC, K, [&](int64_t i, int64_t k) { return w[i * K + k]; }, packed);
  DENSEGRAD_OMP(parallel if (chunks > 1 && g.N * OC * K * P >= kParallelMinMacs)) {
    scratch_vector<A> cols(static_cast<size_t>(K * ld), A(0));
    scratch_buffer<A> out(static_cast<size_t>(OC * ld));  // the GEMM writes it whole
    scratch_buffer<A> prepped(static_cast<size_t>(kPrep ? G * img : 0));  // prep writes each image it reads
    scratch_buffer<uint32_t> bh;
    DENSEGRAD_OMP(for schedule(static))
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t n0 = ch * G, gn = std::min(G, g.N - n0);
      Planes<A> src = x;  // the chunk's images: image n0 + i at src.at(s0 + i)
      int64_t s0 = n0;
      if constexpr (kPrep) {
        for (int64_t i = 0; i < gn; ++i) prep(x.at(n0 + i), prepped.data() + i * img, img);
        src = {prepped.data(), img};
        s0 = 0;
      }
      for (int64_t i = 0; i < gn && c0 > 0; ++i) {  // in place: x (C, P) rows P apart -> y rows P apart
        if (i + 1 < gn) {  // the next image's planes stream in while this one computes
          prefetch_l2(src.at(s0 + i + 1), K * P, false);
          prefetch_l2(y + (n0 + i + 1) * OC * P, OC * P, true);
        }
        panel_gemm<TileInit::Row>(a, wh, src.at(s0 + i), P, y + (n0 + i) * OC * P, P, OC, c0, K, bh, b);
      }
      if (c0 == P) continue;
      gather_cols(src, s0, gn, g, c0, cols.data(), ld);
      panel_gemm<TileInit::Zero>(a, wh, cols.data(), ld, out.data(), ld, OC, round_up(gn * (P - c0), kLanes<A>), K,
                                 bh);
      scatter_cols(out.data(), ld, gn, OC, P, c0, y + n0 * OC * P, OC * P, b);
    }
  }
}

template <class A>
A plane_sum(const A* p, int64_t n);  // below, with the depthwise kernels

/// The A operand of dx's GEMMs, W^T (K, OC), made once per conv: packed (float32 products) or
/// rounded (bf16 products).
template <class A>
struct DxOperand {
  scratch_vector<A> packed;
  HalfRows wh;
  Operand<A> a{};
  DxOperand(const A* w, const Conv2dGeometry& g) {
    const int64_t K = g.C_in * g.kH * g.kW, OC = g.C_out;
    if (bf16_products<A>(g)) {  // W^T, then rounded
      packed.resize(static_cast<size_t>(K * OC));
      for (int64_t k = 0; k < OC; ++k)
        for (int64_t i = 0; i < K; ++i) packed[static_cast<size_t>(i * OC + k)] = w[k * K + i];
      round_operand(matrix(static_cast<const A*>(packed.data()), OC, OC), K, wh);
    } else {
      a = pack_rows<A>(K, OC, [&](int64_t i, int64_t k) { return w[k * K + i]; }, packed);
    }
  }
};

/// One thread's buffers for dx_chunk: the gathered dout tails (ds) and their product (cols).
template <class A>
struct DxScratch {
  scratch_vector<A> ds;
  scratch_buffer<A> cols;  // the GEMM writes it whole
  scratch_buffer<uint32_t> bh;
  explicit DxScratch(const Conv2dGeometry& g)
      : ds(static_cast<size_t>(g.C_out * dx_ld(g)), A(0)), cols(static_cast<size_t>(g.C_in * g.kH * g.kW * dx_ld(g))) {}
  /// Rows of the gathered tails: G images' last P - c0 columns side by side, whole vectors.
  static int64_t dx_ld(const Conv2dGeometry& g) {
    return round_up(panel_images(g) * (g.Ho * g.Wo - inplace_cols<A>(g)), kLanes<A>);
  }
};

/// dx of images n0 .. n0+gn-1: dcol = W^T @ dout per image (in place and gathered, as
/// panel_forward); an im2col conv's dcol then goes back through col2im. With sums (N x C_out),
/// also each image's plane sums of dout (plane_sum, as conv2d_backward_bias takes them), while the
/// chunk's dout is still in cache.
template <class A>
void dx_chunk(const DxOperand<A>& op, Planes<A> dout, A* dx, const Conv2dGeometry& g, int64_t n0, int64_t gn,
              DxScratch<A>& s, A* sums) {
  const int64_t K = g.C_in * g.kH * g.kW, OC = g.C_out, P = g.Ho * g.Wo, c0 = inplace_cols<A>(g);
  const int64_t ld = DxScratch<A>::dx_ld(g), image = g.C_in * g.H * g.W;  // of dx
  for (int64_t i = 0; i < gn && c0 > 0; ++i) {  // pointwise, in place: dout (OC, P) -> dx (C, P)
    if (i + 1 < gn) {
      prefetch_l2(dout.at(n0 + i + 1), OC * P, false);
      prefetch_l2(dx + (n0 + i + 1) * image, image, true);
    }
    panel_gemm<TileInit::Zero>(op.a, op.wh, dout.at(n0 + i), P, dx + (n0 + i) * image, P, K, c0, OC, s.bh);
  }
  if (c0 < P) {
    gather_planes(dout, n0, gn, OC, P, c0, s.ds.data(), ld);
    panel_gemm<TileInit::Zero>(op.a, op.wh, s.ds.data(), ld, s.cols.data(), ld, K, round_up(gn * (P - c0), kLanes<A>),
                               OC, s.bh);
    if (is_pointwise(g)) {
      scatter_cols(s.cols.data(), ld, gn, K, P, c0, dx + n0 * image, image, static_cast<const A*>(nullptr));
    } else {
      for (int64_t i = 0; i < gn; ++i) col2im(s.cols.data() + i * P, dx + (n0 + i) * image, g, ld);
    }
  }
  for (int64_t i = 0; i < gn && sums; ++i)
    for (int64_t oc = 0; oc < OC; ++oc) sums[(n0 + i) * OC + oc] = plane_sum(dout.at(n0 + i) + oc * P, P);
}

/// dx = W^T @ dout, chunk by chunk (dx_chunk); with sums, the bias's plane sums too.
template <class A>
void panel_backward_input(Planes<A> dout, const A* w, A* dx, const Conv2dGeometry& g, A* sums = nullptr) {
  const int64_t OC = g.C_out, K = g.C_in * g.kH * g.kW, P = g.Ho * g.Wo, G = panel_images(g);
  const int64_t chunks = (g.N + G - 1) / G;
  const DxOperand<A> op(w, g);
  DENSEGRAD_OMP(parallel if (chunks > 1 && g.N * OC * K * P >= kParallelMinMacs)) {
    DxScratch<A> s(g);
    DENSEGRAD_OMP(for schedule(static))
    for (int64_t ch = 0; ch < chunks; ++ch) dx_chunk(op, dout, dx, g, ch * G, std::min(G, g.N - ch * G), s, sums);
  }
}

/// How the weight gradient's GEMMs are laid out: dW (OC, K) = sum over images of dout (OC, P) @
/// col^T (P, K), G images per GEMM: a contraction over G*P pixels. B is gathered transposed (rows
/// padded to whole vectors): x for a pointwise conv with C_in < C_out, else dout. A is the other,
/// read in place image by image (an im2col conv's col is gathered first). Each thread sums its
/// chunks into its own copy of dW (M x ldb: dW, or dW^T when B is dout), added up in thread order.
struct DwLayout {
  int64_t K, OC, P, G, chunks, M, R, ldb, copies;
  bool pointwise, transpose_x, parallel;
  template <class A>
  static DwLayout of(const Conv2dGeometry& g) {
    DwLayout l{};
    l.K = g.C_in * g.kH * g.kW, l.OC = g.C_out, l.P = g.Ho * g.Wo, l.G = panel_images(g);
    l.chunks = (g.N + l.G - 1) / l.G;
    l.pointwise = is_pointwise(g), l.transpose_x = l.pointwise && g.C_in < l.OC;  // true: A = dout, B = x^T
    l.M = l.transpose_x ? l.OC : l.K, l.R = l.transpose_x ? l.K : l.OC, l.ldb = round_up(l.R, kLanes<A>);
    l.copies = std::max<int64_t>(1, std::min<int64_t>(max_threads(), l.chunks));
    l.parallel = l.copies > 1 && g.N * l.OC * l.K * l.P >= kParallelMinMacs;
    return l;
  }
  int64_t used() const { return parallel ? copies : 1; }
};

/// One thread's buffers for dw_chunk.
template <class A>
struct DwScratch {
  scratch_buffer<A> cols;  // im2col writes each image it reads
  scratch_vector<A> bs;
  HalfRows ah;  // bf16 products: the chunk's A rounded
  scratch_buffer<uint32_t> bh;
  explicit DwScratch(const DwLayout& l)
      : cols(static_cast<size_t>(l.pointwise ? 0 : l.K * l.G * l.P)), bs(static_cast<size_t>(l.G * l.P * l.ldb), A(0)) {}
};

/// Adds images n0 .. n0+gn-1's share of dW into `mine` (this thread's copy, see DwLayout). Their
/// x is x's images xn0 .. xn0+gn-1 (xn0 = n0, or 0 for a chunk's own buffer).
template <class A>
void dw_chunk(const DwLayout& l, Planes<A> dout, Planes<A> x, int64_t xn0, A* mine, const Conv2dGeometry& g,
              int64_t n0, int64_t gn, DwScratch<A>& s) {
  Operand<A> a{};
  if (l.transpose_x) {
    a = {dout.at(n0), l.P, dout.image, l.P, gn};
    gather_planes_transposed(x, xn0, gn, l.K, l.P, s.bs.data(), l.ldb);
  } else {
    if (l.pointwise) a = {x.at(xn0), l.P, x.image, l.P, gn};
    else {
      gather_cols(x, xn0, gn, g, 0, s.cols.data(), gn * l.P);
      a = matrix(static_cast<const A*>(s.cols.data()), gn * l.P, gn * l.P);
    }
    gather_planes_transposed(dout, n0, gn, l.OC, l.P, s.bs.data(), l.ldb);
  }
  if (bf16_products<A>(g)) round_operand(a, l.M, s.ah);
  panel_gemm<TileInit::Load>(a, s.ah, s.bs.data(), l.ldb, mine, l.ldb, l.M, l.ldb, gn * l.P, s.bh);
}

/// dw (OC, K) <- the threads' copies added up in thread order.
template <class A>
void dw_finish(const DwLayout& l, const scratch_vector<A>& part, A* dw) {
  for (int64_t oc = 0; oc < l.OC; ++oc)
    for (int64_t k = 0; k < l.K; ++k) {
      const int64_t at = l.transpose_x ? oc * l.ldb + k : k * l.ldb + oc;
      A s = 0;
      for (int64_t t = 0; t < l.used(); ++t) s += part[static_cast<size_t>(t * l.M * l.ldb + at)];
      dw[oc * l.K + k] = s;
    }
}

/// dW, chunk by chunk (dw_chunk), each thread into its own copy, then added up (dw_finish).
template <class A>
void panel_backward_weight(Planes<A> dout, Planes<A> x, A* dw, const Conv2dGeometry& g) {
  const DwLayout l = DwLayout::of<A>(g);
  scratch_vector<A> part(static_cast<size_t>(l.used() * l.M * l.ldb), A(0));
  DENSEGRAD_OMP(parallel if (l.parallel) num_threads(static_cast<int>(l.copies))) {
    DwScratch<A> s(l);
    A* mine = part.data() + thread_num() * l.M * l.ldb;
    DENSEGRAD_OMP(for schedule(static))
    for (int64_t ch = 0; ch < l.chunks; ++ch)
      dw_chunk(l, dout, x, ch * l.G, mine, g, ch * l.G, std::min(l.G, g.N - ch * l.G), s);
  }
  dw_finish(l, part, dw);
}

/// dx, dW (and with sums the bias's plane sums) of a conv in one sweep over chunks of images: a
/// chunk's dout, read for its dx GEMMs, is still in cache for its share of dW. That share's x is
/// chunk_x(n0, gn, xs) = {planes, the index of image n0 in them}: x itself, or (conv2d_backward_
/// prepped) the chunk's conv input made from its dx into xs, xs_images dense images of the
/// thread's own (gelu_conv2d: dh *= gelu'(h) in place, xs = gelu(h)), so that input never exists
/// for the whole batch. The chunks, the threads that take them and their order are those of
/// panel_backward_input and panel_backward_weight apart, so are the bits.
template <class A, class ChunkX>
void panel_backward_sweep(Planes<A> dout, const A* w, A* dx, A* dw, const Conv2dGeometry& g, A* sums,
                          int64_t xs_images, ChunkX chunk_x) {
  const DwLayout l = DwLayout::of<A>(g);
  const DxOperand<A> op(w, g);
  scratch_vector<A> part(static_cast<size_t>(l.used() * l.M * l.ldb), A(0));
  DENSEGRAD_OMP(parallel if (l.parallel) num_threads(static_cast<int>(l.copies))) {
    DxScratch<A> sx(g);
    DwScratch<A> sw(l);
    scratch_buffer<A> xs(static_cast<size_t>(xs_images * g.C_in * g.H * g.W));  // chunk_x writes what it gives
    A* mine = part.data() + thread_num() * l.M * l.ldb;
    DENSEGRAD_OMP(for schedule(static))
    for (int64_t ch = 0; ch < l.chunks; ++ch) {
      const int64_t n0 = ch * l.G, gn = std::min(l.G, g.N - n0);
      dx_chunk(op, dout, dx, g, n0, gn, sx, sums);
      const std::pair<Planes<A>, int64_t> x = chunk_x(n0, gn, xs.data());
      dw_chunk(l, dout, x.first, x.second, mine, g, n0, gn, sw);
    }
  }
  dw_finish(l, part, dw);
}

// ---------------------------------------------------------------- depthwise: direct loops
// Loop order (tap kh, kw) -> output row oh -> output column ow: the weight is one scalar per
// row sweep and the innermost loop runs along contiguous rows of length Wo, which the
// compiler vectorizes (`omp simd` in OpenMP builds). Columns that would read the padding
// are cut from the range (valid_cols) instead of tested per element. SW is the column stride
// when known at compile time (1: contiguous vector loads, the common case), 0 for any stride.

/// y[n, c] = bias[c] + sum over taps of weight[c, kh, kw] * shifted x[n, c].
template <int64_t SW, class A>
void depthwise_forward(Planes<A> x, const A* w, const A* b, A* y, const Conv2dGeometry& g) {
  const int64_t C = g.C_in, jobs = g.N * C;
  DENSEGRAD_OMP(parallel for if (jobs > 1))
  for (int64_t j = 0; j < jobs; ++j) {
    const int64_t c = j % C;
    const A* xp = x.at(j / C) + c * g.H * g.W;
    A* yp = y + j * g.Ho * g.Wo;
    std::fill(yp, yp + g.Ho * g.Wo, b ? b[c] : A(0));
    for (int64_t kh = 0; kh < g.kH; ++kh)
      for (int64_t kw = 0; kw < g.kW; ++kw) {
        const A wv = w[(c * g.kH + kh) * g.kW + kw];
        const int64_t off = kw * g.dW - g.pW, sW = SW ? SW : g.sW;
        int64_t lo, hi;
        valid_cols(off, sW, g.W, g.Wo, lo, hi);
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          const int64_t ih = oh * g.sH - g.pH + kh * g.dH;
          if (ih < 0 || ih >= g.H) continue;
          const A* xr = xp + ih * g.W;
          A* yr = yp + oh * g.Wo;
          DENSEGRAD_OMP(simd)
          for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xr[ow * sW + off];
        }
      }
  }
}

/// dx[n, c] = sum over taps of weight[c, kh, kw] * dout[n, c] shifted back (+= : taps overlap).
template <int64_t SW, class A>
void depthwise_backward_input(Planes<A> dout, const A* w, A* dx, const Conv2dGeometry& g) {
  const int64_t C = g.C_in, jobs = g.N * C;
  DENSEGRAD_OMP(parallel for if (jobs > 1))
  for (int64_t j = 0; j < jobs; ++j) {
    const int64_t c = j % C;
    const A* dp = dout.at(j / C) + c * g.Ho * g.Wo;
    A* dxp = dx + j * g.H * g.W;
    std::fill(dxp, dxp + g.H * g.W, A(0));
    for (int64_t kh = 0; kh < g.kH; ++kh)
      for (int64_t kw = 0; kw < g.kW; ++kw) {
        const A wv = w[(c * g.kH + kh) * g.kW + kw];
        const int64_t off = kw * g.dW - g.pW, sW = SW ? SW : g.sW;
        int64_t lo, hi;
        valid_cols(off, sW, g.W, g.Wo, lo, hi);
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          const int64_t ih = oh * g.sH - g.pH + kh * g.dH;
          if (ih < 0 || ih >= g.H) continue;
          A* xr = dxp + ih * g.W;
          const A* dr = dp + oh * g.Wo;
          DENSEGRAD_OMP(simd)  // distinct ow write distinct xr elements: no dependence
          for (int64_t ow = lo; ow < hi; ++ow) xr[ow * sW + off] += wv * dr[ow];
        }
      }
  }
}

/// dweight[c, kh, kw] = sum over (n, oh, ow) of dout[n, c, oh, ow] * x[n, c, ih, iw]. One
/// channel per job (images inside, so no two jobs share a weight); each tap keeps a running
/// sum per output column, so the inner loop is elementwise (vectorizes) and the horizontal
/// sum happens once per tap at the end.
template <int64_t SW, class A>
void depthwise_backward_weight(Planes<A> dout, Planes<A> x, A* dw, const Conv2dGeometry& g) {
  const int64_t C = g.C_in, taps = g.kH * g.kW;
  DENSEGRAD_OMP(parallel for if (C > 1))
  for (int64_t c = 0; c < C; ++c) {
    scratch_vector<A> acc(static_cast<size_t>(taps * g.Wo), A(0));  // acc[tap][ow]
    for (int64_t n = 0; n < g.N; ++n) {
      const A* xp = x.at(n) + c * g.H * g.W;
      const A* dp = dout.at(n) + c * g.Ho * g.Wo;
      for (int64_t kh = 0; kh < g.kH; ++kh)
        for (int64_t kw = 0; kw < g.kW; ++kw) {
          A* row = acc.data() + (kh * g.kW + kw) * g.Wo;
          const int64_t off = kw * g.dW - g.pW, sW = SW ? SW : g.sW;
          int64_t lo, hi;
          valid_cols(off, sW, g.W, g.Wo, lo, hi);
          for (int64_t oh = 0; oh < g.Ho; ++oh) {
            const int64_t ih = oh * g.sH - g.pH + kh * g.dH;
            if (ih < 0 || ih >= g.H) continue;
            const A* xr = xp + ih * g.W;
            const A* dr = dp + oh * g.Wo;
            DENSEGRAD_OMP(simd)
            for (int64_t ow = lo; ow < hi; ++ow) row[ow] += dr[ow] * xr[ow * sW + off];
          }
        }
    }
    for (int64_t t = 0; t < taps; ++t) {
      A s = 0;
      for (int64_t ow = 0; ow < g.Wo; ++ow) s += acc[t * g.Wo + ow];
      dw[c * taps + t] = s;
    }
  }
}

// ---------------------------------------------------------------- depthwise, stride 1: padded planes
// The kernels above sweep rows of length Wo, which is 14, 7 or 3 in small-image models: too
// short to vectorize well. With stride 1, the planes of one channel in G images are first copied
// side by side into a zero-bordered buffer: plane s starts at column pW + s*(W + pW), so a gap of
// pW zero columns separates neighbours (the right border of one plane is the left border of the
// next: stride 1 with padding p reaches exactly p columns past either edge). The buffer is
// Wp = G*(W + pW) + pW wide; output (oh, ow) of plane s lives at flat index p = oh*Wp + s*(W + pW)
// + ow, and tap (kh, kw) reads the buffer at p + kh*dH*Wp + kw*dW. Every tap is ONE contiguous
// sweep over p in [0, (Ho-1)*Wp + (G-1)*(W + pW) + Wo): long, unconditional, vectorized, and the
// per-plane work (tap list, weights) is shared by G planes. The positions between outputs are
// scratch (computed, never stored). G makes rows about kStackWidth wide: 6 planes of 7x7, 3 of
// 14x14, 1 of 56x56. Taps that only ever read the border (a 7x7 kernel on a 3x3 map) are
// skipped, as in the ref kernel. The backward wrt the input is the same correlation of dout,
// padded by (k-1)*d - p, with the taps flipped.

/// dst[0, n) = src[0, n) for the short runs of small planes (3 to 56 elements): whole vectors,
/// then one masked vector with AVX-512; element by element otherwise. No library call per run.
template <class A>
inline void copy_run(const A* src, A* dst, int64_t n) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<A, float>) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_loadu_ps(src + i));
    if (i < n) {  // masked-off lanes are neither read nor written
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
      _mm512_mask_storeu_ps(dst + i, m, _mm512_maskz_loadu_ps(m, src + i));
    }
    return;
  } else if constexpr (std::is_same_v<A, double>) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm512_storeu_pd(dst + i, _mm512_loadu_pd(src + i));
    if (i < n) {
      const __mmask8 m = static_cast<__mmask8>((1u << (n - i)) - 1);
      _mm512_mask_storeu_pd(dst + i, m, _mm512_maskz_loadu_pd(m, src + i));
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

/// Copies plane src (h, w) into buf, whose rows are wp wide, at row top and column left. The
/// rest of buf (the zero border) is zeroed once by the caller and never written here.
template <class A>
void copy_plane(const A* src, int64_t h, int64_t w, A* buf, int64_t wp, int64_t top, int64_t left) {
  for (int64_t i = 0; i < h; ++i) copy_run(src + i * w, buf + (i + top) * wp + left, w);
}

/// The inverse: plane dst (h, w) from buf's rows (wp wide) at column left.
template <class A>
void copy_plane_out(const A* buf, int64_t wp, int64_t left, int64_t h, int64_t w, A* dst) {
  for (int64_t i = 0; i < h; ++i) copy_run(buf + i * wp + left, dst + i * w, w);
}

/// True when tap offset k*d reads at least one in-plane row for some output row o in [0, no):
/// padded rows [k*d, k*d + no) meet the real rows [pad, pad + n).
inline bool tap_reads_plane(int64_t kd, int64_t no, int64_t pad, int64_t n) { return kd < pad + n && kd + no > pad; }

/// The geometry of the padded-plane sweeps of one depthwise conv (stride 1).
struct PlaneSweep {
  static constexpr int64_t kPacket = 16;       // sweeps go by 64 elements (4 AVX-512 registers of floats), then by 16
  static constexpr int64_t kStackWidth = 64;   // planes side by side up to about this many columns
  int64_t G, S, Wp, Hp, L, Lr;     // planes side by side, column step from plane to plane (w + pw), buffer width
                                   // and height, sweep length (ho-1)*Wp + (G-1)*S + wo, L rounded up to kPacket
  std::vector<int64_t> off, taps;  // buffer offset and weight index of every tap that reads the plane
  /// Buffer sizes: the last block of a sweep reads up to Lr - L elements past the plane (kept zero).
  size_t padded_size() const { return static_cast<size_t>(Hp * Wp + Lr - L); }
  PlaneSweep(const Conv2dGeometry& g, int64_t ph, int64_t pw, int64_t h, int64_t w, int64_t ho, int64_t wo, bool flip) {
    S = w + pw;
    G = std::max<int64_t>(1, std::min<int64_t>(g.N, kStackWidth / S));
    Wp = G * S + pw;
    Hp = h + 2 * ph;
    L = (ho - 1) * Wp + (G - 1) * S + wo;
    Lr = (L + kPacket - 1) / kPacket * kPacket;
    for (int64_t kh = 0; kh < g.kH; ++kh)
      for (int64_t kw = 0; kw < g.kW; ++kw)
        if (tap_reads_plane(kh * g.dH, ho, ph, h) && tap_reads_plane(kw * g.dW, wo, pw, w)) {
          off.push_back(kh * g.dH * Wp + kw * g.dW);
          taps.push_back(flip ? (g.kH - 1 - kh) * g.kW + (g.kW - 1 - kw) : kh * g.kW + kw);
        }
  }
};

/// True when the padded-plane kernels apply: depthwise, stride 1, and padding at most the
/// kernel's reach (so the backward's padding (k-1)*d - p is not negative).
inline bool plane_sweep_ok(const Conv2dGeometry& g) {
  return is_depthwise(g) && g.sH == 1 && g.sW == 1 && g.pH <= (g.kH - 1) * g.dH && g.pW <= (g.kW - 1) * g.dW;
}

/// Fixed-size packets: Eigen keeps them in registers (one AVX-512 register for 16 floats).
template <class A> using Packet = Eigen::Array<A, 16, 1>;
template <class A> Eigen::Map<const Packet<A>> packet(const A* p) { return Eigen::Map<const Packet<A>>(p); }

/// out[0, 16*NP) = init + sum over taps t of wv[t] * buf[off[t] + (0, 16*NP)]: NP packets of
/// outputs stay in registers while every tap is added in; even and odd taps go to separate
/// accumulators, so short blocks still have independent FMA chains to overlap.
template <int NP, class A>
void sweep_block(const A* buf, const int64_t* off, const A* wv, int64_t nt, A init, A* out) {
  using B = Eigen::Array<A, 16 * NP, 1>;  // fixed size: Eigen unrolls it into NP registers
  using CB = Eigen::Map<const B>;
  B a = B::Constant(init), b = B::Zero();
  int64_t t = 0;
  for (; t + 2 <= nt; t += 2) {
    a += wv[t] * CB(buf + off[t]);
    b += wv[t + 1] * CB(buf + off[t + 1]);
  }
  if (t < nt) a += wv[t] * CB(buf + off[t]);
  Eigen::Map<B> o(out);
  o = a + b;
}

/// out (ho, wo) planes = init + sum over taps of w[tap] * the padded in (h, wd) plane shifted by
/// the tap, for every (image, channel) plane; w holds each channel's taps. One job per channel
/// and group of G images.
template <class A>
void plane_correlate(Planes<A> in, const A* w, const A* bias, A* out, const Conv2dGeometry& g, int64_t h, int64_t wd,
                     int64_t ph, int64_t pw, int64_t ho, int64_t wo, bool flip) {
  const PlaneSweep sw(g, ph, pw, h, wd, ho, wo, flip);
  const int64_t C = g.C_in, groups = (g.N + sw.G - 1) / sw.G, jobs = groups * C, taps = g.kH * g.kW;
  const int64_t nt = static_cast<int64_t>(sw.off.size());
  DENSEGRAD_OMP(parallel if (jobs > 1 && g.N * C * h * wd * nt > 32768)) {
    scratch_vector<A> buf(sw.padded_size(), A(0)), acc(static_cast<size_t>(sw.Lr)), wv(static_cast<size_t>(nt));
    DENSEGRAD_OMP(for schedule(static))
    for (int64_t j = 0; j < jobs; ++j) {
      const int64_t c = j % C, n0 = (j / C) * sw.G, gn = std::min(sw.G, g.N - n0);
      // a short last group leaves stale planes in the slots past gn: their outputs are dropped,
      // and no kept output reads them (each plane's reach ends inside the gap after it)
      for (int64_t s = 0; s < gn; ++s)
        copy_plane(in.at(n0 + s) + c * h * wd, h, wd, buf.data(), sw.Wp, ph, pw + s * sw.S);
      for (int64_t t = 0; t < nt; ++t) wv[t] = w[c * taps + sw.taps[t]];
      const A init = bias ? bias[c] : A(0);
      int64_t p = 0;
      for (; p + 64 <= sw.Lr; p += 64) sweep_block<4>(buf.data() + p, sw.off.data(), wv.data(), nt, init, acc.data() + p);
      switch ((sw.Lr - p) / 16) {  // the last 16, 32 or 48 elements
        case 1: sweep_block<1>(buf.data() + p, sw.off.data(), wv.data(), nt, init, acc.data() + p); break;
        case 2: sweep_block<2>(buf.data() + p, sw.off.data(), wv.data(), nt, init, acc.data() + p); break;
        case 3: sweep_block<3>(buf.data() + p, sw.off.data(), wv.data(), nt, init, acc.data() + p); break;
        default: break;
      }
      for (int64_t s = 0; s < gn; ++s)
        copy_plane_out(acc.data(), sw.Wp, s * sw.S, ho, wo, out + ((n0 + s) * C + c) * ho * wo);
    }
  }
}

/// dweight[c, tap] = sum over images of the dot product of dout[n, c] (laid out like the
/// outputs of plane_correlate: width Wp, G planes side by side, zero between them) with the
/// padded x[n, c] shifted by the tap. One channel per job: no two jobs share a weight, so nothing
/// needs a reduction across threads. Four taps at a time share each load of dout.
template <class A>
void plane_backward_weight(Planes<A> dout, Planes<A> x, A* dw, const Conv2dGeometry& g) {
  using P = Packet<A>;
  const int64_t C = g.C_in, taps = g.kH * g.kW;
  const PlaneSweep sw(g, g.pH, g.pW, g.H, g.W, g.Ho, g.Wo, false);
  const int64_t nt = static_cast<int64_t>(sw.off.size());
  std::fill(dw, dw + C * taps, A(0));  // taps that only read the border get exactly 0
  DENSEGRAD_OMP(parallel if (C > 1 && g.N * C * g.H * g.W * nt > 32768)) {
    scratch_vector<A> buf(sw.padded_size(), A(0)), d(static_cast<size_t>(sw.Lr), A(0));
    scratch_vector<P> acc(static_cast<size_t>(nt));  // per tap: 16 partial sums, added up at the end
    DENSEGRAD_OMP(for schedule(static))
    for (int64_t c = 0; c < C; ++c) {
      std::fill(acc.begin(), acc.end(), P::Zero());
      for (int64_t n0 = 0; n0 < g.N; n0 += sw.G) {
        const int64_t gn = std::min(sw.G, g.N - n0);
        for (int64_t s = 0; s < gn; ++s) {
          copy_plane(x.at(n0 + s) + c * g.H * g.W, g.H, g.W, buf.data(), sw.Wp, g.pH, g.pW + s * sw.S);
          copy_plane(dout.at(n0 + s) + c * g.Ho * g.Wo, g.Ho, g.Wo, d.data(), sw.Wp, 0, s * sw.S);
        }
        // a short last group: the slots past gn hold stale dout; zero them (they would add in)
        for (int64_t s = gn; s < sw.G; ++s)
          for (int64_t oh = 0; oh < g.Ho; ++oh) std::fill_n(d.data() + oh * sw.Wp + s * sw.S, g.Wo, A(0));
        int64_t t = 0;
        for (; t + 4 <= nt; t += 4) {
          const A *s0 = buf.data() + sw.off[t], *s1 = buf.data() + sw.off[t + 1], *s2 = buf.data() + sw.off[t + 2],
                  *s3 = buf.data() + sw.off[t + 3];
          P a0 = P::Zero(), a1 = a0, a2 = a0, a3 = a0;
          for (int64_t p = 0; p < sw.Lr; p += 16) {
            const P dp = packet(d.data() + p);
            a0 += dp * packet(s0 + p);
            a1 += dp * packet(s1 + p);
            a2 += dp * packet(s2 + p);
            a3 += dp * packet(s3 + p);
          }
          acc[t] += a0;
          acc[t + 1] += a1;
          acc[t + 2] += a2;
          acc[t + 3] += a3;
        }
        for (; t < nt; ++t) {
          P a = P::Zero();
          for (int64_t p = 0; p < sw.Lr; p += 16) a += packet(d.data() + p) * packet(buf.data() + sw.off[t] + p);
          acc[t] += a;
        }
      }
      for (int64_t t = 0; t < nt; ++t) dw[c * taps + sw.taps[t]] = acc[t].sum();
    }
  }
}

// ---------------------------------------------------------------- depthwise, stride 1, height 3, 5 or 7: row blocks
// The sweeps above load the buffer once per tap and output: one (unaligned) vector load per FMA,
// which bounds them by the load ports. With dilation 1 along H, input row r of the buffer meets
// output row r - kh through tap row kh, for every kh: a block of R output rows x 16 positions
// keeps its R accumulators in registers, and for each tap column kw loads the R + KH - 1 input
// rows once and issues R * KH FMAs (R = 8, KH = 7: 14 loads, 56 FMAs). Same buffer layout as the
// sweeps (G planes side by side, rows Wp wide); outputs go to rows Wa wide (whole vectors, so
// one row's last vector never spills into the next), then out per plane. The weight gradient
// keeps, per tap column, KH accumulators (one per tap row) while the row blocks go by: the R
// dout rows and R + KH - 1 input rows loaded once give R * KH FMAs. Positions between outputs
// and rows past Ho are scratch in the forward and zero in dout.

/// The geometry of the row-block kernels of one depthwise conv (stride 1, dilation 1 along H).
struct RowBlocks {
  int64_t G, S, Wp, Hp;  // as in PlaneSweep: planes side by side, their column step, buffer width and height
  int64_t X, Xr, Wa;     // output positions per row (G*S), rounded up to 16, and the output rows' stride
  int64_t R, Hor;        // rows per block (4, 7 or 8, whichever wastes the fewest scratch rows), ho rounded up to R
  int64_t Kh;            // kernel height
  /// Input buffer size: R scratch rows past the plane's, and the last row's vectors reach
  /// Xr - X + (kW - 1) * dW elements past the row.
  size_t in_size(const Conv2dGeometry& g) const {
    return static_cast<size_t>((Hp + R) * Wp + Xr + (g.kW - 1) * g.dW + 16);
  }
  RowBlocks(const Conv2dGeometry& g, int64_t pw, int64_t h, int64_t w, int64_t ho, int64_t ph) {
    const PlaneSweep sw(g, ph, pw, h, w, ho, w + 2 * pw - (g.kW - 1) * g.dW, false);
    G = sw.G, S = sw.S, Wp = sw.Wp, Hp = sw.Hp;
    X = G * S;
    Xr = (X + 15) / 16 * 16;
    Wa = Xr;
    R = 8;
    for (int64_t r : {7, 4})
      if ((ho + r - 1) / r * r - ho < (ho + R - 1) / R * R - ho) R = r;
    Hor = (ho + R - 1) / R * R;
    Kh = g.kH;
  }
};

/// True when the row-block kernels apply: the padded-plane sweeps' conditions, dilation 1 along
/// H, and a kernel height the kernels are compiled for.
inline bool row_blocks_ok(const Conv2dGeometry& g) {
  return plane_sweep_ok(g) && g.dH == 1 && (g.kH == 3 || g.kH == 5 || g.kH == 7);
}

/// out rows [0, R) x 16 positions (rows wa apart) = init + sum over kh < KH, kw < kw_n of
/// wk[kh * kw_n + kw] * buf[(r + kh) * wp + kw * dw + (0..16)].
template <int KH, int R, class A>
void row_block(const A* buf, int64_t wp, const A* wk, int64_t kw_n, int64_t dw, A init, A* out, int64_t wa) {
  using V = Packet<A>;
  V acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V::Constant(init);
  for (int64_t kw = 0; kw < kw_n; ++kw) {
    const A* col = buf + kw * dw;
    V wv[KH];
    for (int kh = 0; kh < KH; ++kh) wv[kh] = V::Constant(wk[kh * kw_n + kw]);
    DENSEGRAD_UNROLL(16)
    for (int i = 0; i < R + KH - 1; ++i) {  // each input row, loaded once, meets every output row it feeds
      const V in = packet(col + i * wp);
      DENSEGRAD_UNROLL(8)
      for (int kh = 0; kh < KH; ++kh)
        if (i - kh >= 0 && i - kh < R) acc[i - kh] += wv[kh] * in;
    }
  }
  for (int r = 0; r < R; ++r) {
    Eigen::Map<V> o(out + r * wa);
    o = acc[r];
  }
}

/// accm[kh * kw_n + kw] += sum over rows r < rows (in blocks of R) of d[r * wa + (0..16)] *
/// buf[(r + kh) * wp + kw * dw + (0..16)], lane by lane, for every tap.
template <int KH, int R, class A>
void row_block_weight(const A* buf, int64_t wp, const A* d, int64_t wa, int64_t rows, int64_t kw_n, int64_t dw,
                      Packet<A>* accm) {
  using V = Packet<A>;
  for (int64_t kw = 0; kw < kw_n; ++kw) {
    V acc[KH];
    for (int kh = 0; kh < KH; ++kh) acc[kh] = V::Zero();
    for (int64_t r0 = 0; r0 < rows; r0 += R) {
      const A* col = buf + r0 * wp + kw * dw;
      V dv[R];
      for (int r = 0; r < R; ++r) dv[r] = packet(d + (r0 + r) * wa);
      DENSEGRAD_UNROLL(16)
      for (int i = 0; i < R + KH - 1; ++i) {  // each input row, loaded once, meets every dout row it pairs with
        const V in = packet(col + i * wp);
        DENSEGRAD_UNROLL(8)
        for (int kh = 0; kh < KH; ++kh)
          if (i - kh >= 0 && i - kh < R) acc[kh] += dv[i - kh] * in;
      }
    }
    for (int kh = 0; kh < KH; ++kh) accm[kh * kw_n + kw] += acc[kh];
  }
}

/// row_block for the geometry's kernel height and rows per block.
template <class A>
void row_block_any(const RowBlocks& rb, const A* buf, const A* wk, const Conv2dGeometry& g, A init, A* out) {
  auto run = [&](auto kh, auto r) {
    row_block<decltype(kh)::value, decltype(r)::value>(buf, rb.Wp, wk, g.kW, g.dW, init, out, rb.Wa);
  };
  using I3 = std::integral_constant<int, 3>;
  using I5 = std::integral_constant<int, 5>;
  using I7 = std::integral_constant<int, 7>;
  using R4 = std::integral_constant<int, 4>;
  using R7 = std::integral_constant<int, 7>;
  using R8 = std::integral_constant<int, 8>;
  auto by_r = [&](auto kh) {
    if (rb.R == 4) run(kh, R4{});
    else if (rb.R == 7) run(kh, R7{});
    else run(kh, R8{});
  };
  if (rb.Kh == 3) by_r(I3{});
  else if (rb.Kh == 5) by_r(I5{});
  else by_r(I7{});
}

/// row_block_weight for the geometry's kernel height and rows per block.
template <class A>
void row_block_weight_any(const RowBlocks& rb, const A* buf, const A* d, const Conv2dGeometry& g, Packet<A>* accm) {
  auto run = [&](auto kh, auto r) {
    row_block_weight<decltype(kh)::value, decltype(r)::value>(buf, rb.Wp, d, rb.Wa, rb.Hor, g.kW, g.dW, accm);
  };
  using I3 = std::integral_constant<int, 3>;
  using I5 = std::integral_constant<int, 5>;
  using I7 = std::integral_constant<int, 7>;
  using R4 = std::integral_constant<int, 4>;
  using R7 = std::integral_constant<int, 7>;
  using R8 = std::integral_constant<int, 8>;
  auto by_r = [&](auto kh) {
    if (rb.R == 4) run(kh, R4{});
    else if (rb.R == 7) run(kh, R7{});
    else run(kh, R8{});
  };
  if (rb.Kh == 3) by_r(I3{});
  else if (rb.Kh == 5) by_r(I5{});
  else by_r(I7{});
}

/// out (ho, wo) planes = init + the padded in (h, wd) planes correlated with each channel's taps
/// (flipped for the backward wrt the input), as plane_correlate, by row blocks. One job per
/// channel and group of G images.
template <class A>
void rows_correlate(Planes<A> in, const A* w, const A* bias, A* out, const Conv2dGeometry& g, int64_t h, int64_t wd,
                    int64_t ph, int64_t pw, int64_t ho, int64_t wo, bool flip) {
  const RowBlocks rb(g, pw, h, wd, ho, ph);
  const int64_t C = g.C_in, groups = (g.N + rb.G - 1) / rb.G, jobs = groups * C, taps = g.kH * g.kW;
  DENSEGRAD_OMP(parallel if (jobs > 1 && g.N * C * h * wd * taps > 32768)) {
    scratch_vector<A> buf(rb.in_size(g), A(0)), acc(static_cast<size_t>(rb.Hor * rb.Wa)), wk(static_cast<size_t>(taps));
    DENSEGRAD_OMP(for schedule(static))
    for (int64_t j = 0; j < jobs; ++j) {
      const int64_t c = j % C, n0 = (j / C) * rb.G, gn = std::min(rb.G, g.N - n0);
      // stale planes in the slots past gn of a short last group feed only dropped outputs
      for (int64_t s = 0; s < gn; ++s)
        copy_plane(in.at(n0 + s) + c * h * wd, h, wd, buf.data(), rb.Wp, ph, pw + s * rb.S);
      for (int64_t t = 0; t < taps; ++t) wk[t] = w[c * taps + (flip ? taps - 1 - t : t)];
      const A init = bias ? bias[c] : A(0);
      for (int64_t r0 = 0; r0 < rb.Hor; r0 += rb.R)
        for (int64_t x0 = 0; x0 < rb.Xr; x0 += 16)
          row_block_any(rb, buf.data() + r0 * rb.Wp + x0, wk.data(), g, init, acc.data() + r0 * rb.Wa + x0);
      for (int64_t s = 0; s < gn; ++s)
        copy_plane_out(acc.data(), rb.Wa, s * rb.S, ho, wo, out + ((n0 + s) * C + c) * ho * wo);
    }
  }
}

/// dweight[c, tap] = sum over images of dout[n, c] (laid out like rows_correlate's outputs, zero
/// elsewhere) against the padded x[n, c] shifted by the tap, by row blocks. One channel per job.
template <class A>
void rows_backward_weight(Planes<A> dout, Planes<A> x, A* dw, const Conv2dGeometry& g) {
  using P = Packet<A>;
  const RowBlocks rb(g, g.pW, g.H, g.W, g.Ho, g.pH);
  const int64_t C = g.C_in, taps = g.kH * g.kW;
  DENSEGRAD_OMP(parallel if (C > 1 && g.N * C * g.H * g.W * taps > 32768)) {
    scratch_vector<A> buf(rb.in_size(g), A(0)), d(static_cast<size_t>(rb.Hor * rb.Wa + 16), A(0));
    scratch_vector<P> accm(static_cast<size_t>(taps));  // per tap: 16 partial sums, added up at the end
    DENSEGRAD_OMP(for schedule(static))
    for (int64_t c = 0; c < C; ++c) {
      std::fill(accm.begin(), accm.end(), P::Zero());
      for (int64_t n0 = 0; n0 < g.N; n0 += rb.G) {
        const int64_t gn = std::min(rb.G, g.N - n0);
        for (int64_t s = 0; s < gn; ++s) {
          copy_plane(x.at(n0 + s) + c * g.H * g.W, g.H, g.W, buf.data(), rb.Wp, g.pH, g.pW + s * rb.S);
          copy_plane(dout.at(n0 + s) + c * g.Ho * g.Wo, g.Ho, g.Wo, d.data(), rb.Wa, 0, s * rb.S);
        }
        // a short last group: the slots past gn hold stale dout; zero them (they would add in)
        for (int64_t s = gn; s < rb.G; ++s)
          for (int64_t oh = 0; oh < g.Ho; ++oh) std::fill_n(d.data() + oh * rb.Wa + s * rb.S, g.Wo, A(0));
        for (int64_t x0 = 0; x0 < rb.Xr; x0 += 16)
          row_block_weight_any(rb, buf.data() + x0, d.data() + x0, g, accm.data());
      }
      for (int64_t t = 0; t < taps; ++t) dw[c * taps + t] = accm[t].sum();
    }
  }
}

/// p[0] + ... + p[n-1] in 16 lanes, then the lanes, then the tail: the same order wherever p
/// lies in memory (Eigen's sum of a Map starts at the first aligned element, so its order, and
/// its last bits, would follow the address: a batch-strided view would not sum like its copy).
template <class A>
A plane_sum(const A* p, int64_t n) {
  Packet<A> lanes = Packet<A>::Zero();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) lanes += packet(p + i);
  A s = lanes.sum();
  for (; i < n; ++i) s += p[i];
  return s;
}

}  // namespace conv_detail

// ---------------------------------------------------------------- entry points (any strides)
// Contiguous and batch-strided x and dout are read in place; other layouts are copied first.
// Results are always contiguous.

/// True when conv2d_forward runs conv g as panel GEMMs (panel_forward): not depthwise, and
/// panel_ok.
inline bool forward_runs_panels(const Conv2dGeometry& g) {
  using namespace conv_detail;
  return !row_blocks_ok(g) && !plane_sweep_ok(g) && !is_depthwise(g) && panel_ok(g);
}

/// Forward: out (N, C_out, Ho, Wo); bias may be undefined. With a prep (only where
/// forward_runs_panels), the conv is that of prep(x): each image goes through prep(src, dst, n)
/// (n = C_in*H*W elements, dst dense) chunk by chunk on the way into the GEMMs, so prep(x) never
/// exists for the whole batch (see panel_forward; gelu_conv2d's GELU).
template <class T, class Prep = std::nullptr_t>
Tensor<T> conv2d_forward(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& bias,
                         const Conv2dGeometry& g, Prep prep = nullptr) {
  using A = acc_t<T>;
  using namespace conv_detail;
  auto px = images<A>(x), pw = dense<A>(weight);
  DenseArray<A> pb;
  if (bias.defined()) pb = dense<A>(bias);
  const A* b = bias.defined() ? pb.data() : nullptr;
  Tensor<A> out = Tensor<A>::empty(g.out_shape());
  const Planes<A> xp = planes(px);
  if (forward_runs_panels(g)) {
    panel_forward(xp, pw.data(), b, out.data(), g, prep);
    return rounded<T>(out);
  }
  if constexpr (!std::is_same_v<Prep, std::nullptr_t>)
    DG_CHECK(false, "cpu::conv2d_forward: a prep needs a conv that runs as panel GEMMs");
  if (row_blocks_ok(g)) rows_correlate(xp, pw.data(), b, out.data(), g, g.H, g.W, g.pH, g.pW, g.Ho, g.Wo, false);
  else if (plane_sweep_ok(g)) plane_correlate(xp, pw.data(), b, out.data(), g, g.H, g.W, g.pH, g.pW, g.Ho, g.Wo, false);
  else if (is_depthwise(g) && g.sW == 1) depthwise_forward<1>(xp, pw.data(), b, out.data(), g);
  else if (is_depthwise(g)) depthwise_forward<0>(xp, pw.data(), b, out.data(), g);
  else if (images_per_gemm(g) > 1) folded_forward(xp, pw.data(), b, out.data(), g, images_per_gemm(g));
  else gemm_forward(xp, pw.data(), b, out.data(), g);
  return rounded<T>(out);
}

/// Gradient wrt the input: dx (N, C_in, H, W) from dout (N, C_out, Ho, Wo) and the weight.
template <class T>
Tensor<T> conv2d_backward_input(const Tensor<T>& dout, const Tensor<T>& weight, const Conv2dGeometry& g) {
  using A = acc_t<T>;
  using namespace conv_detail;
  auto pd = images<A>(dout), pw = dense<A>(weight);
  Tensor<A> dx = Tensor<A>::empty(g.x_shape());
  const Planes<A> dp = planes(pd);
  if (row_blocks_ok(g))  // dx = dout padded by (k-1)*d - p, correlated with the flipped taps
    rows_correlate(dp, pw.data(), static_cast<const A*>(nullptr), dx.data(), g, g.Ho, g.Wo,
                   (g.kH - 1) * g.dH - g.pH, (g.kW - 1) * g.dW - g.pW, g.H, g.W, true);
  else if (plane_sweep_ok(g))
    plane_correlate(dp, pw.data(), static_cast<const A*>(nullptr), dx.data(), g, g.Ho, g.Wo,
                    (g.kH - 1) * g.dH - g.pH, (g.kW - 1) * g.dW - g.pW, g.H, g.W, true);
  else if (is_depthwise(g) && g.sW == 1) depthwise_backward_input<1>(dp, pw.data(), dx.data(), g);
  else if (is_depthwise(g)) depthwise_backward_input<0>(dp, pw.data(), dx.data(), g);
  else if (panel_ok(g)) panel_backward_input(dp, pw.data(), dx.data(), g);
  else if (images_per_gemm(g) > 1) folded_backward_input(dp, pw.data(), dx.data(), g, images_per_gemm(g));
  else gemm_backward_input(dp, pw.data(), dx.data(), g);
  return rounded<T>(dx);
}

/// Gradient wrt the weight: dweight (C_out, C_in/groups, kH, kW) from dout and the input.
template <class T>
Tensor<T> conv2d_backward_weight(const Tensor<T>& dout, const Tensor<T>& x, const Conv2dGeometry& g) {
  using A = acc_t<T>;
  using namespace conv_detail;
  auto pd = images<A>(dout), px = images<A>(x);
  Tensor<A> dw = Tensor<A>::empty(g.w_shape());
  const Planes<A> dp = planes(pd), xp = planes(px);
  if (row_blocks_ok(g)) rows_backward_weight(dp, xp, dw.data(), g);
  else if (plane_sweep_ok(g)) plane_backward_weight(dp, xp, dw.data(), g);
  else if (is_depthwise(g) && g.sW == 1) depthwise_backward_weight<1>(dp, xp, dw.data(), g);
  else if (is_depthwise(g)) depthwise_backward_weight<0>(dp, xp, dw.data(), g);
  else if (panel_weight_ok(g)) panel_backward_weight(dp, xp, dw.data(), g);
  else gemm_backward_weight(dp, xp, dw.data(), g);
  return rounded<T>(dw);
}

/// Gradient wrt the bias: dbias[oc] = sum of dout over (n, oh, ow).
template <class T>
Tensor<T> conv2d_backward_bias(const Tensor<T>& dout, const Conv2dGeometry& g) {
  using A = acc_t<T>;
  using namespace conv_detail;
  auto pd = images<A>(dout);
  const int64_t P = g.Ho * g.Wo;
  Tensor<A> db = Tensor<A>::empty({g.C_out});
  A* o = db.data();
  const Planes<A> d = planes(pd);
  std::fill(o, o + g.C_out, A(0));
  // blocks of up to 16 channels, images inside: each image's block is one contiguous read; at
  // least 4 blocks per thread, so that 48 or 72 channels split evenly enough
  const int64_t bs = std::max<int64_t>(1, std::min<int64_t>(16, g.C_out / (4 * max_threads())));
  const int64_t blocks = (g.C_out + bs - 1) / bs;
  DENSEGRAD_OMP(parallel for schedule(static) if (blocks > 1 && g.N * g.C_out * P >= (int64_t(1) << 16)))
  for (int64_t ob = 0; ob < blocks; ++ob)
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t oc = ob * bs; oc < std::min(g.C_out, ob * bs + bs); ++oc)
        o[oc] += plane_sum(d.at(n) + oc * P, P);
  return rounded<T>(db);
}

namespace conv_detail {
/// dbias (C_out) from each image's plane sums (N x C_out), added up image by image: the order
/// conv2d_backward_bias adds in, so its bits.
template <class A>
Tensor<A> bias_from_sums(const scratch_vector<A>& sums, const Conv2dGeometry& g) {
  Tensor<A> db = Tensor<A>::empty({g.C_out});
  A* o = db.data();
  std::fill(o, o + g.C_out, A(0));
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t oc = 0; oc < g.C_out; ++oc) o[oc] += sums[static_cast<size_t>(n * g.C_out + oc)];
  return db;
}
}  // namespace conv_detail

/// The gradients asked for, {dx, dweight, dbias} (undefined where not asked): the same bits as
/// conv2d_backward_input, conv2d_backward_weight and conv2d_backward_bias. Where the conv runs as
/// panel GEMMs and dx is asked for, one sweep over chunks of images makes them: a chunk's dout,
/// read for its dx GEMMs, is still in cache for its share of dW and for the bias's plane sums
/// (each image's, added up after in conv2d_backward_bias's order), instead of each gradient
/// reading all of dout from memory again.
template <class T>
std::array<Tensor<T>, 3> conv2d_backward(const Tensor<T>& dout, const Tensor<T>& x, const Tensor<T>& weight,
                                         const Conv2dGeometry& g, bool need_x, bool need_w, bool need_b) {
  using A = acc_t<T>;
  using namespace conv_detail;
  std::array<Tensor<T>, 3> r;
  if (!need_x || is_depthwise(g) || !panel_ok(g) || (!need_w && !need_b)) {  // nothing to share
    if (need_x) r[0] = conv2d_backward_input(dout, weight, g);
    if (need_w) r[1] = conv2d_backward_weight(dout, x, g);
    if (need_b) r[2] = conv2d_backward_bias(dout, g);
    return r;
  }
  const bool with_w = need_w && panel_weight_ok(g);
  auto pd = images<A>(dout), pw = dense<A>(weight);
  Tensor<A> dx = Tensor<A>::empty(g.x_shape()), dw;
  scratch_vector<A> sums(static_cast<size_t>(need_b ? g.N * g.C_out : 0));
  A* sp = need_b ? sums.data() : nullptr;
  if (with_w) {
    auto px = images<A>(x);
    dw = Tensor<A>::empty(g.w_shape());
    const Planes<A> xp = planes(px);
    panel_backward_sweep(planes(pd), pw.data(), dx.data(), dw.data(), g, sp, 0,
                         [xp](int64_t n0, int64_t, A*) { return std::make_pair(xp, n0); });
    r[1] = rounded<T>(dw);
  } else {
    panel_backward_input(planes(pd), pw.data(), dx.data(), g, sp);
    if (need_w) r[1] = conv2d_backward_weight(dout, x, g);
  }
  r[0] = rounded<T>(dx);
  if (need_b) r[2] = rounded<T>(conv_detail::bias_from_sums(sums, g));
  return r;
}

/// True when conv2d_backward_prepped applies to conv g: a float or double conv whose gradients
/// run as panel GEMMs (not depthwise).
template <class T>
bool backward_runs_panels(const Conv2dGeometry& g) {
  using namespace conv_detail;
  return !std::is_same_v<T, bfloat16> && !is_depthwise(g) && panel_ok(g) && panel_weight_ok(g);
}

/// {dx, dweight, dbias (if need_b)} of a conv whose input x is a function of the gradient wrt it,
/// in one sweep over chunks of images (where backward_runs_panels<T>(g)): prep(n0, gn, dx_chunk,
/// x_chunk) gets images n0 .. n0+gn-1's dx (gn dense images, just made) to turn in place into the
/// gradient returned, and writes their conv input into x_chunk. gelu_conv2d's backward: dx = dh,
/// turned into dh * gelu'(h), and x = gelu(h), so gelu(h) never exists for the whole batch. The
/// same bits as conv2d_backward_input, prep over the whole batch, then conv2d_backward_weight.
template <class T, class Prep>
std::array<Tensor<T>, 3> conv2d_backward_prepped(const Tensor<T>& dout, const Tensor<T>& weight,
                                                 const Conv2dGeometry& g, bool need_b, Prep prep) {
  using namespace conv_detail;
  DG_CHECK(backward_runs_panels<T>(g), "cpu::conv2d_backward_prepped: conv ", shape_str(g.x_shape()), " -> ",
           shape_str(g.out_shape()), " does not run as panel GEMMs here");
  auto pd = images<T>(dout), pw = dense<T>(weight);
  Tensor<T> dx = Tensor<T>::empty(g.x_shape()), dw = Tensor<T>::empty(g.w_shape());
  scratch_vector<T> sums(static_cast<size_t>(need_b ? g.N * g.C_out : 0));
  const int64_t img = g.C_in * g.H * g.W;
  T* px = dx.data();
  panel_backward_sweep(planes(pd), pw.data(), px, dw.data(), g, need_b ? sums.data() : nullptr, panel_images(g),
                       [&](int64_t n0, int64_t gn, T* xs) {
                         prep(n0, gn, px + n0 * img, xs);
                         return std::make_pair(Planes<T>{xs, img}, int64_t{0});
                       });
  return {dx, dw, need_b ? bias_from_sums(sums, g) : Tensor<T>()};
}

}  // namespace dg::cpu
