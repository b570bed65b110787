// densegrad/backend/cuda/norm.cuh: layer norm on CUDA, forward and backward: over the last k dims
// of a contiguous tensor (a warp per row, or a block for rows over 1024 elements), and timm's
// LayerNorm2d straight on NCHW (blocks of 32 pixels x 8 warps splitting the channels, which lie
// at stride H*W; no permute).
// Also the warp/block reductions and row geometry that softmax.cuh and pool.cuh reuse (rowwise::).
// float and double only; sums in acc_t<T>, variance two-pass. ref::layer_norm_* is the oracle.
// Shape legend: x, y, dy, dx: (*outer, *normalized), rows = prod(outer), n = prod(normalized);
// weight, bias: (*normalized) or undefined; mean, rstd: (*outer) in acc_t<T>.
// NCHW: x, y, dy, dx: (N, C, H, W), P = H * W pixels; weight, bias: (C); mean, rstd: (N, H, W).
#pragma once

#include <climits>
#include <type_traits>

#include "../ref/norm.hpp"  // LayerNormForward / LayerNormGrads: the CUDA path returns what the oracle returns
#include "common.cuh"

namespace dg::cuda {

// ---------------------------------------------------------------- rowwise: shared by row kernels

namespace rowwise {

/// Sum over the 32 lanes of a warp. The xor butterfly hands every lane the same bits.
template <class A>
__device__ inline A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
/// Max over the 32 lanes of a warp (a NaN is not propagated; the sums that follow carry it).
template <class A>
__device__ inline A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) {
    const A other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

/// Sum (or max) over a 1-D block whose size is a multiple of 32, at most 1024; every thread gets
/// the result. Must be reached by all threads of the block; may be called back to back.
template <class A, bool kMax = false>
__device__ inline A block_reduce(A v) {
  __shared__ A part[33];  // one slot per warp, then the total in part[32]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  auto warp_reduce = [](A u) {
    if constexpr (kMax) return warp_max(u);
    else return warp_sum(u);
  };
  v = warp_reduce(v);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    // lanes past the last warp pad with a neutral value: 0 for the sum, part[0] for the max
    A s = lane < warps ? part[lane] : kMax ? part[0] : A(0);
    s = warp_reduce(s);
    if (lane == 0) part[32] = s;
  }
  __syncthreads();
  const A total = part[32];
  __syncthreads();  // everyone has read part before a next call overwrites it
  return total;
}
template <class A>
__device__ inline A block_sum(A v) { return block_reduce<A, false>(v); }
template <class A>
__device__ inline A block_max(A v) { return block_reduce<A, true>(v); }

/// Which threads work on which row: a warp per row (kBlockRow false: `warps per block` rows per
/// block) or the whole block per row. Rows are visited first, first + step, ...; within a row
/// the thread takes elements lane, lane + width, ...
struct RowGrid {
  int64_t first, step;
  int lane, width;
};
template <bool kBlockRow>
__device__ inline RowGrid row_grid() {
  if constexpr (kBlockRow) return {int64_t(blockIdx.x), int64_t(gridDim.x), int(threadIdx.x), int(blockDim.x)};
  const int warps = blockDim.x >> 5;
  return {int64_t(blockIdx.x) * warps + (threadIdx.x >> 5), int64_t(gridDim.x) * warps, int(threadIdx.x & 31), 32};
}
/// Sum / max over the threads that share a row.
template <bool kBlockRow, class A>
__device__ inline A row_sum(A v) {
  if constexpr (kBlockRow) return block_sum(v);
  else return warp_sum(v);
}
template <bool kBlockRow, class A>
__device__ inline A row_max(A v) {
  if constexpr (kBlockRow) return block_max(v);
  else return warp_max(v);
}

