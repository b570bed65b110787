// densegrad/backend/ref/conv.hpp: reference 2-D convolution kernels (forward, grad input,
// grad weight, grad bias) as plain direct loops that index every tensor through its strides.
// The readable definition the fast path (backend/cpu/conv.hpp) is tested against; not fast.
// Shape legend: x: (N, C_in, H, W), weight: (C_out, C_in/groups, kH, kW), bias: (C_out),
// out: (N, C_out, Ho, Wo); inside group g, input channels [g*Cg, (g+1)*Cg) feed output
// channels [g*OCg, (g+1)*OCg), where Cg = C_in/groups and OCg = C_out/groups.
#pragma once

#include <vector>

#include "../../core/tensor.hpp"

namespace dg {

/// Every size one conv2d call needs. dg::conv2d_geometry (ops/conv.hpp) checks the shapes
/// once and fills it; the kernels of every backend trust it.
struct Conv2dGeometry {
  int64_t N, C_in, H, W;     // input
  int64_t C_out, kH, kW;     // weight
  int64_t sH, sW, pH, pW, dH, dW, groups;  // stride, zero padding, dilation
  int64_t Ho, Wo;            // output: floor((H + 2p - d(k-1) - 1) / s) + 1
  // Products in bfloat16 (dg::MatmulPrecision::bf16 when the op ran): a hint the GEMMs of
  // ungrouped convs follow on CPUs with AVX512-BF16 (backend/cpu/gemm_bf16.hpp) and on CUDA
  // (backend/cuda/conv.cuh); the ref kernels ignore it.
  bool bf16 = false;
  int64_t cin_g() const { return C_in / groups; }
  int64_t cout_g() const { return C_out / groups; }
  Shape x_shape() const { return {N, C_in, H, W}; }
  Shape w_shape() const { return {C_out, C_in / groups, kH, kW}; }
  Shape out_shape() const { return {N, C_out, Ho, Wo}; }
};

}  // namespace dg

namespace dg::ref {

namespace conv_detail {
/// Element offset of t[i0, i1, i2, i3] for a 4-D tensor of any strides.
template <class T>
int64_t at4(const Tensor<T>& t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
  const Shape& s = t.strides();
  return i0 * s[0] + i1 * s[1] + i2 * s[2] + i3 * s[3];
}
}  // namespace conv_detail

/// out[n, oc, oh, ow] = bias[oc] + sum over (ic, kh, kw) of the group's inputs
///   x[n, g*Cg + ic, oh*s - p + kh*d, ow*s - p + kw*d] * weight[oc, ic, kh, kw]
/// (reads outside the input are the zero padding). bias may be undefined.
template <class T>
Tensor<T> conv2d_forward(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& bias,
                         const Conv2dGeometry& g) {
  using A = acc_t<T>;
  using conv_detail::at4;
  Tensor<T> out = Tensor<T>::empty(g.out_shape());
  const T *px = x.data(), *pw = weight.data();
  T* po = out.data();
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t oc = 0; oc < g.C_out; ++oc) {
      const int64_t c0 = (oc / g.cout_g()) * g.cin_g();  // first input channel of oc's group
      for (int64_t oh = 0; oh < g.Ho; ++oh)
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          A acc = bias.defined() ? A(bias.data()[oc * bias.strides()[0]]) : A(0);
          for (int64_t ic = 0; ic < g.cin_g(); ++ic)
            for (int64_t kh = 0; kh < g.kH; ++kh)
              for (int64_t kw = 0; kw < g.kW; ++kw) {
                const int64_t ih = oh * g.sH - g.pH + kh * g.dH, iw = ow * g.sW - g.pW + kw * g.dW;
                if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;  // zero padding
                acc += A(px[at4(x, n, c0 + ic, ih, iw)]) * A(pw[at4(weight, oc, ic, kh, kw)]);
              }
          po[((n * g.C_out + oc) * g.Ho + oh) * g.Wo + ow] = T(acc);
        }
    }
  return out;
}

