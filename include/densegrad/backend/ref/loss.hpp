// densegrad/backend/ref/loss.hpp: reference kernels for cross-entropy over (N, C) logits:
// a row-wise, max-subtracted log_softmax, the loss against a dense target distribution q, and
// its logits gradient. Math in double. Not the public log_softmax (ops/activation.hpp has it).
// Shape legend: logits, logp, q: (N, C); one row per sample, one column per class.
#pragma once

#include <cmath>

#include "../../core/tensor.hpp"

namespace dg::ref {

/// logp[n, c] = x[n, c] - m - log(sum_k exp(x[n, k] - m)), m = max_k x[n, k] (so exp never overflows).
template <class T>
Tensor<T> log_softmax_rows(const Tensor<T>& x) {
  const int64_t N = x.size(0), C = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  Tensor<T> out = Tensor<T>::empty({N, C});
  for (int64_t n = 0; n < N; ++n) {
    const T* row = x.data() + n * s0;
    double m = -INFINITY, z = 0;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, double(acc_t<T>(row[c * s1])));
    for (int64_t c = 0; c < C; ++c) z += std::exp(double(acc_t<T>(row[c * s1])) - m);
    const double lse = m + std::log(z);
    for (int64_t c = 0; c < C; ++c) out.data()[n * C + c] = T(double(acc_t<T>(row[c * s1])) - lse);
  }
  return out;
}

/// mean over rows of -sum_c q[n, c] * logp[n, c]; a q of 0 contributes 0 even where logp is -inf.
template <class T>
double cross_entropy_mean(const Tensor<T>& logp, const Tensor<T>& q) {
  const int64_t N = logp.size(0), C = logp.size(1);
  double s = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const double qv = double(acc_t<T>(q.data()[n * C + c]));
      if (qv != 0.0) s -= qv * double(acc_t<T>(logp.data()[n * C + c]));
    }
  return s / double(N);  // N = 0 gives nan, like torch's mean of nothing
}

/// d loss / d logits = scale * (softmax * sum_c q - q), softmax = exp(logp); scale = dout / N.
/// (sum_c q is 1 for a proper distribution; soft targets need not be normalized.)
template <class T>
Tensor<T> cross_entropy_backward(const Tensor<T>& logp, const Tensor<T>& q, double scale) {
  const int64_t N = logp.size(0), C = logp.size(1);
  Tensor<T> dx = Tensor<T>::empty({N, C});
  for (int64_t n = 0; n < N; ++n) {
    const T *lp = logp.data() + n * C, *qr = q.data() + n * C;
    double qsum = 0;
    for (int64_t c = 0; c < C; ++c) qsum += double(acc_t<T>(qr[c]));
    for (int64_t c = 0; c < C; ++c)
      dx.data()[n * C + c] = T(scale * (std::exp(double(acc_t<T>(lp[c]))) * qsum - double(acc_t<T>(qr[c]))));
  }
  return dx;
}

}  // namespace dg::ref
