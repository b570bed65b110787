// densegrad/backend/cuda/reduce.cuh: reductions over any set of dims (sum, amax) and the sum of
// squares of a whole tensor (for gradient clipping). The input is seen as (kept dims) x (reduced
// dims). When the innermost reduced dims form a dense run of at least 128 elements (a per-channel
// gradient over (N, H, W): runs of H*W), each output's rows of runs are split over enough blocks
// to fill the GPU, whose threads read each run straight through (no index arithmetic per
// element); a second pass adds the blocks' partial sums in order. Otherwise one block per output
// element strides over the reduced elements through the general indexer. Both end in a
// warp-shuffle + shared-memory tree. Deterministic: the order of additions depends only on the
// shapes. Sums accumulate in double, like the ref kernels.
#pragma once

#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "elementwise.cuh"

namespace dg::cuda {

namespace reduce_detail {

struct SumOp {
  using Acc = double;
  __device__ static Acc init() { return 0.0; }
  __device__ static Acc fold(Acc a, double v) { return a + v; }
  __device__ static Acc combine(Acc a, Acc b) { return a + b; }
};
struct SumSqOp {
  using Acc = double;
  __device__ static Acc init() { return 0.0; }
  __device__ static Acc fold(Acc a, double v) { return a + v * v; }
  __device__ static Acc combine(Acc a, Acc b) { return a + b; }
};
struct MaxOp {  // NaN wins, as torch.amax
  using Acc = double;
  __device__ static Acc init() { return -INFINITY; }
  __device__ static Acc fold(Acc a, double v) { return (a != a || v != v) ? NAN : (v > a ? v : a); }
  __device__ static Acc combine(Acc a, Acc b) { return fold(a, b); }
};

/// Reduces v over the block; the result is valid in thread 0.
template <class Op>
__device__ typename Op::Acc block_reduce(typename Op::Acc v) {
  __shared__ typename Op::Acc warp_part[32];
  for (int off = 16; off > 0; off /= 2) v = Op::combine(v, __shfl_down_sync(0xffffffffu, v, off));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = (blockDim.x + 31) / 32;
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? warp_part[lane] : Op::init();
    for (int off = 16; off > 0; off /= 2) v = Op::combine(v, __shfl_down_sync(0xffffffffu, v, off));
  }
  return v;
}

/// out[o] = reduce over r of x[kept(o) + red(r)]: one block per output (grid-stride over outputs).
template <class T, class Op>
__global__ void reduce_kernel(T* out, const T* x, Indexer<1> kept, int64_t n_out, Indexer<1> red, int64_t n_red) {
  for (int64_t o = blockIdx.x; o < n_out; o += gridDim.x) {
    int64_t base[1];
    kept.offsets(o, base);
    typename Op::Acc acc = Op::init();
    for (int64_t r = threadIdx.x; r < n_red; r += blockDim.x) {
      int64_t off[1];
      red.offsets(r, off);
      acc = Op::fold(acc, double(x[base[0] + off[0]]));
    }
    acc = block_reduce<Op>(acc);
    if (threadIdx.x == 0) out[o] = T(acc);
    __syncthreads();  // warp_part is reused by the next output
  }
}

/// The reduced elements as rows of dense runs: block b reduces rows [s*per, (s+1)*per) of output
/// o = b / splits (s = b % splits), each row a run of `run` elements at x[kept(o) + outer(row)],
/// into part[b] (the accumulator type; the finish kernel adds a output's splits in order).
template <class T, class Op>
__global__ void reduce_runs_kernel(typename Op::Acc* part, const T* x, Indexer<1> kept, int64_t n_out,
                                   Indexer<1> outer, int64_t n_rows, int64_t run, int64_t splits) {
  const int64_t per = (n_rows + splits - 1) / splits;
  for (int64_t b = blockIdx.x; b < n_out * splits; b += gridDim.x) {
    const int64_t o = b / splits, lo = (b % splits) * per, hi = min(n_rows, lo + per);
    int64_t base[1];
    kept.offsets(o, base);
    typename Op::Acc acc = Op::init();
    for (int64_t row = lo; row < hi; ++row) {
      int64_t off[1];
      outer.offsets(row, off);
      const T* p = x + base[0] + off[0];
      for (int64_t i = threadIdx.x; i < run; i += blockDim.x) acc = Op::fold(acc, double(p[i]));
    }
    acc = block_reduce<Op>(acc);
    if (threadIdx.x == 0) part[b] = acc;
    __syncthreads();  // warp_part is reused by the next block index
  }
}

/// out[o] = the splits of output o combined in order.
template <class T, class Op>
__global__ void reduce_finish_kernel(T* out, const typename Op::Acc* part, int64_t n_out, int64_t splits) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < n_out; o += int64_t(gridDim.x) * blockDim.x) {
    typename Op::Acc acc = part[o * splits];
    for (int64_t s = 1; s < splits; ++s) acc = Op::combine(acc, part[o * splits + s]);
    out[o] = T(acc);
  }
}

