// tests/test_shape.cpp: gradients of the view and copy ops (reshape, view, permute, transpose,
// narrow, slice with step, select, expand, unsqueeze, squeeze, flatten, contiguous, clone):
// gradcheck in double, overlapping views, chains of views, and PyTorch parity (core.safetensors).
// Not a test of view geometry and aliasing (test_tensor.cpp).
#include "test_util.hpp"

#include <functional>
#include <vector>

namespace test_shape {

using namespace dg;
using Catch::Contains;

namespace {
Tensor<double> in(const Shape& shape, uint64_t seed) {
  Generator g(seed);
  return randn<double>(shape, g).requires_grad_();
}

}  // namespace

TEST_CASE("reshape and view gradcheck, including -1 and non-contiguous inputs", "[shape][gradcheck]") {
  auto x = in({2, 3, 4}, 1);
  dgtest::require_gradcheck([](const auto& v) { return v[0].reshape({4, -1}); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].view({6, 4}); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].view({24}); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].transpose(0, 2).reshape({-1, 2}); }, {x});  // copies
  dgtest::require_gradcheck([](const auto& v) { return v[0].reshape({}); }, {in({1, 1}, 2)});
}

TEST_CASE("permute and transpose gradcheck", "[shape][gradcheck]") {
  auto x = in({2, 3, 4}, 3);
  dgtest::require_gradcheck([](const auto& v) { return v[0].permute({2, 0, 1}); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].permute({1, -1, 0}); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].transpose(0, -1); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].transpose(1, 1); }, {x});  // identity
  // a permuted view feeding a reduction and an elementwise op: gradients land in the right places
  dgtest::require_gradcheck([](const auto& v) { return sum(v[0].permute({2, 0, 1}) * v[1], {0}); },
                            {x, in({2, 3}, 4)});
}

TEST_CASE("narrow, slice with step and select gradcheck", "[shape][gradcheck]") {
  auto x = in({3, 8}, 5);
  dgtest::require_gradcheck([](const auto& v) { return v[0].narrow(1, 2, 3); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].narrow(0, -2, 2); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].slice(1, 1, 7, 2); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].slice(1, 0, 8, 3).slice(0, 0, 3, 2); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].slice(1, -3, 100); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].select(1, 4); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].select(0, -1); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].select(0, 1).select(0, 2); }, {x});  // to 0-D
}

TEST_CASE("expand gradcheck: size-1 dims, new leading dims, -1", "[shape][gradcheck]") {
  dgtest::require_gradcheck([](const auto& v) { return v[0].expand({2, 3, 4}); }, {in({3, 1}, 6)});
  dgtest::require_gradcheck([](const auto& v) { return v[0].expand({5, -1}); }, {in({1, 3}, 7)});
  dgtest::require_gradcheck([](const auto& v) { return v[0].expand({2, 3}); }, {in({}, 8)});
  dgtest::require_gradcheck([](const auto& v) { return v[0].expand({2, 3, 2}); }, {in({1, 3, 1}, 9)});
  // expand of a transposed view, then an op that reads it: sums over the repeated entries
  dgtest::require_gradcheck([](const auto& v) { return v[0].transpose(0, 1).expand({2, 4, 3}) * v[1]; },
                            {in({3, 4}, 10), in({2, 4, 3}, 11)});
}

TEST_CASE("unsqueeze, squeeze and flatten gradcheck", "[shape][gradcheck]") {
  auto x = in({2, 1, 3}, 12);
  dgtest::require_gradcheck([](const auto& v) { return v[0].unsqueeze(0); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].unsqueeze(-1); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].squeeze(1); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].squeeze(0); }, {x});  // size 2: no-op view
  dgtest::require_gradcheck([](const auto& v) { return v[0].flatten(); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].flatten(1); }, {in({2, 3, 4}, 13)});
  dgtest::require_gradcheck([](const auto& v) { return v[0].permute({2, 0, 1}).flatten(0, 1); }, {in({2, 3, 4}, 14)});
}

