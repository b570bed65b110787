// tests/test_optim.cpp: optim/: SGD and AdamW trajectories vs torch.optim (every step, two param
// groups, a parameter without a gradient at one step), schedules vs timm, clip_grad_norm_ vs torch
// (tests/fixtures/optim.safetensors), timm param groups, state_dict round trips, ModelEMA, errors.
#include "test_util.hpp"

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>

#include <densegrad/optim/optim.hpp>

namespace test_optim {

using dg::Tensor;
namespace optim = dg::optim;

namespace {

const std::map<std::string, Tensor<float>>& fx() {
  static const auto f = dgtest::load_fixture<float>("optim");
  return f;
}

/// Fresh copies of the fixture's three parameters: (4, 3), (5), (2, 1, 3, 3).
std::vector<Tensor<float>> fixture_params() {
  std::vector<Tensor<float>> p;
  for (int j = 0; j < 3; ++j) p.push_back(dgtest::get(fx(), "init." + std::to_string(j)).clone().requires_grad_());
  return p;
}

/// The fixture's groups: {p0, p1} with the optimizer's lr and weight_decay, {p2} with lr / 2 and no decay.
std::vector<optim::ParamGroup<float>> fixture_groups(const std::vector<Tensor<float>>& p, double lr) {
  return {{{p[0], p[1]}}, {{p[2]}, lr / 2, 0.0}};
}

/// Sets the gradients of step s; parameter 1 has none at step 1.
void set_fixture_grads(const std::vector<Tensor<float>>& params, int s) {
  for (size_t j = 0; j < params.size(); ++j) {
    auto it = fx().find("grad." + std::to_string(s) + "." + std::to_string(j));
    Tensor<float> p = params[j];
    if (it == fx().end()) p.zero_grad();
    else p.set_grad(it->second.clone());
  }
}

/// State key of fixture parameter j: "state.<group>.<index>.".
std::string state_prefix(int j) { return j < 2 ? "state.0." + std::to_string(j) + "." : "state.1.0."; }

/// Runs 5 steps with the fixture's gradients and compares every step's parameters with torch's,
/// then the optimizer state (exp_avg, momentum_buffer, per-parameter step...) after the last.
void check_trajectory(optim::Optimizer<float>& opt, const std::vector<Tensor<float>>& params, const std::string& name,
                      bool has_state = true) {
  for (int s = 0; s < 5; ++s) {
    set_fixture_grads(params, s);
    opt.step();
    for (int j = 0; j < 3; ++j) {
      std::string key = name + ".param." + std::to_string(s) + "." + std::to_string(j);
      dgtest::require_close(params[j], dgtest::get(fx(), key), 1e-5, 1e-6, key);
    }
  }
  auto sd = opt.state_dict();
  int compared = 0;
  const std::string prefix = name + ".state.";
  for (auto& [key, ref] : fx()) {
    if (key.compare(0, prefix.size(), prefix) != 0) continue;
    int j = key[prefix.size()] - '0';
    std::string ours = state_prefix(j) + key.substr(prefix.size() + 2);
    INFO(key << " vs " << ours);
    REQUIRE(sd.count(ours));
    dgtest::require_close(sd.at(ours), ref, 1e-5, 1e-6, key);
    ++compared;
  }
  REQUIRE((compared > 0) == has_state);
  REQUIRE(opt.step_count() == 5);
}

std::vector<float> values(const Tensor<float>& t) { return t.to_vector(); }

/// A small model shaped like an RDNet corner: conv stem, norm, layer-scale gamma, linear head,
/// a 2-D parameter named "*.bias", a position embedding and a frozen parameter.
/// (Registers parameters directly so it needs no layer implementation.)
struct Leaf : dg::nn::Module<float> {
  explicit Leaf(const std::vector<std::pair<std::string, dg::Shape>>& params) {
    for (auto& [n, s] : params) register_parameter(n, dg::zeros<float>(s));
  }
};
struct TinyNet : dg::nn::Module<float> {
  TinyNet() {
    register_parameter("gamma", dg::ones<float>({4}));
    register_parameter("pos_embed", dg::zeros<float>({1, 4, 2, 2}));
    register_parameter("frozen", dg::zeros<float>({3, 3}), false);
    register_buffer("running", dg::zeros<float>({2}));
    register_module("stem", std::make_shared<Leaf>(std::vector<std::pair<std::string, dg::Shape>>{
                                {"weight", {4, 3, 3, 3}}, {"bias", {4}}}));
    register_module("norm", std::make_shared<Leaf>(std::vector<std::pair<std::string, dg::Shape>>{
                                {"weight", {4}}, {"bias", {4}}}));
    register_module("proj", std::make_shared<Leaf>(std::vector<std::pair<std::string, dg::Shape>>{{"bias", {2, 2}}}));
    register_module("head", std::make_shared<Leaf>(std::vector<std::pair<std::string, dg::Shape>>{
                                {"weight", {2, 4}}, {"bias", {2}}}));
  }
  Tensor<float> param(const std::string& name) const {
    for (auto& [n, p] : named_parameters())
      if (n == name) return p;
    FAIL("no parameter " << name);
    return {};
  }
  Tensor<float> buffer() const { return named_buffers()[0].second; }
};

std::vector<const void*> ids(const std::vector<Tensor<float>>& v) {
  std::vector<const void*> r;
  for (auto& t : v) r.push_back(t.impl().get());
  return r;
}

}  // namespace

// ---------------------------------------------------------------- SGD vs torch.optim.SGD

TEST_CASE("SGD without momentum, weight decay 0.05 parity") {
  auto p = fixture_params();
  optim::SGD<float> opt(fixture_groups(p, 0.1), optim::SGDOptions().lr(0.1).weight_decay(0.05));
  check_trajectory(opt, p, "sgd_plain", false);
  REQUIRE(opt.state_dict().count("state.0.0.momentum_buffer") == 0);  // no buffer without momentum, as torch
}

TEST_CASE("SGD momentum 0.9, weight decay 0.05 parity") {
  auto p = fixture_params();
  optim::SGD<float> opt(fixture_groups(p, 0.1), optim::SGDOptions().lr(0.1).momentum(0.9).weight_decay(0.05));
  check_trajectory(opt, p, "sgd_momentum");
}

TEST_CASE("SGD nesterov momentum 0.9, weight decay 0.05 parity") {
  auto p = fixture_params();
  optim::SGD<float> opt(fixture_groups(p, 0.1),
                        optim::SGDOptions().lr(0.1).momentum(0.9).nesterov(true).weight_decay(0.05));
  check_trajectory(opt, p, "sgd_nesterov");
}

TEST_CASE("SGD momentum 0.9, dampening 0.1 parity") {
  auto p = fixture_params();
  optim::SGD<float> opt(fixture_groups(p, 0.1), optim::SGDOptions().lr(0.1).momentum(0.9).dampening(0.1));
  check_trajectory(opt, p, "sgd_dampening");
}

// ---------------------------------------------------------------- AdamW vs torch.optim.AdamW

TEST_CASE("AdamW weight decay 0.05 parity") {
  auto p = fixture_params();
  optim::AdamW<float> opt(fixture_groups(p, 0.01), optim::AdamWOptions().lr(0.01).weight_decay(0.05));
  check_trajectory(opt, p, "adamw");
  // parameter 1 had no gradient at step 1: its own step count (hence bias correction) is behind
  auto sd = opt.state_dict();
  REQUIRE(sd.at("state.0.0.step").item() == 5.0f);
  REQUIRE(sd.at("state.0.1.step").item() == 4.0f);
}

TEST_CASE("AdamW amsgrad parity") {
  auto p = fixture_params();
  optim::AdamW<float> opt(fixture_groups(p, 0.01), optim::AdamWOptions().lr(0.01).weight_decay(0.05).amsgrad(true));
  check_trajectory(opt, p, "adamw_amsgrad");
}

TEST_CASE("AdamW and SGD skip parameters without a gradient") {
  auto p = fixture_params();
  auto before = values(p[1]);
  optim::AdamW<float> adam(fixture_groups(p, 0.01), optim::AdamWOptions().weight_decay(0.5));
  set_fixture_grads(p, 1);  // parameter 1 has no gradient here
  adam.step();
  REQUIRE(values(p[1]) == before);  // not even decayed
  REQUIRE(adam.state_dict().at("state.0.1.step").item() == 0.0f);
  optim::SGD<float> sgd(std::vector<Tensor<float>>{p[1]}, optim::SGDOptions().lr(1).momentum(0.9));
  sgd.step();
  REQUIRE(values(p[1]) == before);
}

TEST_CASE("AdamW bfloat16 parameters keep fp32 state") {
  // bf16 parameters follow the fp32 trajectory to bf16 precision (2^-8 relative per rounding),
  // because the moments stay fp32; the state dict is fp32.
  auto pf = fixture_params();
  std::vector<Tensor<dg::bfloat16>> pb;
  for (auto& t : pf) pb.push_back(t.detach().to<dg::bfloat16>().requires_grad_());
  optim::AdamW<float> of(pf, optim::AdamWOptions().lr(0.01).weight_decay(0.05));
  optim::AdamW<dg::bfloat16> ob(pb, optim::AdamWOptions().lr(0.01).weight_decay(0.05));
  for (int s = 0; s < 5; ++s) {
    set_fixture_grads(pf, s);
    for (size_t j = 0; j < pb.size(); ++j)
      if (pf[j].grad().defined()) pb[j].set_grad(pf[j].grad().to<dg::bfloat16>());
      else pb[j].zero_grad();
    of.step();
    ob.step();
  }
  for (size_t j = 0; j < pb.size(); ++j) dgtest::require_close(pb[j].to<float>(), pf[j].detach(), 2e-2, 2e-2);
  std::map<std::string, Tensor<float>> sd = ob.state_dict();  // fp32 state for bf16 parameters
  dgtest::require_close(sd.at("state.0.0.exp_avg"), of.state_dict().at("state.0.0.exp_avg"), 2e-2, 1e-3);
}

TEST_CASE("AdamW and SGD OpenMP-sized tensors update like small ones") {
  // A 100003-element parameter takes the parallel loop; the same values split into pieces below
  // detail::kParallelMin take the serial one. Elementwise math: the results must be identical.
  dg::Generator gen(3);
  const int64_t n = 100003, pieces = 5, len = n / pieces + 1;
  auto big = dg::randn<float>({n}, gen).requires_grad_();
  auto gbig = dg::randn<float>({n}, gen);
  std::vector<Tensor<float>> small, big2{dg::randn<float>({n}, gen).requires_grad_()};
  for (int64_t k = 0; k < n; k += len) {
    int64_t m = std::min(len, n - k);
    small.push_back(big.detach().narrow(0, k, m).contiguous().clone().requires_grad_());
  }
  REQUIRE(len < optim::detail::kParallelMin);
  optim::AdamW<float> ab({big}, optim::AdamWOptions().lr(0.01).weight_decay(0.05).amsgrad(true));
  optim::AdamW<float> as(small, optim::AdamWOptions().lr(0.01).weight_decay(0.05).amsgrad(true));
  for (int s = 0; s < 3; ++s) {
    big.set_grad(gbig.clone());
    for (size_t i = 0; i < small.size(); ++i) small[i].set_grad(gbig.narrow(0, int64_t(i) * len, small[i].numel()).contiguous());
    ab.step();
    as.step();
  }
  std::vector<float> joined;
  for (auto& t : small) for (float v : values(t)) joined.push_back(v);
  REQUIRE(joined == values(big));
}

// ---------------------------------------------------------------- schedules vs timm

TEST_CASE("CosineSchedule matches timm CosineLRScheduler with warmup") {
  auto f = dgtest::load_fixture<double>("optim");
  for (bool prefix : {false, true}) {
    std::string key = prefix ? "sched.cosine_prefix" : "sched.cosine";
    optim::CosineSchedule sched(0.1, 100, 10, 1e-4, 1e-5, prefix);
    auto t = dgtest::get(f, key + ".t").to_vector(), lr = dgtest::get(f, key + ".lr").to_vector();
    for (size_t i = 0; i < t.size(); ++i) {
      INFO(key << " at t = " << t[i]);
      REQUIRE(sched.lr(t[i]) == Approx(lr[i]).epsilon(1e-12).margin(1e-15));
    }
  }
}

TEST_CASE("CosineSchedule hand formula at warmup start, end of warmup, middle, end and past the end") {
  const double pi = std::acos(-1.0);
  optim::CosineSchedule s(1.0, 200, 20, 0.01, 0.1);
  REQUIRE(s.lr(0) == Approx(0.01));                           // warmup starts at warmup_lr_init
  REQUIRE(s.lr(10) == Approx(0.01 + 10 * (0.99 / 20)));       // linear
  REQUIRE(s.lr(20) == Approx(0.1 + 0.45 * (1 + std::cos(pi * 20 / 200))));  // warmup overlays the cosine
  REQUIRE(s.lr(100) == Approx(0.55));                         // middle: halfway between base and min
  REQUIRE(s.lr(199.5) == Approx(0.1 + 0.45 * (1 + std::cos(pi * 199.5 / 200))));
  REQUIRE(s.lr(200) == Approx(0.1));
  REQUIRE(s.lr(1e6) == Approx(0.1));
  optim::CosineSchedule plain(0.5, 10);                       // torch CosineAnnealingLR(T_max=10)
  for (int t = 0; t <= 10; ++t) REQUIRE(plain.lr(t) == Approx(0.25 * (1 + std::cos(pi * t / 10))).margin(1e-15));
}

TEST_CASE("StepSchedule matches timm StepLRScheduler with warmup") {
  auto f = dgtest::load_fixture<double>("optim");
  optim::StepSchedule sched(0.1, 30, 0.1, 5, 1e-3);
  auto t = dgtest::get(f, "sched.step.t").to_vector(), lr = dgtest::get(f, "sched.step.lr").to_vector();
  for (size_t i = 0; i < t.size(); ++i) {
    INFO("t = " << t[i]);
    REQUIRE(sched.lr(t[i]) == Approx(lr[i]).epsilon(1e-12));
  }
  optim::StepSchedule no_prefix(0.1, 30, 0.1, 5, 1e-3, false);  // decay clock counts the warmup
  REQUIRE(no_prefix.lr(29) == Approx(0.1));
  REQUIRE(no_prefix.lr(30) == Approx(0.01));
  optim::StepSchedule step_lr(0.1, 30, 0.5);  // torch StepLR(step_size=30, gamma=0.5)
  REQUIRE(step_lr.lr(0) == 0.1);
  REQUIRE(step_lr.lr(89) == Approx(0.025));
  REQUIRE(step_lr.lr(90) == Approx(0.0125));
}

TEST_CASE("schedule apply sets every group's lr, and its state_dict round trips") {
  auto p = fixture_params();
  optim::AdamW<float> opt(fixture_groups(p, 0.01));
  optim::CosineSchedule sched(0.1, 100, 10, 1e-4, 1e-5);
  double v = sched.apply(opt, 37);
  REQUIRE(v == sched.lr(37));
  for (auto& g : opt.param_groups()) REQUIRE(g.lr == v);
  REQUIRE(sched.last_step() == 37);
  optim::CosineSchedule other(0.1, 100, 10, 1e-4, 1e-5);
  other.load_state_dict(sched.state_dict<float>());
  REQUIRE(other.last_step() == 37);
  REQUIRE_THROWS_WITH(other.load_state_dict(std::map<std::string, Tensor<float>>{}),
                      Catch::Contains("expected exactly the key 'last_step'"));
}

// ---------------------------------------------------------------- clipping vs torch

TEST_CASE("clip_grad_norm_ parity in L2, L1, L3, inf norms and without clipping") {
  struct Case { const char* name; double max_norm, norm_type; };
  for (Case c : {Case{"l2", 1.0, 2.0}, Case{"l1", 2.0, 1.0}, Case{"inf", 0.5, INFINITY}, Case{"p3", 1.5, 3.0},
                 Case{"noclip", 1e3, 2.0}}) {
    INFO(c.name);
    std::vector<Tensor<float>> params;
    for (int j = 0; j < 3; ++j) {
      Tensor<float> g = dgtest::get(fx(), "clip.in." + std::to_string(j));
      params.push_back(dg::zeros<float>(g.shape()).requires_grad_());
      params.back().set_grad(g.clone());
    }
    params.push_back(dg::zeros<float>({7}).requires_grad_());  // no gradient: ignored
    double total = optim::clip_grad_norm_(params, c.max_norm, c.norm_type);
    // torch accumulates the norm in fp32, we in double
    REQUIRE(total == Approx(dgtest::get(fx(), std::string("clip.") + c.name + ".total").item()).epsilon(1e-6));
    for (int j = 0; j < 3; ++j)
      dgtest::require_close(params[j].grad(), dgtest::get(fx(), std::string("clip.") + c.name + ".out." + std::to_string(j)));
  }
}

TEST_CASE("clip_grad_norm_ on a non-contiguous gradient, non-finite gradients, grads_finite") {
  auto p = dg::zeros<float>({3, 2}).requires_grad_();
  p.set_grad(dg::tensor<float>({3, 0, 4, 0, 0, 0}, {2, 3}).transpose(0, 1));  // strided (3, 2)
  REQUIRE(optim::clip_grad_norm_(std::vector<Tensor<float>>{p}, 1.0) == Approx(5.0));
  dgtest::require_close(p.grad().contiguous(), dg::tensor<float>({0.6f, 0, 0, 0, 0.8f, 0}, {3, 2}), 1e-5, 1e-6);
  REQUIRE(optim::grads_finite(std::vector<Tensor<float>>{p}));

  p.set_grad(dg::tensor<float>({1, NAN, 2, 0, 0, 0}, {3, 2}));
  REQUIRE_FALSE(optim::grads_finite(std::vector<Tensor<float>>{p}));
  REQUIRE(std::isnan(optim::total_grad_norm(std::vector<Tensor<float>>{p}, INFINITY)));
  REQUIRE_THROWS_WITH(optim::clip_grad_norm_(std::vector<Tensor<float>>{p}, 1.0, 2.0, true),
                      Catch::Contains("clip_grad_norm_: the total norm of order 2 of the gradients is non-finite"));
  REQUIRE(std::isnan(optim::clip_grad_norm_(std::vector<Tensor<float>>{p}, 1.0)));  // torch: grads become NaN
  REQUIRE(std::isnan(p.grad().at({0, 0})));
  REQUIRE(optim::clip_grad_norm_(std::vector<Tensor<float>>{dg::zeros<float>({2})}, 1.0) == 0.0);  // no grads
}

// ---------------------------------------------------------------- param groups

TEST_CASE("timm_param_groups puts 1-D parameters, *.bias and listed names in a no-decay group") {
  TinyNet net;
  auto groups = optim::timm_param_groups(net, 0.05, {"pos_embed"});
  REQUIRE(groups.size() == 2);
  REQUIRE(groups[0].weight_decay == 0.0);
  REQUIRE(groups[1].weight_decay == 0.05);
  // named_parameters order: own parameters first, then children; "frozen" needs no grad: left out
  REQUIRE(ids(groups[0].params) == ids({net.param("gamma"), net.param("pos_embed"), net.param("stem.bias"),
                                        net.param("norm.weight"), net.param("norm.bias"), net.param("proj.bias"),
                                        net.param("head.bias")}));
  REQUIRE(ids(groups[1].params) == ids({net.param("stem.weight"), net.param("head.weight")}));
  REQUIRE(optim::timm_param_groups(net, 0.05)[1].params.size() == 3);  // pos_embed decays unless listed

  optim::AdamW<float> opt(groups, optim::AdamWOptions().lr(2e-3).weight_decay(0.3));
  REQUIRE(opt.param_groups()[0].lr == 2e-3);  // lr left NaN in the group: the optimizer's
  REQUIRE(opt.param_groups()[0].weight_decay == 0.0);
  REQUIRE(opt.param_groups()[1].weight_decay == 0.05);
}

// ---------------------------------------------------------------- state_dict

namespace {
/// A steps 3 times, its state goes through a safetensors file, B (on copies of A's parameters)
/// loads it; one more step each must agree bit for bit.
template <class Opt, class Options>
void round_trip(const Options& o, double lr) {
  auto pa = fixture_params();
  Opt a(fixture_groups(pa, lr), o);
  for (int s = 0; s < 3; ++s) {
    set_fixture_grads(pa, s);
    a.step();
  }
  // a name of its own: ctest -j runs the SGD and AdamW cases at once, in two processes
  const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
  auto path = (std::filesystem::temp_directory_path() /
               ("densegrad_test_optim_state_" + std::to_string(stamp) + ".safetensors"))
                  .string();
  dg::io::save_safetensors(path, a.state_dict());
  auto loaded = dg::io::load_safetensors<float>(path);
  std::remove(path.c_str());

  std::vector<Tensor<float>> pb;
  for (auto& t : pa) pb.push_back(t.detach().clone().requires_grad_());
  Opt b(fixture_groups(pb, lr), o);
  b.load_state_dict(loaded);
  REQUIRE(b.step_count() == 3);
  set_fixture_grads(pa, 3);
  set_fixture_grads(pb, 3);
  a.step();
  b.step();
  for (size_t j = 0; j < pa.size(); ++j) REQUIRE(values(pa[j]) == values(pb[j]));
  auto sa = a.state_dict(), sb = b.state_dict();
  for (auto& [k, t] : sa) {
    INFO(k);
    REQUIRE(values(t) == values(sb.at(k)));
  }
}
}  // namespace

TEST_CASE("AdamW state_dict round trip through safetensors is bit exact") {
  round_trip<optim::AdamW<float>>(optim::AdamWOptions().lr(0.01).weight_decay(0.05), 0.01);
  round_trip<optim::AdamW<float>>(optim::AdamWOptions().lr(0.01).weight_decay(0.05).amsgrad(true), 0.01);
}

TEST_CASE("SGD state_dict round trip through safetensors is bit exact") {
  round_trip<optim::SGD<float>>(optim::SGDOptions().lr(0.1).momentum(0.9).nesterov(true).weight_decay(0.05), 0.1);
  round_trip<optim::SGD<float>>(optim::SGDOptions().lr(0.1).weight_decay(0.05), 0.1);
}

TEST_CASE("optimizer state_dict keys, and hyperparameters restored from a checkpoint") {
  auto p = fixture_params();
  optim::AdamW<float> a(fixture_groups(p, 0.01), optim::AdamWOptions().lr(0.01).beta2(0.99));
  auto sd = a.state_dict();
  std::vector<std::string> keys;
  for (auto& [k, t] : sd) keys.push_back(k);
  REQUIRE(keys == std::vector<std::string>{
                      "options.beta1", "options.beta2", "options.eps", "param_groups.0.lr",
                      "param_groups.0.weight_decay", "param_groups.1.lr", "param_groups.1.weight_decay",
                      "state.0.0.exp_avg", "state.0.0.exp_avg_sq", "state.0.0.step", "state.0.1.exp_avg",
                      "state.0.1.exp_avg_sq", "state.0.1.step", "state.1.0.exp_avg", "state.1.0.exp_avg_sq",
                      "state.1.0.step", "step"});
  REQUIRE(sd.at("step").dim() == 0);
  REQUIRE(sd.at("param_groups.1.lr").item() == 0.005f);
  // a fresh optimizer with other settings takes the checkpoint's (rounded to fp32)
  auto p2 = fixture_params();
  optim::AdamW<float> b(fixture_groups(p2, 0.5), optim::AdamWOptions().lr(0.5).weight_decay(0.2));
  b.load_state_dict(sd);
  REQUIRE(b.param_groups()[0].lr == Approx(0.01).epsilon(1e-7));
  REQUIRE(b.param_groups()[1].lr == Approx(0.005).epsilon(1e-7));
  REQUIRE(b.param_groups()[0].weight_decay == Approx(1e-2).epsilon(1e-7));
  REQUIRE(b.param_groups()[1].weight_decay == 0.0);
  b.load_state_dict(sd);  // same values again: the exact double is kept, not its fp32 rounding
  REQUIRE(b.param_groups()[1].lr == float(0.005));
  a.load_state_dict(sd);
  REQUIRE(a.param_groups()[0].lr == 0.01);
}

TEST_CASE("optimizer load_state_dict errors: missing, unexpected and mis-shaped keys, bad values") {
  auto p = fixture_params();
  optim::AdamW<float> opt(fixture_groups(p, 0.01), optim::AdamWOptions().lr(0.01));
  set_fixture_grads(p, 0);
  opt.step();
  const auto good = opt.state_dict();
  auto before = values(good.at("state.0.0.exp_avg"));

  auto sd = good;
  sd.erase("state.0.1.exp_avg");
  sd.emplace("state.0.0.bogus", dg::zeros<float>({1}));
  sd["state.0.0.exp_avg_sq"] = dg::zeros<float>({2});
  REQUIRE_THROWS_WITH(opt.load_state_dict(sd), Catch::Contains("AdamW load_state_dict: missing keys (1): state.0.1.exp_avg"));
  REQUIRE_THROWS_WITH(opt.load_state_dict(sd), Catch::Contains("unexpected keys (1): state.0.0.bogus"));
  REQUIRE_THROWS_WITH(opt.load_state_dict(sd), Catch::Contains(
                          "shape mismatches (1): state.0.0.exp_avg_sq: checkpoint [2] vs optimizer [4, 3]"));

  optim::AdamW<float> ams(fixture_groups(fixture_params(), 0.01), optim::AdamWOptions().amsgrad(true));
  REQUIRE_THROWS_WITH(ams.load_state_dict(good), Catch::Contains("missing keys (3): state.0.0.max_exp_avg_sq"));
  optim::AdamW<float> one_group(fixture_params(), optim::AdamWOptions());
  REQUIRE_THROWS_WITH(one_group.load_state_dict(good), Catch::Contains("unexpected keys"));

  sd = good;
  sd["param_groups.0.lr"] = dg::scalar_tensor<float>(-1.0f);
  REQUIRE_THROWS_WITH(opt.load_state_dict(sd), Catch::Contains("'param_groups.0.lr' must be >= 0, got -1"));
  sd = good;
  sd["state.0.0.step"] = dg::scalar_tensor<float>(1.5f);
  REQUIRE_THROWS_WITH(opt.load_state_dict(sd), Catch::Contains("'state.0.0.step' must be a count, got 1.5"));
  sd = good;
  sd["options.beta1"] = dg::scalar_tensor<float>(1.0f);
  sd["state.0.0.exp_avg"] = dg::zeros<float>({4, 3});
  REQUIRE_THROWS_WITH(opt.load_state_dict(sd), Catch::Contains("AdamW: invalid betas (1, 0.999)"));
  // a failed load changed nothing
  REQUIRE(values(opt.state_dict().at("state.0.0.exp_avg")) == before);
  REQUIRE(opt.state_dict().at("options.beta1").item() == 0.9f);
  REQUIRE(opt.step_count() == 1);
}

TEST_CASE("optimizer construction and step errors") {
  auto p = fixture_params();
  REQUIRE_THROWS_WITH(optim::AdamW<float>(p, optim::AdamWOptions().lr(-1)),
                      Catch::Contains("AdamW: invalid learning rate -1 in param group 0 (expected a finite value >= 0)"));
  REQUIRE_THROWS_WITH(optim::SGD<float>(p, optim::SGDOptions().weight_decay(-0.1)),
                      Catch::Contains("SGD: invalid weight_decay -0.1 in param group 0"));
  REQUIRE_THROWS_WITH(optim::AdamW<float>(p, optim::AdamWOptions().beta2(1.0)), Catch::Contains("AdamW: invalid betas (0.9, 1)"));
  REQUIRE_THROWS_WITH(optim::AdamW<float>(p, optim::AdamWOptions().eps(-1)), Catch::Contains("AdamW: invalid eps -1"));
  REQUIRE_THROWS_WITH(optim::SGD<float>(p, optim::SGDOptions().nesterov(true)),
                      Catch::Contains("SGD: Nesterov momentum requires momentum > 0 and dampening 0"));
  REQUIRE_THROWS_WITH(optim::SGD<float>(std::vector<optim::ParamGroup<float>>{}), Catch::Contains("SGD: got an empty list"));

  auto strided = dg::zeros<float>({3, 4}).transpose(0, 1);
  REQUIRE_THROWS_WITH(optim::SGD<float>(std::vector<Tensor<float>>{strided}),
                      Catch::Contains("SGD: parameter 0 of group 0 must be a contiguous tensor (shape [4, 3], strides [1, 4])"));
  auto computed = p[0] * 2.0;
  REQUIRE_THROWS_WITH(optim::SGD<float>(std::vector<Tensor<float>>{computed}), Catch::Contains("is not a leaf"));
  REQUIRE_THROWS_WITH(optim::AdamW<float>(std::vector<optim::ParamGroup<float>>{{{p[0], p[1]}}, {{p[1]}}}),
                      Catch::Contains("AdamW: parameter 0 of group 1 appears in more than one place"));

  optim::AdamW<float> opt(fixture_groups(p, 0.01));
  opt.param_groups()[1].lr = -0.5;  // what a buggy schedule might do
  REQUIRE_THROWS_WITH(opt.step(), Catch::Contains("AdamW: invalid learning rate -0.5 in param group 1"));
  opt.param_groups()[1].lr = 0.5;
  opt.param_groups()[1].params.push_back(dg::zeros<float>({2}));
  REQUIRE_THROWS_WITH(opt.step(), Catch::Contains("param group 1 now has 2 parameters, it was built with 1"));

  REQUIRE_THROWS_WITH(optim::CosineSchedule(-0.1, 10), Catch::Contains("CosineSchedule: invalid base learning rate -0.1"));
  REQUIRE_THROWS_WITH(optim::CosineSchedule(0.1, 0), Catch::Contains("CosineSchedule: total_steps must be > 0"));
  REQUIRE_THROWS_WITH(optim::StepSchedule(0.1, 0, 0.1), Catch::Contains("StepSchedule: step_size must be > 0"));
  REQUIRE_THROWS_WITH(optim::clip_grad_norm_(p, -1.0), Catch::Contains("clip_grad_norm_: max_norm must be >= 0"));
  REQUIRE_THROWS_WITH(optim::clip_grad_norm_(p, 1.0, 0.0), Catch::Contains("norm_type must be > 0 or INFINITY"));
}

// ---------------------------------------------------------------- ModelEMA

TEST_CASE("ModelEMA update, copy_to and state_dict (timm ModelEmaV2)") {
  TinyNet net;
  auto gamma = net.param("gamma");  // starts at 1
  auto buf = net.buffer();          // starts at 0
  optim::ModelEMA<float> ema(net, 0.9);
  {
    dg::NoGradGuard g;
    gamma.copy_(dg::tensor<float>({2, 3, 4, 5}));
    buf.fill_(10.0f);
  }
  REQUIRE(values(ema.state_dict().at("gamma")) == std::vector<float>{1, 1, 1, 1});  // a copy, not a view
  ema.update(net);
  const float d = 0.9f, w = float(1 - 0.9);
  REQUIRE(values(ema.state_dict().at("gamma")) ==
          std::vector<float>{d * 1 + w * 2, d * 1 + w * 3, d * 1 + w * 4, d * 1 + w * 5});
  REQUIRE(values(ema.state_dict().at("running")) == std::vector<float>{w * 10, w * 10});  // buffers too
  ema.update(net);
  REQUIRE(ema.state_dict().at("gamma").at({0}) == d * (d * 1 + w * 2) + w * 2);

  TinyNet eval_net;
  ema.copy_to(eval_net);
  REQUIRE(values(eval_net.param("gamma")) == values(ema.state_dict().at("gamma")));
  REQUIRE(values(eval_net.buffer()) == values(ema.state_dict().at("running")));

  optim::ModelEMA<float> restored(eval_net, 0.5);
  std::map<std::string, Tensor<float>> saved;
  for (auto& [k, t] : ema.state_dict()) saved.emplace(k, t.clone());
  {
    dg::NoGradGuard g;
    saved.at("gamma").fill_(7.0f);
  }
  restored.load_state_dict(saved);
  REQUIRE(values(restored.state_dict().at("gamma")) == std::vector<float>{7, 7, 7, 7});

  saved.erase("gamma");
  REQUIRE_THROWS_WITH(restored.load_state_dict(saved),
                      Catch::Contains("ModelEMA load_state_dict: the state dict does not match the EMA's: missing keys (1): gamma"));
  Leaf other({{"gamma", {4}}});
  REQUIRE_THROWS_WITH(ema.update(other), Catch::Contains("ModelEMA update"));
  REQUIRE_THROWS_WITH(optim::ModelEMA<float>(net, 1.5), Catch::Contains("ModelEMA: decay must be in [0, 1], got 1.5"));
}

TEST_CASE("ModelEMA of a bfloat16 model keeps fp32 averages") {
  struct Net : dg::nn::Module<dg::bfloat16> {
    Net() { register_parameter("w", dg::zeros<dg::bfloat16>({3})); }
  } net;
  optim::ModelEMA<dg::bfloat16> ema(net, 0.9999);
  {
    dg::NoGradGuard g;
    net.named_parameters()[0].second.fill_(dg::bfloat16(1.0f));
  }
  for (int i = 0; i < 10; ++i) ema.update(net);
  // 1 - 0.9999^10 ~ 1e-3: far below bf16's resolution near 1, kept exactly enough in fp32
  std::map<std::string, Tensor<float>> sd = ema.state_dict();
  REQUIRE(sd.at("w").at({0}) == Approx(1 - std::pow(0.9999, 10)).epsilon(1e-4));
}

}  // namespace test_optim
