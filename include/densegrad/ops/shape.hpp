// densegrad/ops/shape.hpp: views and copies: reshape/view, permute, transpose, narrow, slice,
// select, expand, unsqueeze, squeeze, flatten, contiguous, clone, dtype conversion.
// Views share storage with their input (no copy); their gradients map the output gradient
// back to the input's geometry.
#pragma once

#include <numeric>

#include "../autograd/tape.hpp"

namespace dg {

template <class T> Tensor<T> sum_to(const Tensor<T>& g, const Shape& shape);  // ops/reduce.hpp
template <class T> Tensor<T> to_device(const Tensor<T>& x, Device device);  // below

namespace detail {
/// Resolves one -1 in `shape` so that it holds `numel` elements.
inline Shape infer_shape(Shape shape, int64_t numel, const Shape& from, const char* op) {
  int64_t known = 1, infer = -1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      DG_CHECK(infer < 0, op, ": only one dimension can be -1, got ", shape_str(shape));
      infer = static_cast<int64_t>(i);
    } else {
      DG_CHECK(shape[i] >= 0, op, ": invalid size ", shape[i], " in ", shape_str(shape));
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    DG_CHECK(known != 0 && numel % known == 0, op, ": shape ", shape_str(shape), " is invalid for input of shape ",
             shape_str(from), " (", numel, " elements)");
    shape[infer] = numel / known;
  }
  DG_CHECK(shape_numel(shape) == numel, op, ": shape ", shape_str(shape), " is invalid for input of shape ",
           shape_str(from), " (", numel, " elements)");
  return shape;
}
template <class T>
Tensor<T> make_view(const Tensor<T>& x, Shape shape, Shape strides, int64_t offset) {
  return Tensor<T>::from_storage(x.storage(), std::move(shape), std::move(strides), offset);
}
}  // namespace detail

/// A contiguous copy of x (torch.contiguous); returns x itself when already contiguous.
template <class T>
Tensor<T> contiguous(const Tensor<T>& x) {
  if (x.is_contiguous()) return x;
  Tensor<T> out = Tensor<T>::empty(x.shape(), x.device());
  {
    NoGradGuard g;
    out.copy_(x);
  }
  return autograd::record("contiguous", out, {x}, [](const Tensor<T>& dout) { return std::vector<Tensor<T>>{dout}; });
}

/// A copy that never aliases x (torch.clone).
template <class T>
Tensor<T> clone(const Tensor<T>& x) {
  Tensor<T> out = Tensor<T>::empty(x.shape(), x.device());
  {
    NoGradGuard g;
    out.copy_(x);
  }
  return autograd::record("clone", out, {x}, [](const Tensor<T>& dout) { return std::vector<Tensor<T>>{dout}; });
}

/// torch.Tensor.view: same elements, new shape, no copy; x must be contiguous.
template <class T>
Tensor<T> view(const Tensor<T>& x, const Shape& shape) {
  Shape s = detail::infer_shape(shape, x.numel(), x.shape(), "view");
  DG_CHECK(x.is_contiguous(), "view: input of shape ", shape_str(x.shape()),
           " is not contiguous (a permuted or sliced view); use reshape(), which copies");
  Tensor<T> out = detail::make_view(x, s, contiguous_strides(s), x.offset());
  return autograd::record("view", out, {x}, [xs = x.shape()](const Tensor<T>& dout) {
    return std::vector<Tensor<T>>{dout.reshape(xs)};
  });
}

/// torch.reshape: a view when x is contiguous, else a contiguous copy reshaped.
template <class T>
Tensor<T> reshape(const Tensor<T>& x, const Shape& shape) {
  return view(contiguous(x), shape);
}

/// torch.permute: dims[i] is the input dim that becomes output dim i.
template <class T>
Tensor<T> permute(const Tensor<T>& x, const Shape& dims) {
  DG_CHECK(static_cast<int64_t>(dims.size()) == x.dim(), "permute: got ", dims.size(), " dims ", shape_str(dims),
           " for a ", x.dim(), "-D tensor");
  Shape s(dims.size()), st(dims.size()), inverse(dims.size(), -1);
  for (size_t i = 0; i < dims.size(); ++i) {
    int64_t d = wrap_dim(dims[i], x.dim(), "permute");
    DG_CHECK(inverse[d] < 0, "permute: dim ", d, " repeated in ", shape_str(dims));
    inverse[d] = static_cast<int64_t>(i);
    s[i] = x.shape()[d];
    st[i] = x.strides()[d];
  }
  Tensor<T> out = detail::make_view(x, s, st, x.offset());
  return autograd::record("permute", out, {x}, [inverse](const Tensor<T>& dout) {
    return std::vector<Tensor<T>>{permute(dout, inverse)};
  });
}

/// torch.transpose: swaps two dims (a view).
template <class T>
Tensor<T> transpose(const Tensor<T>& x, int64_t d0, int64_t d1) {
  Shape p(x.dim());
  std::iota(p.begin(), p.end(), 0);
  std::swap(p[wrap_dim(d0, x.dim(), "transpose")], p[wrap_dim(d1, x.dim(), "transpose")]);
  return permute(x, p);
}