/// dx: every (input, weight) pair the forward multiplied sends dout * weight back to its input
/// position; positions read by several windows (overlap) sum their contributions.
template <class T>
Tensor<T> conv2d_backward_input(const Tensor<T>& dout, const Tensor<T>& weight, const Conv2dGeometry& g) {
  using A = acc_t<T>;
  using conv_detail::at4;
  std::vector<A> dx(static_cast<size_t>(g.N * g.C_in * g.H * g.W), A(0));
  const T *pd = dout.data(), *pw = weight.data();
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t oc = 0; oc < g.C_out; ++oc) {
      const int64_t c0 = (oc / g.cout_g()) * g.cin_g();
      for (int64_t oh = 0; oh < g.Ho; ++oh)
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          const A d = A(pd[at4(dout, n, oc, oh, ow)]);
          for (int64_t ic = 0; ic < g.cin_g(); ++ic)
            for (int64_t kh = 0; kh < g.kH; ++kh)
              for (int64_t kw = 0; kw < g.kW; ++kw) {
                const int64_t ih = oh * g.sH - g.pH + kh * g.dH, iw = ow * g.sW - g.pW + kw * g.dW;
                if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;  // padding has no gradient
                dx[((n * g.C_in + c0 + ic) * g.H + ih) * g.W + iw] += d * A(pw[at4(weight, oc, ic, kh, kw)]);
              }
        }
    }
  Tensor<T> out = Tensor<T>::empty(g.x_shape());
  for (size_t i = 0; i < dx.size(); ++i) out.data()[i] = T(dx[i]);
  return out;
}

/// dweight[oc, ic, kh, kw] = sum over (n, oh, ow) of dout[n, oc, oh, ow] * the input that
/// weight met in the forward.
template <class T>
Tensor<T> conv2d_backward_weight(const Tensor<T>& dout, const Tensor<T>& x, const Conv2dGeometry& g) {
  using A = acc_t<T>;
  using conv_detail::at4;
  Tensor<T> out = Tensor<T>::empty(g.w_shape());
  const T *pd = dout.data(), *px = x.data();
  T* po = out.data();
  for (int64_t oc = 0; oc < g.C_out; ++oc) {
    const int64_t c0 = (oc / g.cout_g()) * g.cin_g();
    for (int64_t ic = 0; ic < g.cin_g(); ++ic)
      for (int64_t kh = 0; kh < g.kH; ++kh)
        for (int64_t kw = 0; kw < g.kW; ++kw) {
          A acc = 0;
          for (int64_t n = 0; n < g.N; ++n)
            for (int64_t oh = 0; oh < g.Ho; ++oh)
              for (int64_t ow = 0; ow < g.Wo; ++ow) {
                const int64_t ih = oh * g.sH - g.pH + kh * g.dH, iw = ow * g.sW - g.pW + kw * g.dW;
                if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
                acc += A(pd[at4(dout, n, oc, oh, ow)]) * A(px[at4(x, n, c0 + ic, ih, iw)]);
              }
          po[((oc * g.cin_g() + ic) * g.kH + kh) * g.kW + kw] = T(acc);
        }
  }
  return out;
}

/// dbias[oc] = sum over (n, oh, ow) of dout[n, oc, oh, ow]: the bias was added everywhere.
template <class T>
Tensor<T> conv2d_backward_bias(const Tensor<T>& dout, const Conv2dGeometry& g) {
  using A = acc_t<T>;
  using conv_detail::at4;
  Tensor<T> out = Tensor<T>::empty({g.C_out});
  for (int64_t oc = 0; oc < g.C_out; ++oc) {
    A acc = 0;
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t oh = 0; oh < g.Ho; ++oh)
        for (int64_t ow = 0; ow < g.Wo; ++ow) acc += A(dout.data()[at4(dout, n, oc, oh, ow)]);
    out.data()[oc] = T(acc);
  }
  return out;
}

}  // namespace dg::ref
