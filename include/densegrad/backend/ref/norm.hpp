// densegrad/backend/ref/norm.hpp: reference layer-norm kernels, forward and backward, over any
// strides: plain loops, one row at a time, sums in double. The oracle the fast paths in
// backend/cpu are tested against; deliberately not fast (it gathers every row element by element).
// Shape legend: x: (*outer, *normalized), the last k dims normalized; a "row" is one outer index,
// n = prod(normalized) elements; weight, bias: (*normalized); mean, rstd: (*outer) in acc_t<T>.
#pragma once

#include <cmath>
#include <vector>

#include "../../core/tensor.hpp"

namespace dg::ref {

/// What layer-norm forward produces: the output and the per-row statistics backward reuses.
template <class T>
struct LayerNormForward {
  Tensor<T> y;                  // x's shape
  Tensor<acc_t<T>> mean, rstd;  // (*outer), contiguous: the row mean and 1 / sqrt(biased var + eps)
};

/// Layer-norm input gradients; a member is undefined when it was not asked for.
template <class T>
struct LayerNormGrads {
  Tensor<T> dx, dweight, dbias;
};

namespace detail {
/// x's geometry cut into the outer dims (which rows) and the last k dims (within a row).
struct RowSplit {
  Shape outer, outer_strides, inner, inner_strides;
  int64_t n = 1;  // elements per row
};
template <class T>
RowSplit split_rows(const Tensor<T>& x, int64_t k) {
  const auto cut = x.shape().size() - static_cast<size_t>(k);
  RowSplit s;
  s.outer.assign(x.shape().begin(), x.shape().begin() + cut);
  s.outer_strides.assign(x.strides().begin(), x.strides().begin() + cut);
  s.inner.assign(x.shape().begin() + cut, x.shape().end());
  s.inner_strides.assign(x.strides().begin() + cut, x.strides().end());
  s.n = shape_numel(s.inner);
  return s;
}
/// Strides that walk an optional weight/bias along the row; zeros (never read) when undefined.
template <class T>
Shape param_strides(const Tensor<T>& p, const RowSplit& s) {
  return p.defined() ? p.strides() : Shape(s.inner.size(), 0);
}
/// A view of t with its dims reordered (dims[i] = source dim of dim i); no autograd, no copy.
template <class T>
Tensor<T> permuted(const Tensor<T>& t, const Shape& dims) {
  Shape s, st;
  for (int64_t d : dims) {
    s.push_back(t.shape()[d]);
    st.push_back(t.strides()[d]);
  }
  return Tensor<T>::from_storage(t.storage(), s, st, t.offset());
}
}  // namespace detail

/// y = (x - mean) / sqrt(var + eps) * weight + bias over the last k dims of x
/// (torch.nn.functional.layer_norm). weight and bias may be undefined (no affine).
template <class T>
LayerNormForward<T> layer_norm_forward(const Tensor<T>& x, int64_t k, const Tensor<T>& weight,
                                       const Tensor<T>& bias, double eps) {
  using A = acc_t<T>;
  const detail::RowSplit s = detail::split_rows(x, k);
  const Shape ws = detail::param_strides(weight, s), bs = detail::param_strides(bias, s);
  LayerNormForward<T> r{Tensor<T>::empty(x.shape()), Tensor<A>::empty(s.outer), Tensor<A>::empty(s.outer)};
  const T* px = x.data();
  const T* pw = weight.defined() ? weight.data() : nullptr;
  const T* pb = bias.defined() ? bias.data() : nullptr;
  T* py = r.y.data();  // contiguous: row `row` starts at row * n
  std::vector<double> v(static_cast<size_t>(s.n));
  int64_t row = 0;
  for_each_strided<1>(s.outer, {s.outer_strides.data()}, {0}, [&](auto o) {
    size_t j = 0;  // gather the row in C order
    for_each_strided<1>(s.inner, {s.inner_strides.data()}, {o[0]}, [&](auto i) { v[j++] = double(A(px[i[0]])); });
    double mean = 0, var = 0;
    for (double e : v) mean += e;
    mean /= static_cast<double>(s.n);
    for (double e : v) var += (e - mean) * (e - mean);
    var /= static_cast<double>(s.n);  // biased (divide by n), like torch
    const double rstd = 1.0 / std::sqrt(var + eps);
    j = 0;
    for_each_strided<2>(s.inner, {ws.data(), bs.data()}, {0, 0}, [&](auto p) {
      const double w = pw ? double(A(pw[p[0]])) : 1.0, b = pb ? double(A(pb[p[1]])) : 0.0;
      py[row * s.n + static_cast<int64_t>(j)] = T((v[j] - mean) * rstd * w + b);
      ++j;
    });
    r.mean.data()[row] = A(mean);
    r.rstd.data()[row] = A(rstd);
    ++row;
  });
  return r;
}

/// Gradients of layer_norm_forward, from the saved row statistics (llm.c layernorm_backward):
///   xhat = (x - mean) * rstd, dnorm = dy * weight
///   dx = rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat))      (means over the row)
///   dweight = sum over rows of dy * xhat, dbias = sum over rows of dy
template <class T>
LayerNormGrads<T> layer_norm_backward(const Tensor<T>& dy, const Tensor<T>& x, const Tensor<acc_t<T>>& mean,
                                      const Tensor<acc_t<T>>& rstd, const Tensor<T>& weight, int64_t k,
                                      bool need_dx, bool need_dweight, bool need_dbias) {
  using A = acc_t<T>;
  const detail::RowSplit s = detail::split_rows(x, k), sd = detail::split_rows(dy, k);
  const Shape ws = detail::param_strides(weight, s);
  const T *px = x.data(), *pdy = dy.data();
  const T* pw = weight.defined() ? weight.data() : nullptr;
  DG_CHECK(mean.is_contiguous() && rstd.is_contiguous() && mean.numel() == shape_numel(s.outer),
           "layer_norm backward: mean/rstd must be the contiguous (*outer) tensors forward saved, got ",
           shape_str(mean.shape()), " for input ", shape_str(x.shape()));
  const A *pmean = mean.data(), *prstd = rstd.data();
  LayerNormGrads<T> g;
  if (need_dx) g.dx = Tensor<T>::empty(x.shape());
  const size_t n = static_cast<size_t>(s.n);
  std::vector<double> xhat(n), dyv(n), dnorm(n), dw(n, 0.0), db(n, 0.0);
  int64_t row = 0;
  for_each_strided<2>(s.outer, {s.outer_strides.data(), sd.outer_strides.data()}, {0, 0}, [&](auto o) {
    const double m = pmean[row], r = prstd[row];
    double mean_dnorm = 0, mean_dnorm_xhat = 0;
    size_t j = 0;
    for_each_strided<3>(s.inner, {s.inner_strides.data(), sd.inner_strides.data(), ws.data()}, {o[0], o[1], 0},
                        [&](auto i) {
                          xhat[j] = (double(A(px[i[0]])) - m) * r;
                          dyv[j] = double(A(pdy[i[1]]));
                          dnorm[j] = dyv[j] * (pw ? double(A(pw[i[2]])) : 1.0);
                          mean_dnorm += dnorm[j];
                          mean_dnorm_xhat += dnorm[j] * xhat[j];
                          ++j;
                        });
    mean_dnorm /= static_cast<double>(n);
    mean_dnorm_xhat /= static_cast<double>(n);
    for (j = 0; j < n; ++j) {
      if (need_dx) g.dx.data()[row * s.n + static_cast<int64_t>(j)] =
          T(r * (dnorm[j] - mean_dnorm - xhat[j] * mean_dnorm_xhat));
      dw[j] += dyv[j] * xhat[j];  // += : every row uses the same weight and bias
      db[j] += dyv[j];
    }
    ++row;
  });
  auto to_tensor = [&](const std::vector<double>& v) {
    Tensor<T> t = Tensor<T>::empty(s.inner);
    for (size_t j = 0; j < n; ++j) t.data()[j] = T(v[j]);
    return t;
  };
  if (need_dweight) g.dweight = to_tensor(dw);
  if (need_dbias) g.dbias = to_tensor(db);
  return g;
}

// ---- LayerNorm2d (timm): layer norm over the channels of (N, C, H, W), by its definition:
// normalize the last dim of the (N, H, W, C) permuted view, then permute back. The views cost
// nothing here; backend/cpu/norm.hpp computes the same thing with channel strides instead.

/// timm LayerNorm2d forward. x: (N, C, H, W), weight/bias: (C) or undefined; mean, rstd: (N, H, W).
template <class T>
LayerNormForward<T> layer_norm2d_forward(const Tensor<T>& x, const Tensor<T>& weight, const Tensor<T>& bias,
                                         double eps) {
  LayerNormForward<T> r = layer_norm_forward(detail::permuted(x, {0, 2, 3, 1}), 1, weight, bias, eps);
  r.y = detail::permuted(r.y, {0, 3, 1, 2});  // (N, C, H, W) with channels-last strides
  return r;
}

/// timm LayerNorm2d backward; dx comes back as an (N, C, H, W) view with channels-last strides.
template <class T>
LayerNormGrads<T> layer_norm2d_backward(const Tensor<T>& dy, const Tensor<T>& x, const Tensor<acc_t<T>>& mean,
                                        const Tensor<acc_t<T>>& rstd, const Tensor<T>& weight, bool need_dx,
                                        bool need_dweight, bool need_dbias) {
  const Shape nhwc{0, 2, 3, 1};
  LayerNormGrads<T> g = layer_norm_backward(detail::permuted(dy, nhwc), detail::permuted(x, nhwc), mean, rstd,
                                            weight, 1, need_dx, need_dweight, need_dbias);
  if (g.dx.defined()) g.dx = detail::permuted(g.dx, {0, 3, 1, 2});
  return g;
}

}  // namespace dg::ref
