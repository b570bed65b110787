// densegrad/ops/fused.hpp: gelu_conv2d(h, weight, bias, ...) = conv2d(gelu(h), weight, bias, ...)
// as one op that keeps h, not gelu(h), for backward: backward recomputes gelu(h) (one cheap
// elementwise pass) instead of holding it from forward to backward. In a dense block the GELU
// sits between the 1x1 expansion and the 1x1 reduction, on the widest tensor of the block
// (bottleneck_width_ratio x the block's input channels), so this frees the largest of the
// tensors a block saves, at the cost of one more GELU forward per block in backward. Values and
// gradients are those of the two ops (the same kernels, the same order: bit for bit). On the
// CPU, a float conv that runs as panel GEMMs takes the GELU of each chunk of images on the way in
// (cpu::conv2d_forward with a prep), so forward never holds gelu(h) for the whole batch either.
// The selective counterpart of dg::checkpoint (which recomputes everything, convolutions too).
// Shape legend: h (N, C_in, H, W), weight (C_out, C_in/groups, kH, kW), out (N, C_out, Ho, Wo).
#pragma once

#include "activation.hpp"
#include "conv.hpp"

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

}  // namespace dg
