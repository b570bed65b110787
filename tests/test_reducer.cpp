// tests/test_reducer.cpp: dist::Reducer's bookkeeping without MPI, against a simulated
// world in which every rank has this process's gradients: bucket layout, sums started during
// backward() in index order, set_sync(false) for gradient accumulation, parameters without a
// gradient, and misuse; and the DataLoader's shards, whose batch k together are the global batch k.
// The sums over real ranks are tested under mpiexec (test_dist.cpp).
#include "test_util.hpp"

#include <densegrad/dist/reducer.hpp>

#include <algorithm>
#include <string>
#include <vector>

namespace test_reducer {

using namespace dg;
using Catch::Contains;

namespace {
/// A world of `size` ranks that all hold this rank's buffers: a sum is the buffer times size.
/// Logs the slots in the order they were started, and whether a backward() was running.
class SimulatedCollective final : public dist::Collective {
 public:
  explicit SimulatedCollective(int size) : size_(size) {}
  int rank() const override { return 0; }
  int world_size() const override { return size_; }
  Device device() const override { return Device::cpu(); }
  void start_sum(void* data, int64_t count, DType dtype, int slot) override {
    REQUIRE(dtype == DType::Float32);
    float* p = static_cast<float*>(data);
    for (int64_t i = 0; i < count; ++i) p[i] *= static_cast<float>(size_);
    started.push_back(slot);
  }
  void wait(int slot) override {
    INFO("wait(" << slot << ") before start_sum");
    REQUIRE(std::find(started.begin(), started.end(), slot) != started.end());
    ++waits;
  }
  void check_uniform(int64_t, const std::string&) override {}
  std::vector<int> started;
  int waits = 0;

