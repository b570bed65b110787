// tests/test_elementwise.cpp: add, sub, mul, div, neg, exp, log, sqrt, pow, abs, clamp and the
// scalar operators: gradcheck in double, broadcasting edge cases and their errors, non-contiguous
// inputs, bfloat16, and PyTorch parity (fixtures_core.py -> core.safetensors).
// Not a test of reductions (test_reduce.cpp), even though broadcast gradients go through sum_to.
#include "test_util.hpp"

#include <functional>
#include <vector>

namespace test_elementwise {

using namespace dg;
using Catch::Contains;
using Fn = std::function<Tensor<double>(const std::vector<Tensor<double>>&)>;

namespace {
/// Uniform values in [lo, hi), requiring grad: the usual gradcheck input.
Tensor<double> in(const Shape& shape, uint64_t seed, double lo = -1.0, double hi = 1.0) {
  Generator g(seed);
  return rand<double>(shape, g, lo, hi).requires_grad_();
}
/// |values| in [0.2, 1.2] with random signs: away from the kinks of abs and clamp.
Tensor<double> away_from_zero(const Shape& shape, uint64_t seed) {
  Generator g(seed);
  Tensor<double> t = rand<double>(shape, g, 0.2, 1.2);
  for (int64_t i = 0; i < t.numel(); ++i)
    if (g.uniform() < 0.5) t.data()[i] = -t.data()[i];
  return t.requires_grad_();
}

}  // namespace

// ---------------------------------------------------------------- gradcheck (double)

TEST_CASE("add sub mul div gradcheck on same shapes", "[elementwise][gradcheck]") {
  auto a = in({2, 3}, 1), b = in({2, 3}, 2, 0.5, 2.0);  // b is a divisor: kept away from 0
  dgtest::require_gradcheck([](const auto& v) { return add(v[0], v[1]); }, {a, b});
  dgtest::require_gradcheck([](const auto& v) { return sub(v[0], v[1]); }, {a, b});
  dgtest::require_gradcheck([](const auto& v) { return mul(v[0], v[1]); }, {a, b});
  dgtest::require_gradcheck([](const auto& v) { return div(v[0], v[1]); }, {a, b});
  dgtest::require_gradcheck([](const auto& v) { return v[0] * v[0]; }, {a});  // one input, both operands
}

TEST_CASE("add sub mul div gradcheck with broadcasting", "[elementwise][gradcheck][broadcast]") {
  struct Case { Shape a, b; };
  // 0-D with N-D, size-1 dims on both sides, a missing leading dim, a 1-element tensor
  const Case cases[] = {{{}, {2, 3}}, {{3, 1}, {1, 4}}, {{2, 3, 4}, {4}}, {{2, 1, 3}, {4, 1}}, {{1}, {3}}};
  const std::pair<const char*, Fn> ops[] = {
      {"add", [](const auto& v) { return add(v[0], v[1]); }},
      {"sub", [](const auto& v) { return sub(v[0], v[1]); }},
      {"mul", [](const auto& v) { return mul(v[0], v[1]); }},
      {"div", [](const auto& v) { return div(v[0], v[1]); }},
  };
  for (const auto& c : cases)
    for (const auto& [name, fn] : ops) {
      INFO(name << " " << shape_str(c.a) << " with " << shape_str(c.b));
      dgtest::require_gradcheck(fn, {in(c.a, 3), in(c.b, 4, 0.5, 2.0)});
      dgtest::require_gradcheck(fn, {in(c.b, 5, 0.5, 2.0), in(c.a, 6, 0.5, 2.0)});  // swapped sides
    }
}

TEST_CASE("neg exp log sqrt gradcheck", "[elementwise][gradcheck]") {
  auto x = in({3, 4}, 7), p = in({3, 4}, 8, 0.3, 2.0);  // log and sqrt: positive inputs away from 0
  dgtest::require_gradcheck([](const auto& v) { return neg(v[0]); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return -v[0]; }, {x});
  dgtest::require_gradcheck([](const auto& v) { return exp(v[0]); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return log(v[0]); }, {p});
  dgtest::require_gradcheck([](const auto& v) { return sqrt(v[0]); }, {p});
}

TEST_CASE("pow with a scalar exponent gradcheck", "[elementwise][gradcheck]") {
  auto p = in({2, 3}, 9, 0.3, 2.0), x = in({2, 3}, 10);
  for (double e : {2.0, 0.5, -1.5, 3.7, 1.0, 0.0}) {
    INFO("exponent " << e);
    dgtest::require_gradcheck([e](const auto& v) { return pow(v[0], e); }, {p});
  }
  for (double e : {2.0, 3.0, -1.0}) {  // integer exponents are defined for negative bases
    INFO("exponent " << e << " on negative bases");
    dgtest::require_gradcheck([e](const auto& v) { return pow(v[0], e); }, {away_from_zero({2, 3}, 11)});
  }
  dgtest::require_gradcheck([](const auto& v) { return pow(v[0], 2.0); }, {x});
}

TEST_CASE("pow with a tensor exponent gradcheck, broadcast", "[elementwise][gradcheck]") {
  auto a = in({2, 3}, 12, 0.3, 2.0), b = in({3}, 13, -1.5, 2.0);
  dgtest::require_gradcheck([](const auto& v) { return pow(v[0], v[1]); }, {a, b});
  dgtest::require_gradcheck([](const auto& v) { return pow(v[0], v[1]); }, {in({3, 1}, 14, 0.3, 2.0), in({1, 2}, 15)});
  dgtest::require_gradcheck([](const auto& v) { return pow(v[0], v[1]); }, {in({}, 16, 0.3, 2.0), b});
}

TEST_CASE("abs and clamp gradcheck away from their kinks", "[elementwise][gradcheck]") {
  auto x = away_from_zero({3, 5}, 17);
  dgtest::require_gradcheck([](const auto& v) { return abs(v[0]); }, {x});
  // fixed values at least 0.1 away from the clamp bounds -0.7 and 0.45 (and from 0)
  auto c = tensor<double>({-1.1, -0.9, -0.5, -0.3, 0.25, 0.6, 0.9, 1.15, 0.35, -0.2}, {2, 5}).requires_grad_();
  dgtest::require_gradcheck([](const auto& v) { return clamp(v[0], -0.7, 0.45); }, {c});
  dgtest::require_gradcheck([](const auto& v) { return clamp(v[0], -2.0, 2.0); }, {c});  // nothing clamped
  dgtest::require_gradcheck([](const auto& v) { return clamp(v[0], 0.0); }, {x});  // min only: relu
  dgtest::require_gradcheck(
      [](const auto& v) { return clamp(v[0], -std::numeric_limits<double>::infinity(), 0.0); }, {x});
}

TEST_CASE("scalar operators gradcheck", "[elementwise][gradcheck]") {
  auto x = in({2, 3}, 18, 0.5, 2.0);
  const Fn fns[] = {
      [](const auto& v) { return v[0] + 2.5; }, [](const auto& v) { return 2.5 + v[0]; },
      [](const auto& v) { return v[0] - 2.5; }, [](const auto& v) { return 2.5 - v[0]; },
      [](const auto& v) { return v[0] * -3.0; }, [](const auto& v) { return -3.0 * v[0]; },
      [](const auto& v) { return v[0] / 4.0; }, [](const auto& v) { return 4.0 / v[0]; },
      [](const auto& v) { return (2.5 * v[0] + 1.0) - 3.0 / v[0] + v[0] / 4.0 - (1.5 - v[0]); },
  };
  for (size_t i = 0; i < std::size(fns); ++i) {
    INFO("scalar form " << i);
    dgtest::require_gradcheck(fns[i], {x});
  }
}

TEST_CASE("elementwise gradients at the edges follow torch's conventions", "[elementwise]") {
  auto z = tensor<double>({0.0, 2.0}).requires_grad_();
  sum(abs(z)).backward();  // sign(0) = 0
  CHECK(z.grad().to_vector() == std::vector<double>{0.0, 1.0});
  z.zero_grad();
  sum(clamp(z, 0.0, 2.0)).backward();  // at the bounds the gradient passes
  CHECK(z.grad().to_vector() == std::vector<double>{1.0, 1.0});
  z.zero_grad();
  sum(pow(z, 0.0)).backward();  // x^0: gradient 0 everywhere, also at 0
  CHECK(z.grad().to_vector() == std::vector<double>{0.0, 0.0});
  // pow(a, b) at a = 0 with b >= 0: d/db is 0, not nan (0 * log 0)
  auto a = tensor<double>({0.0, 0.0}).requires_grad_(), b = tensor<double>({2.0, 0.0}).requires_grad_();
  sum(pow(a, b)).backward();
  CHECK(b.grad().to_vector() == std::vector<double>{0.0, 0.0});
  CHECK(a.grad().to_vector() == std::vector<double>{0.0, 0.0});
  REQUIRE_THROWS_WITH(clamp(z, 1.0, -1.0), Contains("clamp: min 1 is greater than max -1"));
}

// ---------------------------------------------------------------- broadcasting

TEST_CASE("broadcasting edge cases give torch's shapes and values", "[elementwise][broadcast]") {
  auto s = scalar_tensor<float>(10.f);
  auto v = tensor<float>({1, 2, 3}, {3, 1}), h = tensor<float>({10, 20, 30, 40}, {1, 4});
  CHECK((s + s).dim() == 0);
  CHECK((s + v).shape() == Shape{3, 1});
  CHECK((v * s).at({2, 0}) == 30.f);
  auto vh = v + h;  // size-1 dims on both sides
  CHECK(vh.shape() == Shape{3, 4});
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = 0; j < 4; ++j) REQUIRE(vh.at({i, j}) == v.at({i, 0}) + h.at({0, j}));
  auto lead = ones<float>({2, 1, 3, 1}) - tensor<float>({1, 2}, {2});  // leading dims added
  CHECK(lead.shape() == Shape{2, 1, 3, 2});
  CHECK(lead.at({1, 0, 2, 1}) == -1.f);
  CHECK((zeros<float>({0, 3}) + ones<float>({1, 3})).shape() == Shape{0, 3});  // size 0 broadcasts like torch
  CHECK((ones<float>({1}) / ones<float>({2, 1, 1})).shape() == Shape{2, 1, 1});
}