/// Launch geometry of a row kernel: a warp per row up to kWarpRowMax elements, else a block.
constexpr int64_t kWarpRowMax = 1024;
struct RowLaunch {
  bool block_per_row;
  unsigned blocks;
  int threads;
};
inline RowLaunch row_launch(int64_t rows, int64_t n) {
  constexpr int64_t kMaxBlocks = 65535 * 8;  // rows beyond this are looped over (RowGrid::step)
  if (n > kWarpRowMax) return {true, unsigned(rows < kMaxBlocks ? rows : kMaxBlocks), kThreads};
  return {false, blocks_for(rows * 32, kThreads), kThreads};
}

/// a * b rounded on its own, never fused with a neighbouring add: a product computed twice stays
/// bit-equal, so dnorm - mean(dnorm) is exactly 0 when a row has one element (as in ref).
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }

/// t's data, or nullptr when t is undefined (optional weight, bias and gradients).
template <class T>
T* data_or_null(const Tensor<T>& t) { return t.defined() ? t.data() : nullptr; }

}  // namespace rowwise

// ---------------------------------------------------------------- kernels

namespace norm_detail {

/// One row per warp or block: mean, then the biased variance about it (two passes over the row,
/// the second from cache), then y = (x - mean) * rstd * weight + bias.
template <class T, bool kBlockRow>
__global__ void layer_norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                          T* __restrict__ y, acc_t<T>* __restrict__ mean,
                                          acc_t<T>* __restrict__ rstd, int64_t rows, int64_t n, acc_t<T> eps) {
  using A = acc_t<T>;
  const rowwise::RowGrid g = rowwise::row_grid<kBlockRow>();
  for (int64_t row = g.first; row < rows; row += g.step) {
    const T* xr = x + row * n;
    T* yr = y + row * n;
    A s = 0;
    for (int64_t j = g.lane; j < n; j += g.width) s += A(xr[j]);
    const A m = rowwise::row_sum<kBlockRow>(s) / A(n);
    A ss = 0;
    for (int64_t j = g.lane; j < n; j += g.width) {
      const A d = A(xr[j]) - m;
      ss += d * d;
    }
    const A r = A(1) / std::sqrt(rowwise::row_sum<kBlockRow>(ss) / A(n) + eps);
    for (int64_t j = g.lane; j < n; j += g.width)
      yr[j] = T((A(xr[j]) - m) * r * (w ? A(w[j]) : A(1)) + (b ? A(b[j]) : A(0)));
    if (g.lane == 0) {
      mean[row] = m;
      rstd[row] = r;
    }
  }
}

/// dx of one row per warp or block: dx = rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat)).
template <class T, bool kBlockRow>
__global__ void layer_norm_backward_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                              const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd,
                                              const T* __restrict__ w, T* __restrict__ dx, int64_t rows, int64_t n) {
  using A = acc_t<T>;
  const rowwise::RowGrid g = rowwise::row_grid<kBlockRow>();
  for (int64_t row = g.first; row < rows; row += g.step) {
    const T *xr = x + row * n, *dyr = dy + row * n;
    const A m = mean[row], r = rstd[row];
    A s1 = 0, s2 = 0;  // sum of dnorm, sum of dnorm * xhat
    for (int64_t j = g.lane; j < n; j += g.width) {
      const A xhat = (A(xr[j]) - m) * r, dnorm = rowwise::mul_rn(A(dyr[j]), w ? A(w[j]) : A(1));
      s1 += dnorm;
      s2 += dnorm * xhat;
    }
    s1 = rowwise::row_sum<kBlockRow>(s1) / A(n);
    s2 = rowwise::row_sum<kBlockRow>(s2) / A(n);
    T* dxr = dx + row * n;
    for (int64_t j = g.lane; j < n; j += g.width) {
      const A xhat = (A(xr[j]) - m) * r, dnorm = rowwise::mul_rn(A(dyr[j]), w ? A(w[j]) : A(1));
      dxr[j] = T(r * (dnorm - s1 - xhat * s2));
    }
  }
}

