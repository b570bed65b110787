// tests/dist/test_dist.cpp: dg::dist over real MPI ranks, run as `mpiexec -n 2 test_dist`:
// broadcast, parameter broadcast and its model check, small collectives, evaluation shards, and
// the Reducer's bucket sums against a manual sum over the ranks, up to an RDNet whose averaged
// gradients equal one process's gradients for the global batch. Every test case makes the same
// collective calls on every rank (in the same order), so a failed CHECK never leaves a rank waiting.
// With --inject-failure throw|abort instead of Catch2's options, it runs no test cases but a short
// data-parallel training in which rank 1 fails at step 3, for the CTest tests that the whole job
// then ends, at once, with a clear error (dist_fail_throw, dist_fail_abort):
//   mpiexec -n 2 test_dist --inject-failure throw  # rank 1 throws dg::Error: one line naming
//                                                  # the rank, then MPI_Abort
//   mpiexec -n 2 test_dist --inject-failure abort  # rank 1 calls std::abort(): the launcher
//                                                  # ends the other ranks
// Rank 0 is inside a collective (the bucket sums of step 3) when rank 1 fails; without the abort it
// would wait there forever.
#define CATCH_CONFIG_RUNNER
#include "../test_util.hpp"

#include <densegrad/dist/dist.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "rdnet/rdnet.hpp"

using namespace dg;
using Catch::Contains;

namespace {
/// Three linear layers, 4 -> 8 -> 8 -> 3, plus `extra`, a head that only some ranks use.
struct Mlp : nn::Module<float> {
  explicit Mlp(Generator& g) {
    l1 = register_module("l1", std::make_shared<nn::Linear<float>>(4, 8, true, g));
    l2 = register_module("l2", std::make_shared<nn::Linear<float>>(8, 8, true, g));
    l3 = register_module("l3", std::make_shared<nn::Linear<float>>(8, 3, true, g));
    extra = register_module("extra", std::make_shared<nn::Linear<float>>(8, 2, true, g));
  }
  Tensor<float> hidden(const Tensor<float>& x) { return relu(l2->forward(relu(l1->forward(x)))); }
  std::shared_ptr<nn::Linear<float>> l1, l2, l3, extra;
};

/// Every gradient element, in parameter order (an undefined gradient adds nothing).
std::vector<float> flat_grads(const nn::Module<float>& m) {
  std::vector<float> r;
  for (const auto& p : m.parameters())
    if (p.grad().defined())
      for (float v : p.grad().to_vector()) r.push_back(v);
  return r;
}

/// The mean over the ranks of each element of v, summed in double (the reference for the Reducer).
std::vector<float> mean_over_ranks(const std::vector<float>& v) {
  std::vector<double> d(v.begin(), v.end());
  dist::all_reduce_sum(d.data(), static_cast<int>(d.size()));
  std::vector<float> r;
  for (double x : d) r.push_back(static_cast<float>(x / dist::world_size()));
  return r;
}

void check_close(const std::vector<float>& got, const std::vector<float>& want, double rtol, double atol) {
  REQUIRE(got.size() == want.size());
  size_t bad = 0, worst = 0;
  double worst_excess = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double excess = std::abs(double(got[i]) - double(want[i])) - (atol + rtol * std::abs(double(want[i])));
    if (!(excess <= 0)) {
      if (bad++ == 0 || excess > worst_excess) worst = i, worst_excess = excess;
    }
  }
  INFO(bad << " of " << got.size() << " elements differ; the worst, " << worst << ": " << got[worst] << " vs "
            << want[worst] << " (rtol " << rtol << ", atol " << atol << ")");
  CHECK(bad == 0);
}
}  // namespace

TEST_CASE("dist: ranks, small collectives and check_uniform", "[dist]") {
  const int r = dist::rank(), w = dist::world_size();
  CHECK(dist::rank_tag() == "rank " + std::to_string(r) + " of " + std::to_string(w) + ": ");
  CHECK(dist::local_rank() >= 0);
  CHECK(dist::local_rank() < dist::local_size());
  double v[2] = {double(r + 1), 1.0};
  dist::all_reduce_sum(v, 2);
  CHECK(v[0] == w * (w + 1) / 2.0);
  CHECK(v[1] == w);
  CHECK(dist::all_true(true));
  CHECK_FALSE(dist::all_true(r == 0));
  dist::check_uniform(7, "seven");
  REQUIRE_THROWS_WITH(dist::check_uniform(r, "the rank"), Contains("the rank differs between ranks: 0 to " + std::to_string(w - 1)));
}