TEST_CASE("incompatible shapes: the error names the op and both shapes", "[elementwise][broadcast][errors]") {
  auto a = ones<float>({2, 3}), b = ones<float>({4}), c = ones<float>({3, 2, 2});
  REQUIRE_THROWS_WITH(a + b, Contains("add: shapes [2, 3] and [4] cannot be broadcast"));
  REQUIRE_THROWS_WITH(a - b, Contains("sub: shapes [2, 3] and [4]"));
  REQUIRE_THROWS_WITH(b * a, Contains("mul: shapes [4] and [2, 3]"));
  REQUIRE_THROWS_WITH(a / c, Contains("div: shapes [2, 3] and [3, 2, 2] cannot be broadcast (dim 2 of the result: 3 vs 2)"));
  REQUIRE_THROWS_WITH(pow(a, b), Contains("pow: shapes [2, 3] and [4]"));
  REQUIRE_THROWS_WITH(ones<float>({0}) + ones<float>({2}), Contains("[0] and [2]"));
}

TEST_CASE("elementwise ops read non-contiguous inputs correctly", "[elementwise]") {
  Generator g(19);
  auto base = rand<double>({4, 6}, g, 0.5, 2.0);
  auto t = base.transpose(0, 1);            // (6, 4), permuted strides
  auto s = base.slice(1, 0, 6, 2);          // (4, 3), stepped
  auto e = base.slice(0, 1, 2).expand({3, 6});  // stride 0
  auto tc = t.contiguous(), sc = s.contiguous(), ec = e.contiguous();
  CHECK(exp(t).to_vector() == exp(tc).to_vector());
  CHECK((t * t).to_vector() == (tc * tc).to_vector());
  CHECK(div(s, sc.slice(0, 0, 1)).to_vector() == div(sc, sc.slice(0, 0, 1)).to_vector());
  CHECK(pow(e, e).to_vector() == pow(ec, ec).to_vector());
  CHECK(clamp(t - 1.0, -0.2, 0.3).to_vector() == clamp(tc - 1.0, -0.2, 0.3).to_vector());
  dgtest::require_gradcheck([](const auto& v) { return v[0].transpose(0, 1) * v[1].slice(1, 0, 6, 2); },
                            {in({3, 4}, 20), in({4, 6}, 21)});
}

