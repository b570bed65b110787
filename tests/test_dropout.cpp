// tests/test_dropout.cpp: dropout (F.dropout) and drop_path (timm): gradcheck with a generator
// re-seeded inside the function (so every evaluation draws the same mask), statistics over 100k
// elements, eval identity, seeded reproducibility, drop_path's per-sample structure, errors.
// No PyTorch fixture: masks come from densegrad's own generator, not torch's.
#include "test_util.hpp"

#include <densegrad/ops/dropout.hpp>

namespace test_dropout {

using dg::Tensor;

namespace {
bool all_zero(const Tensor<float>& t) {
  auto v = t.to_vector();
  return std::all_of(v.begin(), v.end(), [](float x) { return x == 0.f; });
}
}  // namespace

TEST_CASE("dropout gradcheck with a fixed seed") {
  dg::Generator gen(31);
  auto x = dg::randn<double>({3, 5, 7}, gen).requires_grad_();
  for (double p : {0.0, 0.3, 0.9, 1.0}) {
    INFO("p = " << p);
    dgtest::require_gradcheck([p](auto& v) {
      dg::Generator g(7);  // re-seeded on every call: the same mask for each finite difference
      return dg::dropout(v[0], p, true, g);
    }, {x});
  }
}

TEST_CASE("drop_path gradcheck with a fixed seed") {
  dg::Generator gen(32);
  auto x = dg::randn<double>({5, 3, 1, 7}, gen).requires_grad_();
  for (bool scale : {true, false}) {
    INFO("scale_by_keep = " << scale);
    dgtest::require_gradcheck([scale](auto& v) {
      dg::Generator g(8);
      return dg::drop_path(v[0], 0.4, true, g, scale);
    }, {x});
  }
}

TEST_CASE("dropout statistics over 100k elements") {
  const int64_t n = 100000;
  auto x = dg::ones<float>({n});
  for (double p : {0.1, 0.5, 0.8}) {
    INFO("p = " << p);
    dg::Generator gen(33);
    auto y = dg::dropout(x, p, true, gen).to_vector();
    int64_t zeros = 0, wrong_scale = 0;
    double sum = 0;
    for (float v : y) {
      if (v == 0.f) ++zeros;
      else if (std::abs(v - 1.0 / (1.0 - p)) > 1e-6 * v) ++wrong_scale;  // survivors are scaled by 1/(1-p)
      sum += v;
    }
    REQUIRE(wrong_scale == 0);
    // binomial: std of the zeroed fraction is sqrt(p(1-p)/n) <= 0.0016; allow ~5 sigma
    REQUIRE(std::abs(double(zeros) / n - p) < 0.008);
    REQUIRE(std::abs(sum / n - 1.0) < 0.04);  // the mean is kept (std of the mean <= 0.0063 at p = 0.8)
  }
}

TEST_CASE("dropout eval, p = 0 and p = 1") {
  dg::Generator gen(34);
  auto x = dg::randn<float>({4, 5}, gen).requires_grad_();
  REQUIRE(dg::dropout(x, 0.5, false, gen).impl() == x.impl());  // eval: x itself
  REQUIRE(dg::dropout(x, 0.0, true, gen).impl() == x.impl());
  auto y = dg::dropout(x, 1.0, true, gen);  // all zeros, still in the graph (gradient 0)
  REQUIRE(all_zero(y));
  dg::sum(y).backward();
  REQUIRE(all_zero(x.grad()));
}

TEST_CASE("dropout backward uses the forward mask") {
  dg::Generator gen(35);
  auto x = dg::ones<float>({1000}).requires_grad_();
  auto y = dg::dropout(x, 0.25, true, gen);
  dg::sum(y).backward();
  dgtest::require_close(x.grad(), y.detach());  // d y_i / d x_i = mask_i / 0.75 = y_i when x = 1
}

TEST_CASE("dropout and drop_path are reproducible from a seed") {
  auto x = dg::ones<float>({64, 8});
  dg::Generator a(36), b(36), c(37);
  auto ya = dg::dropout(x, 0.5, true, a).to_vector(), yb = dg::dropout(x, 0.5, true, b).to_vector();
  REQUIRE(ya == yb);
  REQUIRE(ya != dg::dropout(x, 0.5, true, c).to_vector());
  REQUIRE(ya != dg::dropout(x, 0.5, true, a).to_vector());  // the generator advances
  dg::Generator d(38), e(38);
  REQUIRE(dg::drop_path(x, 0.5, true, d).to_vector() == dg::drop_path(x, 0.5, true, e).to_vector());
}

TEST_CASE("drop_path drops whole samples") {
  const int64_t n = 20000;
  dg::Generator gen(39);
  auto x = dg::randn<float>({n, 2, 3}, gen);
  for (bool scale : {true, false}) {
    auto y = dg::drop_path(x, 0.3, true, gen, scale);
    const float f = scale ? float(1.0 / 0.7) : 1.f;
    const std::vector<float> xv = x.to_vector(), yv = y.to_vector();
    int64_t dropped = 0, mixed = 0;
    for (int64_t i = 0; i < n; ++i) {  // each sample: all 6 values zero, or all 6 equal to x * f
      int zero = 0, kept = 0;
      for (int64_t k = i * 6; k < i * 6 + 6; ++k) {
        zero += yv[k] == 0.f;
        kept += std::abs(yv[k] - xv[k] * f) <= 1e-6f * std::abs(xv[k] * f);
      }
      dropped += zero == 6;
      mixed += zero != 6 && kept != 6;
    }
    REQUIRE(mixed == 0);
    REQUIRE(std::abs(double(dropped) / n - 0.3) < 0.02);  // std sqrt(0.21/20000) = 0.0032
  }
  REQUIRE(dg::drop_path(x, 0.3, false, gen).impl() == x.impl());  // eval: identity
  REQUIRE(dg::drop_path(x, 0.0, true, gen).impl() == x.impl());
  REQUIRE(all_zero(dg::drop_path(x, 1.0, true, gen)));  // keep_prob 0: zeros, no division
}

TEST_CASE("dropout bfloat16 keeps the scale exact") {
  dg::Generator gen(40);
  auto y = dg::dropout(dg::ones<dg::bfloat16>({256}), 0.5, true, gen);
  auto v = y.to_vector();
  REQUIRE(std::all_of(v.begin(), v.end(), [](dg::bfloat16 b) { return float(b) == 0.f || float(b) == 2.f; }));
}

TEST_CASE("dropout and drop_path errors") {
  dg::Generator gen(41);
  auto x = dg::ones<float>({2, 3});
  REQUIRE_THROWS_WITH(dg::dropout(x, -0.1, true, gen),
                      Catch::Contains("dropout: probability has to be between 0 and 1, got p=-0.1"));
  REQUIRE_THROWS_WITH(dg::dropout(x, 1.5, false, gen), Catch::Contains("got p=1.5"));
  REQUIRE_THROWS_WITH(dg::dropout(x, std::nan(""), true, gen), Catch::Contains("between 0 and 1"));
  REQUIRE_THROWS_WITH(dg::drop_path(x, 2.0, true, gen), Catch::Contains("drop_path: drop_prob has to be between 0 and 1"));
  REQUIRE_THROWS_WITH(dg::drop_path(dg::scalar_tensor(1.f), 0.5, true, gen), Catch::Contains("batch dim"));
}

}  // namespace test_dropout