TEST_CASE("dist: broadcast copies the root's values into every rank's tensor", "[dist]") {
  auto t = full<float>({3, 5}, float(dist::rank()) + 1.5f);
  dist::broadcast(t);
  CHECK(t.to_vector() == std::vector<float>(15, 1.5f));
  auto d = full<double>({7}, dist::rank() * 10.0);
  dist::broadcast(d, 1);
  CHECK(d.to_vector() == std::vector<double>(7, 10.0));
  auto strided = full<float>({4, 6}, float(dist::rank())).transpose(0, 1);  // a non-contiguous view
  dist::broadcast(strided);
  CHECK(strided.to_vector() == std::vector<float>(24, 0.0f));
  auto wrong = zeros<float>({dist::rank() + 1});
  REQUIRE_THROWS_WITH(dist::broadcast(wrong), Contains("the size of a broadcast tensor differs between ranks"));
}

TEST_CASE("dist: broadcast_parameters gives every rank rank 0's weights, check_in_sync sees the difference", "[dist]") {
  Generator g(100 + static_cast<uint64_t>(dist::rank()));  // each rank its own initialization
  Mlp m(g);
  REQUIRE_THROWS_WITH(dist::check_in_sync(m, "before the broadcast"), Contains("the ranks' weights differ before the broadcast"));
  dist::broadcast_parameters(m);
  dist::check_in_sync(m, "after the broadcast");
  Generator g0(100);  // rank 0's initialization, rebuilt here
  Mlp ref(g0);
  for (auto& [name, p] : m.named_parameters()) {
    INFO(name);
    CHECK(p.to_vector() == ref.state_dict().at(name).to_vector());
    CHECK(p.requires_grad());
  }
}

TEST_CASE("dist: broadcast_parameters refuses models that differ between ranks", "[dist]") {
  Generator g(1);
  nn::Linear<float> lin(4, dist::rank() == 0 ? 3 : 5, true, g);
  REQUIRE_THROWS_WITH(dist::broadcast_parameters(lin),
                      Contains("the number of parameter and buffer elements differs between ranks"));
}

TEST_CASE("dist: eval_shard splits a set into disjoint parts that cover it", "[dist]") {
  data::Dataset set = data::make_synthetic(data::SyntheticOptions().samples(11).with_seed(3));
  data::Dataset part = dist::eval_shard(set);
  double n = static_cast<double>(part.size());
  dist::all_reduce_sum(&n, 1);
  CHECK(n == 11);
  for (int64_t i = 0; i < part.size(); ++i) CHECK(part.label(i) == set.label(dist::rank() + i * dist::world_size()));
}

TEST_CASE("dist: Reducer means equal a manual sum over the ranks, sums start during backward()", "[dist]") {
  Generator g(7);
  Mlp m(g);
  Generator data_gen(200 + static_cast<uint64_t>(dist::rank()));  // each rank its own batch
  auto x = randn<float>({5, 4}, data_gen);
  sum(pow(m.l3->forward(m.hidden(x)), 2.0)).backward();
  const std::vector<float> want = mean_over_ranks(flat_grads(m));
  m.zero_grad();

  dist::MpiCollective c;
  dist::Reducer<float> reducer(m, c, dist::ReducerOptions().bucket_cap(100));
  REQUIRE(reducer.num_buckets() >= 2);
  sum(pow(m.l3->forward(m.hidden(x)), 2.0)).backward();
  reducer.finish();
  // `extra` took no part: bucket 0 (extra) never filled in backward(), so finish() started them all.
  CHECK(reducer.started_in_backward() == 0);
  CHECK_FALSE(m.extra->weight.grad().defined());
  check_close(flat_grads(m), want, 1e-6, 1e-7);

  // Without `extra`, every bucket starts during backward().
  std::vector<std::pair<std::string, Tensor<float>>> used;
  for (auto& [name, p] : m.named_parameters())
    if (name.rfind("extra", 0) != 0) used.emplace_back(name, p);
  m.zero_grad();
  dist::Reducer<float> r2(used, c, dist::ReducerOptions().bucket_cap(100));
  sum(pow(m.l3->forward(m.hidden(x)), 2.0)).backward();
  r2.finish();
  CHECK(r2.started_in_backward() == r2.num_buckets());
  check_close(flat_grads(m), want, 1e-6, 1e-7);
}