 private:
  int size_;
};

/// Three linear layers, 4 -> 8 -> 8 -> 3 (six parameters).
struct Mlp : nn::Module<float> {
  explicit Mlp(Generator& g) {
    l1 = register_module("l1", std::make_shared<nn::Linear<float>>(4, 8, true, g));
    l2 = register_module("l2", std::make_shared<nn::Linear<float>>(8, 8, true, g));
    l3 = register_module("l3", std::make_shared<nn::Linear<float>>(8, 3, true, g));
  }
  Tensor<float> forward(const Tensor<float>& x) { return l3->forward(relu(l2->forward(relu(l1->forward(x))))); }
  std::shared_ptr<nn::Linear<float>> l1, l2, l3;
};

std::vector<std::vector<float>> grads(const nn::Module<float>& m) {
  std::vector<std::vector<float>> r;
  for (const auto& p : m.parameters()) r.push_back(p.grad().defined() ? p.grad().to_vector() : std::vector<float>{});
  return r;
}
}  // namespace

TEST_CASE("Reducer: buckets hold parameters in reverse registration order, up to the cap", "[dist]") {
  Generator g(1);
  Mlp m(g);
  SimulatedCollective c(2);
  // l3.bias 3 + l3.weight 24 = 27 floats = 108 bytes >= 100: the first bucket closes there.
  dist::Reducer<float> r(m, c, dist::ReducerOptions().bucket_cap(100));
  REQUIRE(r.num_buckets() == 3);
  CHECK(r.bucket_names(0) == std::vector<std::string>{"l3.bias", "l3.weight"});
  CHECK(r.bucket_names(1) == std::vector<std::string>{"l2.bias", "l2.weight"});
  CHECK(r.bucket_names(2) == std::vector<std::string>{"l1.bias", "l1.weight"});
  dist::Reducer<float> one(m, c, dist::ReducerOptions().bucket_cap(int64_t(1) << 20));
  CHECK(one.num_buckets() == 1);
}

TEST_CASE("Reducer: every bucket starts during backward(), in index order, means of equal gradients", "[dist]") {
  Generator g(2);
  Mlp m(g);
  auto x = randn<float>({5, 4}, g);
  sum(pow(m.forward(x), 2.0)).backward();
  const auto local = grads(m);
  m.zero_grad();

  SimulatedCollective c(2);
  dist::Reducer<float> r(m, c, dist::ReducerOptions().bucket_cap(100));
  sum(pow(m.forward(x), 2.0)).backward();
  CHECK(c.started == std::vector<int>{0, 1, 2});  // all of them before finish()
  r.finish();
  CHECK(r.started_in_backward() == 3);
  CHECK(c.waits == 3);
  CHECK(grads(m) == local);  // (2 g) / 2 == g exactly
  // The next step starts from slot 0 again.
  m.zero_grad();
  sum(pow(m.forward(x), 2.0)).backward();
  r.finish();
  CHECK(c.started == std::vector<int>{0, 1, 2, 0, 1, 2});
  CHECK(grads(m) == local);
}

TEST_CASE("Reducer: buckets start in index order even when their gradients come in another", "[dist]") {
  // p0 is registered first but used last in forward: its gradient is ready first, yet its
  // bucket (the last one) must wait for bucket 0 (p1), as on every other rank.
  auto p0 = ones<float>({4}).requires_grad_(), p1 = full<float>({4}, 2.0f).requires_grad_();
  std::vector<std::pair<std::string, Tensor<float>>> params{{"p0", p0}, {"p1", p1}};
  SimulatedCollective c(2);
  dist::Reducer<float> r(params, c, dist::ReducerOptions().bucket_cap(4));
  REQUIRE(r.num_buckets() == 2);
  CHECK(r.bucket_names(0) == std::vector<std::string>{"p1"});
  std::vector<std::string> hooks;
  auto h0 = autograd::register_post_accumulate_grad_hook<float>(p0, [&](const Tensor<float>&) { hooks.push_back("p0"); });
  auto h1 = autograd::register_post_accumulate_grad_hook<float>(p1, [&](const Tensor<float>&) { hooks.push_back("p1"); });
  sum(pow(sum(p1 * 3.0) * p0, 2.0)).backward();
  CHECK(hooks == std::vector<std::string>{"p0", "p1"});
  CHECK(c.started == std::vector<int>{0, 1});
  r.finish();
  CHECK(r.started_in_backward() == 2);
}

TEST_CASE("Reducer: set_sync(false) accumulates locally, finish() reduces the sum (DDP no_sync)", "[dist]") {
  Generator g(3);
  Mlp m(g);
  std::vector<Tensor<float>> xs{randn<float>({3, 4}, g), randn<float>({3, 4}, g), randn<float>({3, 4}, g)};
  for (auto& x : xs) (sum(pow(m.forward(x), 2.0)) * (1.0 / 3)).backward();
  const auto local = grads(m);
  m.zero_grad();

  SimulatedCollective c(2);
  dist::Reducer<float> r(m, c, dist::ReducerOptions().bucket_cap(100));
  for (size_t i = 0; i < xs.size(); ++i) {
    r.set_sync(i + 1 == xs.size());
    (sum(pow(m.forward(xs[i]), 2.0)) * (1.0 / 3)).backward();
    CHECK(c.started.size() == (i + 1 == xs.size() ? 3u : 0u));  // only the last backward communicates
  }
  r.finish();
  CHECK(grads(m) == local);
  // Without sync at all, finish() starts every bucket itself.
  m.zero_grad();
  r.set_sync(false);
  sum(pow(m.forward(xs[0]), 2.0)).backward();
  r.finish();
  CHECK(r.started_in_backward() == 0);
  CHECK(c.started.size() == 6);
}

TEST_CASE("Reducer: a parameter without a gradient keeps none, a second backward before finish() is an error", "[dist]") {
  Generator g(4);
  Mlp m(g);
  SimulatedCollective c(2);
  dist::Reducer<float> r(m, c, dist::ReducerOptions().bucket_cap(100));
  // Only l1 and l2 take part: l3's parameters get no gradient anywhere.
  auto x = randn<float>({2, 4}, g);
  sum(m.l2->forward(relu(m.l1->forward(x)))).backward();
  CHECK(c.started.empty());  // bucket 0 (l3) never fills during backward()
  r.finish();
  CHECK(c.started == std::vector<int>{0, 1, 2});
  CHECK_FALSE(m.l3->weight.grad().defined());
  CHECK_FALSE(m.l3->bias.grad().defined());
  CHECK(m.l1->weight.grad().defined());

  m.zero_grad();
  r.set_sync(true);
  sum(m.forward(x)).backward();
  REQUIRE_THROWS_WITH(sum(m.forward(x)).backward(), Contains("got a second gradient before finish()"));
  r.finish();  // the first backward's buckets are all started: finish() completes the step
}

TEST_CASE("Reducer: in a world of one it does nothing", "[dist]") {
  Generator g(5);
  Mlp m(g);
  SimulatedCollective c(1);
  dist::Reducer<float> r(m, c);
  auto x = randn<float>({2, 4}, g);
  sum(m.forward(x)).backward();
  const auto local = grads(m);
  sum(m.forward(x)).backward();  // no hooks: a second backward is fine
  r.finish();
  CHECK(c.started.empty());
  CHECK(c.waits == 0);
  CHECK(grads(m) != local);  // accumulated twice, untouched by finish()
}

TEST_CASE("DataLoader shards: the ranks' batch k together are the single-process batch k of P x B", "[dist]") {
  data::Dataset set = data::make_synthetic(data::SyntheticOptions().samples(96).with_seed(5));
  const int64_t B = 4, P = 3;
  auto options = data::LoaderOptions().batch(B).with_seed(9).drop_last_batch(true);
  data::DataLoader single(set, data::LoaderOptions(options).batch(P * B));
  for (int64_t epoch : {0, 1}) {
    const std::vector<int64_t> order = single.epoch_indices(epoch);
    for (int64_t k = 0; k < single.size(); ++k) {
      std::vector<int64_t> want(order.begin() + k * P * B, order.begin() + (k + 1) * P * B), got;
      for (int64_t r = 0; r < P; ++r) {
        data::DataLoader shard(set, data::LoaderOptions(options).shard(r, P));
        REQUIRE(shard.size() == single.size());
        const data::Batch b = shard.make_batch(epoch, k, shard.epoch_indices(epoch));
        got.insert(got.end(), b.indices.begin(), b.indices.end());
      }
      std::sort(want.begin(), want.end());
      std::sort(got.begin(), got.end());
      INFO("epoch " << epoch << " batch " << k);
      CHECK(got == want);
    }
  }
}

}  // namespace test_reducer
