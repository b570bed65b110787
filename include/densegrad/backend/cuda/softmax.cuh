// densegrad/backend/cuda/softmax.cuh: softmax and log_softmax along any dim of a contiguous tensor,
// their backward, and cross-entropy on (N, C) log-probabilities against target distributions.
// The tensor is viewed as (outer, D, inner): a warp or block per line when inner == 1 (the last
// dim), else one thread per (outer, inner) line, coalesced across inner. float and double only;
// sums in acc_t<T>. ref::softmax / log_softmax / softmax_backward and ref/loss.hpp are the oracles.
// Shape legend: x, y, dy, dx: any shape, contiguous, all the same; D = size along dim;
// logp, q, dlogits: (N, C).
#pragma once

#include "common.cuh"
#include "norm.cuh"  // rowwise:: reductions and row geometry

namespace dg::cuda {

namespace softmax_detail {

/// One line of D elements per warp or block (dim is the last dim): m = max, s = sum exp(x - m);
/// softmax = exp(x - m) / s, log_softmax = x - m - log(s).
template <class T, bool kBlockRow>
__global__ void softmax_rows_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t D, bool log_) {
  using A = acc_t<T>;
  const rowwise::RowGrid g = rowwise::row_grid<kBlockRow>();
  for (int64_t row = g.first; row < rows; row += g.step) {
    const T* xr = x + row * D;
    T* yr = y + row * D;
    A m = A(-INFINITY);
    for (int64_t j = g.lane; j < D; j += g.width) m = A(xr[j]) > m ? A(xr[j]) : m;
    m = rowwise::row_max<kBlockRow>(m);
    A s = 0;
    for (int64_t j = g.lane; j < D; j += g.width) s += std::exp(A(xr[j]) - m);
    s = rowwise::row_sum<kBlockRow>(s);
    const A log_s = std::log(s);
    for (int64_t j = g.lane; j < D; j += g.width) {
      const A v = A(xr[j]) - m;
      yr[j] = T(log_ ? v - log_s : std::exp(v) / s);
    }
  }
}

/// One thread per line (o, i) of D elements at stride `inner`; neighbouring threads take
/// neighbouring i, so every pass over the line reads contiguous memory across the warp.
template <class T>
__global__ void softmax_cols_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t outer, int64_t D,
                                    int64_t inner, bool log_) {
  using A = acc_t<T>;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < outer * inner;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = t / inner, base = o * D * inner + (t - o * inner);  // element d: base + d * inner
    A m = A(-INFINITY);
    for (int64_t d = 0; d < D; ++d) m = A(x[base + d * inner]) > m ? A(x[base + d * inner]) : m;
    A s = 0;
    for (int64_t d = 0; d < D; ++d) s += std::exp(A(x[base + d * inner]) - m);
    const A log_s = std::log(s);
    for (int64_t d = 0; d < D; ++d) {
      const A v = A(x[base + d * inner]) - m;
      y[base + d * inner] = T(log_ ? v - log_s : std::exp(v) / s);
    }
  }
}

/// Backward of one line per warp or block, from the output y:
/// softmax: dx = y * (dy - sum(dy * y)); log_softmax: dx = dy - exp(y) * sum(dy).
template <class T, bool kBlockRow>
__global__ void softmax_backward_rows_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                             T* __restrict__ dx, int64_t rows, int64_t D, bool log_) {
  using A = acc_t<T>;
  const rowwise::RowGrid g = rowwise::row_grid<kBlockRow>();
  for (int64_t row = g.first; row < rows; row += g.step) {
    const T *gr = dy + row * D, *yr = y + row * D;
    T* dr = dx + row * D;
    A s = 0;
    for (int64_t j = g.lane; j < D; j += g.width) s += log_ ? A(gr[j]) : A(gr[j]) * A(yr[j]);
    s = rowwise::row_sum<kBlockRow>(s);
    for (int64_t j = g.lane; j < D; j += g.width)
      dr[j] = T(log_ ? A(gr[j]) - std::exp(A(yr[j])) * s : A(yr[j]) * (A(gr[j]) - s));
  }
}

/// Backward of one line per thread at stride `inner` (see softmax_cols_kernel).
template <class T>
__global__ void softmax_backward_cols_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                             T* __restrict__ dx, int64_t outer, int64_t D, int64_t inner,
                                             bool log_) {
  using A = acc_t<T>;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < outer * inner;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = t / inner, base = o * D * inner + (t - o * inner);
    A s = 0;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t e = base + d * inner;
      s += log_ ? A(dy[e]) : A(dy[e]) * A(y[e]);
    }
    for (int64_t d = 0; d < D; ++d) {
      const int64_t e = base + d * inner;
      dx[e] = T(log_ ? A(dy[e]) - std::exp(A(y[e])) * s : A(y[e]) * (A(dy[e]) - s));
    }
  }
}

