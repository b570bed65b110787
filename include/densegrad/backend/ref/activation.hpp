// densegrad/backend/ref/activation.hpp: reference activation kernels: the scalar math of gelu
// (erf and tanh forms), hard_sigmoid, relu, relu6, sigmoid and their derivatives, plus softmax
// and log_softmax along any dim. Plain loops over any strides, math in acc_t<T>; the oracle, not
// the fast path (backend/cpu/activation.hpp reuses the gelu scalars and only parallelizes).
// Shape legend: x, y, dy: any shape, all the same; `dim` is already wrapped to [0, x.dim()).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "elementwise.hpp"

namespace dg::ref {

// ---- scalar math (A is the arithmetic type: float or double), written like ATen's CPU kernels

constexpr double kSqrt1_2 = 0.70710678118654752440;        // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;     // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;    // sqrt(2 / pi)
constexpr double kGeluTanhCubic = 0.044715;

/// gelu(x) = x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)); tanh form: x/2 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
template <class A>
DENSEGRAD_HOST_DEVICE A gelu_scalar(A x, bool tanh_approximation) {
  if (tanh_approximation)
    return A(0.5) * x * (A(1) + std::tanh(A(kSqrt2OverPi) * (x + A(kGeluTanhCubic) * x * x * x)));
  return A(0.5) * x * (A(1) + std::erf(x * A(kSqrt1_2)));
}

/// d gelu / dx: Phi(x) + x phi(x) for erf; the tanh form's product rule as in ATen.
template <class A>
DENSEGRAD_HOST_DEVICE A gelu_grad_scalar(A x, bool tanh_approximation) {
  if (tanh_approximation) {
    const A inner = A(kSqrt2OverPi) * (x + A(kGeluTanhCubic) * x * x * x), t = std::tanh(inner);
    const A left = A(0.5) * x, right = A(1) + t;
    return A(0.5) * right + left * (A(1) - t * t) * A(kSqrt2OverPi) * (A(1) + A(3 * kGeluTanhCubic) * x * x);
  }
  const A cdf = A(0.5) * (A(1) + std::erf(x * A(kSqrt1_2))), pdf = A(kInvSqrt2Pi) * std::exp(A(-0.5) * x * x);
  return cdf + x * pdf;
}

// ---- pointwise kernels: fresh contiguous outputs (map/map2 from ref/elementwise.hpp)

/// torch.nn.functional.gelu
template <class T>
Tensor<T> gelu(const Tensor<T>& x, bool tanh_approximation) {
  return map(x, [=](auto v) { return gelu_scalar(v, tanh_approximation); });
}
template <class T>
Tensor<T> gelu_backward(const Tensor<T>& dy, const Tensor<T>& x, bool tanh_approximation) {
  return map2(dy, x, [=](auto g, auto v) { return g * gelu_grad_scalar(v, tanh_approximation); }, "gelu backward");
}

/// torch.nn.functional.hardsigmoid: relu6(x + 3) / 6.
template <class T>
Tensor<T> hard_sigmoid(const Tensor<T>& x) {
  return map(x, [](auto v) {
    using A = decltype(v);
    return std::min(std::max(v + A(3), A(0)), A(6)) / A(6);
  });
}
/// 1/6 strictly inside (-3, 3), 0 outside and at -3 and 3 exactly (torch's rule).
template <class T>
Tensor<T> hard_sigmoid_backward(const Tensor<T>& dy, const Tensor<T>& x) {
  return map2(dy, x, [](auto g, auto v) {
    using A = decltype(v);
    return v > A(-3) && v < A(3) ? g / A(6) : A(0);
  }, "hard_sigmoid backward");
}

/// torch.relu (NaN stays NaN: std::max(NaN, 0) returns its first argument).
template <class T>
Tensor<T> relu(const Tensor<T>& x) {
  return map(x, [](auto v) { return std::max(v, decltype(v)(0)); });
}
/// From the output: y > 0 exactly where x > 0, so the gradient at x == 0 is 0 (like torch).
template <class T>
Tensor<T> relu_backward(const Tensor<T>& dy, const Tensor<T>& y) {
  return map2(dy, y, [](auto g, auto r) { return r > decltype(r)(0) ? g : decltype(r)(0); }, "relu backward");
}

/// torch.nn.functional.relu6 = hardtanh(x, 0, 6).
template <class T>
Tensor<T> relu6(const Tensor<T>& x) {
  return map(x, [](auto v) {
    using A = decltype(v);
    return std::min(std::max(v, A(0)), A(6));
  });
}
/// Passes the gradient strictly inside (0, 6); 0 at 0 and 6 (torch's hardtanh rule).
template <class T>
Tensor<T> relu6_backward(const Tensor<T>& dy, const Tensor<T>& x) {
  return map2(dy, x, [](auto g, auto v) {
    using A = decltype(v);
    return v > A(0) && v < A(6) ? g : A(0);
  }, "relu6 backward");
}

/// torch.sigmoid: 1 / (1 + exp(-x)) (exp overflow gives 1/inf = 0, the right limit).
template <class T>
Tensor<T> sigmoid(const Tensor<T>& x) {
  return map(x, [](auto v) {
    using A = decltype(v);
    return A(1) / (A(1) + std::exp(-v));
  });
}
/// From the output: d sigmoid = y (1 - y).
template <class T>
Tensor<T> sigmoid_backward(const Tensor<T>& dy, const Tensor<T>& y) {
  return map2(dy, y, [](auto g, auto s) { return g * s * (decltype(s)(1) - s); }, "sigmoid backward");
}

// ---- softmax family: one "line" = all elements along `dim` with the other indices fixed

namespace detail {
/// Calls f(offsets) once per line of `shape` along `dim`; offsets[k] is the line's first element
/// in operand k. A 0-D tensor is one line of length 1.
template <size_t K, class F>
void for_each_line(const Shape& shape, int64_t dim, const std::array<const Shape*, K>& strides, F f) {
  if (shape.empty()) {
    f(std::array<int64_t, K>{});
    return;
  }
  Shape outer = shape;
  outer[dim] = 1;
  std::array<const int64_t*, K> st;
  for (size_t k = 0; k < K; ++k) st[k] = strides[k]->data();
  for_each_strided<K>(outer, st, {}, f);
}
inline int64_t line_length(const Shape& s, int64_t dim) { return s.empty() ? 1 : s[dim]; }
inline int64_t line_step(const Shape& strides, int64_t dim) { return strides.empty() ? 1 : strides[dim]; }

/// Softmax or log-softmax of every line, numerically stable: m = max, s = sum exp(x - m);
/// softmax = exp(x - m) / s, log_softmax = x - m - log(s). Sums in double.
template <class T>
Tensor<T> softmax_impl(const Tensor<T>& x, int64_t dim, bool log) {
  Tensor<T> y = Tensor<T>::empty(x.shape());
  const Shape ys = y.strides();
  const int64_t L = line_length(x.shape(), dim), xstep = line_step(x.strides(), dim), ystep = line_step(ys, dim);
  const T* px = x.data();
  T* py = y.data();
  for_each_line<2>(x.shape(), dim, {&x.strides(), &ys}, [&](auto o) {
    double m = -std::numeric_limits<double>::infinity(), s = 0;
    for (int64_t i = 0; i < L; ++i) m = std::max(m, double(acc_t<T>(px[o[0] + i * xstep])));
    for (int64_t i = 0; i < L; ++i) s += std::exp(double(acc_t<T>(px[o[0] + i * xstep])) - m);
    for (int64_t i = 0; i < L; ++i) {
      const double v = double(acc_t<T>(px[o[0] + i * xstep])) - m;
      py[o[1] + i * ystep] = T(log ? v - std::log(s) : std::exp(v) / s);
    }
  });
  return y;
}
}  // namespace detail

/// torch.softmax(x, dim)
template <class T>
Tensor<T> softmax(const Tensor<T>& x, int64_t dim) { return detail::softmax_impl(x, dim, false); }
/// torch.log_softmax(x, dim)
template <class T>
Tensor<T> log_softmax(const Tensor<T>& x, int64_t dim) { return detail::softmax_impl(x, dim, true); }

/// From the output y: softmax: dx = y * (dy - sum(dy * y)); log_softmax: dx = dy - exp(y) * sum(dy)
/// (sums along the line).
template <class T>
Tensor<T> softmax_backward(const Tensor<T>& dy, const Tensor<T>& y, int64_t dim, bool log) {
  Tensor<T> dx = Tensor<T>::empty(y.shape());
  const Shape ds = dx.strides();
  const int64_t L = detail::line_length(y.shape(), dim), gstep = detail::line_step(dy.strides(), dim),
                ystep = detail::line_step(y.strides(), dim), dstep = detail::line_step(ds, dim);
  const T *pg = dy.data(), *py = y.data();
  T* pd = dx.data();
  detail::for_each_line<3>(y.shape(), dim, {&dy.strides(), &y.strides(), &ds}, [&](auto o) {
    auto g = [&](int64_t i) { return double(acc_t<T>(pg[o[0] + i * gstep])); };
    auto v = [&](int64_t i) { return double(acc_t<T>(py[o[1] + i * ystep])); };
    double s = 0;
    for (int64_t i = 0; i < L; ++i) s += log ? g(i) : g(i) * v(i);
    for (int64_t i = 0; i < L; ++i) pd[o[2] + i * dstep] = T(log ? g(i) - std::exp(v(i)) * s : v(i) * (g(i) - s));
  });
  return dx;
}

}  // namespace dg::ref
