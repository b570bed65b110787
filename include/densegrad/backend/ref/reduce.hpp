// densegrad/backend/ref/reduce.hpp: reference reductions over a set of dims.
// One pass over the input; each element is folded into its output slot found through
// output strides that are 0 along reduced dims. Sums accumulate in double.
#pragma once

#include <limits>

#include "../../core/tensor.hpp"

namespace dg::ref {

/// Output shape of reducing `dims` (already wrapped, sorted, unique) of `shape`.
inline Shape reduced_shape(const Shape& shape, const Shape& dims, bool keepdim) {
  Shape r;
  for (int64_t i = 0; i < static_cast<int64_t>(shape.size()); ++i) {
    bool red = std::find(dims.begin(), dims.end(), i) != dims.end();
    if (!red) r.push_back(shape[i]);
    else if (keepdim) r.push_back(1);
  }
  return r;
}

/// Folds x over `dims` with fold(acc&, value) starting from init; writes finish(acc) into a
/// tensor of the keepdim shape.
template <class T, class Acc, class Fold, class Finish>
Tensor<T> reduce(const Tensor<T>& x, const Shape& dims, Acc init, Fold fold, Finish finish) {
  Shape kshape = reduced_shape(x.shape(), dims, true);
  Shape ostr = contiguous_strides(kshape);
  for (int64_t d : dims) ostr[d] = 0;
  std::vector<Acc> acc(static_cast<size_t>(shape_numel(kshape)), init);
  const T* px = x.data();
  for_each_strided<2>(x.shape(), {x.strides().data(), ostr.data()}, {0, 0},
                      [&](auto k) { fold(acc[k[1]], px[k[0]]); });
  Tensor<T> out = Tensor<T>::empty(kshape);
  for (size_t i = 0; i < acc.size(); ++i) out.data()[i] = T(finish(acc[i]));
  return out;
}

template <class T>
Tensor<T> sum(const Tensor<T>& x, const Shape& dims) {
  using A = std::conditional_t<std::is_same_v<T, int64_t>, int64_t, double>;
  return reduce<T>(x, dims, A(0), [](A& a, T v) { a += A(v); }, [](A a) { return a; });
}

template <class T>
Tensor<T> amax(const Tensor<T>& x, const Shape& dims) {
  using A = acc_t<T>;
  A lowest = std::numeric_limits<A>::has_infinity ? -std::numeric_limits<A>::infinity()
                                                  : std::numeric_limits<A>::lowest();
  return reduce<T>(x, dims, lowest, [](A& a, T v) {
    A w = A(v);
    if (w > a || w != w) a = (a != a) ? a : w;  // NaN propagates, like torch.amax
  }, [](A a) { return a; });
}

}  // namespace dg::ref