/// One block: sum over all elements of -q * logp, skipping q == 0 (so 0 * -inf adds nothing).
/// A single block keeps the order, and so the bits, fixed.
constexpr int kLossThreads = 1024;
template <class T>
__global__ void cross_entropy_sum_kernel(const T* __restrict__ logp, const T* __restrict__ q, int64_t total,
                                         acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  A s = 0;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const A qv = A(q[i]);
    if (qv != A(0)) s -= qv * A(logp[i]);
  }
  s = rowwise::block_sum(s);
  if (threadIdx.x == 0) *out = s;
}

/// One row per warp: dlogits = scale * (exp(logp) * sum_c q - q).
template <class T>
__global__ void cross_entropy_backward_kernel(const T* __restrict__ logp, const T* __restrict__ q,
                                              T* __restrict__ dx, int64_t N, int64_t C, acc_t<T> scale) {
  using A = acc_t<T>;
  const rowwise::RowGrid g = rowwise::row_grid<false>();
  for (int64_t row = g.first; row < N; row += g.step) {
    const T *lr = logp + row * C, *qr = q + row * C;
    A qsum = 0;
    for (int64_t c = g.lane; c < C; c += g.width) qsum += A(qr[c]);
    qsum = rowwise::warp_sum(qsum);
    for (int64_t c = g.lane; c < C; c += g.width)
      dx[row * C + c] = T(scale * (std::exp(A(lr[c])) * qsum - A(qr[c])));
  }
}

/// (outer, D, inner) of `shape` around `dim`; a 0-D tensor is one line of length 1.
struct Lines {
  int64_t outer = 1, D = 1, inner = 1;
};
inline Lines split_lines(const Shape& shape, int64_t dim, const char* op) {
  Lines l;
  if (shape.empty()) return l;
  DG_CHECK(dim >= 0 && dim < static_cast<int64_t>(shape.size()), op, ": expected dim in [0, ", shape.size(),
           "), got ", dim, " for shape ", shape_str(shape));
  for (int64_t d = 0; d < dim; ++d) l.outer *= shape[d];
  l.D = shape[dim];
  for (size_t d = static_cast<size_t>(dim) + 1; d < shape.size(); ++d) l.inner *= shape[d];
  return l;
}

template <class T>
constexpr void check_float_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "CUDA softmax kernels: float or double only");
}

}  // namespace softmax_detail

/// softmax (log = false) or log_softmax (log = true) of contiguous x along dim, already wrapped
/// to [0, x.dim()) (= ref::softmax / ref::log_softmax; torch.softmax, torch.log_softmax).
template <class T>
Tensor<T> softmax(const Tensor<T>& x, int64_t dim, bool log) {
  softmax_detail::check_float_type<T>();
  const Device dev = x.device();
  DG_CHECK(dev.is_cuda() && x.is_contiguous(), "cuda::softmax: expected a contiguous CUDA input, got ",
           shape_str(x.shape()), " on ", dev.str());
  const softmax_detail::Lines l = softmax_detail::split_lines(x.shape(), dim, "cuda::softmax");
  Tensor<T> y = empty<T>(x.shape(), dev);
  if (x.numel() == 0) return y;
  if (l.inner == 1) {
    const rowwise::RowLaunch L = rowwise::row_launch(l.outer, l.D);
    if (L.block_per_row)
      softmax_detail::softmax_rows_kernel<T, true><<<L.blocks, L.threads, 0, stream()>>>(x.data(), y.data(), l.outer,
                                                                                        l.D, log);
    else
      softmax_detail::softmax_rows_kernel<T, false><<<L.blocks, L.threads, 0, stream()>>>(x.data(), y.data(),
                                                                                         l.outer, l.D, log);
  } else {
    softmax_detail::softmax_cols_kernel<T><<<blocks_for(l.outer * l.inner), kThreads, 0, stream()>>>(
        x.data(), y.data(), l.outer, l.D, l.inner, log);
  }
  check_launch("cuda::softmax");
  return y;
}

