// densegrad/backend/cpu/conv.hpp: fast CPU conv2d kernels. Dense and grouped convs are
// im2col + Eigen GEMM per (image, group); 1x1 stride-1 unpadded convs skip im2col (the image
// already is the column matrix), and on tiny maps put several images side by side in one GEMM;
// stride-1 depthwise convs sweep zero-padded planes with register-blocked vector loops, other
// depthwise convs are direct loops over output rows. OpenMP splits images and channels. Not
// oneDNN, not Winograd/FFT; bfloat16 is widened to float, computed in float and rounded once.
// x and dout may be batch-strided views (cpu::batch_stride: a dense stage's prefix), read in
// place: every kernel finds image n at n * (its image stride), never at n * C * H * W.
// Tested against backend/ref/conv.hpp.
// Shape legend: as in backend/ref/conv.hpp; K = Cg*kH*kW (one column of im2col), P = Ho*Wo.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <vector>


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
  std::vector<A> own;
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

/// col (K, P) from one group's input planes x (Cg, H, W): row (c, kh, kw) of col holds, for
/// every output position, the input that tap (kh, kw) of channel c sees (0 in the padding).
template <class A>
void im2col(const A* x, A* col, const Conv2dGeometry& g) {
  const int64_t P = g.Ho * g.Wo;
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
            std::fill(r, r + g.Wo, A(0));
            continue;
          }
          const A* xr = x + (c * g.H + ih) * g.W;
          std::fill(r, r + lo, A(0));
          for (int64_t ow = lo; ow < hi; ++ow) r[ow] = xr[ow * g.sW + off];
          std::fill(r + hi, r + g.Wo, A(0));
        }
      }
}

