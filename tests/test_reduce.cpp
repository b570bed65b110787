// tests/test_reduce.cpp: sum, mean, max (torch.amax) over single, multiple, negative and all
// dims with keepdim on and off, and sum_to: gradcheck in double, shapes, ties, errors,
// strided inputs, bfloat16 accumulation, and PyTorch parity (core.safetensors).
// Not a test of the broadcasting ops that use sum_to (test_elementwise.cpp).
#include "test_util.hpp"

#include <cmath>
#include <functional>
#include <vector>

namespace test_reduce {

using namespace dg;
using Catch::Contains;

namespace {
Tensor<double> in(const Shape& shape, uint64_t seed) {
  Generator g(seed);
  return randn<double>(shape, g).requires_grad_();
}

/// Every way to name the reduced dims that the tests sweep: single, negative, several, all.
const std::vector<Shape> kDims = {{0}, {1}, {2}, {-1}, {-3}, {0, 2}, {2, 0}, {-1, 1}, {0, 1, 2}, {}};

}  // namespace

TEST_CASE("sum gradcheck over single, negative, multiple and all dims, keepdim on and off", "[reduce][gradcheck]") {
  auto x = in({2, 3, 4}, 1);
  for (const Shape& d : kDims)
    for (bool keep : {false, true}) {
      INFO("dims " << shape_str(d) << " keepdim " << keep);
      dgtest::require_gradcheck([d, keep](const auto& v) { return sum(v[0], d, keep); }, {x});
    }
}

TEST_CASE("mean gradcheck over single, negative, multiple and all dims, keepdim on and off", "[reduce][gradcheck]") {
  auto x = in({2, 3, 4}, 2);
  for (const Shape& d : kDims)
    for (bool keep : {false, true}) {
      INFO("dims " << shape_str(d) << " keepdim " << keep);
      dgtest::require_gradcheck([d, keep](const auto& v) { return mean(v[0], d, keep); }, {x});
    }
}

TEST_CASE("max gradcheck over single, negative, multiple and all dims, keepdim on and off", "[reduce][gradcheck]") {
  auto x = in({2, 3, 4}, 3);  // distinct random values: no ties within eps
  for (const Shape& d : kDims)
    for (bool keep : {false, true}) {
      INFO("dims " << shape_str(d) << " keepdim " << keep);
      dgtest::require_gradcheck([d, keep](const auto& v) { return max(v[0], d, keep); }, {x});
    }
}

TEST_CASE("reductions on 0-D and 1-element inputs, and composed with other ops, gradcheck", "[reduce][gradcheck]") {
  dgtest::require_gradcheck([](const auto& v) { return sum(v[0]); }, {in({}, 4)});
  dgtest::require_gradcheck([](const auto& v) { return mean(v[0], {0}); }, {in({}, 5)});  // dim 0 of a 0-D tensor
  dgtest::require_gradcheck([](const auto& v) { return max(v[0], {1}, true); }, {in({3, 1}, 6)});
  // softmax-like: x - max(x) and a mean over the result, through a non-contiguous view
  dgtest::require_gradcheck(
      [](const auto& v) {
        auto t = v[0].transpose(0, 1);
        auto e = exp(t - max(t, {1}, true));
        return e / sum(e, {1}, true);
      },
      {in({4, 3}, 7)});
}

TEST_CASE("reduction output shapes follow torch, values are right", "[reduce]") {
  auto x = arange<double>(24).reshape({2, 3, 4});
  CHECK(sum(x).dim() == 0);
  CHECK(sum(x).item() == 276.0);
  CHECK(sum(x, {}, true).shape() == Shape{1, 1, 1});
  CHECK(sum(x, {1}).shape() == Shape{2, 4});
  CHECK(sum(x, {1}, true).shape() == Shape{2, 1, 4});
  CHECK(sum(x, {-1, 0}).shape() == Shape{3});
  CHECK(sum(x, {-1, 0}).to_vector() == std::vector<double>{60, 92, 124});
  CHECK(x.mean({2}).to_vector() == std::vector<double>{1.5, 5.5, 9.5, 13.5, 17.5, 21.5});
  CHECK(x.max({0, 2}, true).shape() == Shape{1, 3, 1});
  CHECK(x.max({0, 2}).to_vector() == std::vector<double>{15, 19, 23});
  CHECK(max(x * -1.0, {1}).to_vector() == std::vector<double>{0, -1, -2, -3, -12, -13, -14, -15});
  CHECK(sum(zeros<float>({0, 3}), {0}).to_vector() == std::vector<float>{0, 0, 0});  // empty sum is 0
  CHECK(std::isnan(mean(zeros<float>({0, 3}), {0}).to_vector()[0]));               // empty mean is nan
  auto n = tensor<float>({1, NAN, 3});
  CHECK(std::isnan(max(n).item()));  // nan propagates, like torch.amax
  CHECK(max(tensor<float>({-INFINITY, -INFINITY})).item() == -INFINITY);
}

TEST_CASE("max splits the gradient evenly between tied maxima", "[reduce]") {
  auto x = tensor<double>({1, 3, 3, 2, 5, 5, 5, 0}, {2, 4}).requires_grad_();
  max(x, {1}).backward(tensor<double>({1, 6}));  // torch.amax: each of n ties gets dout / n
  CHECK(x.grad().to_vector() == std::vector<double>{0, 0.5, 0.5, 0, 2, 2, 2, 0});
  x.zero_grad();
  sum(max(x)).backward();
  CHECK(x.grad().to_vector() == std::vector<double>{0, 0, 0, 0, 1.0 / 3, 1.0 / 3, 1.0 / 3, 0});
}

TEST_CASE("reduction errors name the op and the dim", "[reduce][errors]") {
  auto x = ones<float>({2, 3});
  REQUIRE_THROWS_WITH(sum(x, {2}), Contains("sum: dim 2 out of range for a 2-D tensor (expected in [-2, 1])"));
  REQUIRE_THROWS_WITH(mean(x, {-3}), Contains("mean: dim -3 out of range"));
  REQUIRE_THROWS_WITH(max(x, {5}), Contains("max: dim 5 out of range"));
  REQUIRE_THROWS_WITH(sum(x, {1, -1}), Contains("sum: dim listed twice in [1, -1]"));
  REQUIRE_THROWS_WITH(max(zeros<float>({0, 3})), Contains("max: cannot reduce an empty tensor of shape [0, 3]"));
  REQUIRE_THROWS_WITH(sum_to(x, {4}), Contains("sum_to: shapes [4] and [2, 3] cannot be broadcast"));
  REQUIRE_THROWS_WITH(sum_to(x, {2, 1, 3}), Contains("sum_to: shape [2, 1, 3] does not broadcast to [2, 3]"));
}

TEST_CASE("sum_to undoes broadcasting: values and gradcheck", "[reduce]") {
  auto g = arange<double>(24).reshape({2, 3, 4});
  CHECK(sum_to(g, {2, 3, 4}).storage().is_alias_of(g.storage()));  // same shape: returned as is
  CHECK(sum_to(g, {4}).to_vector() == std::vector<double>{60, 66, 72, 78});
  CHECK(sum_to(g, {3, 1}).to_vector() == std::vector<double>{60, 92, 124});
  CHECK(sum_to(g, {2, 1, 4}).shape() == Shape{2, 1, 4});
  CHECK(sum_to(g, {}).item() == 276.0);
  for (Shape s : {Shape{4}, Shape{3, 1}, Shape{2, 1, 1}, Shape{1, 3, 4}, Shape{}}) {
    INFO("sum_to " << shape_str(s));
    dgtest::require_gradcheck([s](const auto& v) { return sum_to(v[0], s); }, {in({2, 3, 4}, 8)});
  }
}

TEST_CASE("reductions read non-contiguous and expanded inputs", "[reduce]") {
  Generator gen(9);
  auto base = randn<double>({4, 5, 6}, gen);
  auto v = base.permute({2, 0, 1}).slice(2, 1, 5, 2);  // (6, 4, 2), permuted and stepped
  auto c = v.contiguous();
  for (const Shape& d : {Shape{0}, Shape{1, 2}, Shape{}}) {
    INFO("dims " << shape_str(d));
    CHECK(sum(v, d).to_vector() == sum(c, d).to_vector());
    CHECK(max(v, d, true).to_vector() == max(c, d, true).to_vector());
  }
  auto e = tensor<double>({1, 2, 3}, {3, 1}).expand({3, 5});  // stride 0
  CHECK(sum(e, {1}).to_vector() == std::vector<double>{5, 10, 15});
  CHECK(mean(e).item() == Approx(2.0));
}

TEST_CASE("bfloat16 sums accumulate in higher precision", "[reduce][bfloat16]") {
  // summing 1000 ones in bfloat16 steps would stall at 256 (256 + 1 rounds back to 256)
  auto o = ones<bfloat16>({1000});
  CHECK(float(sum(o).item()) == 1000.f);
  CHECK(float(mean(o).item()) == 1.f);
  auto x = arange<bfloat16>(0.0, 8.0).reshape({2, 4});
  CHECK(float(max(x, {1}).to_vector()[1]) == 7.f);
  CHECK(float(sum(x, {0}).to_vector()[3]) == 10.f);
}

TEST_CASE("sum parity with torch over one, several, negative and all dims", "[reduce][parity]") {
  dgtest::check_parity("core", "sum_dim1", 1, [](const auto& v) { const auto& x = v[0]; return sum(x, {1}); });
  dgtest::check_parity("core", "sum_dims02_keep", 1, [](const auto& v) { const auto& x = v[0]; return sum(x, {0, 2}, true); });
  dgtest::check_parity("core", "sum_neg_keep", 1, [](const auto& v) { const auto& x = v[0]; return sum(x, {-1}, true); });
  dgtest::check_parity("core", "sum_all", 1, [](const auto& v) { const auto& x = v[0]; return sum(x); });
}

TEST_CASE("mean parity with torch over one, several, negative and all dims", "[reduce][parity]") {
  dgtest::check_parity("core", "mean_dim1", 1, [](const auto& v) { const auto& x = v[0]; return mean(x, {1}); });
  dgtest::check_parity("core", "mean_dims_neg", 1, [](const auto& v) { const auto& x = v[0]; return mean(x, {-1, 0}, true); });
  dgtest::check_parity("core", "mean_all", 1, [](const auto& v) { const auto& x = v[0]; return x.mean(); });
}

TEST_CASE("max parity with torch.amax over one, several and all dims", "[reduce][parity]") {
  dgtest::check_parity("core", "max_dim1", 1, [](const auto& v) { const auto& x = v[0]; return max(x, {1}); });
  dgtest::check_parity("core", "max_dims02_keep", 1, [](const auto& v) { const auto& x = v[0]; return max(x, {0, 2}, true); });
  dgtest::check_parity("core", "max_all", 1, [](const auto& v) { const auto& x = v[0]; return x.max(); });
}

}  // namespace test_reduce