/// dweight[j] = sum over rows of dy * xhat, dbias[j] = sum of dy. A block takes 32 adjacent
/// columns (coalesced reads); its 16 thread rows split the rows (row ty, ty + 16, ...), and thread
/// row 0 adds the 16 partial sums in order: the same bits on every run.
constexpr int kColTile = 32, kColSplit = 16;
template <class T>
__global__ void layer_norm_backward_dwb_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                               const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd,
                                               T* __restrict__ dw, T* __restrict__ db, int64_t rows, int64_t n) {
  using A = acc_t<T>;
  __shared__ A sw[kColSplit][kColTile], sb[kColSplit][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = int64_t(blockIdx.x) * kColTile + tx;
  A aw = 0, ab = 0;
  if (j < n)
    for (int64_t row = ty; row < rows; row += kColSplit) {
      const A d = A(dy[row * n + j]);
      aw += d * ((A(x[row * n + j]) - mean[row]) * rstd[row]);
      ab += d;
    }
  sw[ty][tx] = aw;
  sb[ty][tx] = ab;
  __syncthreads();
  if (ty == 0 && j < n) {
    for (int k = 1; k < kColSplit; ++k) {
      aw += sw[k][tx];
      ab += sb[k][tx];
    }
    if (dw) dw[j] = T(aw);
    if (db) db[j] = T(ab);
  }
}

/// Threads per pixel in the LayerNorm2d kernels: a block is 32 pixels (the lanes) x kNormGroups
/// warps, warp g taking channels g, g + kNormGroups, ... of its lane's pixel. Lanes read adjacent
/// pixels of a channel plane (coalesced); the warps' partial sums meet in shared memory; and a
/// block holds few pixels at a time, so the second and third passes over them find the channels
/// still in cache (a thread per pixel kept so many pixels in flight that every pass went to DRAM,
/// and left small images, 14x14 x 64, with too few threads to fill the GPU).
constexpr int kNormGroups = 8;

/// The sum over the block's warps of v, for this thread's lane (every warp gets it).
template <class A>
__device__ inline A sum_over_groups(A v, A (*part)[33]) {
  part[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  A s = 0;
  for (int q = 0; q < kNormGroups; ++q) s += part[q][threadIdx.x];
  __syncthreads();  // part is read by all before a next call overwrites it
  return s;
}

/// LayerNorm2d forward, blocks of 32 pixels x kNormGroups warps (see kNormGroups); pixel i = n * P + p
/// is also the index of mean/rstd. Two-pass variance, as the ref kernel.
template <class T>
__global__ void layer_norm2d_forward_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                            const T* __restrict__ b, T* __restrict__ y, acc_t<T>* __restrict__ mean,
                                            acc_t<T>* __restrict__ rstd, int64_t N, int64_t C, int64_t P,
                                            acc_t<T> eps) {
  using A = acc_t<T>;
  __shared__ A part[kNormGroups][33];
  const int64_t i = int64_t(blockIdx.x) * 32 + threadIdx.x;
  const bool ok = i < N * P;
  const int64_t nn = ok ? i / P : 0, p = ok ? i - nn * P : 0;
  const T* xp = x + nn * C * P + p;  // channel c of this pixel: xp[c * P]
  T* yp = y + nn * C * P + p;
  A s = 0;
  if (ok)
    for (int64_t c = threadIdx.y; c < C; c += kNormGroups) s += A(xp[c * P]);
  const A m = sum_over_groups(s, part) / A(C);
  A ss = 0;
  if (ok)
    for (int64_t c = threadIdx.y; c < C; c += kNormGroups) {
      const A d = A(xp[c * P]) - m;
      ss += d * d;
    }
  const A r = A(1) / std::sqrt(sum_over_groups(ss, part) / A(C) + eps);
  if (!ok) return;
  for (int64_t c = threadIdx.y; c < C; c += kNormGroups)
    yp[c * P] = T((A(xp[c * P]) - m) * r * (w ? A(w[c]) : A(1)) + (b ? A(b[c]) : A(0)));
  if (threadIdx.y == 0) {
    mean[i] = m;
    rstd[i] = r;
  }
}

/// LayerNorm2d dx, blocks as the forward's, the row formula of layer_norm_backward_dx_kernel over C.
template <class T>
__global__ void layer_norm2d_backward_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                const acc_t<T>* __restrict__ mean,
                                                const acc_t<T>* __restrict__ rstd, const T* __restrict__ w,
                                                T* __restrict__ dx, int64_t N, int64_t C, int64_t P) {
  using A = acc_t<T>;
  __shared__ A part[kNormGroups][33];
  const int64_t i = int64_t(blockIdx.x) * 32 + threadIdx.x;
  const bool ok = i < N * P;
  const int64_t nn = ok ? i / P : 0, p = ok ? i - nn * P : 0, base = nn * C * P + p;
  const A m = ok ? mean[i] : A(0), r = ok ? rstd[i] : A(0);
  A s1 = 0, s2 = 0;
  if (ok)
    for (int64_t c = threadIdx.y; c < C; c += kNormGroups) {
      const A xhat = (A(x[base + c * P]) - m) * r, dnorm = rowwise::mul_rn(A(dy[base + c * P]), w ? A(w[c]) : A(1));
      s1 += dnorm;
      s2 += dnorm * xhat;
    }
  s1 = sum_over_groups(s1, part) / A(C);
  s2 = sum_over_groups(s2, part) / A(C);
  if (!ok) return;
  for (int64_t c = threadIdx.y; c < C; c += kNormGroups) {
    const A xhat = (A(x[base + c * P]) - m) * r, dnorm = rowwise::mul_rn(A(dy[base + c * P]), w ? A(w[c]) : A(1));
    dx[base + c * P] = T(r * (dnorm - s1 - xhat * s2));
  }
}

