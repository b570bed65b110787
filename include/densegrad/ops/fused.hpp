// densegrad/ops/fused.hpp: two ops of a dense block fused so that backward keeps less:
//
// gelu_conv2d(h, weight, bias, ...) = conv2d(gelu(h), weight, bias, ...), keeping h, not gelu(h),
// for backward: backward recomputes gelu(h) (one cheap elementwise pass) instead of holding it
// from forward to backward. In a dense block the GELU sits between the 1x1 expansion and the 1x1
// reduction, on the widest tensor of the block (bottleneck_width_ratio x the block's input
// channels), so this frees the largest of the tensors a block saves, at the cost of one more GELU
// forward per block in backward. On the CPU, a float conv that runs as panel GEMMs takes the GELU
// of each chunk of images on the way in (cpu::conv2d_forward with a prep), so forward never holds
// gelu(h) for the whole batch either. Under bf16 products (dg::MatmulPrecision::bf16, a float conv
// without groups), gelu_conv2d keeps h rounded to bfloat16 instead: half the bytes of the largest
// tensor a block saves. Its GELU then takes those rounded values in forward and backward (the
// conv's operand is round(gelu(round(h))), as under torch's bf16 autocast, where h would be a
// bfloat16 tensor), and h's gradient is gelu'(round(h)) times the float gradient of gelu's output.
// On a GPU one pass per chunk of images rounds h, keeps it and stages the GEMM's bf16 operand.
//
// layer_norm2d_conv2d(x, norm weight, norm bias, eps, weight, bias, ...) =
// conv2d(layer_norm2d(x, ...), weight, bias, ...), keeping x and the norm's per-pixel statistics,
// not the normalized tensor: apart, layer_norm2d keeps its input x and conv2d keeps its input
// (the norm's output, as wide as x). Backward runs the norm's forward once more to get the conv's
// input back for the weight's gradient. In a dense block that is the depthwise conv's output ->
// LayerNorm2d -> 1x1 expansion; between stages, the stage's features -> LayerNorm2d -> the
// compressing conv (there x is the stage's buffer, which the blocks keep anyway). On the CPU, a
// float conv that runs as panel GEMMs takes the norm's statistics first and normalizes each chunk
// of images on the way in (the prep of cpu::conv2d_forward, as gelu_conv2d's GELU), so forward
// never holds the normalized tensor for the whole batch either.
//
// depthwise_layer_norm2d_conv2d(x, depthwise weight, depthwise bias, padding, norm weight, norm
// bias, eps, weight, bias, ...) = layer_norm2d_conv2d(conv2d(x, depthwise weight, ..., groups = C),
// ...): a dense block's whole head, keeping x (in a dense stage: a prefix view of the stage's
// buffer, which the stage keeps anyway) instead of the depthwise conv's output. Backward runs the
// depthwise conv once more (49 multiply-adds per element for 7x7, against 4 C for the expansion
// after it) before the norm's.
//
// Values and gradients of all three are those of the ops they fuse (the same kernels, the same
// order: bit for bit). They are the selective counterparts of dg::checkpoint (which recomputes
// everything, convolutions too).
// Shape legend: h, x (N, C_in, H, W), weight (C_out, C_in/groups, kH, kW), out (N, C_out, Ho, Wo),
// norm weight and bias (C_in).
#pragma once

#include <array>
#include <tuple>

#include "activation.hpp"
#include "conv.hpp"
#include "norm.hpp"

