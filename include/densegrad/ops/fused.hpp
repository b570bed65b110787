// densegrad/ops/fused.hpp: two ops of a dense block fused so that backward keeps less:
//
// gelu_conv2d(h, weight, bias, ...) = conv2d(gelu(h), weight, bias, ...), keeping h, not gelu(h),
// for backward: backward recomputes gelu(h) (one cheap elementwise pass) instead of holding it
// from forward to backward. In a dense block the GELU sits between the 1x1 expansion and the 1x1
// reduction, on the widest tensor of the block (bottleneck_width_ratio x the block's input
// channels), so this frees the largest of the tensors a block saves, at the cost of one more GELU
// forward per block in backward. On the CPU, a float conv that runs as panel GEMMs takes the GELU
// of each chunk of images on the way in (cpu::conv2d_forward with a prep), so forward never holds
// gelu(h) for the whole batch either.
//
// layer_norm2d_conv2d(x, norm weight, norm bias, eps, weight, bias, ...) =
// conv2d(layer_norm2d(x, ...), weight, bias, ...), keeping x and the norm's per-pixel statistics,
// not the normalized tensor: apart, layer_norm2d keeps its input x and conv2d keeps its input
// (the norm's output, as wide as x). Backward runs the norm's forward once more to get the conv's
// input back for the weight's gradient. In a dense block that is the depthwise conv's output ->
// LayerNorm2d -> 1x1 expansion; between stages, the stage's features -> LayerNorm2d -> the
// compressing conv (there x is the stage's buffer, which the blocks keep anyway).
//
// Values and gradients of both are those of the ops they fuse (the same kernels, the same
// order: bit for bit). They are the selective counterparts of dg::checkpoint (which recomputes
// everything, convolutions too).
// Shape legend: h, x (N, C_in, H, W), weight (C_out, C_in/groups, kH, kW), out (N, C_out, Ho, Wo),
// norm weight and bias (C_in).
#pragma once

#include "activation.hpp"
#include "conv.hpp"
#include "norm.hpp"

