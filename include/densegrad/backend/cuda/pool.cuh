// densegrad/backend/cuda/pool.cuh: adaptive average pooling on CUDA, forward and backward, with
// torch's (possibly overlapping) bins. The global case (output 1x1) is one block reduction per
// plane; any other output size is one thread per output element (forward) or per input element
// (backward: it gathers from the bins that contain it, so no atomics and no races).
// No max pooling, no fixed-kernel avg_pool2d. float and double only; ref/pool.hpp is the oracle.
// Shape legend: x, dx: (N, C, H, W) contiguous -> out, dout: (N, C, OH, OW); a plane is one (n, c).
#pragma once

#include "common.cuh"
#include "norm.cuh"  // rowwise::block_sum

namespace dg::cuda {

namespace pool_detail {

/// torch's adaptive bins (= ref::adaptive_start/end): output i of `out` covers input
/// [floor(i * in / out), ceil((i + 1) * in / out)).
DENSEGRAD_HOST_DEVICE inline int64_t bin_start(int64_t i, int64_t out, int64_t in) { return (i * in) / out; }
DENSEGRAD_HOST_DEVICE inline int64_t bin_end(int64_t i, int64_t out, int64_t in) {
  return ((i + 1) * in + out - 1) / out;
}

/// Global average pooling: one block per plane sums its HW elements.
template <class T>
__global__ void global_avg_pool_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t planes, int64_t HW) {
  using A = acc_t<T>;
  for (int64_t pl = blockIdx.x; pl < planes; pl += gridDim.x) {
    const T* xp = x + pl * HW;
    A s = 0;
    for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) s += A(xp[i]);
    s = rowwise::block_sum(s);
    if (threadIdx.x == 0) out[pl] = T(s / A(HW));
  }
}

/// One thread per output element (plane, i, j): the mean of its bin.
template <class T>
__global__ void adaptive_avg_pool_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t planes, int64_t H,
                                         int64_t W, int64_t OH, int64_t OW) {
  using A = acc_t<T>;
  for (int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; o < planes * OH * OW;
       o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = o % OW, i = (o / OW) % OH, pl = o / (OW * OH);
    const int64_t h0 = bin_start(i, OH, H), h1 = bin_end(i, OH, H), w0 = bin_start(j, OW, W),
                  w1 = bin_end(j, OW, W);
    const T* xp = x + pl * H * W;
    A s = 0;
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t w = w0; w < w1; ++w) s += A(xp[h * W + w]);
    out[o] = T(s / A((h1 - h0) * (w1 - w0)));
  }
}

/// One thread per input element (plane, h, w): dx = sum over the bins (i, j) containing it of
/// dout / bin size. The output rows whose bins contain h are [bin_start(h, H, OH), bin_end(h, H, OH))
/// (the bin formulas with in and out swapped; the same holds for w), visited in the order ref adds them.
template <class T>
__global__ void adaptive_avg_pool_backward_kernel(const T* __restrict__ dout, T* __restrict__ dx, int64_t planes,
                                                  int64_t H, int64_t W, int64_t OH, int64_t OW) {
  using A = acc_t<T>;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < planes * H * W;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = e % W, h = (e / W) % H, pl = e / (W * H);
    const int64_t i0 = bin_start(h, H, OH), i1 = bin_end(h, H, OH), j0 = bin_start(w, W, OW),
                  j1 = bin_end(w, W, OW);
    const T* dp = dout + pl * OH * OW;
    A s = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bh = bin_end(i, OH, H) - bin_start(i, OH, H);
      for (int64_t j = j0; j < j1; ++j) s += A(dp[i * OW + j]) / A(bh * (bin_end(j, OW, W) - bin_start(j, OW, W)));
    }
    dx[e] = T(s);
  }
}

template <class T>
constexpr void check_float_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "CUDA pool kernels: float or double only");
}

}  // namespace pool_detail

/// torch.nn.functional.adaptive_avg_pool2d(x, {OH, OW}) on contiguous x (= ref::adaptive_avg_pool2d).
template <class T>
Tensor<T> adaptive_avg_pool2d(const Tensor<T>& x, int64_t OH, int64_t OW) {
  pool_detail::check_float_type<T>();
  const Device dev = x.device();
  DG_CHECK(dev.is_cuda() && x.dim() == 4 && x.is_contiguous() && OH >= 0 && OW >= 0,
           "cuda::adaptive_avg_pool2d: expected a contiguous (N, C, H, W) CUDA input and output size >= 0, got ",
           shape_str(x.shape()), " on ", dev.str(), " -> ", OH, "x", OW);
  const int64_t planes = x.size(0) * x.size(1), H = x.size(2), W = x.size(3);
  Tensor<T> out = empty<T>({x.size(0), x.size(1), OH, OW}, dev);
  if (out.numel() == 0) return out;
  if (OH == 1 && OW == 1) {
    // a warp per 32 elements of the plane, up to kThreads: small planes (7x7) leave few threads idle
    const int64_t warps = (H * W + 31) / 32;
    const int threads = warps * 32 < kThreads ? int(warps < 1 ? 32 : warps * 32) : kThreads;
    const unsigned blocks = static_cast<unsigned>(planes < 65535 * 8 ? planes : 65535 * 8);
    pool_detail::global_avg_pool_kernel<T><<<blocks, threads, 0, stream()>>>(x.data(), out.data(), planes, H * W);
  } else {
    pool_detail::adaptive_avg_pool_kernel<T><<<blocks_for(out.numel()), kThreads, 0, stream()>>>(
        x.data(), out.data(), planes, H, W, OH, OW);
  }
  check_launch("cuda::adaptive_avg_pool2d");
  return out;
}

/// Gradient of adaptive_avg_pool2d back to an (N, C, H, W) input (= ref::adaptive_avg_pool2d_backward).
template <class T>
Tensor<T> adaptive_avg_pool2d_backward(const Tensor<T>& dout, int64_t H, int64_t W) {
  pool_detail::check_float_type<T>();
  const Device dev = dout.device();
  DG_CHECK(dev.is_cuda() && dout.dim() == 4 && dout.is_contiguous() && H >= 0 && W >= 0,
           "cuda::adaptive_avg_pool2d_backward: expected a contiguous (N, C, OH, OW) CUDA gradient and input size "
           ">= 0, got ", shape_str(dout.shape()), " on ", dev.str(), " -> ", H, "x", W);
  const int64_t planes = dout.size(0) * dout.size(1), OH = dout.size(2), OW = dout.size(3);
  Tensor<T> dx = empty<T>({dout.size(0), dout.size(1), H, W}, dev);
  if (dx.numel() == 0) return dx;
  if (OH == 0 || OW == 0) {  // no bins: nothing flows back
    DG_CUDA_CHECK(cudaMemsetAsync(dx.data(), 0, static_cast<size_t>(dx.numel()) * sizeof(T), stream()));
    return dx;
  }
  pool_detail::adaptive_avg_pool_backward_kernel<T><<<blocks_for(dx.numel()), kThreads, 0, stream()>>>(
      dout.data(), dx.data(), planes, H, W, OH, OW);
  check_launch("cuda::adaptive_avg_pool2d_backward");
  return dx;
}

/// Installs adaptive_avg_pool2d and its backward.
template <class T>
void register_pool(DeviceKernels<T>& k) {
  k.adaptive_avg_pool2d = DG_CUDA_ON_DEVICE(adaptive_avg_pool2d<T>);
  k.adaptive_avg_pool2d_backward = DG_CUDA_ON_DEVICE(adaptive_avg_pool2d_backward<T>);
}

}  // namespace dg::cuda
