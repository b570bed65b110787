// densegrad/backend/cpu/norm.hpp: fast timm LayerNorm2d, forward and backward, straight on
// NCHW: the statistics over C of each pixel are read at channel stride H*W, so every inner loop
// runs over contiguous pixels and vectorizes (OpenMP simd) — no permute, no copy. x and dy may be
// batch-strided views (dg::batch_stride, core/tensor.hpp), read in place. Not a general layer
// norm (ref::layer_norm_forward serves that); ref::layer_norm2d_* is its oracle.
// Shape legend: x, dy: (N, C, H, W) batch-strided; y, dx: (N, C, H, W) contiguous, P = H * W
// pixels per image; weight, bias: (C) contiguous or undefined; mean, rstd: (N, H, W) in acc_t<T>.
#pragma once

#include "parallel.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "../ref/norm.hpp"  // LayerNormForward / LayerNormGrads: the fast path returns what the oracle returns


namespace dg::cpu {

using dg::batch_stride;  // core/tensor.hpp: the layout the fast kernels read in place

namespace detail {
/// Pixels per task: a tile of all C channels stays in L2 (C * 256 * 4 bytes = 64 KB at C = 64).
constexpr int64_t kNormTile = 256;
/// Below this many elements one thread is faster than waking the others.
constexpr int64_t kNormParallelMin = int64_t(1) << 15;

/// The forward's last pass over one tile of len pixels (channel c at xt + c * P, yt + c * P):
/// y = (x - mean) * rstd * weight[c] + bias[c], with mean and rstd of the tile's pixels.
template <class T, class A>
void layer_norm2d_tile_out(const T* xt, T* yt, int64_t C, int64_t P, int64_t len, const A* mean, const A* rstd,
                           const T* pw, const T* pb) {
  for (int64_t c = 0; c < C; ++c) {
    const T* xc = xt + c * P;
    T* yc = yt + c * P;
    const A w = pw ? A(pw[c]) : A(1), b = pb ? A(pb[c]) : A(0);
    DENSEGRAD_OMP(simd)
    for (int64_t p = 0; p < len; ++p) yc[p] = T((A(xc[p]) - mean[p]) * rstd[p] * w + b);
  }
}

/// The statistics passes of one task (len pixels of an image; channel c at xt + c * P): mean and
/// variance (two-pass: no cancellation), then rstd = 1 / sqrt(var + eps), into mean[0, len) and
/// rstd[0, len).
template <class T, class A>
void layer_norm2d_tile_stats(const T* xt, int64_t C, int64_t P, int64_t len, A eps, A* mean, A* rstd) {
  const A inv_c = A(1) / A(C);
  for (int64_t p = 0; p < len; ++p) mean[p] = rstd[p] = A(0);
  for (int64_t c = 0; c < C; ++c) {
    const T* xc = xt + c * P;
    DENSEGRAD_OMP(simd)
    for (int64_t p = 0; p < len; ++p) mean[p] += A(xc[p]);
  }
  for (int64_t p = 0; p < len; ++p) mean[p] *= inv_c;
  for (int64_t c = 0; c < C; ++c) {  // rstd holds the sum of squared deviations for now
    const T* xc = xt + c * P;
    DENSEGRAD_OMP(simd)
    for (int64_t p = 0; p < len; ++p) rstd[p] += (A(xc[p]) - mean[p]) * (A(xc[p]) - mean[p]);
  }
  DENSEGRAD_OMP(simd)
  for (int64_t p = 0; p < len; ++p) rstd[p] = A(1) / std::sqrt(rstd[p] * inv_c + eps);  // biased var
}

/// The (N, H, W) statistics tensors of x, and for each task (image n, tiles of kNormTile pixels)
/// f(n, p0, len, x's tile, its mean, its rstd) after the task's statistics are made; tasks split
/// over the threads. x: batch-strided.
template <class T, class F>
std::pair<Tensor<acc_t<T>>, Tensor<acc_t<T>>> layer_norm2d_tasks(const Tensor<T>& x, double eps, const char* op, F f) {
  using A = acc_t<T>;
  const int64_t xs = batch_stride(x);  // image n of x starts at n * xs
  DG_CHECK(xs >= 0, op, ": expected a contiguous or batch-strided (N, C, H, W) input, got shape ",
           shape_str(x.shape()), " strides ", shape_str(x.strides()));
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3), tiles = (P + kNormTile - 1) / kNormTile;
  Tensor<A> mean = Tensor<A>::empty({N, x.size(2), x.size(3)}), rstd = Tensor<A>::empty({N, x.size(2), x.size(3)});
  const T* px = x.data();
  A *pmean = mean.data(), *prstd = rstd.data();
  const A a_eps = A(eps);
  DENSEGRAD_OMP(parallel for schedule(static) if (N * C * P >= kNormParallelMin))
  for (int64_t task = 0; task < N * tiles; ++task) {
    const int64_t n = task / tiles, p0 = (task % tiles) * kNormTile, len = std::min(kNormTile, P - p0);
    const T* xt = px + n * xs + p0;  // channel c of this tile: xt + c * P
    A *m = pmean + n * P + p0, *r = prstd + n * P + p0;
    layer_norm2d_tile_stats(xt, C, P, len, a_eps, m, r);
    f(n, p0, len, xt, m, r);
  }
  return {mean, rstd};
}
}  // namespace detail

