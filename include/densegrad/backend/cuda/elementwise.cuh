// densegrad/backend/cuda/elementwise.cuh: pointwise CUDA kernels: fill, strided copy,
// accumulate (dst += src), and the unary / binary / ternary functions of core/device_kernels.hpp
// with NumPy broadcasting. One grid-stride kernel per arity; the function is picked by a switch
// on its code (uniform across a warp, so it costs no divergence). Inputs of any strides are read
// through an Indexer; outputs are contiguous. Arithmetic in acc_t<T> (float or double).
#pragma once

#include <cmath>

#include "../ref/activation.hpp"  // gelu_scalar / gelu_grad_scalar: one formula for CPU and GPU
#include "common.cuh"

namespace dg::cuda {

namespace ew {

template <class A>
__device__ A unary(UnaryFn f, A x, A s0, A s1) {
  switch (f) {
    case UnaryFn::AddScalar: return x + s0;
    case UnaryFn::MulScalar: return x * s0;
    case UnaryFn::Exp: return ::exp(x);
    case UnaryFn::Log: return ::log(x);
    case UnaryFn::Sqrt: return ::sqrt(x);
    case UnaryFn::Abs: return ::fabs(x);
    case UnaryFn::PowScalar: return ::pow(x, s0);
    case UnaryFn::Clamp: return x != x ? x : ::fmin(::fmax(x, s0), s1);
    case UnaryFn::Gelu: return ref::gelu_scalar(x, false);
    case UnaryFn::GeluTanh: return ref::gelu_scalar(x, true);
    case UnaryFn::HardSigmoid: return ::fmin(::fmax(x + A(3), A(0)), A(6)) / A(6);
    case UnaryFn::Relu: return x != x ? x : (x > A(0) ? x : A(0));
    case UnaryFn::Relu6: return x != x ? x : ::fmin(::fmax(x, A(0)), A(6));
    case UnaryFn::Sigmoid: return A(1) / (A(1) + ::exp(-x));
  }
  return A(0);
}

template <class A>
__device__ A binary(BinaryFn f, A a, A b, A s0, A s1) {
  switch (f) {
    case BinaryFn::Add: return a + b;
    case BinaryFn::Sub: return a - b;
    case BinaryFn::Mul: return a * b;
    case BinaryFn::Div: return a / b;
    case BinaryFn::Pow: return ::pow(a, b);
    case BinaryFn::Eq: return a == b ? A(1) : A(0);
    case BinaryFn::GeluGrad: return a * ref::gelu_grad_scalar(b, false);
    case BinaryFn::GeluTanhGrad: return a * ref::gelu_grad_scalar(b, true);
    case BinaryFn::HardSigmoidGrad: return b > A(-3) && b < A(3) ? a / A(6) : A(0);
    case BinaryFn::ReluGrad: return b > A(0) ? a : A(0);
    case BinaryFn::Relu6Grad: return b > A(0) && b < A(6) ? a : A(0);
    case BinaryFn::SigmoidGrad: return a * b * (A(1) - b);
    case BinaryFn::SqrtGrad: return a / (b + b);
    case BinaryFn::PowScalarGrad: return s0 == A(0) ? A(0) : a * s0 * ::pow(b, s0 - A(1));
    case BinaryFn::AbsGrad: return b > A(0) ? a : b < A(0) ? -a : A(0);
    case BinaryFn::ClampGrad: return b >= s0 && b <= s1 ? a : A(0);
    case BinaryFn::MaskedScale: return b != A(0) ? a * s0 : A(0);
  }
  return A(0);
}

template <class A>
__device__ A ternary(TernaryFn f, A d, A a, A b) {
  switch (f) {
    case TernaryFn::DivGradB: return -d * a / (b * b);
    case TernaryFn::PowGradA: return b == A(0) ? A(0) : d * b * ::pow(a, b - A(1));
    case TernaryFn::PowGradB: return a == A(0) && b >= A(0) ? A(0) : d * ::pow(a, b) * ::log(a);
  }
  return A(0);
}

// The kernels take their index type I from the launcher: int where every offset fits (see
// Indexer::fits_int), else int64_t.

template <class T, class I>
__global__ void fill_kernel(T* p, Indexer<1> ix, I n, T v) {
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < n; i += I(gridDim.x) * I(blockDim.x)) {
    I o[1];
    ix.offsets_as(i, o);
    p[o[0]] = v;
  }
}

template <class T, class I>
__global__ void copy_kernel(T* dst, const T* src, Indexer<2> ix, I n, bool accumulate) {
  using A = acc_t<T>;
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < n; i += I(gridDim.x) * I(blockDim.x)) {
    I o[2];
    ix.offsets_as(i, o);
    dst[o[0]] = accumulate ? T(A(dst[o[0]]) + A(src[o[1]])) : src[o[1]];
  }
}

template <class T, class I>
__global__ void unary_kernel(UnaryFn f, T* out, const T* x, Indexer<1> ix, I n, acc_t<T> s0, acc_t<T> s1) {
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < n; i += I(gridDim.x) * I(blockDim.x)) {
    I o[1];
    ix.offsets_as(i, o);
    out[i] = T(unary<acc_t<T>>(f, acc_t<T>(x[o[0]]), s0, s1));
  }
}

template <class T, class I>
__global__ void binary_kernel(BinaryFn f, T* out, const T* a, const T* b, Indexer<2> ix, I n, acc_t<T> s0,
                              acc_t<T> s1) {
  using A = acc_t<T>;
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < n; i += I(gridDim.x) * I(blockDim.x)) {
    I o[2];
    ix.offsets_as(i, o);
    out[i] = T(binary<A>(f, A(a[o[0]]), A(b[o[1]]), s0, s1));
  }
}

