// densegrad/backend/cpu/elementwise.hpp: fast binary elementwise maps with broadcasting. The
// same contract as ref::map2, but the innermost loop runs over the longest block of trailing
// dims each operand walks with one fixed step (1: dense, 0: broadcast), so a per-channel scale
// (1, C, 1, 1) against (N, C, H, W) is N*C plain loops over H*W; OpenMP splits the rows of big
// tensors. Not a JIT or a fusion engine. Tested against ref::map2 (tests/test_cpu_fastpaths.cpp).
// Shape legend: a, b: any shapes that broadcast together; out: their broadcast shape.
#pragma once

#include "parallel.hpp"
#include "../ref/elementwise.hpp"


namespace dg::cpu {

/// Below this many output elements one thread does the whole map (waking threads costs more).
constexpr int64_t kElementwiseParallelMin = int64_t(1) << 16;

namespace elementwise_detail {
/// Splits `shape` into outer dims [0, d) and one inner run of `run` elements over which every
/// operand k advances by the fixed step steps[k] (its stride in the innermost non-1 dim).
template <size_t K>
void inner_run(const Shape& shape, const std::array<const int64_t*, K>& strides, int64_t& d, int64_t& run,
               std::array<int64_t, K>& steps) {
  d = static_cast<int64_t>(shape.size());
  run = 1;
  steps.fill(0);
  bool first = true;
  while (d > 0) {
    const int64_t i = d - 1;
    if (shape[i] != 1) {
      if (first) {
        for (size_t k = 0; k < K; ++k) steps[k] = strides[k][i];
        first = false;
      } else {
        for (size_t k = 0; k < K; ++k)
          if (strides[k][i] != steps[k] * run) return;  // dim i does not continue the run
      }
      run *= shape[i];
    }
    --d;
  }
}
}  // namespace elementwise_detail

/// out = f(a, b) with a and b broadcast to a common shape (ref::map2's contract and math: f gets
/// acc_t<T> values); `op` names the caller in errors.
template <class T, class F>
Tensor<T> map2(const Tensor<T>& a, const Tensor<T>& b, F f, const char* op) {
  Shape shape = broadcast_shapes(a.shape(), b.shape(), op);
  Shape sa = Tensor<T>::broadcast_strides(a, shape), sb = Tensor<T>::broadcast_strides(b, shape);
  int64_t d, run;
  std::array<int64_t, 2> step;
  elementwise_detail::inner_run<2>(shape, {sa.data(), sb.data()}, d, run, step);
  if (run < 8 || shape_numel(shape) == 0) return ref::map2(a, b, f, op);  // no useful inner run (a transposed view)
  Tensor<T> out = Tensor<T>::empty(shape);
  T* o = out.data();
  const T *pa = a.data(), *pb = b.data();
  const int64_t nrows = out.numel() / run, s0 = step[0], s1 = step[1];
  DENSEGRAD_OMP(parallel for if (out.numel() >= kElementwiseParallelMin && nrows > 1))
  for (int64_t r = 0; r < nrows; ++r) {
    int64_t oa = 0, ob = 0;  // unravel row r over the outer dims [0, d)
    for (int64_t i = d - 1, rem = r; i >= 0; --i) {
      const int64_t idx = rem % shape[i];
      rem /= shape[i];
      oa += idx * sa[i];
      ob += idx * sb[i];
    }
    T* ro = o + r * run;
    const T *ra = pa + oa, *rb = pb + ob;
    using A = acc_t<T>;
    if (s0 == 1 && s1 == 1) {
      DENSEGRAD_OMP(simd)
      for (int64_t i = 0; i < run; ++i) ro[i] = T(f(A(ra[i]), A(rb[i])));
    } else if (s0 == 1 && s1 == 0) {  // b is one value along the run (a per-channel scale)
      const A vb = A(rb[0]);
      DENSEGRAD_OMP(simd)
      for (int64_t i = 0; i < run; ++i) ro[i] = T(f(A(ra[i]), vb));
    } else if (s0 == 0 && s1 == 1) {
      const A va = A(ra[0]);
      DENSEGRAD_OMP(simd)
      for (int64_t i = 0; i < run; ++i) ro[i] = T(f(va, A(rb[i])));
    } else {
      for (int64_t i = 0; i < run; ++i) ro[i] = T(f(A(ra[i * s0]), A(rb[i * s1])));
    }
  }
  return out;
}

}  // namespace dg::cpu