/// LayerNorm2d dweight/dbias: one block per channel c sums dy * xhat and dy over its N * P
/// elements (plane n of channel c starts at (n * C + c) * P), then a block reduction.
template <class T>
__global__ void layer_norm2d_backward_dwb_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                 const acc_t<T>* __restrict__ mean,
                                                 const acc_t<T>* __restrict__ rstd, T* __restrict__ dw,
                                                 T* __restrict__ db, int64_t N, int64_t C, int64_t P) {
  using A = acc_t<T>;
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    A aw = 0, ab = 0;
    // pixel i = nn * P + p, stepped without a division per element
    int64_t nn = threadIdx.x / P, p = threadIdx.x - nn * P;
    const int64_t step_n = blockDim.x / P, step_p = blockDim.x - step_n * P;
    for (int64_t i = threadIdx.x; i < N * P; i += blockDim.x) {
      const int64_t off = (nn * C + c) * P + p;
      const A d = A(dy[off]);
      aw += d * ((A(x[off]) - mean[i]) * rstd[i]);
      ab += d;
      nn += step_n;
      p += step_p;
      if (p >= P) {
        p -= P;
        ++nn;
      }
    }
    aw = rowwise::block_sum(aw);
    ab = rowwise::block_sum(ab);
    if (threadIdx.x == 0) {
      if (dw) dw[c] = T(aw);
      if (db) db[c] = T(ab);
    }
  }
}

template <class T>
constexpr void check_float_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "CUDA norm kernels: float or double only");
}

}  // namespace norm_detail

// ---------------------------------------------------------------- launchers

