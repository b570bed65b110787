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

namespace reduce_detail {
/// ref::sum's loops for the layouts sum_fits accepts, over a tensor of this shape read by rows:
/// row_at(f) gives a callable r with r(i) the element at flat index f + i (a T), for the runs the
/// loops read (R1 elements, or K for column sums). out[k] = sum over (r0, r1) of [r0, k, r1], in
/// the keepdim shape. Threads split the kept entries (no two threads share an output).
template <class T, class RowAt>
Tensor<T> sum_by(const Shape& shape, const Shape& dims, RowAt row_at) {
  int64_t r0, k, r1;
  as_r0_k_r1(shape, dims, r0, k, r1);
  if (k == 1 && r1 == 1) std::swap(r0, r1);  // a full sum: one contiguous run
  Tensor<T> out = Tensor<T>::empty(ref::reduced_shape(shape, dims, true));
  T* o = out.data();
  [[maybe_unused]] const bool par = shape_numel(shape) >= (int64_t(1) << 16);  // only read by OpenMP
  if (r1 > 1) {  // each kept entry sums R0 contiguous runs of R1
    DENSEGRAD_OMP(parallel for if (par && k > 1))
    for (int64_t j = 0; j < k; ++j) {
      double s = 0;
      for (int64_t a = 0; a < r0; ++a) {
        const auto row = row_at((a * k + j) * r1);
        if constexpr (std::is_same_v<T, double>) {  // ref::sum's order: bit-identical doubles
          for (int64_t i = 0; i < r1; ++i) s += row(i);
        } else {  // float in double lanes: the order can only show after rounding to float
          DENSEGRAD_OMP(simd reduction(+ : s))
          for (int64_t i = 0; i < r1; ++i) s += double(row(i));
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
        const auto row = row_at(a * k);
        DENSEGRAD_OMP(simd)
        for (int64_t j = lo; j < hi; ++j) pa[j] += double(row(j));
      }
    }
    for (int64_t j = 0; j < k; ++j) o[j] = T(acc[j]);
  }
  return out;
}

/// Where a tensor's elements lie, by flat index f: image f / image at f / image * stride, then
/// dense (a contiguous tensor is one image; a batch-strided one has its images stride apart).
struct Images {
  int64_t image, stride;
  int64_t at(int64_t f) const { return f / image * stride + f % image; }
};

/// x's Images when it is contiguous or (4-D) batch-strided; image 0 otherwise.
template <class T>
Images images_of(const Tensor<T>& x) {
  if (x.is_contiguous()) return {std::max<int64_t>(1, x.numel()), 0};
  const int64_t s = batch_stride(x);
  return s < 0 ? Images{0, 0} : Images{x.numel() / x.size(0), s};
}
}  // namespace reduce_detail

/// ref::sum for the layouts sum_fits accepts, in the keepdim shape.
template <class T>
Tensor<T> sum(const Tensor<T>& x, const Shape& dims) {
  const T* px = x.data();
  return reduce_detail::sum_by<T>(x.shape(), dims, [px](int64_t f) { return [p = px + f](int64_t i) { return p[i]; }; });
}

/// True when sum_of_products takes a and b: float of one shape, each contiguous or a
/// batch-strided view (a dense stage's gradient window: dg::batch_stride), dims in the (R0, K, R1)
/// pattern, and the runs it reads inside one image. Not double: there the compiler may fuse the
/// product into the sum's add (one FMA, no rounding of the product), which a product tensor
/// rounds first; a float product is rounded to float before it is widened and added.
template <class T>
bool sum_of_products_fits(const Tensor<T>& a, const Tensor<T>& b, const Shape& dims) {
  int64_t r0, k, r1;
  if (!std::is_same_v<T, float> || a.shape() != b.shape() || a.numel() == 0 ||
      !reduce_detail::as_r0_k_r1(a.shape(), dims, r0, k, r1))
    return false;
  const int64_t run = r1 > 1 ? r1 : (k == 1 ? r0 : k);  // sum_by's runs: R1, K for column sums, all for a full sum
  for (const Tensor<T>* t : {&a, &b}) {
    const reduce_detail::Images im = reduce_detail::images_of(*t);
    if (im.image == 0 || im.image % run != 0) return false;
  }
  return true;
}

/// sum(a * b, dims) where sum_of_products_fits (keepdim shape): each product rounded to T as the
/// elementwise mul rounds it, then summed in cpu::sum's order, so the bits are those of cpu::sum
/// of mul(a, b); no tensor of a's size is filled. (A broadcast factor's gradient: the layer
/// scale's, the SE gate's.)
template <class T>
Tensor<T> sum_of_products(const Tensor<T>& a, const Tensor<T>& b, const Shape& dims) {
  const T *pa = a.data(), *pb = b.data();
  const reduce_detail::Images ia = reduce_detail::images_of(a), ib = reduce_detail::images_of(b);
  return reduce_detail::sum_by<T>(a.shape(), dims, [=](int64_t f) {
    return [ra = pa + ia.at(f), rb = pb + ib.at(f)](int64_t i) { return T(acc_t<T>(ra[i]) * acc_t<T>(rb[i])); };
  });
}

}  // namespace dg::cpu
