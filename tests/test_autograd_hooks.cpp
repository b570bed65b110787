// tests/test_autograd_hooks.cpp: post-accumulate-grad hooks (autograd/tape.hpp): when they run
// (once per backward(), after the last edge into their leaf), in what order, what .grad() holds
// then, with checkpoint() and a leaf as the root, removal through the handle, and misuse errors.
#include "test_util.hpp"

#include <string>
#include <vector>

namespace test_autograd_hooks {

using namespace dg;
using Catch::Contains;

TEST_CASE("post-accumulate-grad hook: once per backward, when the leaf's gradient is complete", "[autograd][hooks]") {
  Generator g(1);
  auto w = randn<double>({3, 4}, g).requires_grad_();
  auto x1 = randn<double>({2, 3}, g), x2 = randn<double>({2, 3}, g);
  int calls = 0;
  std::vector<double> seen;  // .grad() at the time of the hook
  auto h = autograd::register_post_accumulate_grad_hook<double>(w, [&](const Tensor<double>& p) {
    ++calls;
    seen = p.grad().to_vector();
  });
  // w feeds two matmuls: its gradient is the sum of both, and the hook must see that sum.
  auto loss = sum(pow(matmul(x1, w), 2.0)) + sum(matmul(x2, w));
  loss.backward();
  CHECK(calls == 1);
  CHECK(seen == w.grad().to_vector());
  // A second backward accumulates: the hook runs again and sees the total.
  (sum(matmul(x2, w)) * 3.0).backward();
  CHECK(calls == 2);
  CHECK(seen == w.grad().to_vector());
}

TEST_CASE("post-accumulate-grad hooks run in reverse order of use: the last layer's first", "[autograd][hooks]") {
  Generator g(2);
  auto w1 = randn<float>({4, 5}, g).requires_grad_(), w2 = randn<float>({5, 3}, g).requires_grad_();
  auto w3 = randn<float>({3, 2}, g).requires_grad_();
  std::vector<std::string> order;
  auto h1 = autograd::register_post_accumulate_grad_hook<float>(w1, [&](const Tensor<float>&) { order.push_back("w1"); });
  auto h2 = autograd::register_post_accumulate_grad_hook<float>(w2, [&](const Tensor<float>&) { order.push_back("w2"); });
  auto h3 = autograd::register_post_accumulate_grad_hook<float>(w3, [&](const Tensor<float>&) { order.push_back("w3"); });
  auto x = randn<float>({6, 4}, g);
  sum(matmul(relu(matmul(relu(matmul(x, w1)), w2)), w3)).backward();
  CHECK(order == std::vector<std::string>{"w3", "w2", "w1"});
}

TEST_CASE("post-accumulate-grad hook: a leaf as the root, and a leaf no gradient reaches", "[autograd][hooks]") {
  auto w = ones<float>({2, 2}).requires_grad_();
  auto unused = ones<float>({2}).requires_grad_();
  int calls = 0, unused_calls = 0;
  auto h = autograd::register_post_accumulate_grad_hook<float>(w, [&](const Tensor<float>&) { ++calls; });
  auto hu = autograd::register_post_accumulate_grad_hook<float>(unused, [&](const Tensor<float>&) { ++unused_calls; });
  w.backward(full<float>({2, 2}, 2.0f));  // backward() of a leaf: its gradient is the given one
  CHECK(calls == 1);
  CHECK(w.grad().to_vector() == std::vector<float>(4, 2.0f));
  sum(w * 2.0).backward();
  CHECK(calls == 2);
  CHECK(unused_calls == 0);  // not in either graph
}

TEST_CASE("post-accumulate-grad hook: inside checkpoint(), from the recomputation's backward", "[autograd][hooks]") {
  Generator g(3);
  auto w = randn<double>({4, 4}, g).requires_grad_();
  auto x = randn<double>({3, 4}, g).requires_grad_();
  int calls = 0;
  std::vector<double> seen;
  auto h = autograd::register_post_accumulate_grad_hook<double>(w, [&](const Tensor<double>& p) {
    ++calls;
    seen = p.grad().to_vector();
  });
  auto y = checkpoint([&](const std::vector<Tensor<double>>& in) { return gelu(matmul(in[0], w)); }, {x});
  sum(pow(y, 2.0)).backward();
  CHECK(calls == 1);
  CHECK(seen == w.grad().to_vector());
  // The same numbers as without checkpoint().
  std::vector<double> with_ckpt = w.grad().to_vector();
  w.zero_grad();
  sum(pow(gelu(matmul(x, w)), 2.0)).backward();
  CHECK(calls == 2);
  CHECK(w.grad().to_vector() == with_ckpt);
}

TEST_CASE("post-accumulate-grad hook: the handle removes it, moved handles keep it", "[autograd][hooks]") {
  auto w = ones<float>({3}).requires_grad_();
  int calls = 0;
  {
    auto h = autograd::register_post_accumulate_grad_hook<float>(w, [&](const Tensor<float>&) { ++calls; });
    autograd::HookHandle moved = std::move(h);
    sum(w * 2.0).backward();
    CHECK(calls == 1);
    moved.remove();
    moved.remove();  // a second remove() does nothing
    sum(w * 2.0).backward();
    CHECK(calls == 1);
    auto again = autograd::register_post_accumulate_grad_hook<float>(w, [&](const Tensor<float>&) { ++calls; });
    sum(w * 2.0).backward();
    CHECK(calls == 2);
  }  // `again` goes out of scope: unregistered
  sum(w * 2.0).backward();
  CHECK(calls == 2);
}

TEST_CASE("post-accumulate-grad hook: only on leaves that require grad", "[autograd][hooks]") {
  auto w = ones<float>({3});
  REQUIRE_THROWS_WITH(autograd::register_post_accumulate_grad_hook<float>(w, [](const Tensor<float>&) {}),
                      Contains("expected a leaf tensor that requires grad"));
  w.requires_grad_();
  auto y = w * 2.0;  // not a leaf
  REQUIRE_THROWS_WITH(autograd::register_post_accumulate_grad_hook<float>(y, [](const Tensor<float>&) {}),
                      Contains("expected a leaf tensor that requires grad"));
  REQUIRE_THROWS_WITH(autograd::register_post_accumulate_grad_hook<float>(w, nullptr), Contains("the hook is empty"));
}

}  // namespace test_autograd_hooks