/// y = layer_norm(x) over the last k dims of contiguous x, with the row mean and rstd that backward
/// needs (= ref::layer_norm_forward; torch.nn.functional.layer_norm). weight/bias may be undefined.
template <class T>
ref::LayerNormForward<T> layer_norm_forward(const Tensor<T>& x, int64_t k, const Tensor<T>& w, const Tensor<T>& b,
                                            double eps) {
  norm_detail::check_float_type<T>();
  using A = acc_t<T>;
  const Device dev = x.device();
  DG_CHECK(dev.is_cuda() && x.is_contiguous(), "cuda::layer_norm_forward: expected a contiguous CUDA input, got ",
           shape_str(x.shape()), " on ", dev.str());
  DG_CHECK(k >= 0 && k <= x.dim(), "cuda::layer_norm_forward: expected 0 <= k <= ", x.dim(),
           " normalized dims, got k = ", k, " for input ", shape_str(x.shape()));
  check_device<T>("cuda::layer_norm_forward", dev, {&w, &b});
  const Shape outer(x.shape().begin(), x.shape().end() - k), inner(x.shape().end() - k, x.shape().end());
  const int64_t rows = shape_numel(outer), n = shape_numel(inner);
  for (const Tensor<T>* p : {&w, &b})
    DG_CHECK(!p->defined() || (p->is_contiguous() && p->numel() == n), "cuda::layer_norm_forward: expected a "
             "contiguous weight/bias of ", n, " elements, got ", shape_str(p->shape()));
  ref::LayerNormForward<T> r{empty<T>(x.shape(), dev), empty<A>(outer, dev), empty<A>(outer, dev)};
  if (rows == 0) return r;
  const rowwise::RowLaunch L = rowwise::row_launch(rows, n);
  const T *pw = rowwise::data_or_null(w), *pb = rowwise::data_or_null(b);
  if (L.block_per_row)
    norm_detail::layer_norm_forward_kernel<T, true><<<L.blocks, L.threads, 0, stream()>>>(
        x.data(), pw, pb, r.y.data(), r.mean.data(), r.rstd.data(), rows, n, A(eps));
  else
    norm_detail::layer_norm_forward_kernel<T, false><<<L.blocks, L.threads, 0, stream()>>>(
        x.data(), pw, pb, r.y.data(), r.mean.data(), r.rstd.data(), rows, n, A(eps));
  check_launch("cuda::layer_norm_forward");
  return r;
}

