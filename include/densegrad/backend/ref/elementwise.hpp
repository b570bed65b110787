// densegrad/backend/ref/elementwise.hpp: reference kernels for elementwise maps with NumPy
// broadcasting. Plain loops over strides (core/strided.hpp); the readable definition that
// faster paths are tested against. Math happens in acc_t<T> (float for bfloat16).
#pragma once

#include "../../core/tensor.hpp"

namespace dg::ref {

/// The ref kernels read host memory: a device tensor reaching one is a dispatch bug of its caller.
template <class T>
void check_host(const Tensor<T>& t, const char* op) {
  DG_CHECK(t.device().is_cpu(), op, ": this kernel runs on the CPU only, got a tensor on ", t.device().str());
}

/// out[i] = f(x[i]) into a fresh contiguous tensor.
template <class T, class F>
Tensor<T> map(const Tensor<T>& x, F f) {
  check_host(x, "elementwise op");
  Tensor<T> out = Tensor<T>::empty(x.shape());
  T* o = out.data();
  const T* px = x.data();
  if (x.is_contiguous()) {
    const int64_t n = x.numel();
    for (int64_t i = 0; i < n; ++i) o[i] = T(f(acc_t<T>(px[i])));
  } else {
    int64_t i = 0;
    for_each_strided<1>(x.shape(), {x.strides().data()}, {0}, [&](auto k) { o[i++] = T(f(acc_t<T>(px[k[0]]))); });
  }
  return out;
}

/// out = f(a, b) with a and b broadcast to a common shape; `op` names the caller in errors.
template <class T, class F>
Tensor<T> map2(const Tensor<T>& a, const Tensor<T>& b, F f, const char* op) {
  check_host(a, op);
  check_host(b, op);
  Shape shape = broadcast_shapes(a.shape(), b.shape(), op);
  Tensor<T> out = Tensor<T>::empty(shape);
  T* o = out.data();
  const T *pa = a.data(), *pb = b.data();
  if (a.shape() == shape && b.shape() == shape && a.is_contiguous() && b.is_contiguous()) {
    const int64_t n = out.numel();
    for (int64_t i = 0; i < n; ++i) o[i] = T(f(acc_t<T>(pa[i]), acc_t<T>(pb[i])));
    return out;
  }
  Shape sa = Tensor<T>::broadcast_strides(a, shape), sb = Tensor<T>::broadcast_strides(b, shape);
  int64_t i = 0;
  for_each_strided<2>(shape, {sa.data(), sb.data()}, {0, 0},
                      [&](auto k) { o[i++] = T(f(acc_t<T>(pa[k[0]]), acc_t<T>(pb[k[1]]))); });
  return out;
}

/// out = f(a, b, c), all three broadcast together.
template <class T, class F>
Tensor<T> map3(const Tensor<T>& a, const Tensor<T>& b, const Tensor<T>& c, F f, const char* op) {
  for (const Tensor<T>* t : {&a, &b, &c}) check_host(*t, op);
  Shape shape = broadcast_shapes(broadcast_shapes(a.shape(), b.shape(), op), c.shape(), op);
  Tensor<T> out = Tensor<T>::empty(shape);
  T* o = out.data();
  const T *pa = a.data(), *pb = b.data(), *pc = c.data();
  Shape sa = Tensor<T>::broadcast_strides(a, shape), sb = Tensor<T>::broadcast_strides(b, shape),
        sc = Tensor<T>::broadcast_strides(c, shape);
  int64_t i = 0;
  for_each_strided<3>(shape, {sa.data(), sb.data(), sc.data()}, {0, 0, 0}, [&](auto k) {
    o[i++] = T(f(acc_t<T>(pa[k[0]]), acc_t<T>(pb[k[1]]), acc_t<T>(pc[k[2]])));
  });
  return out;
}

}  // namespace dg::ref
