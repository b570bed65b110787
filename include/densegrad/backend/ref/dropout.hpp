// densegrad/backend/ref/dropout.hpp: reference kernels for dropout and drop_path: drawing a
// Bernoulli keep-mask from a dg::Generator, and out = x * mask * scale with the mask broadcast.
// Deterministic for a given generator state; not torch's RNG stream (masks differ from torch's).
#pragma once

#include "../../core/tensor.hpp"
#include "elementwise.hpp"

namespace dg::ref {

/// A tensor of 1s (kept, probability `keep`) and 0s, drawn in C order from `gen`.
template <class T>
Tensor<T> bernoulli_mask(const Shape& shape, double keep, Generator& gen) {
  Tensor<T> mask = Tensor<T>::empty(shape);
  T* m = mask.data();
  for (int64_t i = 0; i < mask.numel(); ++i) m[i] = T(gen.uniform() < keep ? 1 : 0);
  return mask;
}

/// out = x * mask * scale, mask broadcast against x (drop_path's mask is (N, 1, ..., 1)).
template <class T>
Tensor<T> masked_scale(const Tensor<T>& x, const Tensor<T>& mask, double scale, const char* op) {
  return map2(x, mask, [scale](auto v, auto m) { return m != decltype(m)(0) ? v * decltype(v)(scale) : decltype(v)(0); },
              op);
}

}  // namespace dg::ref
