// tests/test_activation.cpp: the activation family: gelu (erf, tanh), hard_sigmoid, relu, relu6,
// sigmoid, softmax, log_softmax. Gradcheck in double away from the kinks, torch's gradient at the
// kinks, parity with PyTorch fixtures (forward and dx), the fast GELU against the ref kernel, errors.
#include "test_util.hpp"

#include <densegrad/ops/activation.hpp>

namespace test_activation {

using namespace dg;
using Catch::Contains;

namespace {

using V = std::vector<Tensor<double>>;

/// Uniform values in [lo, hi) that keep at least `gap` away from every kink in `kinks`.
Tensor<double> away_from(const Shape& s, Generator& gen, double lo, double hi, std::vector<double> kinks,
                         double gap = 0.05) {
  Tensor<double> t = rand<double>(s, gen, lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i)
    for (double k : kinks)
      if (std::abs(t.data()[i] - k) < gap) t.data()[i] = k + (t.data()[i] < k ? -gap : gap);
  return t;
}

/// y = f(x) and dx of backward(dout) for a fresh leaf copy of x.
template <class T, class F>
std::pair<Tensor<T>, Tensor<T>> forward_backward(F f, const Tensor<T>& x0, const Tensor<T>& dout) {
  Tensor<T> x = x0.detach();
  x.requires_grad_();
  Tensor<T> y = f(x);
  y.backward(dout);
  return {y, x.grad()};
}

/// Our op vs fixture case `name` of activation.safetensors: forward and dx, rtol 1e-5.
template <class F>
void check_parity(const std::string& name, F f, double atol = 1e-6) {
  auto fx = dgtest::load_fixture<float>("activation");
  auto r = forward_backward<float>(f, dgtest::get(fx, name + ".x"), dgtest::get(fx, name + ".dout"));
  dgtest::require_close(r.first, dgtest::get(fx, name + ".out"), 1e-5, atol, name + " forward");
  dgtest::require_close(r.second, dgtest::get(fx, name + ".dx"), 1e-5, atol, name + " dx");
}

}  // namespace

// ---------------------------------------------------------------- gradcheck (double)

TEST_CASE("gelu gradcheck erf and tanh forms, odd shapes, non-contiguous") {
  Generator gen(1);
  for (bool tanh_form : {false, true}) {
    INFO((tanh_form ? "tanh" : "erf"));
    for (const Shape& s : {Shape{1}, Shape{3, 5}, Shape{1, 3, 7}}) {
      dgtest::require_gradcheck([tanh_form](const V& v) { return gelu(v[0], tanh_form); },
                                {rand<double>(s, gen, -4, 4).requires_grad_()});
    }
    dgtest::require_gradcheck([tanh_form](const V& v) { return gelu(v[0].transpose(0, 1), tanh_form); },
                              {rand<double>({3, 5}, gen, -4, 4).requires_grad_()});
  }
}

TEST_CASE("hard_sigmoid, relu, relu6 gradcheck away from their kinks") {
  Generator gen(2);
  dgtest::require_gradcheck([](const V& v) { return hard_sigmoid(v[0]); },
                            {away_from({3, 5, 7}, gen, -5, 5, {-3, 3}).requires_grad_()});
  dgtest::require_gradcheck([](const V& v) { return relu(v[0]); }, {away_from({3, 5, 7}, gen, -2, 2, {0}).requires_grad_()});
  dgtest::require_gradcheck([](const V& v) { return relu6(v[0]); },
                            {away_from({3, 5, 7}, gen, -2, 8, {0, 6}).requires_grad_()});
  dgtest::require_gradcheck([](const V& v) { return relu(v[0].transpose(0, 2)); },
                            {away_from({3, 1, 5}, gen, -2, 2, {0}).requires_grad_()});
}

TEST_CASE("sigmoid gradcheck") {
  Generator gen(3);
  dgtest::require_gradcheck([](const V& v) { return sigmoid(v[0]); }, {rand<double>({3, 5, 7}, gen, -8, 8).requires_grad_()});
}

TEST_CASE("softmax and log_softmax gradcheck over dim 0, 1, -1 and a non-contiguous input") {
  Generator gen(4);
  for (int64_t d : {0, 1, -1, 2, -3}) {
    INFO("dim " << d);
    dgtest::require_gradcheck([d](const V& v) { return softmax(v[0], d); }, {randn<double>({3, 5, 7}, gen).requires_grad_()});
    dgtest::require_gradcheck([d](const V& v) { return log_softmax(v[0], d); }, {randn<double>({3, 5, 7}, gen).requires_grad_()});
  }
  dgtest::require_gradcheck([](const V& v) { return softmax(v[0].transpose(0, 1), -1); },
                            {randn<double>({5, 3}, gen).requires_grad_()});
  dgtest::require_gradcheck([](const V& v) { return log_softmax(v[0].transpose(0, 1), 0); },
                            {randn<double>({5, 3}, gen).requires_grad_()});
  dgtest::require_gradcheck([](const V& v) { return log_softmax(v[0], 0); }, {randn<double>({1}, gen).requires_grad_()});
}

// ---------------------------------------------------------------- torch's gradient at the kinks

TEST_CASE("hard_sigmoid, relu, relu6 gradients at the kinks match torch") {
  // torch: hardsigmoid' is 1/6 only strictly inside (-3, 3); relu' and relu6' are 0 at 0 and 6
  Tensor<double> x = tensor<double>({-3, -2.999, 0, 2.999, 3, 6, 5.999});
  auto grad = [&](auto f) { return forward_backward<double>(f, x, ones<double>({7})).second.to_vector(); };
  const double s = 1.0 / 6;
  CHECK(grad([](auto t) { return hard_sigmoid(t); }) == std::vector<double>{0, s, s, s, 0, 0, 0});
  CHECK(grad([](auto t) { return relu(t); }) == std::vector<double>{0, 0, 0, 1, 1, 1, 1});
  CHECK(grad([](auto t) { return relu6(t); }) == std::vector<double>{0, 0, 0, 1, 1, 0, 1});
}

// ---------------------------------------------------------------- parity with PyTorch (float)

TEST_CASE("gelu erf parity") { check_parity("gelu", [](auto x) { return gelu(x); }); }
TEST_CASE("gelu tanh parity") { check_parity("gelu_tanh", [](auto x) { return gelu(x, true); }); }
TEST_CASE("hard_sigmoid parity incl. exactly -3 and 3") { check_parity("hard_sigmoid", [](auto x) { return hard_sigmoid(x); }); }
TEST_CASE("relu parity incl. exactly 0") { check_parity("relu", [](auto x) { return relu(x); }); }
TEST_CASE("relu6 parity") { check_parity("relu6", [](auto x) { return relu6(x); }); }
TEST_CASE("relu6 parity at the kinks 0 and 6") { check_parity("relu6_kinks", [](auto x) { return relu6(x); }); }
TEST_CASE("sigmoid parity incl. -100 and 100") { check_parity("sigmoid", [](auto x) { return sigmoid(x); }); }
TEST_CASE("softmax dim 0 parity") { check_parity("softmax_dim0", [](auto x) { return softmax(x, 0); }); }
TEST_CASE("softmax dim 1 parity") { check_parity("softmax_dim1", [](auto x) { return softmax(x, 1); }); }
TEST_CASE("softmax dim -1 parity") { check_parity("softmax_dimm1", [](auto x) { return softmax(x, -1); }); }
TEST_CASE("log_softmax dim 0 parity") { check_parity("log_softmax_dim0", [](auto x) { return log_softmax(x, 0); }); }
TEST_CASE("log_softmax dim 1 parity") { check_parity("log_softmax_dim1", [](auto x) { return log_softmax(x, 1); }); }
TEST_CASE("log_softmax dim -1 parity") { check_parity("log_softmax_dimm1", [](auto x) { return log_softmax(x, -1); }); }
TEST_CASE("softmax magnitude 1000 parity") { check_parity("softmax_large", [](auto x) { return softmax(x, 1); }); }
TEST_CASE("log_softmax magnitude 1000 parity") {
  // outputs reach -5000: 1e-5 relative of that is 0.05, so atol 1e-6 is the binding bound only near 0
  check_parity("log_softmax_large", [](auto x) { return log_softmax(x, 0); });
}

TEST_CASE("softmax and log_softmax stay finite for inputs of magnitude 1000 in float") {
  Tensor<float> x = tensor<float>({1000, 0, -1000, 999}, {2, 2});
  auto p = softmax(x, 0).to_vector(), lp = log_softmax(x, -1).to_vector();
  CHECK(p == std::vector<float>{1, 0, 0, 1});
  CHECK(lp == std::vector<float>{0, -1000, -1999, 0});
  for (float v : softmax(x, -1).to_vector()) CHECK(std::isfinite(v));
}

TEST_CASE("softmax of a 0-D tensor is 1") {
  CHECK(softmax(scalar_tensor<float>(3.5f), 0).item() == 1.0f);
  CHECK(log_softmax(scalar_tensor<float>(3.5f), -1).item() == 0.0f);
}

// ---------------------------------------------------------------- fast GELU vs ref kernel

TEMPLATE_TEST_CASE("gelu fast path matches ref on odd shapes and non-contiguous inputs", "", float, double, bfloat16) {
  using T = TestType;
  Generator gen(5);
  // The oracle is ref::gelu in double on the same inputs (the exact answer: a float ref would add its
  // own rounding, ~0.5e-6 at |x| ~ 5 in the tanh form's 1 - tanh^2). double: the same libm math;
  // float: the vectorized erf (A&S 7.1.26, |error| <= 1.5e-7) within the 1e-5 parity bound;
  // bfloat16: that float math rounded once (2^-8 relative).
  const double rtol = std::is_same_v<T, double> ? 1e-14 : std::is_same_v<T, float> ? 1e-5 : 1e-2;
  const double atol = std::is_same_v<T, double> ? 1e-14 : std::is_same_v<T, float> ? 1e-6 : 1e-2;
  // 1, odd, and 3 * 7 * 17 * 61 = 21777 elements: past the OpenMP threshold, a partial last chunk
  Tensor<T> big = randn<T>({3, 7, 17, 61}, gen, 0, 3);
  for (const Tensor<T>& x : {randn<T>({1}, gen, 0, 3), randn<T>({3, 5, 7}, gen, 0, 3), big,
                             big.permute({0, 3, 1, 2}), big.slice(3, 1, 61, 3)}) {
    for (bool tanh_form : {false, true}) {
      INFO(shape_str(x.shape()) << " strides " << shape_str(x.strides()) << (tanh_form ? " tanh" : " erf"));
      Tensor<T> dy = randn<T>(x.shape(), gen);
      auto r = forward_backward<T>([tanh_form](auto t) { return gelu(t, tanh_form); }, x, dy);
      Tensor<double> xd = x.template to<double>(), dyd = dy.template to<double>();
      dgtest::require_close(r.first.detach().template to<double>(), ref::gelu(xd, tanh_form), rtol, atol, "forward");
      dgtest::require_close(r.second.template to<double>(), ref::gelu_backward(dyd, xd, tanh_form), rtol, atol,
                            "backward");
    }
  }
}

// ---------------------------------------------------------------- errors

TEST_CASE("softmax and log_softmax reject a bad dim") {
  Tensor<float> x = zeros<float>({2, 3});
  REQUIRE_THROWS_WITH(softmax(x, 2), Contains("softmax: dim 2 out of range for a 2-D tensor (expected in [-2, 1])"));
  REQUIRE_THROWS_WITH(log_softmax(x, -3), Contains("log_softmax: dim -3 out of range for a 2-D tensor"));
}

}  // namespace test_activation
