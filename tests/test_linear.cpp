// tests/test_linear.cpp: linear (F.linear): gradcheck, PyTorch parity for 2-D and 3-D inputs with
// and without bias (tests/fixtures/misc.safetensors "linear.*"), and error messages.
#include "test_util.hpp"

#include <densegrad/ops/linear.hpp>

namespace test_linear {

using dg::Tensor;

namespace {
void linear_parity(const std::string& name, bool with_bias) {
  auto fx = dgtest::load_fixture<float>("misc");
  const std::string p = "linear." + name + ".";
  Tensor<float> x = dgtest::get(fx, p + "x").detach().requires_grad_();
  Tensor<float> w = dgtest::get(fx, p + "w").detach().requires_grad_();
  Tensor<float> b = with_bias ? dgtest::get(fx, p + "b").detach().requires_grad_() : Tensor<float>();
  Tensor<float> out = dg::linear(x, w, b);
  dgtest::require_close(out, dgtest::get(fx, p + "out"), 1e-5, 1e-6, p + "out");
  out.backward(dgtest::get(fx, p + "dout"));
  dgtest::require_close(x.grad(), dgtest::get(fx, p + "dx"), 1e-5, 1e-6, p + "dx");
  dgtest::require_close(w.grad(), dgtest::get(fx, p + "dw"), 1e-5, 1e-6, p + "dw");
  if (with_bias) dgtest::require_close(b.grad(), dgtest::get(fx, p + "db"), 1e-5, 1e-6, p + "db");
}
}  // namespace

TEST_CASE("linear gradcheck 1-D, 2-D and 3-D input, with and without bias") {
  dg::Generator gen(11);
  for (dg::Shape xs : {dg::Shape{5}, dg::Shape{1, 5}, dg::Shape{3, 5}, dg::Shape{3, 1, 5}, dg::Shape{1, 3, 5}})
    for (bool bias : {true, false}) {
      INFO("x " << dg::shape_str(xs) << (bias ? " with" : " without") << " bias");
      auto x = dg::randn<double>(xs, gen).requires_grad_();
      auto w = dg::randn<double>({3, 5}, gen).requires_grad_();
      auto b = dg::randn<double>({3}, gen).requires_grad_();
      if (bias)
        dgtest::require_gradcheck([](auto& v) { return dg::linear(v[0], v[1], v[2]); }, {x, w, b});
      else
        dgtest::require_gradcheck([](auto& v) { return dg::linear(v[0], v[1]); }, {x, w});
    }
}

TEST_CASE("linear 2-D with bias parity") { linear_parity("2d_bias", true); }
TEST_CASE("linear 2-D without bias parity") { linear_parity("2d_nobias", false); }
TEST_CASE("linear 3-D with bias parity") { linear_parity("3d_bias", true); }
TEST_CASE("linear 3-D without bias parity") { linear_parity("3d_nobias", false); }

TEST_CASE("linear output shapes and non-contiguous input") {
  dg::Generator gen(5);
  auto w = dg::randn<float>({4, 5}, gen);
  REQUIRE(dg::linear(dg::zeros<float>({5}), w).shape() == dg::Shape{4});
  REQUIRE(dg::linear(dg::zeros<float>({2, 3, 6, 5}), w).shape() == dg::Shape{2, 3, 6, 4});
  auto xt = dg::randn<float>({5, 3}, gen).transpose(0, 1);  // (3, 5), strided
  dgtest::require_close(dg::linear(xt, w), dg::linear(xt.contiguous(), w));
}

TEST_CASE("linear errors") {
  auto w = dg::zeros<float>({4, 5});
  REQUIRE_THROWS_WITH(dg::linear(dg::zeros<float>({3, 6}), w),
                      Catch::Contains("linear: input has 6 features in its last dim, weight expects 5 "
                                      "(shapes [3, 6] and [4, 5])"));
  REQUIRE_THROWS_WITH(dg::linear(dg::zeros<float>({3, 5}), dg::zeros<float>({5})),
                      Catch::Contains("weight must be (out_features, in_features), got shape [5]"));
  REQUIRE_THROWS_WITH(dg::linear(dg::zeros<float>({3, 5}), w, dg::zeros<float>({5})),
                      Catch::Contains("linear: bias must be (4) for weight [4, 5], got shape [5]"));
}

}  // namespace test_linear
