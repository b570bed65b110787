// densegrad/backend/ref/matmul.hpp: reference batched matrix product, three plain loops.
// The oracle the Eigen GEMM path (backend/cpu/matmul.hpp) is tested against.
#pragma once

#include "../../core/tensor.hpp"

namespace dg::ref {

/// out[b] = a[b] @ c[b]; a: (B, M, K), c: (B, K, N), both contiguous; out: (B, M, N).
template <class T>
Tensor<T> bmm(const Tensor<T>& a, const Tensor<T>& c) {
  const int64_t B = a.shape()[0], M = a.shape()[1], K = a.shape()[2], N = c.shape()[2];
  Tensor<T> out = Tensor<T>::empty({B, M, N});
  const T *pa = a.data(), *pc = c.data();
  T* po = out.data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        acc_t<T> s = 0;
        for (int64_t k = 0; k < K; ++k) s += acc_t<T>(pa[(b * M + m) * K + k]) * acc_t<T>(pc[(b * K + k) * N + n]);
        po[(b * M + m) * N + n] = T(s);
      }
  return out;
}

}  // namespace dg::ref
