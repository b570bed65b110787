// densegrad/backend/cpu/matmul.hpp: batched matrix product through Eigen's GEMM.
// bfloat16 is widened to float for the product and rounded once at the end.
#pragma once

#include <Eigen/Core>

#include "../../core/tensor.hpp"

namespace dg::cpu {

/// out[b] = a[b] @ c[b]; a: (B, M, K), c: (B, K, N), both contiguous; out: (B, M, N).
template <class T>
Tensor<T> bmm(const Tensor<T>& a, const Tensor<T>& c) {
  using A = acc_t<T>;
  using Mat = Eigen::Matrix<A, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const int64_t B = a.shape()[0], M = a.shape()[1], K = a.shape()[2], N = c.shape()[2];
  Tensor<T> out = Tensor<T>::empty({B, M, N});
  for (int64_t b = 0; b < B; ++b) {
    if constexpr (std::is_same_v<T, A>) {
      Eigen::Map<const Mat> ma(a.data() + b * M * K, M, K), mc(c.data() + b * K * N, K, N);
      Eigen::Map<Mat> mo(out.data() + b * M * N, M, N);
      if (K == 0) mo.setZero();
      else mo.noalias() = ma * mc;
    } else {
      Mat ma(M, K), mc(K, N);
      for (int64_t i = 0; i < M * K; ++i) ma.data()[i] = A(a.data()[b * M * K + i]);
      for (int64_t i = 0; i < K * N; ++i) mc.data()[i] = A(c.data()[b * K * N + i]);
      Mat mo = K == 0 ? Mat::Zero(M, N) : Mat(ma * mc);
      for (int64_t i = 0; i < M * N; ++i) out.data()[b * M * N + i] = T(mo.data()[i]);
    }
  }
  return out;
}

}  // namespace dg::cpu
