// densegrad/backend/ref/concat.hpp: reference concatenation: copies each input, whatever its
// strides, into its window of one fresh contiguous output. No autograd and no checks here
// (ops/concat.hpp does both); not the zero-copy dense-stage buffer (that lives in nn/).
#pragma once

#include "../../core/tensor.hpp"

namespace dg::ref {

/// out = the inputs laid end to end along dim d; `out_shape` is already computed and checked.
template <class T>
Tensor<T> concat(const std::vector<Tensor<T>>& xs, int64_t d, const Shape& out_shape) {
  Tensor<T> out = Tensor<T>::empty(out_shape);
  int64_t start = 0;
  for (const auto& x : xs) {
    // input x lands at offset `start` along d: same strides as out, shifted base
    T* dst = out.data() + start * out.strides()[d];
    const T* src = x.data();
    for_each_strided<2>(x.shape(), {out.strides().data(), x.strides().data()}, {0, 0},
                        [&](auto k) { dst[k[0]] = src[k[1]]; });
    start += x.shape()[d];
  }
  return out;
}

}  // namespace dg::ref
