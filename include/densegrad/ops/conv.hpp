// densegrad/ops/conv.hpp: conv2d (dense, grouped, depthwise, strided, dilated, zero padded)
// with its shape rule, checks, forward and backward, as torch.nn.functional.conv2d.
// Not here: transposed conv, padding modes other than zeros, "same" padding, conv1d/3d.
// Shape legend: x: (N, C_in, H, W), weight: (C_out, C_in/groups, kH, kW), bias: (C_out),
// out: (N, C_out, Ho, Wo) with Ho = floor((H + 2*pH - dH*(kH-1) - 1) / sH) + 1 (Wo alike).
#pragma once

#include <array>

#include "../autograd/tape.hpp"
#include "../core/precision.hpp"
#include "../backend/cpu/conv.hpp"
#include "../backend/ref/conv.hpp"
#include "shape.hpp"

namespace dg {

/// A (height, width) pair; one int means both, like PyTorch's `int | tuple[int, int]`:
/// `conv2d(x, w, b, 2, 1)` or `conv2d(x, w, b, {2, 1}, {1, 0})`.
struct Pair2 {
  int64_t h, w;
  Pair2(int64_t v) : h(v), w(v) {}  // NOLINT: implicit on purpose
  Pair2(int64_t h_, int64_t w_) : h(h_), w(w_) {}
};

/// Checks x, weight and bias shapes and the conv arguments against each other, and returns
/// every size the kernels need. Throws dg::Error naming op and the broken rule.
inline Conv2dGeometry conv2d_geometry(const Shape& x, const Shape& w, const Shape* bias, Pair2 stride, Pair2 padding,
                                      Pair2 dilation, int64_t groups, const char* op = "conv2d") {
  const std::string shapes = " (x " + shape_str(x) + ", weight " + shape_str(w) + ")";
  DG_CHECK(x.size() == 4, op, ": expected x of shape (N, C_in, H, W), got a ", x.size(), "-D tensor of shape ",
           shape_str(x));
  DG_CHECK(w.size() == 4, op, ": expected weight of shape (C_out, C_in/groups, kH, kW), got a ", w.size(),
           "-D tensor of shape ", shape_str(w));
  DG_CHECK(stride.h > 0 && stride.w > 0, op, ": stride must be positive, got (", stride.h, ", ", stride.w, ")");
  DG_CHECK(dilation.h > 0 && dilation.w > 0, op, ": dilation must be positive, got (", dilation.h, ", ", dilation.w,
           ")");
  DG_CHECK(padding.h >= 0 && padding.w >= 0, op, ": padding must be non-negative, got (", padding.h, ", ", padding.w,
           ")");
  DG_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  DG_CHECK(w[0] > 0 && w[1] > 0 && w[2] > 0 && w[3] > 0, op, ": weight must not be empty", shapes);
  DG_CHECK(w[0] % groups == 0, op, ": C_out = ", w[0], " (weight dim 0) is not divisible by groups = ", groups,
           shapes);
  DG_CHECK(x[1] == w[1] * groups, op, ": x has ", x[1], " channels, but weight expects C_in/groups * groups = ",
           w[1], " * ", groups, " = ", w[1] * groups, shapes);
  Conv2dGeometry g{};
  g.N = x[0], g.C_in = x[1], g.H = x[2], g.W = x[3];
  g.C_out = w[0], g.kH = w[2], g.kW = w[3];
  g.sH = stride.h, g.sW = stride.w, g.pH = padding.h, g.pW = padding.w, g.dH = dilation.h, g.dW = dilation.w;
  g.groups = groups;
  const int64_t ekH = g.dH * (g.kH - 1) + 1, ekW = g.dW * (g.kW - 1) + 1;  // dilated kernel extent
  DG_CHECK(g.H + 2 * g.pH >= ekH && g.W + 2 * g.pW >= ekW, op, ": kernel size ", ekH, "x", ekW,
           " (after dilation) is larger than the padded input ", g.H + 2 * g.pH, "x", g.W + 2 * g.pW, shapes);
  g.Ho = (g.H + 2 * g.pH - ekH) / g.sH + 1;  // numerator >= 0 here, so / floors like PyTorch
  g.Wo = (g.W + 2 * g.pW - ekW) / g.sW + 1;
  if (bias)
    DG_CHECK(bias->size() == 1 && (*bias)[0] == g.C_out, op, ": expected bias of shape [", g.C_out,
             "] (C_out), got ", shape_str(*bias), shapes);
  return g;
}

/// 2-D convolution (cross-correlation, as in deep learning), matching
namespace detail {
/// conv2d's gradients wrt x, weight and bias (those asked for; the others undefined) from dout,
/// the saved input xs (needed for need_w) and weight ws (needed for need_x): the CUDA kernels
/// or the fast CPU kernels. Shared by conv2d and the fused ops that recompute conv2d's input.
template <class T>
std::vector<Tensor<T>> conv2d_grads(const Tensor<T>& dout, const Tensor<T>& xs, const Tensor<T>& ws,
                                    const Conv2dGeometry& g, bool need_x, bool need_w, bool need_b) {
  std::vector<Tensor<T>> grads(3);
  if (dout.device().is_cuda()) {
    const DeviceKernels<T>& k = cuda_kernels<T>("conv2d backward");
    Tensor<T> d = dout.contiguous();
    if (need_x) grads[0] = k.conv2d_backward_input(d, ws.contiguous(), g);
    if (need_w) grads[1] = k.conv2d_backward_weight(d, batch_stride(xs) >= 0 ? xs : xs.contiguous(), g);
    if (need_b) grads[2] = k.conv2d_backward_bias(d, g);
    return grads;
  }
  std::array<Tensor<T>, 3> cpu_grads = cpu::conv2d_backward(dout, xs, ws, g, need_x, need_w, need_b);
  for (size_t i = 0; i < 3; ++i) grads[i] = std::move(cpu_grads[i]);
  return grads;
}

/// conv2d's forward without recording: the CUDA kernels (x batch-strided or a contiguous copy,
/// the rest contiguous) or the CPU ones.
template <class T>
Tensor<T> conv2d_forward(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& bias, const Conv2dGeometry& g) {
  if (x.device().is_cuda()) {
    NoGradGuard no_grad;  // copies made here are the kernel's business, not the graph's
    return cuda_kernels<T>("conv2d").conv2d_forward(batch_stride(x) >= 0 ? x.detach() : x.contiguous().detach(),
                                                    weight.contiguous().detach(),
                                                    bias.defined() ? bias.contiguous().detach() : bias, g);
  }
  return cpu::conv2d_forward(x, weight, bias, g);
}

/// conv2d's checks (errors name op): defined tensors, the shape rule and one device. Returns the geometry.
template <class T>
Conv2dGeometry conv2d_checked_geometry(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& bias,
                                       Pair2 stride, Pair2 padding, Pair2 dilation, int64_t groups,
                                       const char* op = "conv2d") {
  DG_CHECK(x.defined() && weight.defined(), op, ": x and weight must be defined tensors");
  const Shape bshape = bias.defined() ? bias.shape() : Shape{};
  Conv2dGeometry g = conv2d_geometry(x.shape(), weight.shape(), bias.defined() ? &bshape : nullptr, stride,
                                     padding, dilation, groups, op);
  DG_CHECK(x.device() == weight.device() && (!bias.defined() || bias.device() == x.device()),
           op, ": expected x, weight and bias on one device, got x on ", x.device().str(), ", weight on ",
           weight.device().str(), bias.defined() ? ", bias on " + bias.device().str() : std::string());
  g.bf16 = std::is_same_v<T, float> && matmul_precision() == MatmulPrecision::bf16;  // read once: backward follows
  return g;
}
}  // namespace detail

/// torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups) with zero
/// padding. Differentiable in x, weight and bias; bias may be an undefined Tensor (none).
/// Example: auto y = dg::conv2d(x, w, b, /*stride=*/1, /*padding=*/3, /*dilation=*/1, /*groups=*/C);
template <class T>
Tensor<T> conv2d(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& bias = {}, Pair2 stride = 1,
                 Pair2 padding = 0, Pair2 dilation = 1, int64_t groups = 1) {
  static_assert(is_floating_v<T>, "conv2d: T must be float, double or dg::bfloat16");
  const Conv2dGeometry g = detail::conv2d_checked_geometry(x, weight, bias, stride, padding, dilation, groups);
  // Dispatch, once: the CUDA kernels or the fast CPU kernels. backend/ref/conv.hpp holds the
  // plain-loop kernels that the tests use as the oracle for both. The CPU kernels read x (and, in
  // backward, dout) in place when contiguous or batch-strided, as a dense stage's prefix view is
  // (ops/dense.hpp); so do the CUDA kernels of stride-1 depthwise convs (the others copy it).
  Tensor<T> out = detail::conv2d_forward(x, weight, bias, g);
  // Saves x only when weight needs a gradient (dweight = dout * x) and the weight only when x
  // does (dx = dout * weight); bias's gradient needs neither. x is saved as the view it is: for a
  // dense stage's prefix that is the stage's shared buffer, not a copy.
  const bool need_x = x.requires_grad(), need_w = weight.requires_grad(), need_b = bias.requires_grad();
  Tensor<T> xs = need_w ? x.detach() : Tensor<T>(), ws = need_x ? weight.detach() : Tensor<T>();
  return autograd::record("conv2d", out, {x, weight, bias}, [xs, ws, g, need_x, need_w, need_b](const Tensor<T>& dout) {
    return detail::conv2d_grads(dout, xs, ws, g, need_x, need_w, need_b);
  });
}

}  // namespace dg