/// partial[b] = sum of x^2 over this block's grid-stride share (x contiguous).
template <class T>
__global__ void sum_squares_kernel(double* partial, const T* x, int64_t n) {
  double acc = 0.0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const double v = double(x[i]);
    acc += v * v;
  }
  acc = block_reduce<SumSqOp>(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

/// Runs Op over `dims` of x into a new tensor of the keepdim shape.
template <class T, class Op>
Tensor<T> reduce(const Tensor<T>& x, const Shape& dims, const char* op) {
  Shape kshape = x.shape(), kept_shape, kept_strides, red_shape, red_strides;
  for (int64_t d = 0; d < x.dim(); ++d) {
    const bool r = std::find(dims.begin(), dims.end(), d) != dims.end();
    if (r) {
      kshape[d] = 1;
      red_shape.push_back(x.size(d));
      red_strides.push_back(x.strides()[d]);
    } else {
      kept_shape.push_back(x.size(d));
      kept_strides.push_back(x.strides()[d]);
    }
  }
  Tensor<T> out = empty<T>(kshape, x.device());
  const int64_t n_out = out.numel(), n_red = shape_numel(red_shape);
  if (n_out == 0) return out;
  auto kept = make_indexer<1>(kept_shape, {kept_strides}, op);
  // The innermost reduced dims that are dense together: one run of `run` elements per row.
  int64_t run = 1;
  size_t inner = red_shape.size();
  while (inner > 0 && red_strides[inner - 1] == run) run *= red_shape[--inner];
  if (run >= 128) {
    const Shape outer_shape(red_shape.begin(), red_shape.begin() + inner);
    const Shape outer_strides(red_strides.begin(), red_strides.begin() + inner);
    auto outer = make_indexer<1>(outer_shape, {outer_strides}, op);
    const int64_t n_rows = n_red / run;
    // about 4 blocks per multiprocessor, no more splits than rows
    const int64_t splits = std::clamp<int64_t>((4 * int64_t(sm_count()) + n_out - 1) / n_out, 1, n_rows);
    Tensor<double> part = empty<double>({n_out * splits}, x.device());
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(n_out * splits, 65535 * 8));
    reduce_runs_kernel<T, Op><<<blocks, kThreads, 0, stream()>>>(part.data(), x.data(), kept, n_out, outer, n_rows,
                                                                  run, splits);
    check_launch(op);
    reduce_finish_kernel<T, Op><<<blocks_for(n_out), kThreads, 0, stream()>>>(out.data(), part.data(), n_out, splits);
    check_launch(op);
    return out;
  }
  auto red = make_indexer<1>(red_shape, {red_strides}, op);
  const int threads = n_red >= 1024 ? 256 : n_red >= 128 ? 128 : 32;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(n_out, 65535 * 8));
  reduce_kernel<T, Op><<<blocks, threads, 0, stream()>>>(out.data(), x.data(), kept, n_out, red, n_red);
  check_launch(op);
  return out;
}

}  // namespace reduce_detail

/// Sum over dims (keepdim shape); an empty reduction gives 0.
template <class T>
Tensor<T> sum(const Tensor<T>& x, const Shape& dims) { return reduce_detail::reduce<T, reduce_detail::SumOp>(x, dims, "sum"); }

/// Max over dims (keepdim shape); NaN propagates.
template <class T>
Tensor<T> amax(const Tensor<T>& x, const Shape& dims) { return reduce_detail::reduce<T, reduce_detail::MaxOp>(x, dims, "amax"); }

/// sum(x^2) over every element, in double (x is made contiguous first when it is not).
template <class T>
double sum_squares(const Tensor<T>& x) {
  const int64_t n = x.numel();
  if (n == 0) return 0.0;
  Tensor<T> xc = x;
  if (!x.is_contiguous()) {
    xc = empty<T>(x.shape(), x.device());
    auto ix = make_indexer<2>(x.shape(), {xc.strides(), x.strides()}, "sum_squares");
    ew::copy_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(xc.data(), x.data(), ix, n, false);
    check_launch("sum_squares");
  }
  const unsigned blocks = std::min<unsigned>(blocks_for(n), 1024);
  Tensor<double> partial = empty<double>({int64_t(blocks)}, x.device());
  reduce_detail::sum_squares_kernel<T><<<blocks, kThreads, 0, stream()>>>(partial.data(), xc.data(), n);
  check_launch("sum_squares");
  std::vector<double> host(blocks);
  copy_bytes_cuda(host.data(), Device::cpu(), partial.data(), x.device(), blocks * sizeof(double));
  double s = 0.0;
  for (double v : host) s += v;
  return s;
}

template <class T>
void register_reduce(DeviceKernels<T>& k) {
  k.sum = DG_CUDA_ON_DEVICE(sum<T>);
  k.amax = DG_CUDA_ON_DEVICE(amax<T>);
  k.sum_squares = DG_CUDA_ON_DEVICE(sum_squares<T>);
}

}  // namespace dg::cuda
