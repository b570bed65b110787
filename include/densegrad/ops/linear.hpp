// densegrad/ops/linear.hpp: linear (torch.nn.functional.linear), y = x @ weight^T + bias.
// Built from matmul, transpose, reshape and add, so its backward is theirs; no kernel of its
// own. Not a module: nn/ wraps it with parameters and initialization.
// Shape legend: x: (..., in), weight: (out, in), bias: (out) -> (..., out).
#pragma once

#include "elementwise.hpp"
#include "matmul.hpp"
#include "shape.hpp"

namespace dg {

/// torch.nn.functional.linear(x, weight, bias): any number of leading dims (also none).
/// Pass an undefined bias (the default) for no bias.
/// Example: auto logits = dg::linear(feat, head_w, head_b);  // (N, C) x (K, C) -> (N, K)
template <class T>
Tensor<T> linear(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& bias = Tensor<T>()) {
  if (detail::same_device<T>("linear", {&x, &weight, &bias}).is_cuda()) cuda_kernels<T>("linear");  // errors name linear
  DG_CHECK(weight.dim() == 2, "linear: weight must be (out_features, in_features), got shape ",
           shape_str(weight.shape()));
  DG_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "linear: input has ", x.dim() ? x.size(-1) : 0,
           " features in its last dim, weight expects ", weight.size(1), " (shapes ", shape_str(x.shape()), " and ",
           shape_str(weight.shape()), ")");
  if (bias.defined())
    DG_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), "linear: bias must be (", weight.size(0),
             ") for weight ", shape_str(weight.shape()), ", got shape ", shape_str(bias.shape()));
  // leading dims fold into one batch of rows: one (rows, in) @ (in, out) product
  const int64_t rows = shape_numel(Shape(x.shape().begin(), x.shape().end() - 1));
  Tensor<T> x2 = x.dim() == 2 ? x : reshape(x, {rows, x.size(-1)});
  Tensor<T> y = matmul(x2, transpose(weight, 0, 1));
  if (bias.defined()) y = add(y, bias);  // broadcast over rows; its gradient sums them (sum_to)
  Shape os = x.shape();
  os.back() = weight.size(0);
  return x.dim() == 2 ? y : reshape(y, os);
}

}  // namespace dg
