// densegrad/backend/cpu/reduce.hpp: fast sum over dims for the layouts gradients produce: a
// contiguous float/double tensor reduced over a leading block, a trailing block, or both, around
// one kept block (bias and layer-scale grads: NCHW over {0, 2, 3}; SE and pooling: over {2, 3};
// linear bias: (N, F) over {0}). Sums in double like ref::sum, in ref::sum's order except the
// float runs of one output, which go in vector lanes. Anything else is left to ref::sum. Tested against it in tests/test_cpu_fastpaths.cpp.
// Shape legend: x viewed as (R0, K, R1): R0 and R1 reduced (each may be 1), K kept.
#pragma once

#include <vector>

#include "parallel.hpp"
#include "../ref/reduce.hpp"


namespace dg::cpu {

namespace reduce_detail {
/// x's dims as (R0, K, R1) when the kept dims form one block between reduced ones (size-1
/// dims go anywhere); false otherwise.
inline bool as_r0_k_r1(const Shape& shape, const Shape& dims, int64_t& r0, int64_t& k, int64_t& r1) {
  r0 = k = r1 = 1;
  int stage = 0;  // 0: in R0, 1: in K, 2: in R1
  for (int64_t i = 0; i < static_cast<int64_t>(shape.size()); ++i) {
    if (shape[i] == 1) continue;
    const bool red = std::find(dims.begin(), dims.end(), i) != dims.end();
    if (stage == 0 && !red) stage = 1;
    else if (stage == 1 && red) stage = 2;
    else if (stage == 2 && !red) return false;  // a second kept block
    (stage == 0 ? r0 : stage == 1 ? k : r1) *= shape[i];
  }
  return true;
}
}  // namespace reduce_detail

/// True when cpu::sum handles this call (float or double, contiguous, (R0, K, R1) pattern).
template <class T>
bool sum_fits(const Tensor<T>& x, const Shape& dims) {
  int64_t r0, k, r1;
  return (std::is_same_v<T, float> || std::is_same_v<T, double>) && x.is_contiguous() && x.numel() > 0 &&
         reduce_detail::as_r0_k_r1(x.shape(), dims, r0, k, r1);
}

/// ref::sum for the layouts sum_fits accepts: out[k] = sum over (r0, r1) of x[r0, k, r1], in the
/// keepdim shape. Threads split the kept entries (no two threads share an output).
template <class T>
Tensor<T> sum(const Tensor<T>& x, const Shape& dims) {
  int64_t r0, k, r1;
  reduce_detail::as_r0_k_r1(x.shape(), dims, r0, k, r1);
  if (k == 1 && r1 == 1) std::swap(r0, r1);  // a full sum: one contiguous run
  Tensor<T> out = Tensor<T>::empty(ref::reduced_shape(x.shape(), dims, true));
  const T* px = x.data();
  T* o = out.data();
  [[maybe_unused]] const bool par = x.numel() >= (int64_t(1) << 16);  // only read by OpenMP
  if (r1 > 1) {  // each kept entry sums R0 contiguous runs of R1
    DENSEGRAD_OMP(parallel for if (par && k > 1))
    for (int64_t j = 0; j < k; ++j) {
      double s = 0;
      for (int64_t a = 0; a < r0; ++a) {
        const T* row = px + (a * k + j) * r1;
        if constexpr (std::is_same_v<T, double>) {  // ref::sum's order: bit-identical doubles
          for (int64_t i = 0; i < r1; ++i) s += row[i];
        } else {  // float in double lanes: the order can only show after rounding to float
          DENSEGRAD_OMP(simd reduction(+ : s))
          for (int64_t i = 0; i < r1; ++i) s += double(row[i]);
        }
      }
      o[j] = T(s);
    }
  } else {  // column sums: add R0 rows of K into K accumulators, threads taking column blocks
    std::vector<double> acc(static_cast<size_t>(k), 0.0);
    double* pa = acc.data();
    const int64_t blocks = (k + 255) / 256;
    DENSEGRAD_OMP(parallel for if (par && blocks > 1))
    for (int64_t bj = 0; bj < blocks; ++bj) {
      const int64_t lo = bj * 256, hi = std::min(k, lo + 256);
      for (int64_t a = 0; a < r0; ++a) {
        const T* row = px + a * k;
        DENSEGRAD_OMP(simd)
        for (int64_t j = lo; j < hi; ++j) pa[j] += double(row[j]);
      }
    }
    for (int64_t j = 0; j < k; ++j) o[j] = T(acc[j]);
  }
  return out;
}

}  // namespace dg::cpu