/// timm LayerNorm2d forward on NCHW (= ref::layer_norm2d_forward). Each task takes one image
/// and a tile of up to 256 pixels and makes three passes over its channels: mean, variance
/// (two-pass: no cancellation), output. x: batch-strided; y comes back contiguous.
template <class T>
ref::LayerNormForward<T> layer_norm2d_forward(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& bias,
                                              double eps) {
  using A = acc_t<T>;
  Tensor<T> y = Tensor<T>::empty(x.shape());
  const T *pw = weight.defined() ? weight.data() : nullptr, *pb = bias.defined() ? bias.data() : nullptr;
  T* py = y.data();
  const int64_t C = x.size(1), P = x.size(2) * x.size(3);
  auto [mean, rstd] = detail::layer_norm2d_tasks(
      x, eps, "cpu::layer_norm2d_forward", [&](int64_t n, int64_t p0, int64_t len, const T* xt, const A* m, const A* r) {
        detail::layer_norm2d_tile_out(xt, py + n * C * P + p0, C, P, len, m, r, pw, pb);
      });
  return {y, mean, rstd};
}

/// layer_norm2d_forward's statistics alone ((N, H, W) mean and rstd, the same bits), for a fused op
/// that applies them later chunk by chunk (layer_norm2d_apply_image). x: batch-strided.
template <class T>
std::pair<Tensor<acc_t<T>>, Tensor<acc_t<T>>> layer_norm2d_stats(const Tensor<T>& x, double eps) {
  return detail::layer_norm2d_tasks(x, eps, "cpu::layer_norm2d_stats",
                                    [](int64_t, int64_t, int64_t, const T*, const acc_t<T>*, const acc_t<T>*) {});
}

/// layer_norm2d_forward's output for one image (C planes of P pixels at src, dense) into dst from
/// its statistics (mean, rstd: P each): the forward's last pass, tile by tile, so the same bits.
template <class T>
void layer_norm2d_apply_image(const T* src, T* dst, int64_t C, int64_t P, const acc_t<T>* mean, const acc_t<T>* rstd,
                              const T* weight, const T* bias) {
  for (int64_t p0 = 0; p0 < P; p0 += detail::kNormTile)
    detail::layer_norm2d_tile_out(src + p0, dst + p0, C, P, std::min(detail::kNormTile, P - p0), mean + p0, rstd + p0,
                                  weight, bias);
}

/// layer_norm2d_forward's output from statistics it gave before for this x (mean, rstd: (N, H, W)):
/// its last pass only, so the same bits without the two passes that make the statistics. What a
/// fused op's backward uses to make the normalized tensor again. x: batch-strided; y contiguous.
template <class T>
Tensor<T> layer_norm2d_apply(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& bias,
                             const Tensor<acc_t<T>>& mean, const Tensor<acc_t<T>>& rstd) {
  using A = acc_t<T>;
  const int64_t xs = batch_stride(x);
  DG_CHECK(xs >= 0 && x.dim() == 4 && mean.is_contiguous() && rstd.is_contiguous() &&
               mean.shape() == Shape({x.size(0), x.size(2), x.size(3)}) && rstd.shape() == mean.shape(),
           "cpu::layer_norm2d_apply: expected a contiguous or batch-strided (N, C, H, W) input and its (N, H, W) "
           "statistics, got x ", shape_str(x.shape()), " strides ", shape_str(x.strides()), ", mean ",
           shape_str(mean.shape()), ", rstd ", shape_str(rstd.shape()));
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3), tiles = (P + detail::kNormTile - 1) / detail::kNormTile;
  Tensor<T> y = Tensor<T>::empty(x.shape());
  const T *px = x.data(), *pw = weight.defined() ? weight.data() : nullptr, *pb = bias.defined() ? bias.data() : nullptr;
  T* py = y.data();
  const A *pmean = mean.data(), *prstd = rstd.data();
  DENSEGRAD_OMP(parallel for schedule(static) if (N * C * P >= detail::kNormParallelMin))
  for (int64_t task = 0; task < N * tiles; ++task) {
    const int64_t n = task / tiles, p0 = (task % tiles) * detail::kNormTile, len = std::min(detail::kNormTile, P - p0);
    detail::layer_norm2d_tile_out(px + n * xs + p0, py + n * C * P + p0, C, P, len, pmean + n * P + p0,
                                  prstd + n * P + p0, pw, pb);
  }
  return y;
}

