// densegrad/core/strided.hpp: the one loop that walks K strided tensors of one shape in C order.
// Every reference kernel and contiguous() are built on it; fast paths live in backend/cpu.
#pragma once

#include <array>
#include <cstdint>

#include "shape.hpp"

namespace dg {

/// Calls f(offsets) for every index of `shape` in C order, where offsets[k] is the element
/// offset of that index in operand k (base[k] + sum_i index[i] * strides[k][i]).
/// A stride of 0 repeats an element: that is how broadcasting and expand() read.
template <size_t K, class F>
void for_each_strided(const Shape& shape, const std::array<const int64_t*, K>& strides,
                      std::array<int64_t, K> base, F&& f) {
  const int64_t nd = static_cast<int64_t>(shape.size());
  for (int64_t d : shape)
    if (d == 0) return;
  if (nd == 0) {
    f(base);
    return;
  }
  const int64_t inner = shape[nd - 1];
  std::array<int64_t, K> step;
  for (size_t k = 0; k < K; ++k) step[k] = strides[k][nd - 1];
  Shape idx(nd, 0);
  std::array<int64_t, K> off = base;
  while (true) {
    std::array<int64_t, K> o = off;
    for (int64_t i = 0; i < inner; ++i) {
      f(o);
      for (size_t k = 0; k < K; ++k) o[k] += step[k];
    }
    // advance the outer index (odometer), updating offsets incrementally
    int64_t d = nd - 2;
    for (; d >= 0; --d) {
      if (++idx[d] < shape[d]) {
        for (size_t k = 0; k < K; ++k) off[k] += strides[k][d];
        break;
      }
      for (size_t k = 0; k < K; ++k) off[k] -= strides[k][d] * (shape[d] - 1);
      idx[d] = 0;
    }
    if (d < 0) return;
  }
}

}  // namespace dg
