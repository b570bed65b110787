// densegrad/ops/elementwise.hpp: arithmetic and pointwise math with NumPy broadcasting:
// add, sub, mul, div, neg, exp, log, sqrt, pow, abs, clamp, and the C++ operators.
// Each op: forward through backend/ref/elementwise.hpp (binary arithmetic through the fast
// broadcasting loops of backend/cpu/elementwise.hpp, whose oracle is the ref kernel), backward
// right below it, written with other ops; a broadcast input's gradient is sum_to() its own shape.
#pragma once

#include <cmath>
#include <limits>

#include "../backend/cpu/elementwise.hpp"
#include "dispatch.hpp"
#include "reduce.hpp"

namespace dg {

namespace detail {
template <class T> using Grads = std::vector<Tensor<T>>;
}

/// torch.add(a, b)
template <class T>
Tensor<T> add(const Tensor<T>& a, const Tensor<T>& b) {
  Tensor<T> out = detail::arithmetic2("add", a, b, BinaryFn::Add, [](auto x, auto y) { return x + y; });
  return autograd::record("add", out, {a, b}, [sa = a.shape(), sb = b.shape()](const Tensor<T>& dout) {
    return detail::Grads<T>{sum_to(dout, sa), sum_to(dout, sb)};
  });
}

/// torch.sub(a, b)
template <class T>
Tensor<T> sub(const Tensor<T>& a, const Tensor<T>& b) {
  Tensor<T> out = detail::arithmetic2("sub", a, b, BinaryFn::Sub, [](auto x, auto y) { return x - y; });
  return autograd::record("sub", out, {a, b}, [sa = a.shape(), sb = b.shape()](const Tensor<T>& dout) {
    return detail::Grads<T>{sum_to(dout, sa), sum_to(detail::pointwise("sub backward", dout, UnaryFn::MulScalar,
                                                                       [](auto g) { return -g; }, -1.0), sb)};
  });
}

template <class T> Tensor<T> mul(const Tensor<T>& a, const Tensor<T>& b);  // below

namespace detail {
/// sum_to(mul(g, x), shape): the gradient of a broadcast factor of a product. For float g and x
/// of one shape on the CPU, each contiguous or batch-strided (a dense stage's gradient
/// window), the products are summed as they are made (cpu::sum_of_products: the same bits, and
/// no tensor of g's size).
template <class T>
Tensor<T> sum_to_mul(const Tensor<T>& g, const Tensor<T>& x, const Shape& shape) {
  if (g.shape() != shape && g.device().is_cpu() && x.device().is_cpu()) {
    const Shape dims = sum_to_dims(g.shape(), shape);
    if (cpu::sum_of_products_fits(g, x, dims)) return cpu::sum_of_products(g, x, dims).reshape(shape);
  }
  return sum_to(mul(g, x), shape);
}
}  // namespace detail

/// torch.mul(a, b); saves each input that the other one's gradient needs (b for da, a for db).
template <class T>
Tensor<T> mul(const Tensor<T>& a, const Tensor<T>& b) {
  Tensor<T> out = detail::arithmetic2("mul", a, b, BinaryFn::Mul, [](auto x, auto y) { return x * y; });
  const bool need_a = a.requires_grad(), need_b = b.requires_grad();
  // each operand is kept only for the other's gradient: x * constant keeps the constant alone
  return autograd::record("mul", out, {a, b},
                          [a = need_b ? a.detach() : Tensor<T>(), b = need_a ? b.detach() : Tensor<T>(),
                           a_shape = a.shape(), b_shape = b.shape(), need_a, need_b](const Tensor<T>& dout) {
                            detail::Grads<T> g(2);
                            if (need_a) g[0] = detail::sum_to_mul(dout, b, a_shape);
                            if (need_b) g[1] = detail::sum_to_mul(dout, a, b_shape);
                            return g;
                          });
}

/// torch.div(a, b); saves a and b.
template <class T>
Tensor<T> div(const Tensor<T>& a, const Tensor<T>& b) {
  Tensor<T> out = detail::arithmetic2("div", a, b, BinaryFn::Div, [](auto x, auto y) { return x / y; });
  return autograd::record("div", out, {a, b}, [a = a.detach(), b = b.detach(), need_a = a.requires_grad(),
                                               need_b = b.requires_grad()](const Tensor<T>& dout) {
    detail::Grads<T> g(2);
    if (need_a) g[0] = sum_to(div(dout, b), a.shape());
    // d(a/b)/db = -a / b^2
    if (need_b)
      g[1] = sum_to(detail::pointwise3("div backward", dout, a, b, TernaryFn::DivGradB,
                                       [](auto d, auto x, auto y) { return -d * x / (y * y); }),
                    b.shape());
    return g;
  });
}

/// Scalar forms: x op s (s is a constant, no gradient).
template <class T>
Tensor<T> add(const Tensor<T>& x, double s) {
  Tensor<T> out = detail::pointwise("add", x, UnaryFn::AddScalar, [s](auto v) { return v + static_cast<decltype(v)>(s); }, s);
  return autograd::record("add_scalar", out, {x}, [](const Tensor<T>& dout) { return detail::Grads<T>{dout}; });
}
template <class T>
Tensor<T> mul(const Tensor<T>& x, double s) {
  auto times_s = [s](auto v) { return v * static_cast<decltype(v)>(s); };
  Tensor<T> out = detail::pointwise("mul", x, UnaryFn::MulScalar, times_s, s);
  return autograd::record("mul_scalar", out, {x}, [s, times_s](const Tensor<T>& dout) {
    return detail::Grads<T>{detail::pointwise("mul backward", dout, UnaryFn::MulScalar, times_s, s)};
  });
}

/// torch.neg
template <class T>
Tensor<T> neg(const Tensor<T>& x) { return mul(x, -1.0); }

/// torch.exp; saves its output (d exp(x) = exp(x) dx).
template <class T>
Tensor<T> exp(const Tensor<T>& x) {
  Tensor<T> out = detail::pointwise("exp", x, UnaryFn::Exp, [](auto v) { return std::exp(v); });
  return autograd::record("exp", out, {x}, [y = out.detach()](const Tensor<T>& dout) {
    return detail::Grads<T>{mul(dout, y)};
  });
}

/// torch.log (natural); saves its input.
template <class T>
Tensor<T> log(const Tensor<T>& x) {
  Tensor<T> out = detail::pointwise("log", x, UnaryFn::Log, [](auto v) { return std::log(v); });
  return autograd::record("log", out, {x}, [x = x.detach()](const Tensor<T>& dout) {
    return detail::Grads<T>{div(dout, x)};
  });
}

/// torch.sqrt; saves its output (d sqrt(x) = dx / (2 sqrt(x))).
template <class T>
Tensor<T> sqrt(const Tensor<T>& x) {
  Tensor<T> out = detail::pointwise("sqrt", x, UnaryFn::Sqrt, [](auto v) { return std::sqrt(v); });
  return autograd::record("sqrt", out, {x}, [y = out.detach()](const Tensor<T>& dout) {
    return detail::Grads<T>{
        detail::pointwise2("sqrt backward", dout, y, BinaryFn::SqrtGrad, [](auto g, auto r) { return g / (r + r); })};
  });
}

/// torch.pow(x, p) with a constant exponent; saves x.
template <class T>
Tensor<T> pow(const Tensor<T>& x, double p) {
  Tensor<T> out =
      detail::pointwise("pow", x, UnaryFn::PowScalar, [p](auto v) { return std::pow(v, static_cast<decltype(v)>(p)); }, p);
  return autograd::record("pow", out, {x}, [x = x.detach(), p](const Tensor<T>& dout) {
    // torch: the gradient of x^0 is 0 everywhere (also at x = 0)
    return detail::Grads<T>{detail::pointwise2("pow backward", dout, x, BinaryFn::PowScalarGrad, [p](auto g, auto v) {
      using A = decltype(v);
      return p == 0.0 ? A(0) : g * A(p) * std::pow(v, A(p - 1.0));
    }, p)};
  });
}

/// torch.pow(a, b) elementwise; saves a and b (backward recomputes a^b where it needs it).
template <class T>
Tensor<T> pow(const Tensor<T>& a, const Tensor<T>& b) {
  Tensor<T> out = detail::pointwise2("pow", a, b, BinaryFn::Pow, [](auto x, auto y) { return std::pow(x, y); });
  return autograd::record("pow", out, {a, b}, [a = a.detach(), b = b.detach(), need_a = a.requires_grad(),
                                               need_b = b.requires_grad()](const Tensor<T>& dout) {
    detail::Grads<T> g(2);
    if (need_a)  // b * a^(b-1), 0 where b == 0 (torch's convention)
      g[0] = sum_to(detail::pointwise3("pow backward", dout, a, b, TernaryFn::PowGradA, [](auto d, auto x, auto e) {
        using A = decltype(x);
        return e == A(0) ? A(0) : d * e * std::pow(x, e - A(1));
      }), a.shape());
    if (need_b)  // a^b * log(a), 0 where a == 0 and b >= 0 (torch's masking)
      g[1] = sum_to(detail::pointwise3("pow backward", dout, a, b, TernaryFn::PowGradB, [](auto d, auto x, auto e) {
        using A = decltype(x);
        return x == A(0) && e >= A(0) ? A(0) : d * std::pow(x, e) * std::log(x);
      }), b.shape());
    return g;
  });
}

/// torch.abs; the gradient at 0 is 0 (sign(0) = 0), as in torch.
template <class T>
Tensor<T> abs(const Tensor<T>& x) {
  Tensor<T> out = detail::pointwise("abs", x, UnaryFn::Abs, [](auto v) { return std::abs(v); });
  return autograd::record("abs", out, {x}, [x = x.detach()](const Tensor<T>& dout) {
    return detail::Grads<T>{detail::pointwise2("abs backward", dout, x, BinaryFn::AbsGrad, [](auto g, auto v) {
      using A = decltype(v);
      return v > A(0) ? g : v < A(0) ? -g : A(0);
    })};
  });
}

/// torch.clamp(x, lo, hi); the gradient passes where lo <= x <= hi (torch's rule).
template <class T>
Tensor<T> clamp(const Tensor<T>& x, double lo = -std::numeric_limits<double>::infinity(),
                double hi = std::numeric_limits<double>::infinity()) {
  DG_CHECK(!(lo > hi), "clamp: min ", lo, " is greater than max ", hi);
  Tensor<T> out = detail::pointwise("clamp", x, UnaryFn::Clamp, [lo, hi](auto v) {
    using A = decltype(v);
    return v != v ? v : std::min(std::max(v, A(lo)), A(hi));
  }, lo, hi);
  return autograd::record("clamp", out, {x}, [x = x.detach(), lo, hi](const Tensor<T>& dout) {
    return detail::Grads<T>{detail::pointwise2("clamp backward", dout, x, BinaryFn::ClampGrad, [lo, hi](auto g, auto v) {
      using A = decltype(v);
      return (v >= A(lo) && v <= A(hi)) ? g : A(0);
    }, lo, hi)};
  });
}

// ---- operators, like torch's Python operators
template <class T> Tensor<T> operator+(const Tensor<T>& a, const Tensor<T>& b) { return add(a, b); }
template <class T> Tensor<T> operator-(const Tensor<T>& a, const Tensor<T>& b) { return sub(a, b); }
template <class T> Tensor<T> operator*(const Tensor<T>& a, const Tensor<T>& b) { return mul(a, b); }
template <class T> Tensor<T> operator/(const Tensor<T>& a, const Tensor<T>& b) { return div(a, b); }
template <class T> Tensor<T> operator-(const Tensor<T>& x) { return neg(x); }
template <class T> Tensor<T> operator+(const Tensor<T>& x, double s) { return add(x, s); }
template <class T> Tensor<T> operator+(double s, const Tensor<T>& x) { return add(x, s); }
template <class T> Tensor<T> operator-(const Tensor<T>& x, double s) { return add(x, -s); }
template <class T> Tensor<T> operator-(double s, const Tensor<T>& x) { return add(neg(x), s); }
template <class T> Tensor<T> operator*(const Tensor<T>& x, double s) { return mul(x, s); }
template <class T> Tensor<T> operator*(double s, const Tensor<T>& x) { return mul(x, s); }
template <class T> Tensor<T> operator/(const Tensor<T>& x, double s) { return mul(x, 1.0 / s); }
template <class T> Tensor<T> operator/(double s, const Tensor<T>& x) { return mul(pow(x, -1.0), s); }

}  // namespace dg