namespace detail {
/// The backward of one task (image n, len pixels from p0; xt, dyt, dxt at that image's pixel p0,
/// channel c at + c * P): dweight and dbias's partial sums of the task into dw[c], db[c], and
/// (dxt not null) dx. dxt may be dyt: each channel's dy is read before its dx is written.
template <class T, class A>
void layer_norm2d_backward_tile(const T* xt, const T* dyt, T* dxt, int64_t C, int64_t P, int64_t len, const A* m,
                                const A* r, const T* pw, A* dw, A* db) {
  const A inv_c = A(1) / A(C);
  A s1[kNormTile], s2[kNormTile];  // per pixel: sum_c dnorm, sum_c dnorm * xhat
  std::fill_n(s1, len, A(0));
  std::fill_n(s2, len, A(0));
  for (int64_t c = 0; c < C; ++c) {
    const T *xc = xt + c * P, *dyc = dyt + c * P;
    const A w = pw ? A(pw[c]) : A(1);
    A dw_c = 0, db_c = 0;
    DENSEGRAD_OMP(simd reduction(+ : dw_c, db_c))
    for (int64_t p = 0; p < len; ++p) {
      const A xhat = (A(xc[p]) - m[p]) * r[p], d = A(dyc[p]);
      s1[p] += d * w;
      s2[p] += d * w * xhat;
      dw_c += d * xhat;
      db_c += d;
    }
    dw[c] = dw_c;
    db[c] = db_c;
  }
  if (!dxt) return;
  for (int64_t p = 0; p < len; ++p) {
    s1[p] *= inv_c;
    s2[p] *= inv_c;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T *xc = xt + c * P, *dyc = dyt + c * P;
    T* dxc = dxt + c * P;
    const A w = pw ? A(pw[c]) : A(1);
    DENSEGRAD_OMP(simd)
    for (int64_t p = 0; p < len; ++p) {
      const A xhat = (A(xc[p]) - m[p]) * r[p];
      dxc[p] = T(r[p] * (A(dyc[p]) * w - s1[p] - xhat * s2[p]));
    }
  }
}
}  // namespace detail

/// The norm weight's and bias's gradients as partial sums, a row of C per task (task = image *
/// tiles + tile, tiles of kNormTile pixels), added up over the tasks in order by sum(): the same
/// bits however the tasks were split over threads or chunks of images.
template <class A>
struct LayerNorm2dParamGrads {
  int64_t N, C, P, tiles;
  scratch_buffer<A> dw, db;  // (N * tiles, C); each task writes its rows whole
  LayerNorm2dParamGrads(int64_t n, int64_t c, int64_t p)
      : N(n), C(c), P(p), tiles((p + detail::kNormTile - 1) / detail::kNormTile),
        dw(static_cast<size_t>(n * tiles * c)), db(dw.size()) {}
  /// Task t's rows.
  A* dw_row(int64_t t) { return dw.data() + t * C; }
  A* db_row(int64_t t) { return db.data() + t * C; }
  template <class T>
  Tensor<T> sum(const scratch_buffer<A>& part) const {
    scratch_vector<A> s(static_cast<size_t>(C), A(0));
    for (int64_t task = 0; task < N * tiles; ++task)
      for (int64_t c = 0; c < C; ++c) s[c] += part[task * C + c];
    Tensor<T> t = Tensor<T>::empty({C});
    for (int64_t c = 0; c < C; ++c) t.data()[c] = T(s[c]);
    return t;
  }
};