TEST_CASE("contiguous and clone gradcheck on strided inputs", "[shape][gradcheck]") {
  auto x = in({3, 4}, 15);
  dgtest::require_gradcheck([](const auto& v) { return v[0].transpose(0, 1).contiguous(); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].slice(1, 0, 4, 2).clone(); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].clone(); }, {x});
  dgtest::require_gradcheck([](const auto& v) { return v[0].expand({2, 3, 4}).contiguous(); }, {x});
}

TEST_CASE("overlapping views of one tensor: their gradients add", "[shape][gradcheck]") {
  auto x = in({5, 2}, 16);
  // rows 0..2 and 1..3 overlap in rows 1 and 2
  dgtest::require_gradcheck([](const auto& v) { return v[0].narrow(0, 0, 3) * v[0].narrow(0, 1, 3); }, {x});
  dgtest::require_gradcheck(
      [](const auto& v) { return v[0].select(1, 0) + v[0].transpose(0, 1).select(0, 0) * v[0].select(1, 1); }, {x});
  auto y = tensor<double>({1, 2, 3, 4}).requires_grad_();
  (sum(y.slice(0, 0, 4, 2)) + sum(y.slice(0, 0, 3)) * 2.0 + sum(y.expand({3, 4}))).backward();
  CHECK(y.grad().to_vector() == std::vector<double>{1 + 2 + 3, 2 + 3, 1 + 2 + 3, 3});
}

TEST_CASE("a long chain of views gradchecks like its contiguous equivalent", "[shape][gradcheck]") {
  auto chain = [](const Tensor<double>& t) {
    return t.permute({2, 0, 1}).slice(0, 1, 4, 2).unsqueeze(1).expand({2, 3, 2, 3}).select(3, -1).flatten(1).transpose(0, 1);
  };
  auto x = in({2, 3, 4}, 17);
  dgtest::require_gradcheck([&](const auto& v) { return chain(v[0]); }, {x});
  CHECK(chain(x).shape() == Shape{6, 2});
  // the same values as computing on a contiguous copy
  auto xc = x.detach().permute({1, 2, 0}).contiguous().permute({2, 0, 1});
  CHECK(chain(x).contiguous().to_vector() == chain(xc).contiguous().to_vector());
}

TEST_CASE("view ops record under grad mode and not under NoGradGuard", "[shape]") {
  auto x = ones<float>({2, 3}).requires_grad_();
  CHECK(x.transpose(0, 1).grad_fn_name() == "permute");
  CHECK(x.slice(1, 0, 2).grad_fn_name() == "slice");
  CHECK(x.expand({4, 2, 3}).grad_fn_name() == "expand");
  CHECK(x.view({6}).grad_fn_name() == "view");
  NoGradGuard g;
  auto v = x.transpose(0, 1);
  CHECK_FALSE(v.requires_grad());
  CHECK(v.storage().is_alias_of(x.storage()));
}

TEST_CASE("view op parity with torch: values and gradients", "[shape][parity]") {
  dgtest::check_parity("core", "permute", 1, [](const auto& v) { const auto& x = v[0]; return x.permute({2, 0, 1}); });
  dgtest::check_parity("core", "transpose_reshape", 1, [](const auto& v) { const auto& x = v[0]; return x.transpose(0, 1).reshape({-1}); });
  dgtest::check_parity("core", "slice_step", 1, [](const auto& v) { const auto& x = v[0]; return x.slice(1, 1, 7, 2); });
  dgtest::check_parity("core", "narrow", 1, [](const auto& v) { const auto& x = v[0]; return x.narrow(1, 1, 2); });
  dgtest::check_parity("core", "select", 1, [](const auto& v) { const auto& x = v[0]; return x.select(1, 2); });
  dgtest::check_parity("core", "expand", 1, [](const auto& v) { const auto& x = v[0]; return x.expand({2, 3, 4}); });
  dgtest::check_parity("core", "unsqueeze_squeeze", 1, [](const auto& v) { const auto& x = v[0]; return x.unsqueeze(1).squeeze(0); });
  dgtest::check_parity("core", "flatten", 1, [](const auto& v) { const auto& x = v[0]; return x.flatten(1, 2); });
}

}  // namespace test_shape
