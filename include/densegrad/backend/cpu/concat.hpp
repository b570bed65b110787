// densegrad/backend/cpu/concat.hpp: fast concatenation: a contiguous input is copied as one
// memcpy per index of the dims before `d` (one per image for channel concat in NCHW); other
// inputs take the ref kernel's strided loop. OpenMP splits the outer index of big outputs.
// No autograd and no checks (ops/concat.hpp does both). Tested against ref::concat.
// Shape legend: xs[i]: (..., D_i, ...) along d -> out (..., sum_i D_i, ...).
#pragma once

#include <cstring>

#include "parallel.hpp"
#include "../ref/concat.hpp"


namespace dg::cpu {

/// ref::concat's contract: out = the inputs laid end to end along dim d (out_shape precomputed).
template <class T>
Tensor<T> concat(const std::vector<Tensor<T>>& xs, int64_t d, const Shape& out_shape) {
  Tensor<T> out = Tensor<T>::empty(out_shape);
  int64_t outer = 1;
  for (int64_t i = 0; i < d; ++i) outer *= out_shape[i];
  const int64_t out_block = out.strides()[d] * out_shape[d];  // elements per outer index in out
  int64_t start = 0;
  for (const auto& x : xs) {
    T* dst = out.data() + start * out.strides()[d];  // x's window starts here along d
    const T* src = x.data();
    const int64_t block = x.numel() / std::max<int64_t>(outer, 1);  // x's elements per outer index
    if (x.is_contiguous() && x.numel() > 0) {
      DENSEGRAD_OMP(parallel for if (x.numel() >= (int64_t(1) << 18) && outer > 1))
      for (int64_t o = 0; o < outer; ++o)
        std::memcpy(dst + o * out_block, src + o * block, static_cast<size_t>(block) * sizeof(T));
    } else {
      for_each_strided<2>(x.shape(), {out.strides().data(), x.strides().data()}, {0, 0},
                          [&](auto k) { dst[k[0]] = src[k[1]]; });
    }
    start += x.shape()[d];
  }
  return out;
}

}  // namespace dg::cpu
