// tests/test_profiler.cpp: dg::autograd::Profiler (autograd/profiler.hpp): which ops land on
// which row and how often, in forward and backward; rows by input shapes; scopes; checkpoint()'s
// recomputation counted inside its node; one profiler per thread; the table. Times are only
// checked for what holds on any machine: they are never negative and they fit in the wall time.
#include "test_util.hpp"

#include <map>
#include <string>
#include <thread>
#include <vector>

namespace test_profiler {

using namespace dg;
using Catch::Contains;
using autograd::ProfileRow;

/// The rows by name (and shapes, when recorded): "name" or "name shapes".
std::map<std::string, ProfileRow> by_key(const autograd::Profiler& p) {
  std::map<std::string, ProfileRow> m;
  for (const ProfileRow& r : p.rows()) m[r.shapes.empty() ? r.name : r.name + " " + r.shapes] = r;
  return m;
}

/// Each row's times are >= 0 and all of them together fit in the profiler's wall time.
void check_times(const autograd::Profiler& p) {
  double sum = 0;
  for (const ProfileRow& r : p.rows()) {
    CHECK(r.forward_ms >= 0);
    CHECK(r.backward_ms >= 0);
    sum += r.total_ms();
  }
  CHECK(sum <= p.wall_ms() + 1e-9);
}

TEST_CASE("profiler: each op's forward and backward calls land on its row", "[profiler]") {
  Generator g(1);
  auto x = randn<float>({4, 5}, g).requires_grad_();
  auto w = randn<float>({5, 3}, g).requires_grad_();
  autograd::Profiler prof;
  for (int step = 0; step < 2; ++step) {
    auto y = gelu(matmul(x, w));
    auto loss = sum(mul(y, y));
    loss.backward();
  }
  prof.stop();
  auto rows = by_key(prof);
  for (const char* op : {"bmm", "gelu", "mul", "sum"}) {
    INFO(op);
    REQUIRE(rows.count(op) == 1);
    CHECK(rows[op].forward_calls == 2);
    CHECK(rows[op].backward_calls == 2);
  }
  // The time between the loss and the start of backward (the graph walk) is nobody's op.
  REQUIRE(rows.count("(between ops)") == 1);
  CHECK(rows["(between ops)"].backward_calls == 0);
  check_times(prof);
  // Stopped: later ops are not counted, the rows stay.
  auto z = gelu(x);
  CHECK(by_key(prof)["gelu"].forward_calls == 2);
}

TEST_CASE("profiler: ops run without grad count in forward only", "[profiler]") {
  Generator g(2);
  auto x = randn<double>({3, 3}, g);
  autograd::Profiler prof;
  {
    NoGradGuard no_grad;
    auto y = relu(add(x, x));
  }
  auto rows = by_key(prof);
  REQUIRE(rows.count("relu") == 1);
  CHECK(rows["relu"].forward_calls == 1);
  CHECK(rows["relu"].backward_calls == 0);
  CHECK(rows["add"].forward_calls == 1);
  check_times(prof);
}

TEST_CASE("profiler: record_shapes gives one row per op and input shapes", "[profiler]") {
  Generator g(3);
  auto a = randn<float>({2, 3}, g).requires_grad_(), b = randn<float>({4, 1}, g).requires_grad_();
  autograd::ProfilerOptions opts;
  opts.record_shapes = true;
  autograd::Profiler prof(opts);
  auto loss = add(sum(mul(a, a)), sum(mul(b, b)));
  loss.backward();
  auto rows = by_key(prof);
  REQUIRE(rows.count("mul [2, 3] [2, 3]") == 1);
  REQUIRE(rows.count("mul [4, 1] [4, 1]") == 1);
  CHECK(rows["mul [2, 3] [2, 3]"].forward_calls == 1);
  CHECK(rows["mul [2, 3] [2, 3]"].backward_calls == 1);  // backward lands on the forward's row
  CHECK(rows["mul [4, 1] [4, 1]"].backward_calls == 1);
  CHECK(rows.count("mul") == 0);
  const std::string t = prof.table();
  CHECK_THAT(t, Contains("| mul [4, 1] [4, 1] |"));
}

TEST_CASE("profiler: a scope is one row, and the ops inside are its time", "[profiler]") {
  Generator g(4);
  auto x = randn<float>({8}, g);
  {
    autograd::ProfileScope no_profiler("nothing");  // no profiler on this thread: does nothing
    auto y = exp(x);
  }
  autograd::Profiler prof;
  for (int i = 0; i < 3; ++i) {
    autograd::ProfileScope s("region");
    auto y = exp(mul(x, x));
    autograd::ProfileScope inner("inner");  // nested: counted in "region" only
    auto z = exp(y);
  }
  auto y = exp(x);
  auto rows = by_key(prof);
  REQUIRE(rows.count("region") == 1);
  CHECK(rows["region"].forward_calls == 3);
  CHECK(rows.count("inner") == 0);
  CHECK(rows.count("mul") == 0);
  REQUIRE(rows.count("exp") == 1);
  CHECK(rows["exp"].forward_calls == 1);  // only the one outside the scopes
  CHECK(rows.count("nothing") == 0);
  check_times(prof);
}

TEST_CASE("profiler: checkpoint() recomputation counts towards its backward node", "[profiler]") {
  Generator g(5);
  auto x = randn<double>({3, 4}, g).requires_grad_();
  auto w = randn<double>({4, 4}, g).requires_grad_();
  autograd::Profiler prof;
  auto y = checkpoint([&](const std::vector<Tensor<double>>& in) { return gelu(matmul(in[0], w)); }, {x});
  sum(y).backward();
  auto rows = by_key(prof);
  // Forward: fn's ops ran once (not recorded, but profiled), then the checkpoint node.
  CHECK(rows["gelu"].forward_calls == 1);
  CHECK(rows["bmm"].forward_calls == 1);
  REQUIRE(rows.count("checkpoint") == 1);
  CHECK(rows["checkpoint"].forward_calls == 1);
  CHECK(rows["checkpoint"].backward_calls == 1);
  // Backward: the recomputed forward and its inner backward are the checkpoint node's time.
  CHECK(rows["gelu"].backward_calls == 0);
  CHECK(rows["bmm"].backward_calls == 0);
  CHECK(x.grad().defined());
  CHECK(w.grad().defined());
  check_times(prof);
}

TEST_CASE("profiler: one per thread, and each thread profiles its own ops", "[profiler]") {
  Generator g(6);
  auto x = randn<float>({16}, g);
  {
    autograd::Profiler first;
    CHECK_THROWS_WITH(autograd::Profiler(), Contains("this thread already has a running profiler"));
    std::map<std::string, ProfileRow> other_rows;
    std::thread t([&] {
      autograd::Profiler other;  // another thread: allowed
      auto y = sqrt(abs(x));
      other_rows = by_key(other);
    });
    t.join();
    auto z = exp(x);
    auto rows = by_key(first);
    CHECK(rows.count("sqrt") == 0);
    CHECK(rows["exp"].forward_calls == 1);
    CHECK(other_rows["sqrt"].forward_calls == 1);
    CHECK(other_rows.count("exp") == 0);
  }
  autograd::Profiler again;  // the first one has ended: a new one may start
  CHECK(again.rows().empty());
}

TEST_CASE("profiler: the table lists the rows by total time, per step, and sums the rest", "[profiler]") {
  Generator g(7);
  auto x = randn<float>({32, 32}, g).requires_grad_();
  autograd::Profiler prof;
  for (int i = 0; i < 4; ++i) sum(relu(exp(neg(x)))).backward();
  prof.stop();
  const auto rows = prof.rows();
  REQUIRE(rows.size() >= 4);
  for (size_t i = 1; i < rows.size(); ++i) CHECK(rows[i - 1].total_ms() >= rows[i].total_ms());
  const std::string all = prof.table(40, 4);
  CHECK_THAT(all, Contains("| op | forward ms/step | calls/step |"));
  CHECK_THAT(all, Contains("| **all** |"));
  CHECK_THAT(all, Contains(" | 1 | "));  // each op once per step
  const std::string two = prof.table(2);
  CHECK_THAT(two, Contains("(" + std::to_string(rows.size() - 2) + " more rows)"));
  CHECK_THAT(two, Contains("| " + rows[0].name + " |"));
  CHECK_THROWS_WITH(prof.table(10, 0), Contains("expected per >= 1, got 0"));
}

}  // namespace test_profiler
