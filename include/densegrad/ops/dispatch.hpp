// densegrad/ops/dispatch.hpp: how an op picks its kernel by device. A pointwise op gives both
// forms of its function: a lambda (run by the CPU loops of backend/ref or backend/cpu) and a code
// from core/device_kernels.hpp (run by the CUDA backend's kernel for that code). Ops with their
// own kernels (conv, norms, ...) test x.device().is_cuda() and call cuda_kernels<T>(op) directly.
#pragma once

#include "../backend/cpu/elementwise.hpp"
#include "../backend/ref/elementwise.hpp"
#include "../core/device_kernels.hpp"

namespace dg::detail {

/// Throws unless every defined tensor is on the first one's device; returns that device.
template <class T>
Device same_device(const char* op, std::initializer_list<const Tensor<T>*> ts) {
  Device d = (*ts.begin())->device();
  for (const Tensor<T>* t : ts)
    DG_CHECK(!t->defined() || t->device() == d, op, ": expected all tensors on one device, got ", d.str(), " and ",
             t->device().str());
  return d;
}

/// f(x) elementwise: the CUDA kernel for `code` on a CUDA tensor, the lambda on the CPU.
template <class T, class F>
Tensor<T> pointwise(const char* op, const Tensor<T>& x, UnaryFn code, F f, double s0 = 0, double s1 = 0) {
  if (x.device().is_cuda()) return cuda_kernels<T>(op).unary(code, x, s0, s1);
  return ref::map(x, f);
}

/// f(a, b) with broadcasting: the CUDA kernel for `code`, or the ref loops on the CPU.
template <class T, class F>
Tensor<T> pointwise2(const char* op, const Tensor<T>& a, const Tensor<T>& b, BinaryFn code, F f, double s0 = 0,
                     double s1 = 0) {
  if (same_device<T>(op, {&a, &b}).is_cuda()) return cuda_kernels<T>(op).binary(code, a, b, s0, s1);
  return ref::map2(a, b, f, op);
}

/// Binary arithmetic: the CUDA kernel for `code`, or the fast broadcasting loops of backend/cpu.
template <class T, class F>
Tensor<T> arithmetic2(const char* op, const Tensor<T>& a, const Tensor<T>& b, BinaryFn code, F f) {
  if (same_device<T>(op, {&a, &b}).is_cuda()) return cuda_kernels<T>(op).binary(code, a, b, 0, 0);
  return cpu::map2(a, b, f, op);
}

/// f(a, b, c) with broadcasting: the CUDA kernel for `code`, or the ref loops on the CPU.
template <class T, class F>
Tensor<T> pointwise3(const char* op, const Tensor<T>& a, const Tensor<T>& b, const Tensor<T>& c, TernaryFn code,
                     F f) {
  if (same_device<T>(op, {&a, &b, &c}).is_cuda()) return cuda_kernels<T>(op).ternary(code, a, b, c);
  return ref::map3(a, b, c, f, op);
}

}  // namespace dg::detail