/// Gradient of softmax / log_softmax along dim from its output y (= ref::softmax_backward).
template <class T>
Tensor<T> softmax_backward(const Tensor<T>& dy, const Tensor<T>& y, int64_t dim, bool log) {
  softmax_detail::check_float_type<T>();
  const Device dev = y.device();
  DG_CHECK(dev.is_cuda() && y.is_contiguous() && dy.is_contiguous() && dy.shape() == y.shape(),
           "cuda::softmax_backward: expected contiguous CUDA dy and y of one shape, got dy ", shape_str(dy.shape()),
           ", y ", shape_str(y.shape()), " on ", dev.str());
  check_device<T>("cuda::softmax_backward", dev, {&dy});
  const softmax_detail::Lines l = softmax_detail::split_lines(y.shape(), dim, "cuda::softmax_backward");
  Tensor<T> dx = empty<T>(y.shape(), dev);
  if (y.numel() == 0) return dx;
  if (l.inner == 1) {
    const rowwise::RowLaunch L = rowwise::row_launch(l.outer, l.D);
    if (L.block_per_row)
      softmax_detail::softmax_backward_rows_kernel<T, true><<<L.blocks, L.threads, 0, stream()>>>(
          dy.data(), y.data(), dx.data(), l.outer, l.D, log);
    else
      softmax_detail::softmax_backward_rows_kernel<T, false><<<L.blocks, L.threads, 0, stream()>>>(
          dy.data(), y.data(), dx.data(), l.outer, l.D, log);
  } else {
    softmax_detail::softmax_backward_cols_kernel<T><<<blocks_for(l.outer * l.inner), kThreads, 0, stream()>>>(
        dy.data(), y.data(), dx.data(), l.outer, l.D, l.inner, log);
  }
  check_launch("cuda::softmax_backward");
  return dx;
}

namespace softmax_detail {
template <class T>
void check_loss_inputs(const Tensor<T>& logp, const Tensor<T>& q, const char* op) {
  DG_CHECK(logp.device().is_cuda() && logp.dim() == 2 && logp.is_contiguous() && q.is_contiguous() &&
               q.shape() == logp.shape(),
           op, ": expected contiguous CUDA (N, C) log-probabilities and targets of one shape, got logp ",
           shape_str(logp.shape()), ", q ", shape_str(q.shape()), " on ", logp.device().str());
  check_device<T>(op, logp.device(), {&q});
}
}  // namespace softmax_detail

/// mean over rows of -sum_c q * logp (= ref::cross_entropy_mean): reduced on the device, one
/// scalar copied back (which waits for the device).
template <class T>
double cross_entropy_mean(const Tensor<T>& logp, const Tensor<T>& q) {
  softmax_detail::check_float_type<T>();
  using A = acc_t<T>;
  softmax_detail::check_loss_inputs(logp, q, "cuda::cross_entropy_mean");
  const Device dev = logp.device();
  Tensor<A> sum = empty<A>({}, dev);
  softmax_detail::cross_entropy_sum_kernel<T><<<1, softmax_detail::kLossThreads, 0, stream()>>>(
      logp.data(), q.data(), logp.numel(), sum.data());
  check_launch("cuda::cross_entropy_mean");
  A host = 0;
  copy_bytes_cuda(&host, Device::cpu(), sum.data(), dev, sizeof(A));
  return double(host) / double(logp.size(0));  // N = 0 gives nan, like ref and torch
}

/// d loss / d logits = scale * (exp(logp) * sum_c q - q) (= ref::cross_entropy_backward).
template <class T>
Tensor<T> cross_entropy_backward(const Tensor<T>& logp, const Tensor<T>& q, double scale) {
  softmax_detail::check_float_type<T>();
  using A = acc_t<T>;
  softmax_detail::check_loss_inputs(logp, q, "cuda::cross_entropy_backward");
  const int64_t N = logp.size(0), C = logp.size(1);
  Tensor<T> dx = empty<T>({N, C}, logp.device());
  if (N * C == 0) return dx;
  softmax_detail::cross_entropy_backward_kernel<T><<<blocks_for(N * 32), kThreads, 0, stream()>>>(
      logp.data(), q.data(), dx.data(), N, C, A(scale));
  check_launch("cuda::cross_entropy_backward");
  return dx;
}

/// Installs softmax, softmax_backward, cross_entropy_mean and cross_entropy_backward.
template <class T>
void register_softmax(DeviceKernels<T>& k) {
  k.softmax = DG_CUDA_ON_DEVICE(softmax<T>);
  k.softmax_backward = DG_CUDA_ON_DEVICE(softmax_backward<T>);
  k.cross_entropy_mean = DG_CUDA_ON_DEVICE(cross_entropy_mean<T>);
  k.cross_entropy_backward = DG_CUDA_ON_DEVICE(cross_entropy_backward<T>);
}

}  // namespace dg::cuda
