// tests/test_pool.cpp: adaptive_avg_pool2d: gradcheck on odd shapes, PyTorch parity (forward and
// input gradient, tests/fixtures/misc.safetensors "pool.*"), views, and error messages.
#include "test_util.hpp"

#include <densegrad/ops/pool.hpp>

namespace test_pool {

using dg::Tensor;

namespace {
/// Pools fixture case `name` to (oh, ow), backpropagates its dout, compares out and dx.
void pool_parity(const std::string& name, int64_t oh, int64_t ow) {
  auto fx = dgtest::load_fixture<float>("misc");
  const std::string p = "pool." + name + ".";
  Tensor<float> x = dgtest::get(fx, p + "x").detach().requires_grad_();
  Tensor<float> out = dg::adaptive_avg_pool2d(x, oh, ow);
  dgtest::require_close(out, dgtest::get(fx, p + "out"), 1e-5, 1e-6, p + "out");
  out.backward(dgtest::get(fx, p + "dout"));
  dgtest::require_close(x.grad(), dgtest::get(fx, p + "dx"), 1e-5, 1e-6, p + "dx");
}
}  // namespace

TEST_CASE("adaptive_avg_pool2d gradcheck odd shapes") {
  struct Case { int64_t n, c, h, w, oh, ow; };
  // batch 1 and 3, channels 1/3/5, spatial 1/7/9; global, (2,3) and (3,3) from 7x9, and outputs
  // larger than the input (bins then repeat input pixels)
  for (Case k : {Case{1, 3, 7, 9, 1, 1}, Case{3, 1, 7, 9, 2, 3}, Case{1, 5, 7, 9, 3, 3}, Case{3, 1, 1, 7, 1, 3},
                 Case{1, 1, 1, 1, 2, 3}, Case{1, 3, 9, 1, 4, 1}}) {
    INFO("x (" << k.n << ", " << k.c << ", " << k.h << ", " << k.w << ") -> (" << k.oh << ", " << k.ow << ")");
    dg::Generator gen(k.n * 100 + k.c * 10 + k.oh);
    auto x = dg::randn<double>({k.n, k.c, k.h, k.w}, gen).requires_grad_();
    dgtest::require_gradcheck([&](auto& v) { return dg::adaptive_avg_pool2d(v[0], k.oh, k.ow); }, {x});
  }
}

TEST_CASE("adaptive_avg_pool2d global (1,1) parity") { pool_parity("g11", 1, 1); }
TEST_CASE("adaptive_avg_pool2d (2,3) from 7x9 parity") { pool_parity("a23", 2, 3); }
TEST_CASE("adaptive_avg_pool2d (3,3) from 7x9 parity") { pool_parity("a33", 3, 3); }
TEST_CASE("adaptive_avg_pool2d upsampling (5,6) from 3x4 parity") { pool_parity("up56", 5, 6); }

TEST_CASE("adaptive_avg_pool2d bins match torch's floor/ceil rule") {
  // H = 7 -> 3 rows: bins [0,3), [2,5), [4,7) (they overlap)
  auto x = dg::arange<double>(7).reshape({1, 1, 7, 1});
  auto y = dg::adaptive_avg_pool2d(x, 3, 1).to_vector();
  REQUIRE(y == std::vector<double>{1.0, 3.0, 5.0});
}

TEST_CASE("adaptive_avg_pool2d non-contiguous input and 3-D input") {
  dg::Generator gen(3);
  auto base = dg::randn<float>({2, 3, 9, 7}, gen);
  auto xt = base.transpose(2, 3);  // (2, 3, 7, 9), a strided view
  REQUIRE_FALSE(xt.is_contiguous());
  for (auto [oh, ow] : {std::pair<int64_t, int64_t>{1, 1}, {2, 3}, {3, 3}})
    dgtest::require_close(dg::adaptive_avg_pool2d(xt, oh, ow), dg::adaptive_avg_pool2d(xt.contiguous(), oh, ow));
  auto x3 = base.select(0, 1);  // (3, 9, 7)
  dgtest::require_close(dg::adaptive_avg_pool2d(x3, 2), dg::adaptive_avg_pool2d(base, 2).select(0, 1));
}

TEST_CASE("adaptive_avg_pool2d bfloat16 computes in float") {
  auto x = dg::full<dg::bfloat16>({1, 2, 7, 9}, dg::bfloat16(0.5f));
  auto y = dg::adaptive_avg_pool2d(x, 3, 3);
  auto v = y.to_vector();
  REQUIRE(std::all_of(v.begin(), v.end(), [](dg::bfloat16 b) { return float(b) == 0.5f; }));
}

TEST_CASE("adaptive_avg_pool2d errors") {
  auto x = dg::zeros<float>({2, 3, 7, 9});
  REQUIRE_THROWS_WITH(dg::adaptive_avg_pool2d(dg::zeros<float>({7, 9}), 1, 1),
                      Catch::Contains("expected a (N, C, H, W) or (C, H, W) input, got shape [7, 9]"));
  REQUIRE_THROWS_WITH(dg::adaptive_avg_pool2d(x, 0, 3), Catch::Contains("output size must be positive, got (0, 3)"));
  REQUIRE_THROWS_WITH(dg::adaptive_avg_pool2d(dg::zeros<float>({2, 3, 0, 9}), 1, 1),
                      Catch::Contains("input spatial size must be non-empty"));
}

}  // namespace test_pool
