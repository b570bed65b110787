// Reliability: training in two threads at once gives each model exactly the weights it gets
// alone (the autograd tape and dg::default_generator() are per thread), and public ops refuse a
// wrong shape, dtype or device with a dg::Error whose message starts with the op's name (the ops
// whose messages name an inner op are listed in a [!mayfail] case). Not the fuzzing of the file
// parsers (tests/fuzz) nor the kill tests (tests/reliability).
#include <rdnet/rdnet.hpp>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>

#include "test_util.hpp"

namespace test_reliability {

using dg::Tensor;

namespace {

// ---------------------------------------------------------------- two threads, two models

/// All parameters of a list, flattened, in order: what "the same weights" compares.
std::vector<float> flatten(const std::vector<Tensor<float>>& params) {
  std::vector<float> out;
  for (const auto& p : params) {
    const std::vector<float> v = p.to_vector();
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

/// A 2-layer MLP, x: (16, 8) -> (16, 4), trained for 5 AdamW steps; its final weights.
std::vector<float> train_mlp(uint64_t seed) {
  dg::Generator gen(seed);
  auto w1 = dg::randn<float>({32, 8}, gen, 0.0, 0.3).requires_grad_(), b1 = dg::zeros<float>({32}).requires_grad_();
  auto w2 = dg::randn<float>({4, 32}, gen, 0.0, 0.3).requires_grad_(), b2 = dg::zeros<float>({4}).requires_grad_();
  const std::vector<Tensor<float>> params = {w1, b1, w2, b2};
  dg::optim::AdamW<float> opt(params, dg::optim::AdamWOptions().lr(1e-2));
  const Tensor<float> x = dg::randn<float>({16, 8}, gen);
  std::vector<int64_t> labels(16);
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<int64_t>((i * 7 + seed) % 4);
  const Tensor<int64_t> y = dg::tensor<int64_t>(labels);
  for (int step = 0; step < 5; ++step) {
    dg::cross_entropy(dg::linear(dg::gelu(dg::linear(x, w1, b1)), w2, b2), y).backward();
    opt.step();
    opt.zero_grad();
  }
  return flatten(params);
}

/// A tiny RDNet (the shape of test_rdnet's small config) with drop path, which draws from this
/// thread's dg::default_generator(): 3 AdamW steps on a fixed batch; its final weights.
std::vector<float> train_rdnet(uint64_t seed) {
  rdnet::RDNetConfig c;
  c.in_chans = 3;
  c.num_classes = 5;
  c.growth_rates = {8, 16};
  c.num_blocks_list = {2, 1};
  c.block_type = {"Block", "BlockESE"};
  c.is_downsample_block = {false, true};
  c.num_init_features = 16;
  c.patch_size = 4;
  c.drop_path_rate = 0.3;
  dg::manual_seed(seed);  // this thread's stream for drop path
  dg::Generator init(seed);
  rdnet::RDNet<float> model(c, init);
  model.train();
  dg::optim::AdamW<float> opt(dg::optim::timm_param_groups(model, 0.05), dg::optim::AdamWOptions().lr(1e-3));
  const Tensor<float> x = dg::randn<float>({4, 3, 16, 16}, init);
  const Tensor<int64_t> y = dg::tensor<int64_t>({0, 1, 2, static_cast<int64_t>(seed % 5)});
  for (int step = 0; step < 3; ++step) {
    dg::cross_entropy(model.forward(x), y).backward();
    opt.step();
    opt.zero_grad();
  }
  return flatten(model.parameters());
}

/// Runs f(seed) on a fresh std::thread and returns its result (every run starts from the same
/// per-thread state: an empty tape and a default generator seeded 0).
std::vector<float> alone(const std::function<std::vector<float>(uint64_t)>& f, uint64_t seed) {
  std::vector<float> out;
  std::thread t([&] { out = f(seed); });
  t.join();
  return out;
}

/// Runs f(seed_a) and f(seed_b) on two threads at once.
std::pair<std::vector<float>, std::vector<float>> together(const std::function<std::vector<float>(uint64_t)>& f,
                                                           uint64_t seed_a, uint64_t seed_b) {
  std::vector<float> a, b;
  std::thread ta([&] { a = f(seed_a); });
  std::thread tb([&] { b = f(seed_b); });
  ta.join();
  tb.join();
  return {a, b};
}

}  // namespace

TEST_CASE("reliability: dg::default_generator() and grad mode are per thread") {
  dg::manual_seed(7);
  const double main_draw = dg::randn<double>({1}, dg::default_generator()).item();
  dg::manual_seed(7);
  double other_draw = 0, other_again = 0;
  bool other_grad_mode = false;
  const dg::Generator* other_gen = nullptr;
  std::thread t([&] {
    other_gen = &dg::default_generator();
    dg::manual_seed(7);
    other_draw = dg::randn<double>({1}, dg::default_generator()).item();
    dg::manual_seed(123);  // must not reach the main thread's generator
    other_again = dg::randn<double>({1}, dg::default_generator()).item();
    dg::NoGradGuard no_grad;  // nor its grad mode
    other_grad_mode = dg::is_grad_enabled();
  });
  t.join();
  CHECK(other_gen != &dg::default_generator());
  CHECK(other_draw == main_draw);
  CHECK(other_again != main_draw);
  CHECK_FALSE(other_grad_mode);
  CHECK(dg::is_grad_enabled());
  CHECK(dg::randn<double>({1}, dg::default_generator()).item() == main_draw);  // still seeded 7, untouched
}

TEST_CASE("reliability: two threads training an MLP each get exactly the weights of training alone") {
  const std::vector<float> a = alone(train_mlp, 1), b = alone(train_mlp, 2);
  REQUIRE(a != b);  // different seeds, different models: a mix-up would show
  for (int round = 0; round < 3; ++round) {
    INFO("round " << round);
    auto [ta, tb] = together(train_mlp, 1, 2);
    CHECK(ta == a);
    CHECK(tb == b);
  }
}

TEST_CASE("reliability: two threads training a tiny RDNet with drop path each get exactly the weights of training alone") {
  const std::vector<float> a = alone(train_rdnet, 11), b = alone(train_rdnet, 12);
  REQUIRE(a.size() == b.size());
  REQUIRE(a != b);
  auto [ta, tb] = together(train_rdnet, 11, 12);
  CHECK(ta == a);
  CHECK(tb == b);
  auto [tb2, ta2] = together(train_rdnet, 12, 11);  // the other start order
  CHECK(ta2 == a);
  CHECK(tb2 == b);
}

// ---------------------------------------------------------------- wrong shapes, dtypes, devices

namespace {

using Refusals = std::vector<std::pair<std::string, std::function<void()>>>;

/// Each call must throw dg::Error whose message starts with "<op>" (as in "conv2d: expected ...").
void check_refusals(const Refusals& cases) {
  for (const auto& [op, call] : cases) {
    INFO("op " << op);
    std::string message;
    try {
      call();
    } catch (const dg::Error& e) {
      message = e.what();
    }
    INFO("message: " << message);
    CHECK_FALSE(message.empty());  // it threw dg::Error (any other exception fails the test by itself)
    if (!message.empty()) CHECK(message.rfind(op, 0) == 0);
  }
}

// A second device without a GPU: "cuda:0" memory that is host memory (as in test_device.cpp),
// so tensors can live on two devices here and each op's device checks can be reached.
struct HostAsCuda final : dg::Allocator {
  void* allocate(size_t n) override { return std::malloc(n ? n : 1); }
  void deallocate(void* p, size_t) override { std::free(p); }
};
void host_copy(void* dst, dg::Device, const void* src, dg::Device, size_t n) { std::memcpy(dst, src, n); }
struct FakeCudaDevice {
  HostAsCuda alloc;
  FakeCudaDevice() {
    dg::set_allocator(dg::Device::Kind::CUDA, &alloc);
    dg::set_device_copy(dg::Device::Kind::CUDA, &host_copy);
  }
  ~FakeCudaDevice() {
    dg::set_allocator(dg::Device::Kind::CUDA, nullptr);
    dg::set_device_copy(dg::Device::Kind::CUDA, nullptr);
  }
};

}  // namespace

TEST_CASE("reliability: every public op refuses bad arguments with dg::Error naming the op") {
  using namespace dg;
  auto z = [](Shape s) { return zeros<float>(std::move(s)); };
  Generator gen(0);
  nn::Linear<float> fc(5, 3);
  nn::Conv2d<float> conv(nn::Conv2dOptions(3, 4, 3));
  nn::LayerNorm<float> ln(Shape{6});
  // op name the message must start with, and a call that breaks one of the op's rules
  const Refusals cases = {
      {"conv2d", [&] { conv2d(z({1, 3, 8, 8}), z({4, 3, 3})); }},
      {"conv2d", [&] { conv2d(z({1, 4, 8, 8}), z({6, 2, 3, 3}), {}, 1, 0, 1, 3); }},  // groups 3 vs C_in 4
      {"conv2d", [&] { conv.forward(z({1, 2, 8, 8})); }},                            // through nn::Conv2d
      {"linear", [&] { linear(z({3, 5}), z({4, 6})); }},
      {"linear", [&] { fc.forward(z({2, 4})); }},                                     // through nn::Linear
      {"linear", [&] { linear(z({3, 5}), z({4, 5, 1})); }},
      {"matmul", [&] { matmul(z({2, 3}), z({2, 3})); }},
      {"bmm", [&] { bmm(z({2, 3, 4}), z({3, 4, 5})); }},
      {"layer_norm", [&] { layer_norm(z({2, 3}), {4}); }},
      {"layer_norm", [&] { ln.forward(z({2, 5})); }},                                 // through nn::LayerNorm
      {"layer_norm2d", [&] { layer_norm2d(z({2, 3, 4, 4}), z({4})); }},
      {"layer_norm2d", [&] { layer_norm2d(z({3, 4, 4})); }},
      {"concat", [&] { concat<float>({z({2, 3}), z({2, 4})}, 0); }},
      {"concat", [&] { concat<float>({z({2, 3}), z({3})}, 0); }},
      {"split", [&] { split(z({4, 2}), std::vector<int64_t>{1, 2}, 0); }},
      {"cross_entropy", [&] { cross_entropy(z({3, 4}), tensor<int64_t>({0, 1})); }},
      {"cross_entropy", [&] { cross_entropy(z({3, 4}), z({3, 5})); }},
      {"cross_entropy", [&] { cross_entropy(z({3, 4}), tensor<int64_t>({0, 1, 4})); }},
      {"adaptive_avg_pool2d", [&] { adaptive_avg_pool2d(z({1, 2, 3, 4, 4}), 1); }},
      {"adaptive_avg_pool2d", [&] { adaptive_avg_pool2d(z({2, 3, 4, 4}), 2, -1); }},
      {"add", [&] { add(z({2, 3}), z({3, 2})); }},
      {"add", [&] { z({2, 3}) + z({4}); }},
      {"sub", [&] { z({5}) - z({6}); }},
      {"mul", [&] { z({2, 1, 3}) * z({4, 2}); }},
      {"div", [&] { z({2}) / z({3}); }},
      {"pow", [&] { pow(z({2}), z({3})); }},
      {"view", [&] { z({2, 6}).view({5}); }},
      {"view", [&] { z({2, 6}).transpose(0, 1).view({12}); }},  // not contiguous
      {"permute", [&] { z({2, 3}).permute({0, 0}); }},
      {"expand", [&] { z({2, 3}).expand({4, 3}); }},
      {"narrow", [&] { z({2, 3}).narrow(0, 1, 2); }},
      {"select", [&] { z({2, 3}).select(0, 2); }},
      {"softmax", [&] { softmax(z({2, 3}), 2); }},
      {"log_softmax", [&] { log_softmax(z({2, 3}), -3); }},
      {"sum", [&] { sum(z({2, 3}), {2}); }},
      {"mean", [&] { mean(z({2, 3}), {0, 0}); }},
      {"max", [&] { dg::max(z({0, 3})); }},
      {"dropout", [&] { dropout(z({2}), 1.5, true, gen); }},
      {"drop_path", [&] { drop_path(scalar_tensor(1.f), 0.5, true, gen); }},
      {"clamp", [&] { clamp(z({2}), 1.0, 0.0); }},
      {"backward", [&] { (z({2, 2}).requires_grad_() * 2.0).backward(); }},  // not a scalar
      // dtype: integer tensors cannot take part in autograd
      {"requires_grad_", [&] { zeros<int64_t>({2}).requires_grad_(); }},
  };
  check_refusals(cases);
}

TEST_CASE("reliability: ops refuse tensors on two devices, or on a device without kernels, naming the op") {
  using namespace dg;
  if (has_cuda_kernels<float>()) {
    WARN("this program has the CUDA backend: device checks run in tests/cuda instead");
    return;
  }
  FakeCudaDevice fake;
  auto c = [](Shape s) { return zeros<float>(std::move(s)); };
  auto d = [](Shape s) { return zeros<float>(std::move(s)).to(Device::cuda(0)); };
  const Refusals mixed = {  // one argument on cpu, another on "cuda:0"
      {"add", [&] { c({2, 3}) + d({2, 3}); }},
      {"mul", [&] { d({2, 3}) * c({3}); }},
      {"bmm", [&] { bmm(c({2, 2, 3}), d({2, 3, 4})); }},
      {"conv2d", [&] { conv2d(c({1, 3, 8, 8}), d({4, 3, 3, 3})); }},
      {"concat", [&] { concat<float>({c({2, 3}), d({2, 3})}, 0); }},
      {"layer_norm", [&] { layer_norm(c({2, 4}), {4}, d({4})); }},
      {"layer_norm", [&] { layer_norm(c({2, 4}), {4}, c({4}), d({4})); }},
      {"layer_norm2d", [&] { layer_norm2d(c({1, 3, 4, 4}), d({3}), c({3})); }},
      {"cross_entropy", [&] { cross_entropy(c({3, 4}), d({3, 4})); }},
  };
  check_refusals(mixed);
  // class-index targets are read on the host (to_vector), so they may live on any device
  CHECK_NOTHROW(cross_entropy(c({3, 4}), tensor<int64_t>({0, 1, 2}).to(Device::cuda(0))));
  const Refusals no_kernels = {  // all on "cuda:0", which has no kernels in this program
      {"add", [&] { d({2, 3}) + d({2, 3}); }},
      {"gelu", [&] { gelu(d({4})); }},
      {"conv2d", [&] { conv2d(d({1, 3, 8, 8}), d({4, 3, 3, 3})); }},
      {"layer_norm", [&] { layer_norm(d({2, 4}), {4}); }},
      {"softmax", [&] { softmax(d({2, 4}), 1); }},
      {"sum", [&] { sum(d({2, 4})); }},
      {"adaptive_avg_pool2d", [&] { adaptive_avg_pool2d(d({1, 2, 4, 4}), 2); }},
      {"cross_entropy", [&] { cross_entropy(d({3, 4}), tensor<int64_t>({0, 1, 2}).to(Device::cuda(0))); }},
  };
  check_refusals(no_kernels);
}

// linear and matmul are built from other ops (transpose, bmm, add): they check devices first, so
// the error names them, not the inner op.
TEST_CASE("reliability: linear and matmul name themselves when refusing devices") {
  using namespace dg;
  if (has_cuda_kernels<float>()) return;  // tests/cuda covers devices there
  FakeCudaDevice fake;
  auto c = [](Shape s) { return zeros<float>(std::move(s)); };
  auto d = [](Shape s) { return zeros<float>(std::move(s)).to(Device::cuda(0)); };
  const Refusals cases = {
      {"linear", [&] { linear(c({3, 5}), d({4, 5})); }},
      {"linear", [&] { linear(c({3, 5}), c({4, 5}), d({4})); }},
      {"matmul", [&] { matmul(c({2, 3}), d({3, 4})); }},
      {"matmul", [&] { matmul(d({2, 3}), d({3, 4})); }},
  };
  check_refusals(cases);
}

}  // namespace test_reliability
