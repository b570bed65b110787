// densegrad/ops/norm.hpp: layer_norm (torch.nn.functional.layer_norm) and layer_norm2d (timm's
// LayerNorm2d, the norm of RDNet), each with shape checks, forward, and backward side by side.
// Not batch/group norm. layer_norm runs the ref kernel; layer_norm2d runs the fast NCHW path,
// which reads contiguous and batch-strided inputs (strides (S_n, H*W, W, 1)) without a copy.
// Shape legend: x: (*, *normalized_shape) for layer_norm, (N, C, H, W) for layer_norm2d;
// weight, bias: normalized_shape resp. (C), or undefined tensors for "no affine".
#pragma once

#include <array>

#include "../autograd/tape.hpp"
#include "../backend/cpu/norm.hpp"
#include "../backend/ref/norm.hpp"
#include "shape.hpp"

namespace dg {

namespace detail {
/// t.detach(), or an undefined tensor for an absent (undefined) weight/bias.
template <class T>
Tensor<T> detach_optional(const Tensor<T>& t) { return t.defined() ? t.detach() : Tensor<T>(); }
template <class T>
void check_affine(const Tensor<T>& p, const char* name, const Shape& expected, const char* op, const Tensor<T>& x) {
  DG_CHECK(!p.defined() || p.shape() == expected, op, ": ", name, " has shape ", shape_str(p.shape()),
           ", expected ", shape_str(expected), " (input ", shape_str(x.shape()), ")");
  DG_CHECK(!p.defined() || p.device() == x.device(), op, ": ", name, " is on ", p.device().str(),
           ", the input on ", x.device().str(), " (expected one device)");
}
}  // namespace detail

/// Normalizes over the last normalized_shape.size() dims: (x - mean) / sqrt(var + eps) * weight + bias,
/// biased variance (torch.nn.functional.layer_norm). weight and bias may be undefined (no affine).
/// Example: auto y = dg::layer_norm(x /*(N, L, 64)*/, {64}, w, b);
template <class T>
Tensor<T> layer_norm(const Tensor<T>& x, const Shape& normalized_shape, const Tensor<T>& weight = Tensor<T>(),
                     const Tensor<T>& bias = Tensor<T>(), double eps = 1e-5) {
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  DG_CHECK(k >= 1, "layer_norm: normalized_shape must have at least 1 dim, got []");
  DG_CHECK(x.dim() >= k && Shape(x.shape().end() - k, x.shape().end()) == normalized_shape,
           "layer_norm: normalized_shape ", shape_str(normalized_shape), " expects an input whose last ", k,
           " dims are ", shape_str(normalized_shape), ", got input ", shape_str(x.shape()));
  detail::check_affine(weight, "weight", normalized_shape, "layer_norm", x);
  detail::check_affine(bias, "bias", normalized_shape, "layer_norm", x);
  // No fast CPU path: RDNet normalizes channels through layer_norm2d; the ref kernel serves the rest.
  const bool cuda = x.device().is_cuda();
  Tensor<T> xd = cuda ? contiguous(x.detach()) : x.detach();
  Tensor<T> wd = detail::detach_optional(weight), bd = detail::detach_optional(bias);
  if (cuda) {
    if (wd.defined()) wd = contiguous(wd);
    if (bd.defined()) bd = contiguous(bd);
  }
  ref::LayerNormForward<T> f = cuda ? cuda_kernels<T>("layer_norm").layer_norm_forward(xd, k, wd, bd, eps)
                                    : ref::layer_norm_forward(x, k, weight, bias, eps);
  // Forward saves the mean and rstd of every row (llm.c: "cache the mean and rstd for the backward
  // pass later"), plus x and weight: backward then never recomputes the statistics.
  const std::array<bool, 3> need{x.requires_grad(), weight.requires_grad(), bias.requires_grad()};
  return autograd::record("layer_norm", f.y, {x, weight, bias},
                          [x = xd, w = wd, mean = f.mean, rstd = f.rstd, k, need, cuda](const Tensor<T>& dout) {
                            ref::LayerNormGrads<T> g =
                                cuda ? cuda_kernels<T>("layer_norm backward")
                                           .layer_norm_backward(contiguous(dout), x, mean, rstd, w, k, need[0],
                                                                need[1], need[2])
                                     : ref::layer_norm_backward(dout, x, mean, rstd, w, k, need[0], need[1], need[2]);
                            return std::vector<Tensor<T>>{g.dx, g.dweight, g.dbias};
                          });
}

namespace detail {
/// layer_norm2d's checks (errors name op): a 4-D input, weight and bias (C) or undefined, one device.
template <class T>
void check_layer_norm2d(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& bias, const char* op) {
  DG_CHECK(x.defined(), op, ": the input must be a defined tensor");
  DG_CHECK(x.dim() == 4, op, ": expected a 4-D (N, C, H, W) input, got ", x.dim(), "-D ", shape_str(x.shape()));
  check_affine(weight, "weight", {x.size(1)}, op, x);
  check_affine(bias, "bias", {x.size(1)}, op, x);
}
/// t as layer_norm2d's kernels read it: in place where the fast CPU path can (contiguous NCHW or
/// batch-strided: a dense stage's prefix view), otherwise (other layouts, CUDA) a contiguous copy.
template <class T>
Tensor<T> layer_norm2d_operand(const Tensor<T>& t) {
  return !t.device().is_cuda() && cpu::batch_stride(t) >= 0 ? t : contiguous(t);
}
/// layer_norm2d's forward without recording, on detached operands (x from layer_norm2d_operand,
/// weight and bias contiguous or undefined): y and the (N, H, W) mean and rstd. The fast path
/// (backend/cpu/norm.hpp) or the CUDA kernels; ref::layer_norm2d_forward is their oracle.
template <class T>
ref::LayerNormForward<T> layer_norm2d_forward(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& bias,
                                              double eps) {
  return x.device().is_cuda() ? cuda_kernels<T>("layer_norm2d").layer_norm2d_forward(x, weight, bias, eps)
                              : cpu::layer_norm2d_forward(x, weight, bias, eps);
}
/// layer_norm2d's gradients (those asked for) from dout and what forward saved.
template <class T>
ref::LayerNormGrads<T> layer_norm2d_grads(const Tensor<T>& dout, const Tensor<T>& x, const Tensor<acc_t<T>>& mean,
                                          const Tensor<acc_t<T>>& rstd, const Tensor<T>& weight,
                                          const std::array<bool, 3>& need) {
  const Tensor<T> d = layer_norm2d_operand(dout);
  return x.device().is_cuda()
             ? cuda_kernels<T>("layer_norm2d backward").layer_norm2d_backward(d, x, mean, rstd, weight, need[0], need[1], need[2])
             : cpu::layer_norm2d_backward(d, x, mean, rstd, weight, need[0], need[1], need[2]);
}
}  // namespace detail

/// timm's LayerNorm2d: layer norm over the channels of each pixel of an (N, C, H, W) input, i.e.
/// x.permute(0, 2, 3, 1) -> layer_norm over C -> permute back, computed directly on NCHW.
/// weight, bias: (C) or undefined. Example: auto y = dg::layer_norm2d(x, w, b);  // eps 1e-6
template <class T>
Tensor<T> layer_norm2d(const Tensor<T>& x, const Tensor<T>& weight = Tensor<T>(), const Tensor<T>& bias = Tensor<T>(),
                       double eps = 1e-6) {
  detail::check_layer_norm2d(x, weight, bias, "layer_norm2d");
  // The fast path reduces over C at stride H*W: it reads contiguous NCHW and batch-strided views
  // (a dense stage's prefix) in place; other layouts, and every CUDA input, are copied contiguous.
  Tensor<T> xc = detail::layer_norm2d_operand(x.detach()), wc, bc;
  if (weight.defined()) wc = contiguous(weight.detach());
  if (bias.defined()) bc = contiguous(bias.detach());
  ref::LayerNormForward<T> f = detail::layer_norm2d_forward(xc, wc, bc, eps);
  // saves x, weight and the (N, H, W) mean and rstd for backward (llm.c style: no recomputation);
  // a batch-strided x is saved as the view it is, not copied
  const std::array<bool, 3> need{x.requires_grad(), weight.requires_grad(), bias.requires_grad()};
  return autograd::record("layer_norm2d", f.y, {x, weight, bias},
                          [xc, wc, mean = f.mean, rstd = f.rstd, need](const Tensor<T>& dout) {
                            ref::LayerNormGrads<T> g = detail::layer_norm2d_grads(dout, xc, mean, rstd, wc, need);
                            return std::vector<Tensor<T>>{g.dx, g.dweight, g.dbias};
                          });
}

}  // namespace dg
