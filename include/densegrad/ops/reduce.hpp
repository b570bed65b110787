// densegrad/ops/reduce.hpp: sum, mean, max over dims (keepdim like torch), and sum_to, the
// reduction every broadcasting op's backward uses. Forward calls backend/ref/reduce.hpp (sum:
// backend/cpu/reduce.hpp where it fits, checked against the ref kernel).
// Shape legend: x: any shape; dims: the dims reduced (negative counts from the end).
#pragma once

#include "../autograd/tape.hpp"
#include "../backend/ref/elementwise.hpp"
#include "../backend/cpu/reduce.hpp"
#include "../backend/ref/reduce.hpp"
#include "dispatch.hpp"
#include "shape.hpp"

namespace dg {

namespace detail {
/// Wraps, sorts and de-duplicates `dims`; empty means "all dims" (torch's dim=None).
inline Shape reduce_dims(const Shape& dims, int64_t ndim, const char* op) {
  Shape r;
  if (dims.empty()) {
    for (int64_t i = 0; i < ndim; ++i) r.push_back(i);
    return r;
  }
  for (int64_t d : dims) r.push_back(wrap_dim(d, ndim, op));
  if (ndim == 0) return {};  // torch accepts dim 0 or -1 of a 0-D tensor: there is nothing to reduce
  std::sort(r.begin(), r.end());
  DG_CHECK(std::adjacent_find(r.begin(), r.end()) == r.end(), op, ": dim listed twice in ", shape_str(dims));
  return r;
}
/// Reshapes a reduced tensor to its keepdim shape (a view) so it broadcasts against x.
template <class T>
Tensor<T> keepdim_view(const Tensor<T>& r, const Shape& xshape, const Shape& dims) {
  Shape k = ref::reduced_shape(xshape, dims, true);
  return Tensor<T>::from_storage(r.storage(), k, contiguous_strides(k), r.offset());
}
}  // namespace detail

/// torch.sum(x, dims, keepdim). Empty dims sums everything.
template <class T>
Tensor<T> sum(const Tensor<T>& x, const Shape& dims = {}, bool keepdim = false) {
  Shape d = detail::reduce_dims(dims, x.dim(), "sum");
  Tensor<T> k = x.device().is_cuda() ? cuda_kernels<T>("sum").sum(x, d)
                : cpu::sum_fits(x, d)  ? cpu::sum(x, d)
                                       : ref::sum(x, d);  // ref::sum is the oracle
  // out is a fresh handle on k's storage (record() refuses a tensor someone else holds)
  Shape oshape = ref::reduced_shape(x.shape(), d, keepdim);
  Tensor<T> out = Tensor<T>::from_storage(k.storage(), oshape, contiguous_strides(oshape), 0);
  Shape xshape = x.shape();
  return autograd::record("sum", out, std::vector<Tensor<T>>{x}, [xshape, d](const Tensor<T>& dout) {
    // every input element contributed once: its gradient is dout broadcast back
    return std::vector<Tensor<T>>{detail::keepdim_view(dout.contiguous(), xshape, d).expand(xshape)};
  });
}

/// torch.mean(x, dims, keepdim).
template <class T>
Tensor<T> mean(const Tensor<T>& x, const Shape& dims = {}, bool keepdim = false) {
  Shape d = detail::reduce_dims(dims, x.dim(), "mean");
  int64_t count = 1;
  for (int64_t i : d) count *= x.shape()[i];
  double scale = 1.0 / static_cast<double>(count);  // count 0 gives nan, like torch
  Tensor<T> s = sum(x, dims, keepdim);
  auto times_scale = [scale](acc_t<T> v) { return v * acc_t<T>(scale); };
  Tensor<T> out = detail::pointwise("mean", s, UnaryFn::MulScalar, times_scale, scale);
  return autograd::record("mean", out, std::vector<Tensor<T>>{s}, [scale, times_scale](const Tensor<T>& dout) {
    return std::vector<Tensor<T>>{detail::pointwise("mean backward", dout, UnaryFn::MulScalar, times_scale, scale)};
  });
}

/// torch.amax(x, dims, keepdim): the gradient is split evenly between tied maxima.
template <class T>
Tensor<T> max(const Tensor<T>& x, const Shape& dims = {}, bool keepdim = false) {
  Shape d = detail::reduce_dims(dims, x.dim(), "max");
  DG_CHECK(x.numel() > 0, "max: cannot reduce an empty tensor of shape ", shape_str(x.shape()));
  for (int64_t i : d) DG_CHECK(x.shape()[i] > 0, "max: reduced dim ", i, " has size 0");
  Tensor<T> k = x.device().is_cuda() ? cuda_kernels<T>("max").amax(x, d) : ref::amax(x, d);
  Shape oshape = ref::reduced_shape(x.shape(), d, keepdim);
  Tensor<T> out = Tensor<T>::from_storage(k.storage(), oshape, contiguous_strides(oshape), 0);
  // save x and the keepdim maxima: backward routes dout to the positions that hit the max
  return autograd::record("max", out, std::vector<Tensor<T>>{x}, [x = x.detach(), k, d](const Tensor<T>& dout) {
    const char* op = "max backward";
    Tensor<T> hit = detail::pointwise2(op, x, k, BinaryFn::Eq, [](auto a, auto m) { return a == m ? 1 : 0; });
    Tensor<T> ties = sum(hit, d, true);
    Tensor<T> dk = detail::keepdim_view(dout.contiguous(), x.shape(), d);
    Tensor<T> share = detail::pointwise2(op, dk, ties, BinaryFn::Div, [](auto g, auto n) { return g / n; });
    return std::vector<Tensor<T>>{
        detail::pointwise2(op, hit, share, BinaryFn::Mul, [](auto h, auto s) { return h * s; })};
  });
}

namespace detail {
/// The dims of a tensor of shape `from` that sum_to(., shape) sums over (checked: shape must
/// broadcast to from).
inline Shape sum_to_dims(const Shape& from, const Shape& shape) {
  DG_CHECK(broadcast_shapes(shape, from, "sum_to") == from, "sum_to: shape ", shape_str(shape),
           " does not broadcast to ", shape_str(from));
  const int64_t nd = static_cast<int64_t>(from.size()), lead = nd - static_cast<int64_t>(shape.size());
  Shape dims;
  for (int64_t i = 0; i < nd; ++i)
    if (i < lead || (shape[i - lead] == 1 && from[i] != 1)) dims.push_back(i);
  return dims;
}
}  // namespace detail

/// Sums g down to `shape` (the inverse of broadcasting): the gradient of a broadcast input.
template <class T>
Tensor<T> sum_to(const Tensor<T>& g, const Shape& shape) {
  if (g.shape() == shape) return g;
  return sum(g, detail::sum_to_dims(g.shape(), shape), true).reshape(shape);
}

template <class T> Tensor<T> Tensor<T>::sum(const Shape& dims, bool keepdim) const { return dg::sum(*this, dims, keepdim); }
template <class T> Tensor<T> Tensor<T>::mean(const Shape& dims, bool keepdim) const { return dg::mean(*this, dims, keepdim); }
template <class T> Tensor<T> Tensor<T>::max(const Shape& dims, bool keepdim) const { return dg::max(*this, dims, keepdim); }

}  // namespace dg