namespace dg {

namespace detail {
/// gelu_conv2d's gradients {dh, dweight, dbias (if need_b)} on the CPU from dout and h: first dh's
/// conv part, then one pass that makes gelu(h) again for dweight and multiplies dh by gelu'(h) in
/// place (one erf per element for both, cpu::gelu_and_backward_), then dweight. Where the conv's
/// gradients run as panel GEMMs, all three chunk by chunk of images (cpu::conv2d_backward_prepped):
/// gelu(h) then never exists for the whole batch, and dout is read from memory once; the same
/// bits. h may be kept in bfloat16 (H) for a float conv.
template <class T, class H>
std::vector<Tensor<T>> gelu_conv2d_grads_cpu(const Tensor<T>& dout, const Tensor<H>& h, const Tensor<T>& ws,
                                             const Conv2dGeometry& g, bool need_b, bool tanh_approximation) {
  if (cpu::backward_runs_panels<T>(g)) {  // chunk by chunk: dh, the GELU pass, the chunk's dweight
    const H* ph = h.data();                // contiguous
    const int64_t img = g.C_in * g.H * g.W;
    std::array<Tensor<T>, 3> r = cpu::conv2d_backward_prepped(
        dout, ws, g, need_b, [ph, img, tanh_approximation](int64_t n0, int64_t gn, T* dh, T* a) {
          cpu::gelu_and_backward_range(dh, ph + n0 * img, a, gn * img, tanh_approximation);
        });
    return {r[0], r[1], r[2]};
  }
  std::vector<Tensor<T>> grads = conv2d_grads(dout, Tensor<T>(), ws, g, true, false, need_b);
  const Tensor<T> a = cpu::gelu_and_backward_(grads[0], h, tanh_approximation);
  grads[1] = conv2d_grads(dout, a, ws, g, false, true, false)[1];
  return grads;
}

/// gelu_conv2d under bf16 products (g.bf16, no groups): h kept rounded to bfloat16 (hs), and the
/// GELU taken of those values in both passes (see the top of this file).
inline Tensor<float> gelu_conv2d_bf16(const Tensor<float>& h, const Tensor<float>& weight, const Tensor<float>& bias,
                                      const Conv2dGeometry& g, bool tanh_approximation) {
  const Tensor<float> hc = contiguous(h.detach());
  Tensor<bfloat16> hs = Tensor<bfloat16>::empty(hc.shape(), hc.device());
  Tensor<float> out;
  if (hc.device().is_cuda()) {
    NoGradGuard no_grad;
    out = cuda_kernels<float>("gelu_conv2d")
              .gelu_conv2d_bf16_forward(hc, hs, weight.contiguous().detach(),
                                        bias.defined() ? bias.contiguous().detach() : bias, g, tanh_approximation);
  } else if (cpu::forward_runs_panels(g)) {  // per chunk of images: round, keep, GELU on the way in
    const float* h0 = hc.data();
    bfloat16* s0 = hs.data();
    out = cpu::conv2d_forward(hc, weight, bias, g, [h0, s0, tanh_approximation](const float* s, float* d, int64_t n) {
      cpu::round_bf16_gelu_range(s, s0 + (s - h0), d, n, tanh_approximation);
    });
  } else {
    out = detail::conv2d_forward(gelu_forward(cpu::round_to_bf16(hc, hs), tanh_approximation), weight, bias, g);
  }
  const bool need_h = h.requires_grad(), need_w = weight.requires_grad(), need_b = bias.requires_grad();
  Tensor<float> ws = weight.detach();
  if (!need_h && !need_w) hs = Tensor<bfloat16>();  // only the bias: dbias = sum of dout
  return autograd::record(
      "gelu_conv2d", out, {h, weight, bias},
      [hs, ws, g, need_h, need_w, need_b, tanh_approximation](const Tensor<float>& dout) {
        if (dout.device().is_cuda()) {  // the GELU staged from hs into dweight's GEMM, gelu' applied to dh in place
          const DeviceKernels<float>& k = cuda_kernels<float>("gelu_conv2d backward");
          std::vector<Tensor<float>> grads = detail::conv2d_grads(dout, Tensor<float>(), ws, g, need_h, false, need_b);
          if (need_w) grads[1] = k.gelu_conv2d_bf16_backward_weight(contiguous(dout), hs, g, tanh_approximation);
          if (need_h) k.gelu_grad_bf16_(grads[0], hs, tanh_approximation);
          return grads;
        }
        if (need_h && need_w) return gelu_conv2d_grads_cpu(dout, hs, ws, g, need_b, tanh_approximation);
        const Tensor<float> hr = hs.defined() ? cpu::widen_bf16(hs) : Tensor<float>();
        Tensor<float> a = need_w ? gelu_forward(hr, tanh_approximation) : Tensor<float>();
        std::vector<Tensor<float>> grads = detail::conv2d_grads(dout, a, ws, g, need_h, need_w, need_b);
        a = Tensor<float>();  // freed before dh is made
        if (need_h) grads[0] = gelu_grad(grads[0], hr, tanh_approximation);
        return grads;
      });
}
}  // namespace detail

/// conv2d(gelu(h, tanh_approximation), weight, bias, stride, padding, dilation, groups), saving
/// h (and the weight) only: backward recomputes gelu(h). Differentiable in h, weight and bias.
/// Under bf16 products (float, groups == 1) h is kept in bfloat16 and the GELU sees round(h).
/// Example (a dense block's bottleneck): auto y = dg::gelu_conv2d(expand(x), reduce.weight, reduce.bias);
template <class T>
Tensor<T> gelu_conv2d(const Tensor<T>& h, const Tensor<T>& weight, const Tensor<T>& bias = {}, Pair2 stride = 1,
                      Pair2 padding = 0, Pair2 dilation = 1, int64_t groups = 1, bool tanh_approximation = false) {
  static_assert(is_floating_v<T>, "gelu_conv2d: T must be float, double or dg::bfloat16");
  const Conv2dGeometry g = detail::conv2d_checked_geometry(h, weight, bias, stride, padding, dilation, groups, "gelu_conv2d");
  if constexpr (std::is_same_v<T, float>) {
    if (g.bf16 && g.groups == 1) return detail::gelu_conv2d_bf16(h, weight, bias, g, tanh_approximation);
  }
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
                            if (!dout.device().is_cuda() && need_h && need_w)
                              return detail::gelu_conv2d_grads_cpu(dout, hc, ws, g, need_b, tanh_approximation);
                            Tensor<T> a = need_w ? detail::gelu_forward(hc, tanh_approximation) : Tensor<T>();
                            std::vector<Tensor<T>> grads = detail::conv2d_grads(dout, a, ws, g, need_h, need_w, need_b);
                            a = Tensor<T>();  // freed before dh is made
                            if (need_h) grads[0] = detail::gelu_grad(grads[0], hc, tanh_approximation);
                            return grads;
                          });
}

