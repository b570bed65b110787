// RDNet (examples/rdnet/rdnet.hpp) against timm's own RDNet: state-dict names and shapes of
// all four presets, parameter counts, and a randomized small model's logits, features and
// every gradient (fixtures from tests/fixtures/fixtures_rdnet.py).
#include <rdnet/rdnet.hpp>

#include <filesystem>

#include "test_util.hpp"

namespace test_rdnet {

using dg::Tensor;

namespace {

rdnet::RDNetConfig small_config() {  // = SMALL in fixtures_rdnet.py
  rdnet::RDNetConfig c;
  c.in_chans = 3;
  c.num_classes = 7;
  c.growth_rates = {8, 16, 16};
  c.num_blocks_list = {2, 2, 1};
  c.block_type = {"Block", "BlockESE", "BlockESE"};
  c.is_downsample_block = {false, true, false};
  c.num_init_features = 16;
  c.patch_size = 4;
  return c;
}

/// Loads "param.*" of the fixture into the model (strict: every key must match).
void load_params(rdnet::RDNet<float>& model, const std::map<std::string, Tensor<float>>& fx) {
  std::map<std::string, Tensor<float>> sd;
  for (auto& [k, v] : fx)
    if (k.rfind("param.", 0) == 0) sd.emplace(k.substr(6), v);
  auto r = model.load_state_dict(sd, true);
  REQUIRE(r.ok());
}

}  // namespace

/// The fixture's timm model loaded into model (eval mode), its input (requiring grad) and target.
std::pair<Tensor<float>, Tensor<int64_t>> timm_case(rdnet::RDNet<float>& model,
                                                    const std::map<std::string, Tensor<float>>& fx) {
  model.eval();
  load_params(model, fx);
  return {dgtest::get(fx, "input").requires_grad_(),
          dg::io::from_raw<int64_t>(dg::io::read_safetensors(dgtest::fixtures_dir() + "/rdnet.safetensors").tensors.at("target"))};
}

TEST_CASE("rdnet tiny, small, base, large: timm's state dict keys and shapes, and the paper's parameter counts") {
  auto keys = dgtest::load_fixture<int64_t>("rdnet_keys");
  // 1000 classes, 3 input channels
  const std::map<std::string, int64_t> paper{
      {"tiny", 23863008}, {"small", 50436448}, {"base", 87451096}, {"large", 186269632}};
  for (auto& [variant, count] : paper) {
    INFO("rdnet_" << variant);
    rdnet::RDNet<float> model(rdnet::RDNetConfig::by_name(variant));
    CHECK(model.num_parameters() == count);
    CHECK(model.num_parameters() == dgtest::get(keys, variant + ".__num_params__").item());
    auto sd = model.state_dict();
    size_t expected = 0;
    for (auto& [k, shape] : keys) {
      if (k.rfind(variant + ".", 0) != 0 || k == variant + ".__num_params__") continue;
      ++expected;
      std::string name = k.substr(variant.size() + 1);
      INFO(name);
      REQUIRE(sd.count(name) == 1);
      CHECK(sd.at(name).shape() == shape.to_vector());
    }
    CHECK(sd.size() == expected);
  }
}

TEST_CASE("rdnet with bf16 products: logits and gradients within bfloat16 rounding of timm's float32") {
  // every conv product rounded to bfloat16 (8 bits of mantissa), sums in float32: the errors of
  // independent roundings average out, so whole tensors stay within a few 2^-9 of float32
  auto fx = dgtest::load_fixture<float>("rdnet");
  rdnet::RDNet<float> model(small_config());
  auto [x, target] = timm_case(model, fx);
  Tensor<float> loss;
  {
    dg::MatmulPrecisionGuard bf16(dg::MatmulPrecision::bf16);
    loss = dg::cross_entropy(model.forward(x), target, 0.1);
  }
  loss.backward();  // in the precision of the forward, recorded by each op
  auto relative_l2 = [](const Tensor<float>& got, const Tensor<float>& want) {
    auto g = got.to_vector(), w = want.to_vector();
    double num = 0, den = 0;
    for (size_t i = 0; i < g.size(); ++i) num += (g[i] - w[i]) * double(g[i] - w[i]), den += double(w[i]) * w[i];
    return std::sqrt(num / std::max(den, 1e-300));
  };
  const double loss_err = std::abs(loss.item() - dgtest::get(fx, "loss").item()) / dgtest::get(fx, "loss").item();
  CHECK(loss_err < 1e-3);
  const double dx_err = relative_l2(x.grad(), dgtest::get(fx, "dinput"));
  CHECK(dx_err < 2e-2);
  double worst = 0;
  for (auto& [name, p] : model.named_parameters()) {
    const double e = relative_l2(p.grad(), dgtest::get(fx, "grad." + name));
    INFO("grad." << name << ": relative L2 error " << e);
    CHECK(e < 3e-2);
    worst = std::max(worst, e);
  }
  if (dg::cpu::kBf16Gemm) CHECK(dx_err > 1e-4);  // bf16 did run: float32 products land within 1e-5
  WARN("bf16 products vs timm float32: loss " << loss_err << ", dinput " << dx_err << ", worst parameter gradient "
                                              << worst << " (relative)");
}

TEST_CASE("rdnet MACs at 224 px match timm's GMACs (5.03 / 8.71 / 15.36 / 34.68)") {
  // exact counts from forward hooks on timm's models (conv + linear multiply-accumulates)
  CHECK(rdnet::count_macs(rdnet::RDNetConfig::tiny(), 224, 224) == 5032673424);
  CHECK(rdnet::count_macs(rdnet::RDNetConfig::small(), 224, 224) == 8706216840);
  CHECK(rdnet::count_macs(rdnet::RDNetConfig::base(), 224, 224) == 15358159296);
  CHECK(rdnet::count_macs(rdnet::RDNetConfig::large(), 224, 224) == 34675293792);
}

TEST_CASE("rdnet whole-model parity with timm: logits, features and every gradient") {
  auto fx = dgtest::load_fixture<float>("rdnet");
  rdnet::RDNet<float> model(small_config());
  auto [x, target] = timm_case(model, fx);

  auto feats = model.forward_intermediates(x.detach());
  REQUIRE(feats.size() == 2);
  for (size_t i = 0; i < feats.size(); ++i)
    dgtest::require_close(feats[i], dgtest::get(fx, "features." + std::to_string(i)), 1e-4, 1e-5, "features");

  Tensor<float> logits = model.forward(x);
  dgtest::require_close(logits, dgtest::get(fx, "logits"), 1e-4, 1e-5, "logits");
  Tensor<float> loss = dg::cross_entropy(logits, target, 0.1);
  CHECK(loss.item() == Approx(dgtest::get(fx, "loss").item()).epsilon(1e-5));
  loss.backward();
  // gradients: 1e-4 relative, with an absolute floor of 1e-6 x the largest |gradient| of that
  // tensor for entries near 0 (float32 sums in another order than torch's)
  auto close_grad = [](const Tensor<float>& got, const Tensor<float>& want, const std::string& what) {
    double scale = 0;
    for (float v : want.to_vector()) scale = std::max(scale, double(std::abs(v)));
    dgtest::require_close(got, want, 1e-4, 1e-6 * scale, what);
  };
  close_grad(x.grad(), dgtest::get(fx, "dinput"), "dinput");
  size_t n = 0;
  for (auto& [name, p] : model.named_parameters()) {
    close_grad(p.grad(), dgtest::get(fx, "grad." + name), "grad." + name);
    ++n;
  }
  CHECK(n == model.parameters().size());
}

TEST_CASE("rdnet loads original checkpoints with the stem.stem. prefix") {
  auto fx = dgtest::load_fixture<float>("rdnet");
  std::map<std::string, Tensor<float>> sd;
  for (auto& [k, v] : fx)
    if (k.rfind("param.", 0) == 0) {
      std::string key = k.substr(6);
      if (key.rfind("stem.", 0) == 0) key = "stem.stem." + key.substr(5);
      sd.emplace(key, v);
    }
  std::string path = (std::filesystem::temp_directory_path() / "dg_rdnet_nv.safetensors").string();
  dg::io::save_safetensors(path, sd);
  rdnet::RDNet<float> model(small_config());
  REQUIRE(model.load_timm(path).ok());
  model.eval();
  dg::NoGradGuard g;
  dgtest::require_close(model.forward(dgtest::get(fx, "input")), dgtest::get(fx, "logits"), 1e-4, 1e-5, "logits");
  std::filesystem::remove(path);
}

TEST_CASE("rdnet load_state_dict names missing, unexpected and mis-shaped keys") {
  rdnet::RDNet<float> model(small_config());
  auto sd = model.state_dict();
  std::map<std::string, Tensor<float>> bad(sd.begin(), sd.end());
  bad.erase("head.fc.bias");
  bad["head.fc.extra"] = dg::zeros<float>({1});
  bad["stem.0.weight"] = dg::zeros<float>({1, 2, 3, 4});
  REQUIRE_THROWS_WITH(model.load_state_dict(bad), Catch::Contains("missing keys (1): head.fc.bias") &&
                                                      Catch::Contains("unexpected keys (1): head.fc.extra") &&
                                                      Catch::Contains("stem.0.weight: checkpoint [1, 2, 3, 4] vs model [16, 3, 4, 4]"));
  auto r = model.load_state_dict(bad, false);
  CHECK(r.missing.size() == 1);
  CHECK(r.unexpected.size() == 1);
  CHECK(r.mismatched.size() == 1);
}

TEST_CASE("rdnet rejects inputs of the wrong shape with a clear error") {
  rdnet::RDNet<float> model(small_config());
  REQUIRE_THROWS_WITH(model.forward(dg::zeros<float>({1, 1, 32, 32})),
                      Catch::Contains("expected input (N, 3, H, W), got [1, 1, 32, 32]"));
  REQUIRE_THROWS_WITH(model.forward(dg::zeros<float>({1, 3, 2, 2})), Catch::Contains("smaller than the 4x4 stem patch"));
}

TEST_CASE("rdnet small block gradcheck in double") {
  // one dense stage (two blocks, one with SE) + transition, every parameter random
  rdnet::RDNetConfig c = small_config();
  c.growth_rates = {8, 8};
  c.num_blocks_list = {1, 1};
  c.block_type = {"Block", "BlockESE"};
  c.is_downsample_block = {false, true};
  c.num_init_features = 8;
  c.num_classes = 3;
  c.patch_size = 2;
  dg::Generator gen(3);
  rdnet::RDNet<double> model(c, gen);
  model.eval();
  {
    dg::NoGradGuard g;
    for (auto& p : model.parameters()) p.copy_(dg::randn<double>(p.shape(), gen, 0.0, 0.5));
  }
  Tensor<double> x = dg::randn<double>({1, 3, 4, 4}, gen);
  dgtest::require_gradcheck([&](const std::vector<Tensor<double>>& v) { return model.forward(v[0]); },
                            {x.clone().requires_grad_()});
  // every parameter: backward of a random projection of the logits vs central differences
  Tensor<double> proj = dg::randn<double>({1, 3}, gen);
  auto objective = [&] { return (model.forward(x) * proj).sum(); };
  model.zero_grad();
  objective().backward();
  for (auto& [name, p] : model.named_parameters()) {
    INFO(name);
    for (int64_t j : {int64_t(0), p.numel() / 2, p.numel() - 1}) {
      dg::NoGradGuard g;
      double orig = p.data()[j], eps = 1e-6;
      p.data()[j] = orig + eps;
      double up = objective().item();
      p.data()[j] = orig - eps;
      double down = objective().item();
      p.data()[j] = orig;
      CHECK(p.grad().data()[j] == Approx((up - down) / (2 * eps)).epsilon(1e-5).margin(1e-8));
    }
  }
}

}  // namespace test_rdnet
