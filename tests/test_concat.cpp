// tests/test_concat.cpp: concat (torch.cat) and split (torch.split): gradcheck, PyTorch parity
// (tests/fixtures/misc.safetensors "concat.*", "split.*"), views and strided inputs, gradients of
// a tensor feeding two concats (they add), and the exact error message.
#include "test_util.hpp"

#include <densegrad/ops/concat.hpp>

namespace test_concat {

using dg::Tensor;

namespace {
void concat_parity(const std::string& name, int64_t dim) {
  auto fx = dgtest::load_fixture<float>("misc");
  const std::string p = "concat." + name + ".";
  std::vector<Tensor<float>> xs;
  for (int i = 0; i < 3; ++i) xs.push_back(dgtest::get(fx, p + "x" + std::to_string(i)).detach().requires_grad_());
  Tensor<float> out = dg::concat(xs, dim);
  dgtest::require_close(out, dgtest::get(fx, p + "out"), 1e-5, 1e-6, p + "out");
  out.backward(dgtest::get(fx, p + "dout"));
  for (int i = 0; i < 3; ++i)
    dgtest::require_close(xs[i].grad(), dgtest::get(fx, p + "dx" + std::to_string(i)), 1e-5, 1e-6,
                          p + "dx" + std::to_string(i));
}

/// Splits fixture x, compares the three pieces, backpropagates their douts together.
template <class SplitArg>
void split_parity(const std::string& name, SplitArg arg, int64_t dim) {
  auto fx = dgtest::load_fixture<float>("misc");
  const std::string p = "split." + name + ".";
  Tensor<float> x = dgtest::get(fx, p + "x").detach().requires_grad_();
  std::vector<Tensor<float>> pieces = dg::split(x, arg, dim);
  REQUIRE(pieces.size() == 3);
  Tensor<float> loss;  // sum_i <piece_i, dout_i>: its gradient w.r.t. piece i is dout_i
  for (int i = 0; i < 3; ++i) {
    const std::string k = std::to_string(i);
    dgtest::require_close(pieces[i], dgtest::get(fx, p + "out" + k), 1e-5, 1e-6, p + "out" + k);
    Tensor<float> term = dg::sum(dg::mul(pieces[i], dgtest::get(fx, p + "dout" + k)));
    loss = loss.defined() ? dg::add(loss, term) : term;
  }
  loss.backward();
  dgtest::require_close(x.grad(), dgtest::get(fx, p + "dx"), 1e-5, 1e-6, p + "dx");
}
}  // namespace

TEST_CASE("concat gradcheck along dim 1, 0 and -1") {
  dg::Generator gen(21);
  auto r = [&](dg::Shape s) { return dg::randn<double>(s, gen).requires_grad_(); };
  // channels 1/3/5 with batch 1, as in a dense stage
  dgtest::require_gradcheck([](auto& v) { return dg::concat(v, 1); },
                            {r({1, 1, 3, 2}), r({1, 3, 3, 2}), r({1, 5, 3, 2})});
  dgtest::require_gradcheck([](auto& v) { return dg::concat(v, 0); }, {r({1, 2, 3}), r({3, 2, 3})});
  dgtest::require_gradcheck([](auto& v) { return dg::concat(v, -1); }, {r({3, 1}), r({3, 7}), r({3, 1})});
  // only some inputs need a gradient
  auto fixed = dg::randn<double>({3, 2}, gen);
  dgtest::require_gradcheck([](auto& v) { return dg::concat(v, 1); }, {r({3, 1}), fixed, r({3, 2})});
}

TEST_CASE("concat gradcheck with strided (non-contiguous) inputs") {
  dg::Generator gen(22);
  auto a = dg::randn<double>({2, 3, 4}, gen).requires_grad_(), b = dg::randn<double>({2, 3, 5}, gen).requires_grad_();
  dgtest::require_gradcheck([](auto& v) {
    // a permuted view (2, 4, 3) and a narrowed view (2, 3, 3), concatenated along dim 1
    return dg::concat<double>({v[0].permute({0, 2, 1}), v[1].narrow(2, 1, 3)}, 1);
  }, {a, b});
}

TEST_CASE("concat 3 inputs along dim 1 parity") { concat_parity("d1", 1); }
TEST_CASE("concat 3 inputs along dim 0 parity") { concat_parity("d0", 0); }
TEST_CASE("concat 3 inputs along dim -1 parity") { concat_parity("dm1", -1); }
TEST_CASE("split by size parity") { split_parity("size", int64_t{3}, 1); }
TEST_CASE("split by sizes parity") { split_parity("sizes", std::vector<int64_t>{1, 3, 1}, 0); }

TEST_CASE("concat one tensor feeding two concats gets summed gradients") {
  dg::Generator gen(23);
  auto a = dg::randn<float>({2, 3, 2, 2}, gen).requires_grad_();
  auto b = dg::randn<float>({2, 1, 2, 2}, gen).requires_grad_();
  auto c = dg::randn<float>({2, 2, 2, 2}, gen).requires_grad_();
  auto y1 = dg::concat({a, b}, 1);     // (2, 4, 2, 2): a in channels [0, 3)
  auto y2 = dg::concat({c, a, a}, 1);  // (2, 8, 2, 2): a in [2, 5) and [5, 8)
  auto d1 = dg::randn<float>(y1.shape(), gen), d2 = dg::randn<float>(y2.shape(), gen);
  auto loss = dg::add(dg::sum(dg::mul(y1, d1)), dg::sum(dg::mul(y2, d2)));
  loss.backward();
  auto expect = dg::add(dg::add(d1.narrow(1, 0, 3), d2.narrow(1, 2, 3)), d2.narrow(1, 5, 3));
  dgtest::require_close(a.grad(), expect);
  dgtest::require_close(b.grad(), d1.narrow(1, 3, 1).contiguous());
  dgtest::require_close(c.grad(), d2.narrow(1, 0, 2).contiguous());
  // and in double, by finite differences
  auto ad = dg::randn<double>({1, 2, 3}, gen).requires_grad_(), bd = dg::randn<double>({1, 1, 3}, gen).requires_grad_();
  dgtest::require_gradcheck([](auto& v) {
    return dg::add(dg::concat<double>({v[0], v[1]}, 1), dg::concat<double>({v[1], v[0]}, 1));
  }, {ad, bd});
}

TEST_CASE("concat values, dtypes and strided inputs") {
  auto a = dg::arange<float>(6).reshape({2, 3}), b = dg::arange<float>(6, 8).reshape({2, 1});
  REQUIRE(dg::concat({a, b}, 1).to_vector() == std::vector<float>{0, 1, 2, 6, 3, 4, 5, 7});
  REQUIRE(dg::concat<float>({a, a.narrow(0, 1, 1)}, 0).to_vector() == std::vector<float>{0, 1, 2, 3, 4, 5, 3, 4, 5});
  auto at = a.transpose(0, 1);  // (3, 2) strided
  REQUIRE(dg::concat<float>({at, at}, -1).to_vector() == std::vector<float>{0, 3, 0, 3, 1, 4, 1, 4, 2, 5, 2, 5});
  auto l = dg::concat<int64_t>({dg::tensor<int64_t>({1, 2}), dg::tensor<int64_t>({3})}, 0);  // labels
  REQUIRE(l.to_vector() == std::vector<int64_t>{1, 2, 3});
  auto e = dg::concat<float>({dg::zeros<float>({2, 0}), a}, 1);  // empty inputs are fine, like torch
  REQUIRE(e.shape() == dg::Shape{2, 3});
  REQUIRE(dg::concat<float>({a}, 0).storage().data() != a.storage().data());  // always a fresh tensor
}

TEST_CASE("split pieces are views with torch.split's sizes") {
  auto x = dg::arange<float>(14).reshape({2, 7});
  auto p = dg::split(x, 3, 1);
  REQUIRE(p.size() == 3);
  REQUIRE(p[0].shape() == dg::Shape{2, 3});
  REQUIRE(p[2].shape() == dg::Shape{2, 1});
  REQUIRE(p[2].to_vector() == std::vector<float>{6, 13});
  REQUIRE(p[1].storage().data() == x.storage().data());  // no copy
  REQUIRE(dg::split(x, 7, -1).size() == 1);
  REQUIRE(dg::split(x, 100, 1).size() == 1);
  auto q = dg::split(x, std::vector<int64_t>{2, 0, 5}, 1);
  REQUIRE(q[1].shape() == dg::Shape{2, 0});
  REQUIRE(q[2].to_vector() == std::vector<float>{2, 3, 4, 5, 6, 9, 10, 11, 12, 13});
  dgtest::require_close(dg::concat(q, 1), x);  // split then concat round-trips
  dg::Generator gen(24);
  auto xd = dg::randn<double>({3, 5}, gen).requires_grad_();
  dgtest::require_gradcheck([](auto& v) {
    auto s = dg::split(v[0], 2, 1);  // widths 2, 2, 1
    return dg::concat<double>({dg::mul(s[2], 3.0), s[0], dg::exp(s[1])}, 1);
  }, {xd});
}

TEST_CASE("concat and split errors") {
  auto big = [](dg::Shape s) { return Tensor<float>::empty(s); };
  REQUIRE_THROWS_WITH(dg::concat<float>({big({8, 64, 32, 32}), big({8, 32, 32, 32}), big({8, 32, 16, 16})}, 1),
                      "concat: sizes must match except in dim 1; input 2 of 3 has H=16, expected 32 "
                      "(shapes [8,64,32,32], [8,32,32,32], [8,32,16,16])");
  REQUIRE_THROWS_WITH(dg::concat<float>({big({2, 3}), big({4, 3})}, 1),
                      "concat: sizes must match except in dim 1; input 1 of 2 has dim 0=4, expected 2 "
                      "(shapes [2,3], [4,3])");
  REQUIRE_THROWS_WITH(dg::concat<float>({big({1, 2, 3, 4}), big({2, 2, 3, 4})}, -3),
                      Catch::Contains("input 1 of 2 has N=2, expected 1"));
  REQUIRE_THROWS_WITH(dg::concat<float>({big({2, 3}), big({2, 3, 1})}, 0),
                      "concat: all inputs must have the same number of dims; input 1 of 2 has 3, expected 2 "
                      "(shapes [2,3], [2,3,1])");
  REQUIRE_THROWS_WITH(dg::concat<float>({}, 0), Catch::Contains("expected a non-empty list"));
  REQUIRE_THROWS_WITH(dg::concat<float>({big({2, 3})}, 2), Catch::Contains("concat: dim 2 out of range"));
  REQUIRE_THROWS_WITH(dg::concat<float>({dg::scalar_tensor(1.f)}, 0), Catch::Contains("zero-dimensional"));
  auto x = big({2, 7});
  REQUIRE_THROWS_WITH(dg::split(x, 0, 1), Catch::Contains("split: split_size must be positive, got 0"));
  REQUIRE_THROWS_WITH(dg::split(x, std::vector<int64_t>{3, 3}, 1),
                      Catch::Contains("split: sizes [3, 3] add up to 6, but dim 1 has size 7"));
  REQUIRE_THROWS_WITH(dg::split(x, 2, 2), Catch::Contains("split: dim 2 out of range"));
}

}  // namespace test_concat