/// torch.Tensor.slice semantics of x[..., start:end:step, ...] along `dim` (a view).
/// start/end are clamped like Python slices; negative values count from the end.
template <class T>
Tensor<T> slice(const Tensor<T>& x, int64_t dim, int64_t start, int64_t end, int64_t step = 1) {
  int64_t d = wrap_dim(dim, x.dim(), "slice"), n = x.shape()[d];
  DG_CHECK(step > 0, "slice: step must be positive, got ", step);
  if (start < 0) start += n;
  if (end < 0) end += n;
  start = std::clamp<int64_t>(start, 0, n);
  end = std::clamp<int64_t>(end, start, n);
  Shape s = x.shape(), st = x.strides();
  s[d] = (end - start + step - 1) / step;
  st[d] *= step;
  Tensor<T> out = detail::make_view(x, s, st, x.offset() + start * x.strides()[d]);
  return autograd::record("slice", out, {x}, [xs = x.shape(), d, start, end, step](const Tensor<T>& dout) {
    // the slice's gradient lands in its window of a zero gradient for the whole input
    Tensor<T> dx = zeros<T>(xs, dout.device());
    slice(dx, d, start, end, step).copy_(dout);
    return std::vector<Tensor<T>>{dx};
  });
}

/// torch.narrow: `length` entries of `dim` from `start` (a view); bounds are checked, not clamped.
template <class T>
Tensor<T> narrow(const Tensor<T>& x, int64_t dim, int64_t start, int64_t length) {
  int64_t d = wrap_dim(dim, x.dim(), "narrow"), n = x.shape()[d];
  if (start < 0) start += n;
  DG_CHECK(start >= 0 && length >= 0 && start + length <= n, "narrow: window [", start, ", ", start + length,
           ") is outside dim ", d, " of size ", n, " (shape ", shape_str(x.shape()), ")");
  return slice(x, d, start, start + length);
}

/// torch.select: index `index` of `dim`, removing that dim (a view).
template <class T>
Tensor<T> select(const Tensor<T>& x, int64_t dim, int64_t index) {
  int64_t d = wrap_dim(dim, x.dim(), "select"), n = x.shape()[d];
  DG_CHECK(index >= -n && index < n, "select: index ", index, " out of range for dim ", d, " of size ", n,
           " (shape ", shape_str(x.shape()), ")");
  return narrow(x, d, index, 1).squeeze(d);
}

/// torch.Tensor.expand: size-1 dims repeat (stride 0); -1 keeps a size; new leading dims allowed.
template <class T>
Tensor<T> expand(const Tensor<T>& x, const Shape& shape) {
  DG_CHECK(shape.size() >= static_cast<size_t>(x.dim()), "expand: target ", shape_str(shape), " has fewer dims than input ",
           shape_str(x.shape()));
  size_t lead = shape.size() - static_cast<size_t>(x.dim());
  Shape s(shape.size()), st(shape.size(), 0);
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i < lead) {
      DG_CHECK(shape[i] >= 0, "expand: new leading dim ", i, " cannot be ", shape[i]);
      s[i] = shape[i];
      continue;
    }
    int64_t have = x.shape()[i - lead], want = shape[i] == -1 ? have : shape[i];
    DG_CHECK(have == want || have == 1, "expand: input ", shape_str(x.shape()), " cannot expand to ", shape_str(shape),
             " (dim ", i, ": ", have, " vs ", want, "; only size-1 dims expand)");
    s[i] = want;
    st[i] = have == want ? x.strides()[i - lead] : 0;
  }
  Tensor<T> out = detail::make_view(x, s, st, x.offset());
  return autograd::record("expand", out, {x}, [xs = x.shape()](const Tensor<T>& dout) {
    return std::vector<Tensor<T>>{sum_to(dout, xs)};
  });
}

/// torch.unsqueeze: inserts a size-1 dim at `dim` (in [-dim()-1, dim()]).
template <class T>
Tensor<T> unsqueeze(const Tensor<T>& x, int64_t dim) {
  int64_t d = wrap_dim(dim, x.dim() + 1, "unsqueeze");
  Shape s = x.shape(), st = x.strides();
  int64_t inner = d < x.dim() ? x.strides()[d] * x.shape()[d] : 1;
  s.insert(s.begin() + d, 1);
  st.insert(st.begin() + d, inner);
  Tensor<T> out = detail::make_view(x, s, st, x.offset());
  return autograd::record("unsqueeze", out, {x}, [xs = x.shape()](const Tensor<T>& dout) {
    return std::vector<Tensor<T>>{dout.reshape(xs)};
  });
}

