// densegrad/core/error.hpp: the one exception type and the DG_CHECK macro.
// Checks stay on in release builds: user errors throw dg::Error, they never abort.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace dg {

/// Every error densegrad raises on bad input: shapes, dtypes, devices, files.
/// Like PyTorch's `c10::Error`: the message names the op, the rule, expected and got.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <class... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

}  // namespace dg

/// Throws dg::Error with the streamed message parts when `cond` is false.
/// Example: DG_CHECK(a.dim() == 2, "matmul: expected a 2-D tensor, got ", a.dim(), "-D");
#define DG_CHECK(cond, ...)                                       \
  do {                                                            \
    if (!(cond)) throw ::dg::Error(::dg::detail::str_cat(__VA_ARGS__)); \
  } while (0)

/// Throws dg::Error unconditionally.
#define DG_THROW(...) throw ::dg::Error(::dg::detail::str_cat(__VA_ARGS__))