/// The adjoint of im2col: dx (Cg, H, W) = 0, then every col entry is added back to the input
/// position it was copied from (+= : overlapping windows read one input several times).
template <class A>
void col2im(const A* col, A* dx, const Conv2dGeometry& g) {
  const int64_t P = g.Ho * g.Wo;
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
          A* xr = dx + (c * g.H + ih) * g.W;
          const A* r = row + oh * g.Wo;
          for (int64_t ow = lo; ow < hi; ++ow) xr[ow * g.sW + off] += r[ow];
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
    std::vector<A> col(pointwise ? 0 : static_cast<size_t>(K * P));
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
    std::vector<A> col(pointwise ? 0 : static_cast<size_t>(K * P));
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
  std::vector<A> part(static_cast<size_t>(copies * wsize), A(0));
  DENSEGRAD_OMP(parallel if (copies > 1 && jobs * OCg * K * P >= kParallelMinMacs) num_threads(static_cast<int>(copies))) {
    std::vector<A> col(pointwise ? 0 : static_cast<size_t>(K * P));
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
    std::vector<A> xs(static_cast<size_t>(C * G * P)), ys(static_cast<size_t>(OC * G * P));
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
    std::vector<A> ds(static_cast<size_t>(OC * G * P)), xs(static_cast<size_t>(C * G * P));
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
    std::vector<A> acc(static_cast<size_t>(taps * g.Wo), A(0));  // acc[tap][ow]
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
// short to vectorize well. With stride 1, each (image, channel) plane is first copied into a
// zero-bordered buffer of width Wp = W + 2*pW; an output then lives at flat index
// p = oh*Wp + ow of a plane of width Wp, and tap (kh, kw) reads the buffer at p + kh*dH*Wp +
// kw*dW. Every tap is ONE contiguous sweep over p in [0, (Ho-1)*Wp + Wo): long, unconditional,
// vectorized. The columns ow >= Wo of that sweep are scratch (computed, never stored).
// Taps that only ever read the border (a 7x7 kernel on a 3x3 map) are skipped, as in the ref
// kernel. The backward wrt the input is the same correlation of dout, padded by
// (k-1)*d - p, with the taps flipped.

/// Copies plane src (h, w) into buf, whose rows are wp wide, at row top and column left. The
/// rest of buf (the zero border) is zeroed once by the caller and never written here.
template <class A>
void copy_plane(const A* src, int64_t h, int64_t w, A* buf, int64_t wp, int64_t top, int64_t left) {
  for (int64_t i = 0; i < h; ++i) std::copy(src + i * w, src + (i + 1) * w, buf + (i + top) * wp + left);
}

/// True when tap offset k*d reads at least one in-plane row for some output row o in [0, no):
/// padded rows [k*d, k*d + no) meet the real rows [pad, pad + n).
inline bool tap_reads_plane(int64_t kd, int64_t no, int64_t pad, int64_t n) { return kd < pad + n && kd + no > pad; }

/// The geometry of the padded-plane sweeps of one depthwise conv (stride 1).
struct PlaneSweep {
  static constexpr int64_t kPacket = 16;  // sweeps go by 64 elements (4 AVX-512 registers of floats), then by 16
  int64_t Wp, Hp, L, Lr;           // buffer width and height, sweep length (Ho-1)*Wp + Wo, L rounded up to kPacket
  std::vector<int64_t> off, taps;  // buffer offset and weight index of every tap that reads the plane
  /// Buffer sizes: the last block of a sweep reads up to Lr - L elements past the plane (kept zero).
  size_t padded_size() const { return static_cast<size_t>(Hp * Wp + Lr - L); }
  PlaneSweep(const Conv2dGeometry& g, int64_t ph, int64_t pw, int64_t h, int64_t w, int64_t ho, int64_t wo, bool flip) {
    Wp = w + 2 * pw;
    Hp = h + 2 * ph;
    L = (ho - 1) * Wp + wo;
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
/// the tap, for every (image, channel) plane; w holds each channel's taps.
template <class A>
void plane_correlate(Planes<A> in, const A* w, const A* bias, A* out, const Conv2dGeometry& g, int64_t h, int64_t wd,
                     int64_t ph, int64_t pw, int64_t ho, int64_t wo, bool flip) {
  const int64_t C = g.C_in, jobs = g.N * C, taps = g.kH * g.kW;
  const PlaneSweep sw(g, ph, pw, h, wd, ho, wo, flip);
  const int64_t nt = static_cast<int64_t>(sw.off.size());
  DENSEGRAD_OMP(parallel if (jobs > 1 && jobs * h * wd * nt > 32768)) {
    std::vector<A> buf(sw.padded_size(), A(0)), acc(static_cast<size_t>(sw.Lr)), wv(static_cast<size_t>(nt));
    DENSEGRAD_OMP(for)
    for (int64_t j = 0; j < jobs; ++j) {
      const int64_t c = j % C;
      copy_plane(in.at(j / C) + c * h * wd, h, wd, buf.data(), sw.Wp, ph, pw);
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
      A* o = out + j * ho * wo;
      for (int64_t oh = 0; oh < ho; ++oh) std::copy(acc.data() + oh * sw.Wp, acc.data() + oh * sw.Wp + wo, o + oh * wo);
    }
  }
}

/// dweight[c, tap] = sum over images of the dot product of dout[n, c] (laid out at width Wp,
/// zero in the scratch columns) with the padded x[n, c] shifted by the tap. One channel per
/// job: no two jobs share a weight, so nothing needs a reduction across threads. Four taps at
/// a time share each load of dout.
template <class A>
void plane_backward_weight(Planes<A> dout, Planes<A> x, A* dw, const Conv2dGeometry& g) {
  using P = Packet<A>;
  const int64_t C = g.C_in, taps = g.kH * g.kW;
  const PlaneSweep sw(g, g.pH, g.pW, g.H, g.W, g.Ho, g.Wo, false);
  const int64_t nt = static_cast<int64_t>(sw.off.size());
  std::fill(dw, dw + C * taps, A(0));  // taps that only read the border get exactly 0
  DENSEGRAD_OMP(parallel if (C > 1 && g.N * C * g.H * g.W * nt > 32768)) {
    std::vector<A> buf(sw.padded_size(), A(0)), d(static_cast<size_t>(sw.Lr), A(0));
    std::vector<P> acc(static_cast<size_t>(nt));  // per tap: 16 partial sums, added up at the end
    DENSEGRAD_OMP(for)
    for (int64_t c = 0; c < C; ++c) {
      std::fill(acc.begin(), acc.end(), P::Zero());
      for (int64_t n = 0; n < g.N; ++n) {
        copy_plane(x.at(n) + c * g.H * g.W, g.H, g.W, buf.data(), sw.Wp, g.pH, g.pW);
        copy_plane(dout.at(n) + c * g.Ho * g.Wo, g.Ho, g.Wo, d.data(), sw.Wp, 0, 0);
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

/// Forward: out (N, C_out, Ho, Wo); bias may be undefined.
template <class T>
Tensor<T> conv2d_forward(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& bias,
                         const Conv2dGeometry& g) {
  using A = acc_t<T>;
  using namespace conv_detail;
  auto px = images<A>(x), pw = dense<A>(weight);
  DenseArray<A> pb;
  if (bias.defined()) pb = dense<A>(bias);
  const A* b = bias.defined() ? pb.data() : nullptr;
  Tensor<A> out = Tensor<A>::empty(g.out_shape());
  const Planes<A> xp = planes(px);
  if (plane_sweep_ok(g)) plane_correlate(xp, pw.data(), b, out.data(), g, g.H, g.W, g.pH, g.pW, g.Ho, g.Wo, false);
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
  if (plane_sweep_ok(g))  // dx = dout padded by (k-1)*d - p, correlated with the flipped taps
    plane_correlate(dp, pw.data(), static_cast<const A*>(nullptr), dx.data(), g, g.Ho, g.Wo,
                    (g.kH - 1) * g.dH - g.pH, (g.kW - 1) * g.dW - g.pW, g.H, g.W, true);
  else if (is_depthwise(g) && g.sW == 1) depthwise_backward_input<1>(dp, pw.data(), dx.data(), g);
  else if (is_depthwise(g)) depthwise_backward_input<0>(dp, pw.data(), dx.data(), g);
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
  if (plane_sweep_ok(g)) plane_backward_weight(dp, xp, dw.data(), g);
  else if (is_depthwise(g) && g.sW == 1) depthwise_backward_weight<1>(dp, xp, dw.data(), g);
  else if (is_depthwise(g)) depthwise_backward_weight<0>(dp, xp, dw.data(), g);
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
  // blocks of 16 channels, images inside: each image's block is one contiguous read
  const int64_t blocks = (g.C_out + 15) / 16;
  DENSEGRAD_OMP(parallel for if (blocks > 1 && g.N * g.C_out * P >= (int64_t(1) << 16)))
  for (int64_t ob = 0; ob < blocks; ++ob)
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t oc = ob * 16; oc < std::min(g.C_out, ob * 16 + 16); ++oc)
        o[oc] += plane_sum(d.at(n) + oc * P, P);
  return rounded<T>(db);
}

}  // namespace dg::cpu