namespace dg {

/// conv2d(gelu(h, tanh_approximation), weight, bias, stride, padding, dilation, groups), saving
/// h (and the weight) only: backward recomputes gelu(h). Differentiable in h, weight and bias.
/// Example (a dense block's bottleneck): auto y = dg::gelu_conv2d(expand(x), reduce.weight, reduce.bias);
template <class T>
Tensor<T> gelu_conv2d(const Tensor<T>& h, const Tensor<T>& weight, const Tensor<T>& bias = {}, Pair2 stride = 1,
                      Pair2 padding = 0, Pair2 dilation = 1, int64_t groups = 1, bool tanh_approximation = false) {
  static_assert(is_floating_v<T>, "gelu_conv2d: T must be float, double or dg::bfloat16");
  const Conv2dGeometry g = detail::conv2d_checked_geometry(h, weight, bias, stride, padding, dilation, groups, "gelu_conv2d");
  Tensor<T> hc = contiguous(h.detach());
  Tensor<T> out;
  if constexpr (std::is_same_v<T, float>) {
    if (!hc.device().is_cuda() && cpu::forward_runs_panels(g))  // GELU per chunk of images, on the way in
      out = cpu::conv2d_forward(hc, weight, bias, g, [tanh_approximation](const float* s, float* d, int64_t n) {
        cpu::gelu_range(s, d, n, tanh_approximation);
      });
  }
  if (!out.defined()) out = detail::conv2d_forward(detail::gelu_forward(hc, tanh_approximation), weight, bias, g);
  // gelu(h) is gone here; backward makes it again when the weight's gradient needs it
  const bool need_h = h.requires_grad(), need_w = weight.requires_grad(), need_b = bias.requires_grad();
  Tensor<T> ws = weight.detach();
  if (!need_h && !need_w) hc = Tensor<T>();  // only the bias: dbias = sum of dout
  return autograd::record("gelu_conv2d", out, {h, weight, bias},
                          [hc, ws, g, need_h, need_w, need_b, tanh_approximation](const Tensor<T>& dout) {
                            Tensor<T> a = need_w ? detail::gelu_forward(hc, tanh_approximation) : Tensor<T>();
                            std::vector<Tensor<T>> grads = detail::conv2d_grads(dout, a, ws, g, need_h, need_w, need_b);
                            a = Tensor<T>();  // freed before dh is made
                            if (need_h) grads[0] = detail::gelu_grad(grads[0], hc, tanh_approximation);
                            return grads;
                          });
}

/// conv2d(layer_norm2d(x, norm_weight, norm_bias, eps), weight, bias, stride, padding, dilation,
/// groups), saving x, the norm's weight and bias, its (N, H, W) mean and rstd, and the conv's
/// weight: not the normalized tensor, which backward makes again when the conv weight's gradient
/// needs it. Differentiable in all five tensors; the biases and the norm's weight may be
/// undefined (as in layer_norm2d and conv2d). x may be a dense stage's prefix view (read in place).
/// Example (a dense block): auto h = dg::layer_norm2d_conv2d(dw, norm.weight, norm.bias, 1e-6, expand.weight, expand.bias);
template <class T>
Tensor<T> layer_norm2d_conv2d(const Tensor<T>& x, const Tensor<T>& norm_weight, const Tensor<T>& norm_bias, double eps,
                              const Tensor<T>& weight, const Tensor<T>& bias = {}, Pair2 stride = 1, Pair2 padding = 0,
                              Pair2 dilation = 1, int64_t groups = 1) {
  static_assert(is_floating_v<T>, "layer_norm2d_conv2d: T must be float, double or dg::bfloat16");
  detail::check_layer_norm2d(x, norm_weight, norm_bias, "layer_norm2d_conv2d");
  const Conv2dGeometry g =
      detail::conv2d_checked_geometry(x, weight, bias, stride, padding, dilation, groups, "layer_norm2d_conv2d");
  Tensor<T> xc = detail::layer_norm2d_operand(x.detach()), nw, nb;
  if (norm_weight.defined()) nw = contiguous(norm_weight.detach());
  if (norm_bias.defined()) nb = contiguous(norm_bias.detach());
  ref::LayerNormForward<T> f = detail::layer_norm2d_forward(xc, nw, nb, eps);
  Tensor<T> out = detail::conv2d_forward(f.y, weight, bias, g);
  f.y = Tensor<T>();  // the normalized tensor goes now; backward makes it again for dweight
  // dn (the conv's input gradient) feeds the norm's backward: needed when x or a norm parameter is
  const std::array<bool, 3> need_norm{x.requires_grad(), norm_weight.requires_grad(), norm_bias.requires_grad()};
  const bool need_n = need_norm[0] || need_norm[1] || need_norm[2];
  const bool need_w = weight.requires_grad(), need_b = bias.requires_grad();
  if (!need_n && !need_w) {  // at most the conv's bias: dbias = sum of dout, nothing to keep
    xc = nw = nb = Tensor<T>();
    f.mean = f.rstd = Tensor<acc_t<T>>();
  }
  Tensor<T> ws = need_n ? weight.detach() : Tensor<T>();
  return autograd::record(
      "layer_norm2d_conv2d", out, {x, norm_weight, norm_bias, weight, bias},
      [xc, nw, nb, eps, mean = f.mean, rstd = f.rstd, ws, g, need_norm, need_n, need_w, need_b](const Tensor<T>& dout) {
        // the normalized tensor, again: the same kernel on the same input gives the same values
        Tensor<T> n = need_w ? detail::layer_norm2d_forward(xc, nw, nb, eps).y : Tensor<T>();
        std::vector<Tensor<T>> conv = detail::conv2d_grads(dout, n, ws, g, need_n, need_w, need_b);
        n = Tensor<T>();  // freed before the norm's gradients are made
        std::vector<Tensor<T>> grads{Tensor<T>(), Tensor<T>(), Tensor<T>(), conv[1], conv[2]};
        if (need_n) {
          ref::LayerNormGrads<T> ln = detail::layer_norm2d_grads(conv[0], xc, mean, rstd, nw, need_norm);
          grads[0] = ln.dx;
          grads[1] = ln.dweight;
          grads[2] = ln.dbias;
        }
        return grads;
      });
}

}  // namespace dg
