// densegrad/optim/clip.hpp: gradient clipping by the global norm of all gradients, and a
// finiteness check to skip a step after an overflow. Works on .grad() in place.
// Not clipping by value, and no per-parameter norms.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "optimizer.hpp"

namespace dg::optim {

namespace detail {
/// Calls f(element&) on every element of t, contiguous or not (OpenMP on big contiguous ones).
template <class T, class F>
void for_each_element(const Tensor<T>& t, F&& f) {
  T* p = t.data();
  if (t.is_contiguous()) {
    parallel_for(t.numel(), [&](int64_t k) { f(p[k]); });
  } else {
    for_each_strided<1>(t.shape(), {t.strides().data()}, {0}, [&](auto o) { f(p[o[0]]); });
  }
}
/// 0, 1, ..., t.dim() - 1: every dim of t.
template <class T>
Shape all_dims(const Tensor<T>& t) {
  Shape d(static_cast<size_t>(t.dim()));
  for (int64_t i = 0; i < t.dim(); ++i) d[static_cast<size_t>(i)] = i;
  return d;
}
}  // namespace detail

/// The norm of all gradients together, as if concatenated into one vector
/// (torch.nn.utils.get_total_norm). Parameters without a gradient are skipped; 0 if none has one.
/// norm_type > 0, or INFINITY for the largest absolute value. Accumulated in double.
template <class T>
double total_grad_norm(const std::vector<Tensor<T>>& params, double norm_type = 2.0) {
  DG_CHECK(norm_type > 0, "clip_grad_norm_: norm_type must be > 0 or INFINITY, got ", norm_type);
  const bool inf = std::isinf(norm_type);
  double acc = 0;    // sum of |g|^p, or max |g| for the inf norm
  bool nan = false;  // std::max drops NaN, torch's max keeps it: track it on the side
  for (const auto& p : params) {
    if (!p.grad().defined()) continue;
    const Tensor<T> g = p.grad().contiguous();  // copies only a strided gradient
    if (g.device().is_cuda()) {  // device reductions; one scalar comes back per parameter
      const DeviceKernels<T>& k = cuda_kernels<T>("clip_grad_norm_");
      if (inf || norm_type != 2.0) {
        Tensor<T> a = k.unary(UnaryFn::Abs, g, 0, 0);
        if (inf) {
          const double m = double(acc_t<T>(k.amax(a, detail::all_dims(g)).item()));
          nan = nan || std::isnan(m);
          acc = std::max(acc, m);
        } else {
          acc += double(acc_t<T>(k.sum(k.unary(UnaryFn::PowScalar, a, norm_type, 0), detail::all_dims(g)).item()));
        }
      } else {
        acc += k.sum_squares(g);
      }
      continue;
    }
    const T* pg = g.data();
    const int64_t n = g.numel();
    double s = 0;
    if (inf) {
      bool has_nan = false;
#ifdef DENSEGRAD_WITH_OPENMP
#pragma omp parallel for reduction(max : s) reduction(|| : has_nan) if (n >= detail::kParallelMin)
#endif
      for (int64_t k = 0; k < n; ++k) {
        double a = std::abs(static_cast<double>(pg[k]));
        has_nan = has_nan || std::isnan(a);
        s = std::max(s, a);
      }
      acc = std::max(acc, s);
      nan = nan || has_nan;
    } else {
#ifdef DENSEGRAD_WITH_OPENMP
#pragma omp parallel for reduction(+ : s) if (n >= detail::kParallelMin)
#endif
      for (int64_t k = 0; k < n; ++k) {
        double a = std::abs(static_cast<double>(pg[k]));
        s += norm_type == 2.0 ? a * a : std::pow(a, norm_type);
      }
      acc += s;
    }
  }
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  return inf ? acc : std::pow(acc, 1.0 / norm_type);
}

/// Scales all gradients so that their global norm is at most max_norm and returns the norm
/// before clipping (torch.nn.utils.clip_grad_norm_). As torch: the factor is
/// max_norm / (total + 1e-6), applied whenever it is below 1; a NaN or Inf norm makes it
/// NaN or 0, so the gradients become NaN (check grads_finite() first to skip such a step, or
/// pass error_if_nonfinite to get a dg::Error instead).
/// Example: double norm = optim::clip_grad_norm_(model.parameters(), 1.0);
template <class T>
double clip_grad_norm_(const std::vector<Tensor<T>>& params, double max_norm, double norm_type = 2.0,
                       bool error_if_nonfinite = false) {
  DG_CHECK(max_norm >= 0, "clip_grad_norm_: max_norm must be >= 0, got ", max_norm);
  double total = total_grad_norm(params, norm_type);
  DG_CHECK(!error_if_nonfinite || std::isfinite(total), "clip_grad_norm_: the total norm of order ", norm_type,
           " of the gradients is non-finite (", total, "), so it cannot be clipped");
  double coef = max_norm / (total + 1e-6);
  if (coef >= 1.0) return total;  // torch clamps the factor to <= 1: scaling by 1 (a NaN goes on)
  const acc_t<T> c = static_cast<acc_t<T>>(coef);
  NoGradGuard no_grad;
  for (const auto& p : params)
    if (p.grad().defined()) {
      if (p.grad().device().is_cuda())
        p.grad().copy_(cuda_kernels<T>("clip_grad_norm_").unary(UnaryFn::MulScalar, p.grad(), double(c), 0));
      else
        detail::for_each_element(p.grad(), [&](T& x) { x = T(static_cast<acc_t<T>>(x) * c); });
    }
  return total;
}

/// True when every existing gradient is finite (no NaN, no Inf): a cheap guard against a
/// diverged or overflowed step (what torch.amp.GradScaler checks before stepping).
template <class T>
bool grads_finite(const std::vector<Tensor<T>>& params) {
  for (const auto& p : params) {
    if (!p.grad().defined()) continue;
    const Tensor<T> g = p.grad().contiguous();  // copies only a strided gradient
    if (g.device().is_cuda()) {  // a NaN or Inf makes the sum of squares NaN or Inf
      if (!std::isfinite(cuda_kernels<T>("grads_finite").sum_squares(g))) return false;
      continue;
    }
    const T* pg = g.data();
    const int64_t n = g.numel();
    bool ok = true;
#ifdef DENSEGRAD_WITH_OPENMP
#pragma omp parallel for reduction(&& : ok) if (n >= detail::kParallelMin)
#endif
    for (int64_t k = 0; k < n; ++k) ok = ok && std::isfinite(static_cast<double>(pg[k]));
    if (!ok) return false;
  }
  return true;
}

}  // namespace dg::optim