TEST_CASE("dist: Reducer with accumulation, and a head only rank 1 uses", "[dist]") {
  Generator g(8);
  Mlp m(g);
  Generator data_gen(300 + static_cast<uint64_t>(dist::rank()));
  std::vector<Tensor<float>> xs{randn<float>({3, 4}, data_gen), randn<float>({3, 4}, data_gen)};
  auto loss = [&](const Tensor<float>& x) {
    Tensor<float> l = sum(pow(m.l3->forward(m.hidden(x)), 2.0));
    if (dist::rank() == 1) l = l + sum(m.extra->forward(m.hidden(x)));  // rank 1 alone trains `extra`
    return l * 0.5;
  };
  for (auto& x : xs) loss(x).backward();
  // The reference: every parameter's local gradient (zeros where this rank has none), summed.
  std::vector<float> local;
  for (const auto& p : m.parameters())
    for (float v : p.grad().defined() ? p.grad().to_vector() : std::vector<float>(size_t(p.numel()), 0.0f)) local.push_back(v);
  const std::vector<float> want = mean_over_ranks(local);
  m.zero_grad();

  dist::MpiCollective c;
  dist::Reducer<float> reducer(m, c, dist::ReducerOptions().bucket_cap(64));
  for (size_t i = 0; i < xs.size(); ++i) {
    reducer.set_sync(i + 1 == xs.size());
    loss(xs[i]).backward();
  }
  reducer.finish();
  REQUIRE(m.extra->weight.grad().defined());  // on rank 0 too: rank 1 had one
  check_close(flat_grads(m), want, 1e-6, 1e-7);
}

TEST_CASE("dist: RDNet on 2 ranks x batch 2 has the gradients of 1 process x batch 4", "[dist][rdnet]") {
  for (bool memory_efficient : {false, true}) {  // with checkpoint(), hooks fire inside recomputations
    INFO("memory_efficient " << memory_efficient);
    rdnet::RDNetConfig cfg = rdnet::RDNetConfig::by_name("nano");
    cfg.in_chans = 1;
    cfg.num_classes = 10;
    cfg.memory_efficient = memory_efficient;
    Generator init(11);
    rdnet::RDNet<float> model(cfg, init);
    const int64_t B = 2, W = dist::world_size();
    Generator data_gen(12);  // the same global batch on every rank
    auto images = randn<float>({B * W, 1, 28, 28}, data_gen);
    std::vector<int64_t> y;
    for (int64_t i = 0; i < B * W; ++i) y.push_back(i % 10);
    auto labels = tensor<int64_t>(y);
    // One process, the global batch (computed on every rank).
    cross_entropy(model.forward(images), labels).backward();
    const std::vector<float> want = flat_grads(model);
    model.zero_grad();
    // This rank's B images, gradients averaged by the Reducer.
    dist::MpiCollective c;
    dist::Reducer<float> reducer(model, c, dist::ReducerOptions().bucket_cap(256 << 10));
    auto mine = images.narrow(0, dist::rank() * B, B).contiguous();
    cross_entropy(model.forward(mine), labels.narrow(0, dist::rank() * B, B).contiguous()).backward();
    reducer.finish();
    CHECK(reducer.num_buckets() > 4);
    CHECK(reducer.started_in_backward() == reducer.num_buckets());
    double scale = 0;
    for (float v : want) scale = std::max(scale, double(std::abs(v)));
    check_close(flat_grads(model), want, 1e-4, 1e-5 * scale);
  }
}

namespace {
/// --inject-failure: trains a linear layer data-parallel for 10 steps; rank 1 fails at step 3.
int train_until_failure(const std::string& mode) {
  try {
    Generator g(1);
    nn::Linear<float> model(16, 4, true, g);
    dist::broadcast_parameters(model);
    dist::MpiCollective collective;
    dist::Reducer<float> reducer(model, collective);
    optim::SGD<float> opt(model.parameters(), optim::SGDOptions().lr(0.1));
    Generator data_gen(10 + static_cast<uint64_t>(dist::rank()));
    for (int step = 1; step <= 10; ++step) {
      if (step == 3 && dist::rank() == 1) {
        if (mode == "abort") std::abort();
        DG_THROW("injected failure at step ", step);
      }
      Tensor<float> loss = sum(pow(model.forward(randn<float>({8, 16}, data_gen)), 2.0));
      loss.backward();
      reducer.finish();
      opt.step();
      opt.zero_grad();
      std::printf("step %d: loss %.4f\n", step, double(loss.item()));
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "test_dist: error: %s%s\n", dist::rank_tag().c_str(), e.what());
    return 1;
  }
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  dist::Environment mpi(argc, argv);
  if (dist::world_size() < 2) {
    std::fprintf(stderr, "test_dist: needs several ranks: run it as `mpiexec -n 2 test_dist`\n");
    return mpi.exit(1);
  }
  if (argc == 3 && std::string(argv[1]) == "--inject-failure") {
    const std::string mode = argv[2];
    if (mode != "throw" && mode != "abort") {
      std::fprintf(stderr, "test_dist: --inject-failure: expected throw or abort, got '%s'\n", mode.c_str());
      return mpi.exit(1);
    }
    return mpi.exit(train_until_failure(mode));  // non-zero on rank 1: MPI_Abort ends rank 0 too
  }
  const int failed = Catch::Session().run(argc, argv);
  return mpi.exit(dist::all_true(failed == 0) ? 0 : 1);
}