namespace detail {
/// What layer_norm2d -> conv2d keeps from forward for backward: the norm's (contiguous or
/// undefined) weight and bias and per-pixel mean and rstd, the conv's weight and geometry, and
/// which gradients are asked for (need_norm: x, norm weight, norm bias).
template <class T>
struct LayerNormConvSaved {
  Tensor<T> nw, nb, ws;
  double eps;
  Tensor<acc_t<T>> mean, rstd;
  Conv2dGeometry g;
  std::array<bool, 3> need_norm;
  bool need_w, need_b;
  bool need_n() const { return need_norm[0] || need_norm[1] || need_norm[2]; }
  /// Whether backward reads the norm's input x: for the norm's gradients, or to normalize again for dweight.
  bool needs_x() const { return need_n() || need_w; }
};

/// layer_norm2d -> conv2d forward on x (from layer_norm2d_operand): the conv's output, with the
/// norm's statistics and what backward needs put in `saved` (the normalized tensor is not kept).
template <class T>
Tensor<T> layer_norm2d_conv2d_forward(const Tensor<T>& xc, const Tensor<T>& norm_weight, const Tensor<T>& norm_bias,
                                      double eps, const Tensor<T>& weight, const Tensor<T>& bias,
                                      const Conv2dGeometry& g, const std::array<bool, 3>& need_norm, bool need_w,
                                      bool need_b, LayerNormConvSaved<T>& saved) {
  if (norm_weight.defined()) saved.nw = contiguous(norm_weight.detach());
  if (norm_bias.defined()) saved.nb = contiguous(norm_bias.detach());
  ref::LayerNormForward<T> f;
  Tensor<T> out;
  if constexpr (std::is_same_v<T, float>) {
    if (!xc.device().is_cuda() && cpu::forward_runs_panels(g)) {
      // the statistics first, then each chunk of images normalized on its way into the GEMMs
      // (as gelu_conv2d's GELU): the normalized tensor never exists for the whole batch
      std::tie(f.mean, f.rstd) = cpu::layer_norm2d_stats(xc, eps);
      const float *x0 = xc.data(), *m0 = f.mean.data(), *r0 = f.rstd.data();
      const float *pw = saved.nw.defined() ? saved.nw.data() : nullptr, *pb = saved.nb.defined() ? saved.nb.data() : nullptr;
      const int64_t xs = batch_stride(xc), C = g.C_in, P = g.H * g.W;
      out = cpu::conv2d_forward(xc, weight, bias, g, [=](const float* src, float* dst, int64_t) {
        const int64_t n = (src - x0) / xs;  // src is image n of xc
        cpu::layer_norm2d_apply_image(src, dst, C, P, m0 + n * P, r0 + n * P, pw, pb);
      });
    }
  }
  if (!out.defined()) {
    f = layer_norm2d_forward(xc, saved.nw, saved.nb, eps);
    out = conv2d_forward(f.y, weight, bias, g);
  }
  saved.eps = eps, saved.g = g, saved.need_norm = need_norm, saved.need_w = need_w, saved.need_b = need_b;
  if (saved.needs_x()) {
    saved.mean = f.mean;
    saved.rstd = f.rstd;
    if (saved.need_n()) saved.ws = weight.detach();
  } else {  // at most the conv's bias: dbias = sum of dout, nothing to keep
    saved.nw = saved.nb = Tensor<T>();
  }
  return out;  // f.y, the normalized tensor, goes here
}

/// layer_norm2d -> conv2d backward: {dx, dnorm_weight, dnorm_bias, dweight, dbias} (those asked
/// for) from dout and the norm's input x (the same values as in forward; undefined when
/// !saved.needs_x()). The normalized tensor is made again for dweight: on the CPU by the forward's
/// last pass from the saved statistics, on a GPU by the forward kernel. Where the conv's
/// gradients run as panel GEMMs on the CPU, chunk by chunk of images: the conv's dx, the chunk
/// normalized again, its dweight, and the norm's backward turning that dx into x's gradient in
/// place, so neither the normalized tensor nor a second tensor of x's size exists whole.
template <class T>
std::vector<Tensor<T>> layer_norm2d_conv2d_grads(const Tensor<T>& dout, const Tensor<T>& xc,
                                                 const LayerNormConvSaved<T>& s) {
  if (s.need_w && s.need_n() && !xc.device().is_cuda() && cpu::backward_runs_panels<T>(s.g)) {
    // chunk by chunk of images: the conv's dx (the norm's dy), the normalized chunk for its
    // dweight, and the norm's backward turning that dy into dx in place (the same bits)
    cpu::LayerNorm2dParamGrads<acc_t<T>> parts(s.g.N, s.g.C_in, s.g.H * s.g.W);
    std::array<Tensor<T>, 3> r = cpu::conv2d_backward_prepped(
        dout, s.ws, s.g, s.need_b, [&xc, &s, &parts](int64_t n0, int64_t gn, T* d, T* y) {
          cpu::layer_norm2d_apply_backward_images(xc, s.nw, s.nb, s.mean, s.rstd, n0, gn, y, d, s.need_norm[0], parts);
        });
    return {s.need_norm[0] ? r[0] : Tensor<T>(), s.need_norm[1] ? parts.template sum<T>(parts.dw) : Tensor<T>(),
            s.need_norm[2] ? parts.template sum<T>(parts.db) : Tensor<T>(), r[1], r[2]};
  }
  Tensor<T> n;  // the normalized tensor again, from the saved statistics on the CPU (the same bits)
  if (s.need_w)
    n = xc.device().is_cuda() ? layer_norm2d_forward(xc, s.nw, s.nb, s.eps).y
                              : cpu::layer_norm2d_apply(xc, s.nw, s.nb, s.mean, s.rstd);
  std::vector<Tensor<T>> conv = conv2d_grads(dout, n, s.ws, s.g, s.need_n(), s.need_w, s.need_b);
  n = Tensor<T>();  // freed before the norm's gradients are made
  std::vector<Tensor<T>> grads{Tensor<T>(), Tensor<T>(), Tensor<T>(), conv[1], conv[2]};
  if (s.need_n()) {
    ref::LayerNormGrads<T> ln = layer_norm2d_grads(conv[0], xc, s.mean, s.rstd, s.nw, s.need_norm);
    grads[0] = ln.dx;
    grads[1] = ln.dweight;
    grads[2] = ln.dbias;
  }
  return grads;
}
}  // namespace detail

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
  Tensor<T> xc = detail::layer_norm2d_operand(x.detach());
  detail::LayerNormConvSaved<T> saved;
  Tensor<T> out = detail::layer_norm2d_conv2d_forward(
      xc, norm_weight, norm_bias, eps, weight, bias, g,
      {x.requires_grad(), norm_weight.requires_grad(), norm_bias.requires_grad()}, weight.requires_grad(),
      bias.requires_grad(), saved);
  if (!saved.needs_x()) xc = Tensor<T>();
  return autograd::record("layer_norm2d_conv2d", out, {x, norm_weight, norm_bias, weight, bias},
                          [xc, saved](const Tensor<T>& dout) { return detail::layer_norm2d_conv2d_grads(dout, xc, saved); });
}

