// densegrad/backend/ref/pool.hpp: reference adaptive average pooling, forward and backward.
// Plain loops over any strides, math in double; the oracle for faster paths. Not a general
// pooling library: no max pooling, no padding, no fixed-kernel avg_pool2d.
// Shape legend: x: (N, C, H, W) -> out: (N, C, OH, OW).
#pragma once

#include "../../core/tensor.hpp"

namespace dg::ref {

/// torch's adaptive bins: output index i of `out` covers input [floor(i*in/out), ceil((i+1)*in/out)).
inline int64_t adaptive_start(int64_t i, int64_t out, int64_t in) { return (i * in) / out; }
inline int64_t adaptive_end(int64_t i, int64_t out, int64_t in) { return ((i + 1) * in + out - 1) / out; }

/// out[n, c, i, j] = mean of x[n, c, bin_h(i), bin_w(j)]; bins may overlap when sizes do not divide.
template <class T>
Tensor<T> adaptive_avg_pool2d(const Tensor<T>& x, int64_t OH, int64_t OW) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  Tensor<T> out = Tensor<T>::empty({N, C, OH, OW});
  T* po = out.data();
  const T* px = x.data();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const T* plane = px + n * sn + c * sc;
      for (int64_t i = 0; i < OH; ++i) {
        const int64_t h0 = adaptive_start(i, OH, H), h1 = adaptive_end(i, OH, H);
        for (int64_t j = 0; j < OW; ++j) {
          const int64_t w0 = adaptive_start(j, OW, W), w1 = adaptive_end(j, OW, W);
          double s = 0;
          for (int64_t h = h0; h < h1; ++h)
            for (int64_t w = w0; w < w1; ++w) s += double(acc_t<T>(plane[h * sh + w * sw]));
          *po++ = T(s / double((h1 - h0) * (w1 - w0)));
        }
      }
    }
  return out;
}

/// dx[n, c, h, w] = sum over the bins (i, j) containing (h, w) of dout[n, c, i, j] / bin size.
/// `+=` because overlapping bins share input pixels.
template <class T>
Tensor<T> adaptive_avg_pool2d_backward(const Tensor<T>& dout, int64_t H, int64_t W) {
  const int64_t N = dout.size(0), C = dout.size(1), OH = dout.size(2), OW = dout.size(3);
  std::vector<double> acc(static_cast<size_t>(N * C * H * W), 0.0);
  const T* pd = dout.data();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      double* plane = acc.data() + (n * C + c) * H * W;
      for (int64_t i = 0; i < OH; ++i) {
        const int64_t h0 = adaptive_start(i, OH, H), h1 = adaptive_end(i, OH, H);
        for (int64_t j = 0; j < OW; ++j) {
          const int64_t w0 = adaptive_start(j, OW, W), w1 = adaptive_end(j, OW, W);
          const double g = double(acc_t<T>(pd[n * dout.stride(0) + c * dout.stride(1) + i * dout.stride(2) +
                                              j * dout.stride(3)])) / double((h1 - h0) * (w1 - w0));
          for (int64_t h = h0; h < h1; ++h)
            for (int64_t w = w0; w < w1; ++w) plane[h * W + w] += g;
        }
      }
    }
  Tensor<T> dx = Tensor<T>::empty({N, C, H, W});
  for (size_t k = 0; k < acc.size(); ++k) dx.data()[k] = T(acc[k]);
  return dx;
}

}  // namespace dg::ref