TEST_CASE("bfloat16 elementwise math happens in float and rounds once", "[elementwise][bfloat16]") {
  Generator g(22);
  auto a = randn<float>({37}, g), b = rand<float>({37}, g, 0.5, 2.0);
  auto ah = a.to<bfloat16>(), bh = b.to<bfloat16>();
  auto af = ah.to<float>(), bf = bh.to<float>();
  auto expect = [](const Tensor<float>& t) { return t.to<bfloat16>().to<float>().to_vector(); };
  CHECK((ah + bh).to<float>().to_vector() == expect(af + bf));
  CHECK((ah * bh).to<float>().to_vector() == expect(af * bf));
  CHECK((ah / bh).to<float>().to_vector() == expect(af / bf));
  CHECK(exp(ah).to<float>().to_vector() == expect(exp(af)));
  CHECK(sqrt(bh).to<float>().to_vector() == expect(sqrt(bf)));
}

// ---------------------------------------------------------------- PyTorch parity (core.safetensors)

TEST_CASE("add sub mul div parity with torch, broadcasting", "[elementwise][parity]") {
  dgtest::check_parity("core", "add_same", 2, [](const auto& v) { return v[0] + v[1]; });
  dgtest::check_parity("core", "add_bcast", 2, [](const auto& v) { return v[0] + v[1]; });
  dgtest::check_parity("core", "add_scalar0d", 2, [](const auto& v) { return v[0] + v[1]; });
  dgtest::check_parity("core", "sub_bcast", 2, [](const auto& v) { return v[0] - v[1]; });
  dgtest::check_parity("core", "mul_bcast", 2, [](const auto& v) { return v[0] * v[1]; });
  dgtest::check_parity("core", "mul_both_sides", 2, [](const auto& v) { return v[0] * v[1]; });
  dgtest::check_parity("core", "div_bcast", 2, [](const auto& v) { return v[0] / v[1]; });
}