/// layer_norm2d_conv2d(conv2d(x, dw_weight, dw_bias, 1, dw_padding, 1, C), norm_weight, norm_bias,
/// eps, weight, bias, stride, padding, dilation, groups): a depthwise conv (stride 1, weight
/// (C, 1, kH, kW)), LayerNorm2d and a conv as one op, saving x (the view it is: for a dense stage's
/// prefix, the stage's buffer), the depthwise weight, the norm's statistics and the conv weight; not
/// the depthwise conv's output, which backward computes again. Differentiable in all seven tensors;
/// the biases and the norm's weight may be undefined.
/// Example (a dense block's head): auto h = dg::depthwise_layer_norm2d_conv2d(x, dw.weight, dw.bias, 3,
///                                      norm.weight, norm.bias, 1e-6, expand.weight, expand.bias);
template <class T>
Tensor<T> depthwise_layer_norm2d_conv2d(const Tensor<T>& x, const Tensor<T>& dw_weight, const Tensor<T>& dw_bias,
                                        Pair2 dw_padding, const Tensor<T>& norm_weight, const Tensor<T>& norm_bias,
                                        double eps, const Tensor<T>& weight, const Tensor<T>& bias = {},
                                        Pair2 stride = 1, Pair2 padding = 0, Pair2 dilation = 1, int64_t groups = 1) {
  static_assert(is_floating_v<T>, "depthwise_layer_norm2d_conv2d: T must be float, double or dg::bfloat16");
  constexpr const char* op = "depthwise_layer_norm2d_conv2d";
  DG_CHECK(x.defined() && dw_weight.defined(), op, ": x and the depthwise weight must be defined tensors");
  DG_CHECK(x.dim() == 4, op, ": expected x of shape (N, C, H, W), got a ", x.dim(), "-D tensor of shape ",
           shape_str(x.shape()));
  const int64_t C = x.shape()[1];
  DG_CHECK(dw_weight.dim() == 4 && dw_weight.shape()[0] == C && dw_weight.shape()[1] == 1, op,
           ": expected a depthwise weight of shape (", C, ", 1, kH, kW) for x with ", C, " channels, got ",
           shape_str(dw_weight.shape()));
  const Conv2dGeometry gd = detail::conv2d_checked_geometry(x, dw_weight, dw_bias, 1, dw_padding, 1, C, op);
  const Shape d_shape{gd.N, C, gd.Ho, gd.Wo};
  // the checks of the norm and the conv on the depthwise output's shape, before any work
  detail::check_affine(norm_weight, "norm weight", {C}, op, x);
  detail::check_affine(norm_bias, "norm bias", {C}, op, x);
  DG_CHECK(weight.defined(), op, ": the conv weight must be a defined tensor");
  const Shape bshape = bias.defined() ? bias.shape() : Shape{};
  Conv2dGeometry g = conv2d_geometry(d_shape, weight.shape(), bias.defined() ? &bshape : nullptr, stride, padding,
                                     dilation, groups, op);
  DG_CHECK(weight.device() == x.device() && (!bias.defined() || bias.device() == x.device()), op,
           ": expected the conv weight and bias on ", x.device().str(), ", where x is");
  g.bf16 = gd.bf16;

  const bool need_x = x.requires_grad(), need_dww = dw_weight.requires_grad(), need_dwb = dw_bias.requires_grad();
  const bool need_d = need_x || need_dww || need_dwb;  // the gradient of the depthwise output
  Tensor<T> xs = x.detach(), dww = contiguous(dw_weight.detach()), dwb;
  if (dw_bias.defined()) dwb = contiguous(dw_bias.detach());
  Tensor<T> d = detail::conv2d_forward(xs, dww, dwb, gd);
  detail::LayerNormConvSaved<T> saved;
  Tensor<T> out = detail::layer_norm2d_conv2d_forward(
      d, norm_weight, norm_bias, eps, weight, bias, g, {need_d, norm_weight.requires_grad(), norm_bias.requires_grad()},
      weight.requires_grad(), bias.requires_grad(), saved);
  d = Tensor<T>();  // the depthwise output goes now; backward makes it again from x
  if (!saved.needs_x()) xs = dww = dwb = Tensor<T>();  // need_d is one of needs_x()'s reasons
  return autograd::record(
      "depthwise_layer_norm2d_conv2d", out, {x, dw_weight, dw_bias, norm_weight, norm_bias, weight, bias},
      [xs, dww, dwb, gd, need_x, need_dww, need_dwb, need_d, saved](const Tensor<T>& dout) {
        // the depthwise output, again: the same kernel on the same input gives the same values
        Tensor<T> d = saved.needs_x() ? detail::conv2d_forward(xs, dww, dwb, gd) : Tensor<T>();
        std::vector<Tensor<T>> ln = detail::layer_norm2d_conv2d_grads(dout, d, saved);
        d = Tensor<T>();
        std::vector<Tensor<T>> dw(3);
        if (need_d) dw = detail::conv2d_grads(ln[0], xs, dww, gd, need_x, need_dww, need_dwb);
        return std::vector<Tensor<T>>{dw[0], dw[1], dw[2], ln[1], ln[2], ln[3], ln[4]};
      });
}

}  // namespace dg
