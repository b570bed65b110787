// tests/test_loss.cpp: cross_entropy with class indices and soft targets, with and without label
// smoothing: gradcheck (logits and soft targets), PyTorch parity (tests/fixtures/misc.safetensors
// "ce.*"), numerical stability for huge logits, and error messages.
#include "test_util.hpp"

#include <densegrad/ops/loss.hpp>

namespace test_loss {

using dg::Tensor;

namespace {
void ce_int_parity(const std::string& name, double eps) {
  auto fx = dgtest::load_fixture<float>("misc");
  const std::string p = "ce." + name + ".";
  Tensor<float> x = dgtest::get(fx, p + "x").detach().requires_grad_();
  Tensor<int64_t> target = dgtest::get(fx, p + "target").to<int64_t>();
  Tensor<float> out = dg::cross_entropy(x, target, eps);
  REQUIRE(out.dim() == 0);
  dgtest::require_close(out, dgtest::get(fx, p + "out"), 1e-5, 1e-6, p + "out");
  out.backward(dgtest::get(fx, p + "dout"));
  dgtest::require_close(x.grad(), dgtest::get(fx, p + "dx"), 1e-5, 1e-6, p + "dx");
}
void ce_soft_parity(const std::string& name, double eps) {
  auto fx = dgtest::load_fixture<float>("misc");
  const std::string p = "ce." + name + ".";
  Tensor<float> x = dgtest::get(fx, p + "x").detach().requires_grad_();
  Tensor<float> t = dgtest::get(fx, p + "target").detach().requires_grad_();
  Tensor<float> out = dg::cross_entropy(x, t, eps);
  dgtest::require_close(out, dgtest::get(fx, p + "out"), 1e-5, 1e-6, p + "out");
  out.backward(dgtest::get(fx, p + "dout"));
  dgtest::require_close(x.grad(), dgtest::get(fx, p + "dx"), 1e-5, 1e-6, p + "dx");
  dgtest::require_close(t.grad(), dgtest::get(fx, p + "dtarget"), 1e-5, 1e-6, p + "dtarget");
}
}  // namespace

TEST_CASE("cross_entropy class-index targets gradcheck") {
  dg::Generator gen(51);
  for (double eps : {0.0, 0.1, 1.0}) {
    INFO("label_smoothing = " << eps);
    auto x1 = dg::randn<double>({1, 3}, gen).requires_grad_(), x3 = dg::randn<double>({3, 5}, gen).requires_grad_();
    auto t1 = dg::tensor<int64_t>({2}), t3 = dg::tensor<int64_t>({4, 0, 2});
    dgtest::require_gradcheck([&](auto& v) { return dg::cross_entropy(v[0], t1, eps); }, {x1});
    dgtest::require_gradcheck([&](auto& v) { return dg::cross_entropy(v[0], t3, eps); }, {x3});
  }
}

TEST_CASE("cross_entropy soft targets gradcheck in logits and targets") {
  dg::Generator gen(52);
  for (double eps : {0.0, 0.1}) {
    INFO("label_smoothing = " << eps);
    auto x = dg::randn<double>({3, 5}, gen).requires_grad_();
    // positive targets; not normalized on purpose: the gradient formula must not assume sum = 1
    auto t = dg::rand<double>({3, 5}, gen, 0.1, 1.0).requires_grad_();
    dgtest::require_gradcheck([eps](auto& v) { return dg::cross_entropy(v[0], v[1], eps); }, {x, t});
    auto x1 = dg::randn<double>({1, 1}, gen).requires_grad_(), t1 = dg::ones<double>({1, 1}).requires_grad_();
    dgtest::require_gradcheck([eps](auto& v) { return dg::cross_entropy(v[0], v[1], eps); }, {x1, t1});
  }
}

TEST_CASE("cross_entropy class indices parity") { ce_int_parity("int", 0.0); }
TEST_CASE("cross_entropy class indices label_smoothing 0.1 parity") { ce_int_parity("int_ls", 0.1); }
TEST_CASE("cross_entropy class indices large logits label_smoothing 0.1 parity") { ce_int_parity("int_big", 0.1); }
TEST_CASE("cross_entropy soft targets parity") { ce_soft_parity("soft", 0.0); }
TEST_CASE("cross_entropy soft targets label_smoothing 0.1 parity") { ce_soft_parity("soft_ls", 0.1); }

TEST_CASE("cross_entropy is stable for huge logits and matches one-hot soft targets") {
  // a naive exp overflows at 1e4; with max subtraction the loss is exact
  auto x = dg::tensor<float>({1e4f, 0.f, -1e4f, 0.f, 1e4f, 1e4f - 2.f}, {2, 3}).requires_grad_();
  auto t = dg::tensor<int64_t>({1, 2});
  auto loss = dg::cross_entropy(x, t);
  REQUIRE(std::isfinite(loss.item()));
  REQUIRE(loss.item() == Approx((1e4 + 2.0 + std::log1p(std::exp(-2.0))) / 2.0).epsilon(1e-6));
  loss.backward();
  auto g = x.grad().to_vector();
  REQUIRE(std::all_of(g.begin(), g.end(), [](float v) { return std::isfinite(v); }));
  // class indices == one-hot soft targets, also under smoothing
  auto onehot = dg::tensor<float>({0, 1, 0, 0, 0, 1}, {2, 3});
  dgtest::require_close(dg::cross_entropy(x.detach(), t, 0.2), dg::cross_entropy(x.detach(), onehot, 0.2));
}

TEST_CASE("cross_entropy accepts strided logits and targets") {
  dg::Generator gen(53);
  auto xt = dg::randn<float>({5, 4}, gen).transpose(0, 1);  // (4, 5), strided
  auto t = dg::tensor<int64_t>({0, 9, 4, 9, 3, 9, 1, 9}).slice(0, 0, 8, 2);  // {0, 4, 3, 1}, stride 2
  dgtest::require_close(dg::cross_entropy(xt, t, 0.1), dg::cross_entropy(xt.contiguous(), t.contiguous(), 0.1));
}

TEST_CASE("cross_entropy errors") {
  auto x = dg::zeros<float>({3, 10});
  REQUIRE_THROWS_WITH(dg::cross_entropy(x, dg::tensor<int64_t>({1, 12, 0})),
                      "cross_entropy: target 12 of sample 1 is out of range for 10 classes "
                      "(expected 0 <= target < 10)");
  REQUIRE_THROWS_WITH(dg::cross_entropy(x, dg::tensor<int64_t>({1, 2, -1})), Catch::Contains("target -1 of sample 2"));
  REQUIRE_THROWS_WITH(dg::cross_entropy(x, dg::tensor<int64_t>({1, 2})),
                      Catch::Contains("class-index target must have shape (N) = [3] for logits [3, 10], got [2]"));
  REQUIRE_THROWS_WITH(dg::cross_entropy(x, dg::zeros<float>({3, 9})),
                      Catch::Contains("soft target must have the logits' shape [3, 10], got [3, 9]"));
  REQUIRE_THROWS_WITH(dg::cross_entropy(dg::zeros<float>({10}), dg::tensor<int64_t>({1})),
                      Catch::Contains("expected logits of shape (N, C), got [10]"));
  REQUIRE_THROWS_WITH(dg::cross_entropy(x, dg::tensor<int64_t>({1, 2, 3}), -0.1),
                      Catch::Contains("label_smoothing must be between 0.0 and 1.0, got -0.1"));
  REQUIRE_THROWS_WITH(dg::cross_entropy(x, dg::zeros<float>({3, 10}), 1.5), Catch::Contains("got 1.5"));
}

}  // namespace test_loss
