// tests/test_autograd.cpp: the tape engine: which tensors record, backward() and its errors,
// accumulation, detach/NoGradGuard, graph shapes (shared inputs, diamonds, deep chains),
// memory release, one tape per thread, and gradcheck itself. Per-op gradients are in the
// family files (test_elementwise.cpp, test_reduce.cpp, ...).
#include "test_util.hpp"

#include <thread>
#include <vector>

namespace test_autograd {

using namespace dg;
using Catch::Contains;

namespace {
size_t live() { return autograd::Tape::current().live_nodes(); }

template <class T>
std::vector<double> values(const Tensor<T>& t) {
  std::vector<double> r;
  for (T v : t.to_vector()) r.push_back(static_cast<double>(v));
  return r;
}

/// x^2 with a backward that is off by `factor` (1 = correct): a custom op written the way
/// users write theirs, to show that gradcheck catches a wrong backward.
Tensor<double> square_with_factor(const Tensor<double>& x, double factor) {
  Tensor<double> out = ref::map(x, [](double v) { return v * v; });
  // saves x: d(x^2)/dx = 2x
  return autograd::record("square_with_factor", out, {x}, [x = x.detach(), factor](const Tensor<double>& dout) {
    return std::vector<Tensor<double>>{mul(mul(dout, x), 2.0 * factor)};
  });
}

/// A small two-layer computation from a seed: returns the gradients of both parameters.
std::vector<std::vector<double>> train_step(uint64_t seed) {
  Generator g(seed);
  auto w1 = randn<double>({4, 5}, g).requires_grad_(), w2 = randn<double>({5, 2}, g).requires_grad_();
  auto x = randn<double>({3, 4}, g);
  for (int it = 0; it < 20; ++it) {  // several backward calls: gradients accumulate
    auto h = exp(mul(matmul(x, w1), 0.1));
    auto loss = sum(pow(matmul(h, w2), 2.0)) + mean(abs(w1));
    loss.backward();
  }
  return {w1.grad().to_vector(), w2.grad().to_vector()};
}
}  // namespace

TEST_CASE("requires_grad: leaves opt in, op outputs inherit, errors for misuse", "[autograd]") {
  auto a = ones<float>({2});
  auto b = ones<float>({2});
  CHECK_FALSE(a.requires_grad());
  CHECK_FALSE((a + b).requires_grad());
  CHECK((a + b).is_leaf());  // nothing recorded: no input requires grad
  a.requires_grad_();
  auto c = a + b;
  CHECK(c.requires_grad());
  CHECK_FALSE(c.is_leaf());
  CHECK(c.grad_fn_name() == "add");
  CHECK(a.is_leaf());
  CHECK(a.grad_fn_name().empty());
  REQUIRE_THROWS_WITH(c.requires_grad_(), Contains("can only be changed on a leaf"));
  REQUIRE_THROWS_WITH(zeros<int64_t>({2}).requires_grad_(), Contains("only floating point"));
  a.requires_grad_(false);
  CHECK_FALSE((a * b).requires_grad());
}

TEST_CASE("backward on a scalar fills the leaves' grads", "[autograd]") {
  auto x = tensor<double>({1, 2, 3}).requires_grad_();
  auto w = tensor<double>({4, 5, 6}).requires_grad_();
  auto y = sum(x * w + x);  // dy/dx = w + 1, dy/dw = x
  y.backward();
  CHECK(values(x.grad()) == std::vector<double>{5, 6, 7});
  CHECK(values(w.grad()) == std::vector<double>{1, 2, 3});
  CHECK_FALSE((x * w).grad().defined());  // non-leaf tensors keep no .grad, like torch
  // a leaf as root: its gradient is the given one
  auto z = tensor<double>({1, 2}).requires_grad_();
  z.backward(tensor<double>({3, 4}));
  CHECK(values(z.grad()) == std::vector<double>{3, 4});
}

TEST_CASE("backward with an explicit gradient, and its errors", "[autograd]") {
  auto x = tensor<float>({1, 2, 3, 4}, {2, 2}).requires_grad_();
  auto y = x * x;
  REQUIRE_THROWS_WITH(y.backward(), Contains("implied only for a scalar output; got shape [2, 2]"));
  REQUIRE_THROWS_WITH(y.backward(ones<float>({4})), Contains("grad has shape [4], output has shape [2, 2]"));
  REQUIRE_THROWS_WITH(ones<float>({1}).backward(), Contains("does not require grad"));
  y.backward(tensor<float>({1, 0, 2, 1}, {2, 2}));  // vector-Jacobian product: dout * 2x
  CHECK(values(x.grad()) == std::vector<double>{2, 0, 12, 8});
}

TEST_CASE("gradients accumulate over backward calls until zero_grad", "[autograd]") {
  auto x = tensor<double>({1, -2}).requires_grad_();
  sum(x * 3.0).backward();
  sum(x * x).backward();  // a second graph on the same leaf: 3 + 2x
  CHECK(values(x.grad()) == std::vector<double>{5, -1});
  auto g = x.grad();
  sum(x).backward();  // accumulates in place into the same buffer, like torch
  CHECK(values(g) == std::vector<double>{6, 0});
  x.zero_grad();
  CHECK_FALSE(x.grad().defined());
  sum(x * 2.0).backward();
  CHECK(values(x.grad()) == std::vector<double>{2, 2});
}

TEST_CASE("detach stops gradients and shares storage", "[autograd]") {
  auto x = tensor<double>({2, 3}).requires_grad_();
  auto d = (x * x).detach();
  CHECK_FALSE(d.requires_grad());
  CHECK(d.is_leaf());
  auto y = sum(x * d);  // d is a constant: dy/dx = d = x^2
  y.backward();
  CHECK(values(x.grad()) == std::vector<double>{4, 9});
  CHECK(x.detach().storage().is_alias_of(x.storage()));
}

TEST_CASE("NoGradGuard records nothing and restores the previous mode", "[autograd]") {
  auto x = ones<float>({3}).requires_grad_();
  const size_t before = live();
  {
    NoGradGuard g;
    CHECK_FALSE(is_grad_enabled());
    auto y = exp(x * 2.0) + x;
    CHECK_FALSE(y.requires_grad());
    CHECK(y.is_leaf());
    CHECK(live() == before);
    {
      NoGradGuard inner;
    }
    CHECK_FALSE(is_grad_enabled());  // the inner guard restores "off", not "on"
  }
  CHECK(is_grad_enabled());
  CHECK((x * 2.0).requires_grad());
}

TEST_CASE("a tensor used twice gets the sum of both gradients", "[autograd]") {
  auto x = tensor<double>({1, 2, 3}).requires_grad_();
  auto y = x * x;  // x feeds mul through both operands
  y.backward(ones<double>({3}));
  CHECK(values(x.grad()) == std::vector<double>{2, 4, 6});
  x.zero_grad();
  auto a = x.slice(0, 0, 2), b = x.slice(0, 1, 3);  // two overlapping views of one tensor
  sum(a * 10.0 + b).backward();
  CHECK(values(x.grad()) == std::vector<double>{10, 11, 1});
}

TEST_CASE("diamond graph: both paths contribute", "[autograd]") {
  // x -> a = 2x, b = x^2 -> y = a * b = 2x^3: dy/dx = 6x^2
  auto x = tensor<double>({1, 2, -3}).requires_grad_();
  auto a = x * 2.0, b = pow(x, 2.0);
  auto y = a * b;
  auto z = sum(y + y);  // a second diamond on top: dz/dx = 12x^2
  z.backward();
  CHECK(values(x.grad()) == std::vector<double>{12, 48, 108});
  dgtest::require_gradcheck(
      [](const auto& v) {
        auto m = exp(v[0]);
        return sum(m * sqrt(m) + log(m) * v[1], {1});
      },
      {tensor<double>({0.1, 0.2, -0.3, 0.4, 0.5, 0.6}, {2, 3}).requires_grad_(),
       tensor<double>({1, 2, 3}).requires_grad_()});
}

TEST_CASE("deep chains: backward and destruction without stack overflow", "[autograd]") {
  const size_t before = live();
  auto x = tensor<double>({1.0, 2.0}).requires_grad_();
  {
    auto y = x;
    for (int i = 0; i < 10000; ++i) y = y * 1.0001 + 0.5;  // 20000 nodes
    sum(y).backward();
    CHECK(x.grad().at({0}) == Approx(std::pow(1.0001, 10000)).epsilon(1e-10));
  }
  {
    // never backpropagated: the chain is torn down node by node when y goes away (a recursive
    // teardown overflows an 8 MB stack here)
    auto y = x;
    for (int i = 0; i < 50000; ++i) y = exp(y * 1e-9);
    CHECK(live() == before + 100000);
  }
  CHECK(live() == before);
}

TEST_CASE("backward twice needs retain_graph", "[autograd]") {
  auto x = tensor<double>({1, 2}).requires_grad_();
  auto y = sum(exp(x));
  y.backward();
  REQUIRE_THROWS_WITH(y.backward(), Contains("a second time") && Contains("retain_graph=true"));
  x.zero_grad();
  auto z = sum(exp(x));
  z.backward(Tensor<double>(), /*retain_graph=*/true);
  z.backward();  // works, and accumulates: 2 exp(x)
  CHECK(x.grad().at({1}) == Approx(2 * std::exp(2.0)));
  REQUIRE_THROWS_WITH(z.backward(), Contains("'sum' a second time"));
}

TEST_CASE("backward frees saved tensors: live nodes and storage use counts drop", "[autograd]") {
  const size_t before = live();
  auto x = tensor<double>({1, 2, 3}).requires_grad_();
  auto w = tensor<double>({4, 5, 6}).requires_grad_();
  auto e = exp(x);      // saves its output e
  auto p = e * w;       // saves e and w
  auto loss = sum(p);
  CHECK(live() == before + 3);
  CHECK(e.storage().use_count() == 3);  // e itself + exp's saved output + mul's saved operand
  CHECK(w.storage().use_count() >= 2);
  loss.backward();
  CHECK(live() == before);
  CHECK(e.storage().use_count() == 1);
  CHECK(w.storage().use_count() == 1);
  CHECK(x.storage().use_count() == 1);
  // a retained graph stays alive until its tensors go away
  {
    auto l2 = sum(exp(x) * w);
    l2.backward(Tensor<double>(), true);
    CHECK(live() == before + 3);
  }
  CHECK(live() == before);
}

TEST_CASE("a node keeps edges to its inputs, not their values: an input its backward does not read is freed",
          "[autograd]") {
  Generator gen(5);
  auto x = randn<float>({64, 32}, gen).requires_grad_();
  const size_t bytes = static_cast<size_t>(x.numel()) * sizeof(float);
  const size_t before = cpu_memory_allocated();
  Tensor<float> y, twice;
  {
    Tensor<float> h = x * 3.0;  // mul by a constant and add of one save nothing for backward
    y = h + 1.0;
    twice = h + h;              // an op's output used twice by one node
    CHECK(cpu_memory_allocated() - before == 3 * bytes);
  }
  // h's bytes went with its last handle: y's and twice's nodes hold only its place in the graph
  CHECK(cpu_memory_allocated() - before == 2 * bytes);
  CHECK(y.grad_fn_name() == "add_scalar");
  (sum(y) + sum(twice)).backward();
  CHECK(values(x.grad()) == std::vector<double>(static_cast<size_t>(x.numel()), 9.0));  // 3 + 2 * 3
  // inputs that require no grad are not kept either; leaves are (their .grad lives there)
  Tensor<float> c = randn<float>({64, 32}, gen);
  const size_t c_uses = c.storage().use_count(), x_uses = x.storage().use_count();
  Tensor<float> z = x * c;  // mul keeps c for x's gradient, and not x (c needs no gradient)
  CHECK(c.storage().use_count() == c_uses + 1);
  CHECK(x.storage().use_count() == x_uses);
  x.zero_grad();
  sum(z).backward();
  CHECK(c.storage().use_count() == c_uses);
  CHECK(values(x.grad()) == values(c));
}

TEST_CASE("one tape per thread: concurrent graphs give the sequential results", "[autograd][threads]") {
  auto seq1 = train_step(1), seq2 = train_step(2);
  std::vector<std::vector<double>> par1, par2;
  size_t live1 = 1, live2 = 1;
  std::thread t1([&] { par1 = train_step(1); live1 = live(); });
  std::thread t2([&] { par2 = train_step(2); live2 = live(); });
  t1.join();
  t2.join();
  CHECK(par1 == seq1);  // bit-identical: each thread has its own tape and grad mode
  CHECK(par2 == seq2);
  CHECK(live1 == 0);
  CHECK(live2 == 0);
  // grad mode is per thread too
  NoGradGuard g;
  bool other_enabled = false;
  std::thread([&] { other_enabled = is_grad_enabled(); }).join();
  CHECK(other_enabled);
}

TEST_CASE("in-place changes of a tensor requiring grad throw while recording", "[autograd][errors]") {
  auto x = ones<float>({3}).requires_grad_();
  REQUIRE_THROWS_WITH(x.fill_(2.f), Contains("fill_: in-place change of a tensor that requires grad"));
  REQUIRE_THROWS_WITH(x.copy_(zeros<float>({3})), Contains("copy_: in-place change"));
  auto y = x * 2.0;
  REQUIRE_THROWS_WITH(y.zero_(), Contains("NoGradGuard"));
  REQUIRE_THROWS_WITH(x.slice(0, 0, 2).fill_(0.f), Contains("in-place"));  // a view records too
  {
    NoGradGuard g;  // how optimizers update parameters
    x.fill_(2.f);
  }
  x.detach().fill_(3.f);
  CHECK(values(x) == std::vector<double>{3, 3, 3});
}

TEST_CASE("gradcheck catches a wrong backward in a custom op", "[autograd][gradcheck]") {
  auto x = tensor<double>({0.5, -1.25, 2.0}, {3}).requires_grad_();
  auto good = gradcheck([](const auto& v) { return square_with_factor(v[0], 1.0); }, {x});
  CHECK(good.ok);
  CHECK(good.max_abs_error < 1e-6);
  auto bad = gradcheck([](const auto& v) { return square_with_factor(v[0], 1.5); }, {x});
  CHECK_FALSE(bad.ok);
  CHECK_FALSE(static_cast<bool>(bad));
  CHECK_THAT(bad.message, Contains("gradcheck: input 0 element 0") && Contains("analytical 1.5 vs numerical 1"));
  CHECK(bad.max_abs_error == Approx(0.5 * 2 * 2.0));  // worst element: x = 2, off by 0.5 * 2x
  // gradcheck works on copies: the caller's tensor and its grad are untouched
  CHECK(values(x) == std::vector<double>{0.5, -1.25, 2.0});
  CHECK_FALSE(x.grad().defined());
  // a function that ignores its inputs is reported, not silently passed
  REQUIRE_THROWS_WITH(gradcheck([](const auto&) { return ones<double>({2}); }, {x}),
                      Contains("does not depend on any input"));
}

TEST_CASE("gradients flow through dtype conversions and only into inputs that need them", "[autograd]") {
  auto x = tensor<float>({1, 2}).requires_grad_();
  auto y = sum(x.to<double>() * 3.0);
  y.backward();
  CHECK(x.grad().dtype() == DType::Float32);
  CHECK(values(x.grad()) == std::vector<double>{3, 3});
  auto h = tensor<float>({0.5f, 4.f}).requires_grad_();
  sum(h.to<bfloat16>() * 2.0).backward();
  CHECK(values(h.grad()) == std::vector<double>{2, 2});
  auto c = tensor<double>({1, 2});  // a constant operand: no gradient is made for it
  auto p = tensor<double>({3, 4}).requires_grad_();
  sum(p * c).backward();
  CHECK_FALSE(c.grad().defined());
  REQUIRE_THROWS_WITH(x.to<int64_t>(), Contains("not differentiable"));
}

}  // namespace test_autograd
