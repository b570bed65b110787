// tests/test_util.hpp: what every test file shares: fixture loading and tensor comparison.
#pragma once

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <densegrad/densegrad.hpp>
#include <sstream>
#include <string>

#ifdef DENSEGRAD_WITH_OPENMP
#include <omp.h>
#endif

namespace dgtest {

/// Directory of the committed fixtures (tests/fixtures).
inline std::string fixtures_dir() {
  if (const char* e = std::getenv("DENSEGRAD_FIXTURES")) return e;
#ifdef DENSEGRAD_FIXTURES_DIR
  return DENSEGRAD_FIXTURES_DIR;
#else
  return "tests/fixtures";
#endif
}

/// All tensors of tests/fixtures/<name>.safetensors as T.
/// Fixtures are written by tests/fixtures/make_fixtures.py (run by hand with PyTorch).
template <class T = float>
std::map<std::string, dg::Tensor<T>> load_fixture(const std::string& name) {
  return dg::io::load_safetensors<T>(fixtures_dir() + "/" + name + ".safetensors");
}

/// One tensor out of a loaded fixture, with a clear failure when the key is missing.
template <class T>
dg::Tensor<T> get(const std::map<std::string, dg::Tensor<T>>& fx, const std::string& key) {
  auto it = fx.find(key);
  if (it == fx.end()) FAIL("fixture key '" << key << "' missing; regenerate with tests/fixtures/make_fixtures.py");
  return it->second;
}

/// Checks |a - b| <= atol + rtol * |b| elementwise and equal shapes; reports the worst element.
template <class T>
void require_close(const dg::Tensor<T>& a, const dg::Tensor<T>& b, double rtol = 1e-5, double atol = 1e-6,
                   const std::string& what = "") {
  INFO(what);
  REQUIRE(a.defined());
  REQUIRE(b.defined());
  REQUIRE(dg::shape_str(a.shape()) == dg::shape_str(b.shape()));
  auto va = a.to_vector(), vb = b.to_vector();
  double worst = 0;
  size_t worst_i = 0;
  bool ok = true;
  for (size_t i = 0; i < va.size(); ++i) {
    double x = static_cast<double>(va[i]), y = static_cast<double>(vb[i]);
    double excess = std::abs(x - y) - (atol + rtol * std::abs(y));
    if (!(excess <= 0) && (ok || excess > worst)) {  // also catches NaN
      ok = false;
      worst = std::isnan(excess) ? INFINITY : excess;
      worst_i = i;
    }
  }
  if (!ok) {
    std::ostringstream os;
    os << "element " << worst_i << ": " << static_cast<double>(va[worst_i]) << " vs expected "
       << static_cast<double>(vb[worst_i]) << " (rtol " << rtol << ", atol " << atol << ")";
    FAIL(os.str());
  }
}

/// require_close with atol = 1e-6 x the largest |expected| (float rounding error scales with the
/// values, and PyTorch sums in another order); rtol 1e-5.
inline void require_close_scaled(const dg::Tensor<float>& got, const dg::Tensor<float>& want, const std::string& what) {
  double scale = 1.0;
  for (float v : want.to_vector()) scale = std::max(scale, double(std::abs(v)));
  require_close(got, want, 1e-5, 1e-6 * scale, what);
}

/// Parity with PyTorch for fixture case `name` of tests/fixtures/<fixture>.safetensors: runs op on
/// <name>.x0 .. x<n_in-1>, compares with <name>.out, then backward(<name>.dout) and compares each
/// input gradient with <name>.dx<i>.
inline void check_parity(const std::string& fixture, const std::string& name, int n_in,
                         const std::function<dg::Tensor<float>(const std::vector<dg::Tensor<float>>&)>& op) {
  static std::map<std::string, std::map<std::string, dg::Tensor<float>>> cache;
  if (!cache.count(fixture)) cache.emplace(fixture, load_fixture<float>(fixture));
  const auto& fx = cache.at(fixture);
  std::vector<dg::Tensor<float>> xs;
  for (int i = 0; i < n_in; ++i) xs.push_back(get(fx, name + ".x" + std::to_string(i)).clone().requires_grad_());
  dg::Tensor<float> out = op(xs);
  require_close_scaled(out, get(fx, name + ".out"), name + ".out");
  out.backward(get(fx, name + ".dout"));
  for (int i = 0; i < n_in; ++i) require_close_scaled(xs[i].grad(), get(fx, name + ".dx" + std::to_string(i)), name + ".dx" + std::to_string(i));
}

/// Runs dg::gradcheck and fails with its message.
inline void require_gradcheck(const std::function<dg::Tensor<double>(const std::vector<dg::Tensor<double>>&)>& fn,
                              const std::vector<dg::Tensor<double>>& inputs, dg::GradcheckOptions opt = {}) {
  auto r = dg::gradcheck(fn, inputs, opt);
  INFO(r.message);
  REQUIRE(r.ok);
}

/// Runs f() with OpenMP limited to `threads` threads (once, unchanged, without OpenMP).
template <class F>
void with_threads(int threads, F f) {
#ifdef DENSEGRAD_WITH_OPENMP
  const int before = omp_get_max_threads();
  omp_set_num_threads(threads);
  try {
    f();
  } catch (...) {
    omp_set_num_threads(before);
    throw;
  }
  omp_set_num_threads(before);
#else
  (void)threads;
  f();
#endif
}

}  // namespace dgtest