/// Gradients of layer_norm_forward from the saved mean/rstd (= ref::layer_norm_backward); only the
/// requested members are defined. dweight/dbias are summed over rows in a fixed order.
template <class T>
ref::LayerNormGrads<T> layer_norm_backward(const Tensor<T>& dy, const Tensor<T>& x, const Tensor<acc_t<T>>& mean,
                                           const Tensor<acc_t<T>>& rstd, const Tensor<T>& w, int64_t k, bool need_x,
                                           bool need_w, bool need_b) {
  norm_detail::check_float_type<T>();
  const Device dev = x.device();
  DG_CHECK(dev.is_cuda() && x.is_contiguous() && dy.is_contiguous() && dy.shape() == x.shape(),
           "cuda::layer_norm_backward: expected contiguous CUDA dy and x of one shape, got dy ", shape_str(dy.shape()),
           ", x ", shape_str(x.shape()), " on ", dev.str());
  DG_CHECK(k >= 0 && k <= x.dim(), "cuda::layer_norm_backward: expected 0 <= k <= ", x.dim(), ", got k = ", k);
  check_device<T>("cuda::layer_norm_backward", dev, {&dy, &w});
  check_device<acc_t<T>>("cuda::layer_norm_backward", dev, {&mean, &rstd});
  const Shape outer(x.shape().begin(), x.shape().end() - k), inner(x.shape().end() - k, x.shape().end());
  const int64_t rows = shape_numel(outer), n = shape_numel(inner);
  DG_CHECK(mean.is_contiguous() && rstd.is_contiguous() && mean.numel() == rows && rstd.numel() == rows,
           "cuda::layer_norm_backward: mean/rstd must be the contiguous (*outer) tensors forward saved, got ",
           shape_str(mean.shape()), " for input ", shape_str(x.shape()));
  DG_CHECK(!w.defined() || (w.is_contiguous() && w.numel() == n), "cuda::layer_norm_backward: expected a "
           "contiguous weight of ", n, " elements, got ", shape_str(w.shape()));
  ref::LayerNormGrads<T> g;
  if (need_x) g.dx = empty<T>(x.shape(), dev);
  if (need_w) g.dweight = empty<T>(inner, dev);
  if (need_b) g.dbias = empty<T>(inner, dev);
  if (need_x && rows > 0 && n > 0) {
    const rowwise::RowLaunch L = rowwise::row_launch(rows, n);
    if (L.block_per_row)
      norm_detail::layer_norm_backward_dx_kernel<T, true><<<L.blocks, L.threads, 0, stream()>>>(
          dy.data(), x.data(), mean.data(), rstd.data(), rowwise::data_or_null(w), g.dx.data(), rows, n);
    else
      norm_detail::layer_norm_backward_dx_kernel<T, false><<<L.blocks, L.threads, 0, stream()>>>(
          dy.data(), x.data(), mean.data(), rstd.data(), rowwise::data_or_null(w), g.dx.data(), rows, n);
    check_launch("cuda::layer_norm_backward (dx)");
  }
  if ((need_w || need_b) && n > 0) {  // rows == 0 still runs: the sums are 0
    const dim3 threads(norm_detail::kColTile, norm_detail::kColSplit);
    const unsigned blocks = static_cast<unsigned>((n + norm_detail::kColTile - 1) / norm_detail::kColTile);
    norm_detail::layer_norm_backward_dwb_kernel<T><<<blocks, threads, 0, stream()>>>(
        dy.data(), x.data(), mean.data(), rstd.data(), rowwise::data_or_null(g.dweight),
        rowwise::data_or_null(g.dbias), rows, n);
    check_launch("cuda::layer_norm_backward (dweight/dbias)");
  }
  return g;
}

/// timm LayerNorm2d forward on contiguous NCHW: layer norm over C for every pixel
/// (= ref::layer_norm2d_forward, but y comes back contiguous NCHW).
template <class T>
ref::LayerNormForward<T> layer_norm2d_forward(const Tensor<T>& x, const Tensor<T>& w, const Tensor<T>& b,
                                              double eps) {
  norm_detail::check_float_type<T>();
  using A = acc_t<T>;
  const Device dev = x.device();
  DG_CHECK(dev.is_cuda() && x.dim() == 4 && x.is_contiguous(), "cuda::layer_norm2d_forward: expected a contiguous "
           "(N, C, H, W) CUDA input, got ", shape_str(x.shape()), " on ", dev.str());
  check_device<T>("cuda::layer_norm2d_forward", dev, {&w, &b});
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  for (const Tensor<T>* p : {&w, &b})
    DG_CHECK(!p->defined() || (p->is_contiguous() && p->numel() == C), "cuda::layer_norm2d_forward: expected a "
             "contiguous weight/bias of C = ", C, " elements, got ", shape_str(p->shape()));
  const Shape stats{N, x.size(2), x.size(3)};
  ref::LayerNormForward<T> r{empty<T>(x.shape(), dev), empty<A>(stats, dev), empty<A>(stats, dev)};
  if (N * P == 0) return r;
  const int64_t tiles = (N * P + 31) / 32;
  DG_CHECK(tiles < INT_MAX, "cuda::layer_norm2d_forward: ", N * P, " pixels are too many for one launch");
  norm_detail::layer_norm2d_forward_kernel<T><<<unsigned(tiles), dim3(32, norm_detail::kNormGroups), 0, stream()>>>(
      x.data(), rowwise::data_or_null(w), rowwise::data_or_null(b), r.y.data(), r.mean.data(), r.rstd.data(), N, C,
      P, A(eps));
  check_launch("cuda::layer_norm2d_forward");
  return r;
}