/// torch.squeeze(dim): removes `dim` if its size is 1, else returns an equal view.
template <class T>
Tensor<T> squeeze(const Tensor<T>& x, int64_t dim) {
  int64_t d = wrap_dim(dim, x.dim(), "squeeze");
  Shape s = x.shape(), st = x.strides();
  if (s[d] == 1) {
    s.erase(s.begin() + d);
    st.erase(st.begin() + d);
  }
  Tensor<T> out = detail::make_view(x, s, st, x.offset());
  return autograd::record("squeeze", out, {x}, [xs = x.shape()](const Tensor<T>& dout) {
    return std::vector<Tensor<T>>{dout.reshape(xs)};
  });
}

/// torch.flatten(start_dim, end_dim)
template <class T>
Tensor<T> flatten(const Tensor<T>& x, int64_t start_dim = 0, int64_t end_dim = -1) {
  if (x.dim() == 0) return reshape(x, {1});
  int64_t a = wrap_dim(start_dim, x.dim(), "flatten"), b = wrap_dim(end_dim, x.dim(), "flatten");
  DG_CHECK(a <= b, "flatten: start_dim ", a, " comes after end_dim ", b);
  Shape s(x.shape().begin(), x.shape().begin() + a);
  int64_t n = 1;
  for (int64_t i = a; i <= b; ++i) n *= x.shape()[i];
  s.push_back(n);
  s.insert(s.end(), x.shape().begin() + b + 1, x.shape().end());
  return reshape(x, s);
}

/// Converts the element type (torch .to(dtype)); the gradient converts back. A CUDA tensor is
/// converted on the host (a round trip: meant for tests and checkpoints, not for inner loops).
template <class U, class T>
Tensor<U> to_dtype(const Tensor<T>& x) {
  if (!x.device().is_cpu()) return to_device(to_dtype<U>(to_device(x, Device::cpu())), x.device());
  Tensor<U> out = Tensor<U>::empty(x.shape());
  U* o = out.data();
  const T* p = x.data();
  int64_t i = 0;
  for_each_strided<1>(x.shape(), {x.strides().data()}, {0},
                      [&](auto k) { o[i++] = static_cast<U>(static_cast<acc_t<T>>(p[k[0]])); });
  if constexpr (is_floating_v<U> && is_floating_v<T>) {
    return autograd::record("to", out, std::vector<Tensor<T>>{x},
                            [](const Tensor<U>& dout) { return std::vector<Tensor<T>>{to_dtype<T>(dout)}; });
  } else {
    DG_CHECK(!(is_grad_enabled() && x.requires_grad()), "to: conversion to an integer type is not differentiable");
    return out;
  }
}

/// Copies x to `device` (torch .to(device)); the gradient is copied back to x's device.
template <class T>
Tensor<T> to_device(const Tensor<T>& x, Device device) {
  if (x.device() == device) return x;
  Tensor<T> src = contiguous(x).detach();  // on x's device
  Tensor<T> out = Tensor<T>::empty(x.shape(), device);
  copy_bytes(out.data(), device, src.data(), src.device(), static_cast<size_t>(x.numel()) * sizeof(T));
  return autograd::record("to_device", out, {x}, [from = x.device()](const Tensor<T>& dout) {
    return std::vector<Tensor<T>>{to_device(dout, from)};
  });
}

template <class T> Tensor<T> Tensor<T>::reshape(const Shape& s) const { return dg::reshape(*this, s); }
template <class T> Tensor<T> Tensor<T>::view(const Shape& s) const { return dg::view(*this, s); }
template <class T> Tensor<T> Tensor<T>::permute(const Shape& d) const { return dg::permute(*this, d); }
template <class T> Tensor<T> Tensor<T>::transpose(int64_t a, int64_t b) const { return dg::transpose(*this, a, b); }
template <class T> Tensor<T> Tensor<T>::narrow(int64_t d, int64_t s, int64_t l) const { return dg::narrow(*this, d, s, l); }
template <class T> Tensor<T> Tensor<T>::slice(int64_t d, int64_t s, int64_t e, int64_t st) const { return dg::slice(*this, d, s, e, st); }
template <class T> Tensor<T> Tensor<T>::select(int64_t d, int64_t i) const { return dg::select(*this, d, i); }
template <class T> Tensor<T> Tensor<T>::expand(const Shape& s) const { return dg::expand(*this, s); }
template <class T> Tensor<T> Tensor<T>::unsqueeze(int64_t d) const { return dg::unsqueeze(*this, d); }
template <class T> Tensor<T> Tensor<T>::squeeze(int64_t d) const { return dg::squeeze(*this, d); }
template <class T> Tensor<T> Tensor<T>::flatten(int64_t a, int64_t b) const { return dg::flatten(*this, a, b); }
template <class T> Tensor<T> Tensor<T>::contiguous() const { return dg::contiguous(*this); }
template <class T> Tensor<T> Tensor<T>::clone() const { return dg::clone(*this); }
template <class T> template <class U> Tensor<U> Tensor<T>::to() const { return dg::to_dtype<U>(*this); }
template <class T> Tensor<T> Tensor<T>::to(Device d) const { return dg::to_device(*this, d); }

}  // namespace dg

#include "reduce.hpp"  // sum_to, for expand's backward
