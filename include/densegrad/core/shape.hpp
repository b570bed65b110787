// densegrad/core/shape.hpp: shapes, strides and the broadcasting rule.
// Plain functions over std::vector<int64_t>; no tensor here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "error.hpp"

namespace dg {

using Shape = std::vector<int64_t>;

/// "[8, 64, 32, 32]"
inline std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

/// Number of elements; throws if a dim is negative or the product overflows int64.
inline int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    DG_CHECK(d >= 0, "shape ", shape_str(s), " has a negative dimension");
    DG_CHECK(d == 0 || n <= INT64_MAX / d, "shape ", shape_str(s), " has more than 2^63 elements");
    n *= d;
  }
  return n;
}

/// Row-major (C order) strides, in elements (a 0 dim counts as 1); throws if one overflows
/// int64, which a shape with a 0 dim can do while having no elements (e.g. [0, 2^62, 2^62]).
inline Shape contiguous_strides(const Shape& s) {
  Shape st(s.size(), 1);
  for (int64_t i = static_cast<int64_t>(s.size()) - 2; i >= 0; --i) {
    const int64_t d = s[i + 1] > 0 ? s[i + 1] : 1;
    DG_CHECK(st[i + 1] <= INT64_MAX / d, "shape ", shape_str(s), " is too large: its strides overflow int64");
    st[i] = st[i + 1] * d;
  }
  return st;
}

/// Wraps a possibly negative dim into [0, ndim); `op` names the caller in the error.
inline int64_t wrap_dim(int64_t dim, int64_t ndim, const char* op) {
  int64_t lo = ndim > 0 ? -ndim : -1, hi = ndim > 0 ? ndim - 1 : 0;
  DG_CHECK(dim >= lo && dim <= hi, op, ": dim ", dim, " out of range for a ", ndim,
           "-D tensor (expected in [", lo, ", ", hi, "])");
  return dim < 0 ? dim + (ndim > 0 ? ndim : 1) : dim;
}

/// NumPy broadcasting: align trailing dims; each pair must be equal or contain a 1.
inline Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op) {
  size_t n = std::max(a.size(), b.size());
  Shape r(n);
  for (size_t i = 0; i < n; ++i) {
    int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    DG_CHECK(da == db || da == 1 || db == 1, op, ": shapes ", shape_str(a), " and ", shape_str(b),
             " cannot be broadcast (dim ", i, " of the result: ", da, " vs ", db, ")");
    r[i] = da == 1 ? db : da;
  }
  return r;
}

}  // namespace dg