/// timm LayerNorm2d backward on NCHW (= ref::layer_norm2d_backward), from the saved mean/rstd:
///   dx = rstd * (dnorm - mean_c(dnorm) - xhat * mean_c(dnorm * xhat)), dnorm = dy * weight[c]
///   dweight[c] = sum over (n, pixels) of dy * xhat, dbias[c] = sum of dy.
/// dweight/dbias are summed per task first (each task owns a row of partial sums, so no two
/// threads write one slot), then over tasks in order: the same bits for any thread count.
/// dy and x: batch-strided (each with its own image stride); dx comes back contiguous.
template <class T>
ref::LayerNormGrads<T> layer_norm2d_backward(const Tensor<T>& dy, const Tensor<T>& x, const Tensor<acc_t<T>>& mean,
                                             const Tensor<acc_t<T>>& rstd, const Tensor<T>& weight, bool need_dx,
                                             bool need_dweight, bool need_dbias) {
  using A = acc_t<T>;
  const int64_t xs = batch_stride(x), ds = batch_stride(dy);  // image n of x at n * xs, of dy at n * ds
  DG_CHECK(xs >= 0 && ds >= 0 && dy.shape() == x.shape() && mean.is_contiguous() && rstd.is_contiguous() &&
               mean.numel() == x.size(0) * x.size(2) * x.size(3),
           "cpu::layer_norm2d_backward: expected contiguous or batch-strided dy and x of one (N, C, H, W) shape and "
           "the saved (N, H, W) statistics, got dy ", shape_str(dy.shape()), " strides ", shape_str(dy.strides()),
           ", x ", shape_str(x.shape()), " strides ", shape_str(x.strides()), ", mean ", shape_str(mean.shape()));
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  ref::LayerNormGrads<T> g;
  if (need_dx) g.dx = Tensor<T>::empty(x.shape());
  const T *px = x.data(), *pdy = dy.data(), *pw = weight.defined() ? weight.data() : nullptr;
  T* pdx = need_dx ? g.dx.data() : nullptr;
  const A *pmean = mean.data(), *prstd = rstd.data();
  LayerNorm2dParamGrads<A> parts(N, C, P);
  const int64_t tiles = parts.tiles;
  DENSEGRAD_OMP(parallel for schedule(static) if (N * C * P >= detail::kNormParallelMin))
  for (int64_t task = 0; task < N * tiles; ++task) {
    const int64_t n = task / tiles, p0 = (task % tiles) * detail::kNormTile, len = std::min(detail::kNormTile, P - p0);
    detail::layer_norm2d_backward_tile(px + n * xs + p0, pdy + n * ds + p0, pdx ? pdx + n * C * P + p0 : nullptr, C, P,
                                       len, pmean + n * P + p0, prstd + n * P + p0, pw, parts.dw_row(task),
                                       parts.db_row(task));
  }
  if (need_dweight) g.dweight = parts.template sum<T>(parts.dw);
  if (need_dbias) g.dbias = parts.template sum<T>(parts.db);
  return g;
}

/// layer_norm2d_apply and layer_norm2d_backward on images n0 .. n0+gn-1 alone, on the calling
/// thread: y (gn dense images) <- the normalized tensor, and d (gn dense images) turned from dy
/// into dx in place (need_dx; else only read), the tasks' partial sums into parts. What a fused
/// op's backward runs chunk by chunk of images (layer_norm2d_conv2d): the same bits as the two
/// over the whole batch. x: batch-strided; weight, bias, mean, rstd as for those two.
template <class T>
void layer_norm2d_apply_backward_images(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& bias,
                                        const Tensor<acc_t<T>>& mean, const Tensor<acc_t<T>>& rstd, int64_t n0,
                                        int64_t gn, T* y, T* d, bool need_dx, LayerNorm2dParamGrads<acc_t<T>>& parts) {
  const int64_t xs = batch_stride(x), C = parts.C, P = parts.P, tiles = parts.tiles;
  const T *px = x.data(), *pw = weight.defined() ? weight.data() : nullptr, *pb = bias.defined() ? bias.data() : nullptr;
  for (int64_t task = n0 * tiles; task < (n0 + gn) * tiles; ++task) {
    const int64_t n = task / tiles, p0 = (task % tiles) * detail::kNormTile, len = std::min(detail::kNormTile, P - p0);
    const int64_t at = (n - n0) * C * P + p0;  // in y and d
    const acc_t<T>*m = mean.data() + n * P + p0, *r = rstd.data() + n * P + p0;
    detail::layer_norm2d_tile_out(px + n * xs + p0, y + at, C, P, len, m, r, pw, pb);
    detail::layer_norm2d_backward_tile(px + n * xs + p0, d + at, need_dx ? d + at : nullptr, C, P, len, m, r, pw,
                                       parts.dw_row(task), parts.db_row(task));
  }
}

}  // namespace dg::cpu