template <class T, class I>
__global__ void ternary_kernel(TernaryFn f, T* out, const T* a, const T* b, const T* c, Indexer<3> ix, I n) {
  using A = acc_t<T>;
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < n; i += I(gridDim.x) * I(blockDim.x)) {
    I o[3];
    ix.offsets_as(i, o);
    out[i] = T(ternary<A>(f, A(a[o[0]]), A(b[o[1]]), A(c[o[2]])));
  }
}

}  // namespace ew

/// t[...] = value (t of any strides).
template <class T>
void fill(const Tensor<T>& t, T value) {
  const int64_t n = t.numel();
  if (n == 0) return;
  auto ix = make_indexer<1>(t.shape(), {t.strides()}, "fill_");
  with_indexer_type(ix, n, [&](auto zero_i) {
    using I = decltype(zero_i);
    ew::fill_kernel<T, I><<<blocks_for(n), kThreads, 0, stream()>>>(t.data(), ix, I(n), value);
  });
  check_launch("fill_");
}

namespace detail {
template <class T>
void copy_impl(const Tensor<T>& dst, const Tensor<T>& src, bool accumulate, const char* op) {
  check_device<T>(op, dst.device(), {&src});
  const int64_t n = dst.numel();
  if (n == 0) return;
  if (!accumulate && dst.is_contiguous() && src.is_contiguous() && src.shape() == dst.shape()) {
    DG_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), size_t(n) * sizeof(T), cudaMemcpyDeviceToDevice, stream()));
    return;
  }
  auto ix = make_indexer<2>(dst.shape(), {dst.strides(), broadcast_strides(src, dst.shape())}, op);
  with_indexer_type(ix, n, [&](auto zero_i) {
    using I = decltype(zero_i);
    ew::copy_kernel<T, I><<<blocks_for(n), kThreads, 0, stream()>>>(dst.data(), src.data(), ix, I(n), accumulate);
  });
  check_launch(op);
}
}  // namespace detail

/// dst[...] = src[...] (src broadcast to dst's shape; the two must not overlap).
template <class T>
void copy(const Tensor<T>& dst, const Tensor<T>& src) { detail::copy_impl(dst, src, false, "copy_"); }

/// dst[...] += src[...] (one shape; gradient accumulation).
template <class T>
void add_into(const Tensor<T>& dst, const Tensor<T>& src) { detail::copy_impl(dst, src, true, "backward (accumulate)"); }

/// f(x) into a new contiguous tensor.
template <class T>
Tensor<T> unary(UnaryFn f, const Tensor<T>& x, double s0, double s1) {
  Tensor<T> out = empty<T>(x.shape(), x.device());
  const int64_t n = x.numel();
  if (n == 0) return out;
  auto ix = make_indexer<1>(x.shape(), {x.strides()}, "unary op");
  with_indexer_type(ix, n, [&](auto zero_i) {
    using I = decltype(zero_i);
    ew::unary_kernel<T, I><<<blocks_for(n), kThreads, 0, stream()>>>(f, out.data(), x.data(), ix, I(n), acc_t<T>(s0),
                                                                    acc_t<T>(s1));
  });
  check_launch("unary op");
  return out;
}

/// f(a, b) with broadcasting into a new contiguous tensor of the broadcast shape.
template <class T>
Tensor<T> binary(BinaryFn f, const Tensor<T>& a, const Tensor<T>& b, double s0, double s1) {
  check_device<T>("binary op", a.device(), {&b});
  const Shape shape = broadcast_shapes(a.shape(), b.shape(), "binary op");
  Tensor<T> out = empty<T>(shape, a.device());
  const int64_t n = out.numel();
  if (n == 0) return out;
  auto ix = make_indexer<2>(shape, {broadcast_strides(a, shape), broadcast_strides(b, shape)}, "binary op");
  with_indexer_type(ix, n, [&](auto zero_i) {
    using I = decltype(zero_i);
    ew::binary_kernel<T, I><<<blocks_for(n), kThreads, 0, stream()>>>(f, out.data(), a.data(), b.data(), ix, I(n),
                                                                     acc_t<T>(s0), acc_t<T>(s1));
  });
  check_launch("binary op");
  return out;
}

/// f(a, b, c) with broadcasting into a new contiguous tensor.
template <class T>
Tensor<T> ternary(TernaryFn f, const Tensor<T>& a, const Tensor<T>& b, const Tensor<T>& c) {
  check_device<T>("ternary op", a.device(), {&b, &c});
  const Shape shape = broadcast_shapes(broadcast_shapes(a.shape(), b.shape(), "ternary op"), c.shape(), "ternary op");
  Tensor<T> out = empty<T>(shape, a.device());
  const int64_t n = out.numel();
  if (n == 0) return out;
  auto ix = make_indexer<3>(shape, {broadcast_strides(a, shape), broadcast_strides(b, shape),
                                    broadcast_strides(c, shape)}, "ternary op");
  with_indexer_type(ix, n, [&](auto zero_i) {
    using I = decltype(zero_i);
    ew::ternary_kernel<T, I><<<blocks_for(n), kThreads, 0, stream()>>>(f, out.data(), a.data(), b.data(), c.data(), ix,
                                                                      I(n));
  });
  check_launch("ternary op");
  return out;
}

template <class T>
void register_elementwise(DeviceKernels<T>& k) {
  k.fill = DG_CUDA_ON_DEVICE(fill<T>);
  k.copy = DG_CUDA_ON_DEVICE(copy<T>);
  k.add_into = DG_CUDA_ON_DEVICE(add_into<T>);
  k.unary = DG_CUDA_ON_DEVICE(unary<T>);
  k.binary = DG_CUDA_ON_DEVICE(binary<T>);
  k.ternary = DG_CUDA_ON_DEVICE(ternary<T>);
}

}  // namespace dg::cuda
