// densegrad/backend/cpu/activation.hpp: fast GELU forward and backward over contiguous tensors:
// the very scalar math of ref::gelu_scalar / ref::gelu_grad_scalar, split across OpenMP threads.
// Deliberately not SIMD: libm's erf/tanh are scalar, and a vectorized erf approximation (Eigen's
// is ~7 ulp near the tails) would break 1e-5 parity with torch; the oracle is ref::gelu.
// Shape legend: x, dy, y, dx: any shape, contiguous, all the same.
#pragma once

#include "../ref/activation.hpp"

// DENSEGRAD_OMP(clauses): `#pragma omp clauses` in an OpenMP build, nothing otherwise.
#ifndef DENSEGRAD_OMP
#define DENSEGRAD_OMP_STR_(...) #__VA_ARGS__
#ifdef DENSEGRAD_WITH_OPENMP
#define DENSEGRAD_OMP(...) _Pragma(DENSEGRAD_OMP_STR_(omp __VA_ARGS__))
#else
#define DENSEGRAD_OMP(...)
#endif
#endif

namespace dg::cpu {

namespace detail {
/// Below this many elements one thread is faster than waking the others (erf costs ~10 ns).
constexpr int64_t kActivationParallelMin = int64_t(1) << 14;
}  // namespace detail

/// torch.nn.functional.gelu on a contiguous x (= ref::gelu).
template <class T>
Tensor<T> gelu(const Tensor<T>& x, bool tanh_approximation) {
  using A = acc_t<T>;
  DG_CHECK(x.is_contiguous(), "cpu::gelu: expected a contiguous input, got shape ", shape_str(x.shape()),
           " strides ", shape_str(x.strides()));
  Tensor<T> y = Tensor<T>::empty(x.shape());
  const T* px = x.data();
  T* py = y.data();
  const int64_t n = x.numel();
  DENSEGRAD_OMP(parallel for schedule(static) if (n >= detail::kActivationParallelMin))
  for (int64_t i = 0; i < n; ++i) py[i] = T(ref::gelu_scalar(A(px[i]), tanh_approximation));
  return y;
}

/// dx = dy * gelu'(x) for contiguous dy and x of one shape (= ref::gelu_backward).
template <class T>
Tensor<T> gelu_backward(const Tensor<T>& dy, const Tensor<T>& x, bool tanh_approximation) {
  using A = acc_t<T>;
  DG_CHECK(dy.is_contiguous() && x.is_contiguous() && dy.shape() == x.shape(),
           "cpu::gelu_backward: expected contiguous dy and x of one shape, got ", shape_str(dy.shape()), " and ",
           shape_str(x.shape()));
  Tensor<T> dx = Tensor<T>::empty(x.shape());
  const T *pdy = dy.data(), *px = x.data();
  T* pdx = dx.data();
  const int64_t n = x.numel();
  DENSEGRAD_OMP(parallel for schedule(static) if (n >= detail::kActivationParallelMin))
  for (int64_t i = 0; i < n; ++i) pdx[i] = T(A(pdy[i]) * ref::gelu_grad_scalar(A(px[i]), tanh_approximation));
  return dx;
}

}  // namespace dg::cpu