TEST_CASE("neg exp log sqrt parity with torch", "[elementwise][parity]") {
  dgtest::check_parity("core", "neg", 1, [](const auto& v) { return -v[0]; });
  dgtest::check_parity("core", "exp", 1, [](const auto& v) { return exp(v[0]); });
  dgtest::check_parity("core", "log", 1, [](const auto& v) { return log(v[0]); });
  dgtest::check_parity("core", "sqrt", 1, [](const auto& v) { return sqrt(v[0]); });
}

TEST_CASE("pow abs clamp and scalar operators parity with torch", "[elementwise][parity]") {
  dgtest::check_parity("core", "pow_scalar", 1, [](const auto& v) { return pow(v[0], 2.5); });
  dgtest::check_parity("core", "pow_int", 1, [](const auto& v) { return pow(v[0], 3.0); });
  dgtest::check_parity("core", "pow_tensor", 2, [](const auto& v) { return pow(v[0], v[1]); });
  dgtest::check_parity("core", "abs", 1, [](const auto& v) { return abs(v[0]); });
  dgtest::check_parity("core", "clamp", 1, [](const auto& v) { return clamp(v[0], -0.5, 0.7); });
  dgtest::check_parity("core", "scalar_ops", 1,
               [](const auto& v) { return (2.5 * v[0] + 1.0) - 3.0 / v[0] + v[0] / 4.0 - (1.5 - v[0]); });
}

}  // namespace test_elementwise