/// Gradients of layer_norm2d_forward (= ref::layer_norm2d_backward, dx contiguous NCHW); dweight
/// and dbias are reduced per channel by one block each, in a fixed order.
template <class T>
ref::LayerNormGrads<T> layer_norm2d_backward(const Tensor<T>& dy, const Tensor<T>& x, const Tensor<acc_t<T>>& mean,
                                             const Tensor<acc_t<T>>& rstd, const Tensor<T>& w, bool need_x,
                                             bool need_w, bool need_b) {
  norm_detail::check_float_type<T>();
  const Device dev = x.device();
  DG_CHECK(dev.is_cuda() && x.dim() == 4 && x.is_contiguous() && dy.is_contiguous() && dy.shape() == x.shape(),
           "cuda::layer_norm2d_backward: expected contiguous CUDA dy and x of one (N, C, H, W) shape, got dy ",
           shape_str(dy.shape()), ", x ", shape_str(x.shape()), " on ", dev.str());
  check_device<T>("cuda::layer_norm2d_backward", dev, {&dy, &w});
  check_device<acc_t<T>>("cuda::layer_norm2d_backward", dev, {&mean, &rstd});
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  DG_CHECK(mean.is_contiguous() && rstd.is_contiguous() && mean.numel() == N * P && rstd.numel() == N * P,
           "cuda::layer_norm2d_backward: mean/rstd must be the contiguous (N, H, W) tensors forward saved, got ",
           shape_str(mean.shape()), " for input ", shape_str(x.shape()));
  DG_CHECK(!w.defined() || (w.is_contiguous() && w.numel() == C), "cuda::layer_norm2d_backward: expected a "
           "contiguous weight of C = ", C, " elements, got ", shape_str(w.shape()));
  ref::LayerNormGrads<T> g;
  if (need_x) g.dx = empty<T>(x.shape(), dev);
  if (need_w) g.dweight = empty<T>({C}, dev);
  if (need_b) g.dbias = empty<T>({C}, dev);
  if (need_x && N * P > 0) {
    const int64_t tiles = (N * P + 31) / 32;
    DG_CHECK(tiles < INT_MAX, "cuda::layer_norm2d_backward: ", N * P, " pixels are too many for one launch");
    norm_detail::layer_norm2d_backward_dx_kernel<T><<<unsigned(tiles), dim3(32, norm_detail::kNormGroups), 0,
                                                      stream()>>>(
        dy.data(), x.data(), mean.data(), rstd.data(), rowwise::data_or_null(w), g.dx.data(), N, C, P);
    check_launch("cuda::layer_norm2d_backward (dx)");
  }
  if ((need_w || need_b) && C > 0) {  // N * P == 0 still runs: the sums are 0
    const unsigned blocks = static_cast<unsigned>(C < 65535 * 8 ? C : 65535 * 8);
    norm_detail::layer_norm2d_backward_dwb_kernel<T><<<blocks, 2 * kThreads, 0, stream()>>>(
        dy.data(), x.data(), mean.data(), rstd.data(), rowwise::data_or_null(g.dweight),
        rowwise::data_or_null(g.dbias), N, C, P);
    check_launch("cuda::layer_norm2d_backward (dweight/dbias)");
  }
  return g;
}

/// Installs the four layer-norm entries of the CUDA kernel table.
template <class T>
void register_norm(DeviceKernels<T>& k) {
  k.layer_norm_forward = DG_CUDA_ON_DEVICE(layer_norm_forward<T>);
  k.layer_norm_backward = DG_CUDA_ON_DEVICE(layer_norm_backward<T>);
  k.layer_norm2d_forward = DG_CUDA_ON_DEVICE(layer_norm2d_forward<T>);
  k.layer_norm2d_backward = DG_CUDA_ON_DEVICE(layer_norm2d_backward<T>);
}

}  // namespace dg::cuda
