// densegrad/ops/concat.hpp: concat (torch.cat) and split (torch.split), the naive copy path
// of dense connectivity: each block's input is a fresh concatenation of all earlier features.
// The zero-copy alternative (one preallocated buffer, prefix views) is ops/dense.hpp.
// Shape legend: xs[i]: (..., D_i, ...) along dim -> (..., sum_i D_i, ...).
#pragma once

#include "../backend/cpu/concat.hpp"
#include "shape.hpp"

namespace dg {

namespace detail {
/// "[8,64,32,32]": compact shapes for concat's error, which lists every input.
inline std::string compact_shape(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? "," : "") + std::to_string(s[i]);
  return r + "]";
}
/// "N", "C", "H", "W" for 4-D tensors (NCHW), "dim k" otherwise.
inline std::string dim_name(int64_t d, int64_t ndim) {
  return ndim == 4 ? std::string(1, "NCHW"[d]) : "dim " + std::to_string(d);
}
}  // namespace detail

/// torch.cat(xs, dim): sizes must match except along `dim` (negative counts from the end);
/// inputs may be non-contiguous views. Gradients: input i gets narrow(dout, dim, offset_i, D_i).
/// Example: auto y = dg::concat({x, block(x)}, 1);  // (N, C + G, H, W)
template <class T>
Tensor<T> concat(const std::vector<Tensor<T>>& xs, int64_t dim) {
  DG_CHECK(!xs.empty(), "concat: expected a non-empty list of tensors");
  const int64_t nd = xs[0].dim(), n = static_cast<int64_t>(xs.size());
  DG_CHECK(nd > 0, "concat: zero-dimensional tensors cannot be concatenated (input 0 has shape [])");
  const int64_t d = wrap_dim(dim, nd, "concat");
  auto shapes = [&] {
    std::string s;
    for (size_t i = 0; i < xs.size(); ++i) s += (i ? ", " : "") + detail::compact_shape(xs[i].shape());
    return s;
  };
  Shape out_shape = xs[0].shape();
  out_shape[d] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Shape& s = xs[i].shape();
    DG_CHECK(xs[i].dim() == nd, "concat: all inputs must have the same number of dims; input ", i, " of ", n,
             " has ", xs[i].dim(), ", expected ", nd, " (shapes ", shapes(), ")");
    for (int64_t k = 0; k < nd; ++k)
      DG_CHECK(k == d || s[k] == xs[0].shape()[k], "concat: sizes must match except in dim ", d, "; input ", i,
               " of ", n, " has ", detail::dim_name(k, nd), "=", s[k], ", expected ", xs[0].shape()[k], " (shapes ",
               shapes(), ")");
    out_shape[d] += s[d];
  }
  Device dev = xs[0].device();
  for (int64_t i = 0; i < n; ++i)
    DG_CHECK(xs[i].device() == dev, "concat: expected all inputs on ", dev.str(), ", input ", i, " is on ",
             xs[i].device().str());
  Tensor<T> out;
  if constexpr (is_floating_v<T> && !std::is_same_v<T, bfloat16>) {
    if (dev.is_cuda()) out = cuda_kernels<T>("concat").concat(xs, d, out_shape);
  }
  if (!out.defined()) {
    DG_CHECK(dev.is_cpu(), "concat: no kernel for this element type on ", dev.str());
    out = cpu::concat(xs, d, out_shape);  // memcpy per image; ref::concat is the oracle
  }
  if constexpr (!is_floating_v<T>) {
    return out;  // integer tensors (labels) never carry gradients
  } else {
    // saves only where each input sits along d: its gradient is that window of dout
    Shape starts, lengths;
    std::vector<bool> need;
    for (int64_t i = 0, at = 0; i < n; ++i) {
      starts.push_back(at);
      lengths.push_back(xs[i].shape()[d]);
      need.push_back(xs[i].requires_grad());
      at += xs[i].shape()[d];
    }
    return autograd::record("concat", out, xs, [d, starts, lengths, need](const Tensor<T>& dout) {
      std::vector<Tensor<T>> g(need.size());
      for (size_t i = 0; i < need.size(); ++i)
        if (need[i]) g[i] = narrow(dout, d, starts[i], lengths[i]);  // a view: accumulate() reads its strides
      return g;
    });
  }
}

/// concat({a, b, c}, dim): the braced-list form (T deduced from the elements).
template <class T>
Tensor<T> concat(std::initializer_list<Tensor<T>> xs, int64_t dim) {
  return concat(std::vector<Tensor<T>>(xs), dim);
}

/// torch.split(x, split_size, dim): views of `split_size` entries along dim (the last may be
/// shorter). Each piece is a narrow(), so gradients flow back into x's window.
template <class T>
std::vector<Tensor<T>> split(const Tensor<T>& x, int64_t split_size, int64_t dim) {
  const int64_t d = wrap_dim(dim, x.dim(), "split"), n = x.shape()[d];
  DG_CHECK(split_size > 0 || (split_size == 0 && n == 0), "split: split_size must be positive, got ", split_size,
           " (dim ", d, " has size ", n, ")");
  std::vector<Tensor<T>> out;
  for (int64_t start = 0; start < n || (n == 0 && out.empty()); start += split_size)
    out.push_back(narrow(x, d, start, std::min(split_size, n - start)));
  return out;
}

/// torch.split(x, sizes, dim): views of the given sizes, which must add up to x.size(dim).
template <class T>
std::vector<Tensor<T>> split(const Tensor<T>& x, const std::vector<int64_t>& sizes, int64_t dim) {
  const int64_t d = wrap_dim(dim, x.dim(), "split");
  int64_t total = 0;
  for (int64_t s : sizes) {
    DG_CHECK(s >= 0, "split: sizes must be non-negative, got ", shape_str(sizes));
    total += s;
  }
  DG_CHECK(total == x.shape()[d], "split: sizes ", shape_str(sizes), " add up to ", total, ", but dim ", d,
           " has size ", x.shape()[d], " (shape ", shape_str(x.shape()), ")");
  std::vector<Tensor<T>> out;
  int64_t start = 0;
  for (int64_t s : sizes) {
    out.push_back(narrow(x, d, start, s));
    start += s;
  }
  return out;
}

}  // namespace dg
