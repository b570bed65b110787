// examples/rdnet/rdnet.hpp: RDNet, "DenseNets Reloaded" (Kim, Heo, Han, ECCV 2024), written to
// read like timm's rdnet.py, with the same parameter names, so timm checkpoints load as they are.
// Each dense block's output is CONCATENATED to the stage's features (no additive shortcut).
// Two ways to do that, side by side in DenseStage::forward: the naive one, a fresh concat of all
// features for every block (memory quadratic in depth), and the default, one shared buffer per
// stage whose prefix views the blocks read (dg::DenseBuffer: linear, no copies). Optionally each
// block's activations are recomputed in backward instead of kept (dg::checkpoint).
// Not part of the library: it is user code built from densegrad's nn layers.
//
// Shape legend: N batch, C channels, H x W spatial; features are NCHW like PyTorch.
#pragma once

#include <densegrad/densegrad.hpp>
#include <densegrad/nn/layers.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace rdnet {

using dg::Shape;
using dg::Tensor;
namespace nn = dg::nn;

/// The architecture, with timm's argument names. Presets: tiny, small, base, large, nano.
struct RDNetConfig {
  int64_t in_chans = 3;
  int64_t num_classes = 1000;
  std::vector<int64_t> growth_rates{64, 104, 128, 128, 128, 128, 224};
  std::vector<int64_t> num_blocks_list{3, 3, 3, 3, 3, 3, 3};
  std::vector<std::string> block_type{"Block", "Block", "BlockESE", "BlockESE", "BlockESE", "BlockESE", "BlockESE"};
  std::vector<bool> is_downsample_block{false, true, true, false, false, false, true};  // [0] is unused
  double bottleneck_width_ratio = 4.0;
  double transition_compression_ratio = 0.5;
  double ls_init_value = 1e-6;
  int64_t patch_size = 4;
  int64_t num_init_features = 64;
  double drop_rate = 0.0;       // dropout before the classifier
  double proj_drop_rate = 0.0;  // dropout after each dense block
  double drop_path_rate = 0.0;  // stochastic depth, linear over all blocks
  double norm_eps = 1e-6;       // timm's LayerNorm2d default
  // How dense stages connect; outputs and gradients are the same either way (tests/test_dense.cpp).
  bool dense_buffer = true;       // one shared feature buffer per stage, blocks read prefix views;
                                  // false: the naive path, a fresh concat of all features per block
  bool memory_efficient = false;  // keep no activations inside dense blocks: backward recomputes
                                  // each block (Pleiss et al. 2017), one more forward of the blocks
  // Each block's depthwise conv runs inside dg::depthwise_layer_norm2d_conv2d: the block keeps its
  // input (the stage's buffer) instead of the depthwise output, and backward runs the depthwise
  // conv again. false: the block keeps that output (one tensor as wide as its input) and backward
  // does not rerun it. The same values either way (tests/test_dense.cpp).
  bool recompute_depthwise = true;

  static RDNetConfig tiny() { return {}; }
  static RDNetConfig small() {
    RDNetConfig c;
    c.num_init_features = 72;
    c.growth_rates = {64, 128, 128, 128, 128, 128, 128, 128, 128, 240, 240};
    return c.with_stages({false, true, true, false, false, false, false, false, false, true, false});
  }
  static RDNetConfig base() {
    RDNetConfig c;
    c.num_init_features = 120;
    c.growth_rates = {96, 128, 168, 168, 168, 168, 168, 168, 168, 336, 336};
    return c.with_stages({false, true, true, false, false, false, false, false, false, true, false});
  }
  static RDNetConfig large() {
    RDNetConfig c;
    c.num_init_features = 144;
    c.growth_rates = {128, 192, 256, 256, 256, 256, 256, 256, 256, 256, 360, 360};
    return c.with_stages({false, true, true, false, false, false, false, false, false, false, true, false});
  }
  /// For 28-32 px images (Fashion-MNIST, CIFAR-10): patch 2 stem, four short stages.
  static RDNetConfig nano(int64_t in_chans = 1, int64_t num_classes = 10) {
    RDNetConfig c;
    c.in_chans = in_chans;
    c.num_classes = num_classes;
    c.patch_size = 2;
    c.num_init_features = 32;
    c.growth_rates = {32, 48, 64, 96};
    c.num_blocks_list = {2, 2, 2, 2};
    c.block_type = {"Block", "Block", "BlockESE", "BlockESE"};
    c.is_downsample_block = {false, true, false, true};
    // at 14x14 and smaller maps the depthwise conv is a large part of a step: rerunning it in
    // backward cost about 9% of nano's training throughput (docs/performance.md)
    c.recompute_depthwise = false;
    return c;
  }
  /// By name: "tiny", "small", "base", "large", "nano".
  static RDNetConfig by_name(const std::string& name) {
    if (name == "tiny") return tiny();
    if (name == "small") return small();
    if (name == "base") return base();
    if (name == "large") return large();
    if (name == "nano") return nano();
    DG_THROW("RDNet: unknown model '", name, "' (expected tiny, small, base, large or nano)");
  }

 private:
  /// Three blocks per stage, Block in the first two stages and BlockESE after.
  RDNetConfig with_stages(std::vector<bool> downsample) {
    size_t n = growth_rates.size();
    num_blocks_list.assign(n, 3);
    block_type.assign(n, "BlockESE");
    block_type[0] = block_type[1] = "Block";
    is_downsample_block = std::move(downsample);
    return *this;
  }
};

/// Sets the CPU allocator's cache budget for a program's run (dg::set_cpu_cache_budget): the
/// requested factor when one was given (> 0), else 1.25 for a memory-efficient model (measured:
/// 1.1 held 15 MiB less there for 40% more page faults) and the allocator's default otherwise
/// (1.2 on Linux, no bound elsewhere: dg::CachingCpuAllocator::kDefaultBudget).
inline void set_cache_budget_for(const RDNetConfig& cfg, double requested) {
  dg::set_cpu_cache_budget(requested > 0 ? requested
                           : cfg.memory_efficient ? 1.25
                                                  : dg::CachingCpuAllocator::kDefaultBudget);
}

/// Multiply-accumulates of one forward pass on a (1, in_chans, h, w) image: convolutions and
/// the classifier, the way timm's GMACs are counted (norms, activations and pooling excluded).
/// tiny at 224 px: 5,032,673,424.
inline int64_t count_macs(const RDNetConfig& cfg, int64_t h, int64_t w) {
  auto conv = [&](int64_t c_in, int64_t c_out, int64_t k, int64_t stride, int64_t groups) {
    h = (h - k) / stride + 1;  // no padding here, except the depthwise 7x7 (stride 1, same size)
    w = (w - k) / stride + 1;
    return h * w * c_out * (c_in / groups) * k * k;
  };
  int64_t macs = conv(cfg.in_chans, cfg.num_init_features, cfg.patch_size, cfg.patch_size, 1);
  int64_t c = cfg.num_init_features;
  for (size_t i = 0; i < cfg.growth_rates.size(); ++i) {
    if (i != 0) {
      int64_t compressed = static_cast<int64_t>(static_cast<double>(c) * cfg.transition_compression_ratio / 8) * 8;
      int64_t k = cfg.is_downsample_block[i] ? 2 : 1;
      macs += conv(c, compressed, k, k, 1);
      c = compressed;
    }
    const int64_t g = cfg.growth_rates[i];
    for (int64_t b = 0; b < cfg.num_blocks_list[i]; ++b, c += g) {
      int64_t inter = static_cast<int64_t>(static_cast<double>(c) * cfg.bottleneck_width_ratio / 8) * 8;
      macs += h * w * c * 49 + h * w * inter * c + h * w * g * inter;  // depthwise 7x7, 1x1 expand, 1x1 to g
      if (cfg.block_type[i] == "BlockESE") macs += g * g;                // SE fc on the pooled 1x1 map
    }
  }
  return macs + c * cfg.num_classes;
}

/// timm's EffectiveSEModule: x * hard_sigmoid(conv1x1(mean over H, W of x)).
template <class T = float>
class EffectiveSE : public nn::Layer<T> {
 public:
  explicit EffectiveSE(int64_t channels) {
    fc = this->register_module("fc", std::make_shared<nn::Conv2d<T>>(nn::Conv2dOptions(channels, channels, 1)));
  }
  Tensor<T> forward(const Tensor<T>& x) override {  // x: (N, C, H, W)
    Tensor<T> se = fc->forward(dg::mean(x, {2, 3}, true));  // (N, C, 1, 1)
    return x * dg::hard_sigmoid(se);                        // channel gate, broadcast over H, W
  }
  std::shared_ptr<nn::Conv2d<T>> fc;
};

/// Block / BlockESE: depthwise 7x7 -> LayerNorm2d -> 1x1 expand -> GELU -> 1x1 to growth rate
/// [-> effective SE]. Parameters live under "layers.<i>", as in timm.
template <class T = float>
class Block : public nn::Layer<T> {
 public:
  Block(int64_t in_chs, int64_t inter_chs, int64_t out_chs, bool ese, double eps) {
    layers = this->register_module("layers", std::make_shared<nn::Sequential<T>>());
    dw = std::make_shared<nn::Conv2d<T>>(nn::Conv2dOptions(in_chs, in_chs, 7).padding(3).groups(in_chs));
    layers->push_back(dw);
    norm = std::make_shared<nn::LayerNorm2d<T>>(in_chs, eps);
    layers->push_back(norm);
    expand = std::make_shared<nn::Conv2d<T>>(nn::Conv2dOptions(in_chs, inter_chs, 1));
    layers->push_back(expand);
    layers->push_back(std::make_shared<nn::GELU<T>>());
    reduce = std::make_shared<nn::Conv2d<T>>(nn::Conv2dOptions(inter_chs, out_chs, 1));
    layers->push_back(reduce);
    if (ese) layers->push_back(std::make_shared<EffectiveSE<T>>(out_chs));
  }
  /// The layers in order, fused in two groups; the values are those of running layers 0-5 one by
  /// one, but backward keeps less: the depthwise 7x7, LayerNorm2d and the 1x1 expansion as one op
  /// (dg::depthwise_layer_norm2d_conv2d: backward runs the depthwise conv and the norm again
  /// instead of keeping their outputs; it keeps x, the stage's buffer, which the stage keeps
  /// anyway), then GELU and the 1x1 reduction as one op (dg::gelu_conv2d: backward recomputes the
  /// GELU instead of keeping the block's widest tensor), then the SE when there is one.
  /// With recompute_depthwise false, the depthwise conv runs as its own op (which keeps nothing
  /// beyond its input) and LayerNorm2d + the expansion as dg::layer_norm2d_conv2d, which keeps the
  /// depthwise output.
  Tensor<T> forward(const Tensor<T>& x) override {
    nn::Sequential<T>& l = *layers;
    // the expansion is a 1x1, stride 1, no padding
    const Tensor<T> h = recompute_depthwise
                            ? dg::depthwise_layer_norm2d_conv2d(x, dw->weight, dw->bias, dw->options.padding(),
                                                                norm->weight, norm->bias, norm->eps, expand->weight,
                                                                expand->bias)
                            : dg::layer_norm2d_conv2d(dw->forward(x), norm->weight, norm->bias, norm->eps,
                                                      expand->weight, expand->bias);
    const nn::Conv2dOptions& o = reduce->options;
    Tensor<T> y = dg::gelu_conv2d(h, reduce->weight, reduce->bias, o.stride(), o.padding(), o.dilation(), o.groups());
    return l.size() > 5 ? l[5].forward(y) : y;
  }
  std::shared_ptr<nn::Sequential<T>> layers;  // state-dict names as timm's: layers.0 ... layers.5
  std::shared_ptr<nn::Conv2d<T>> dw;          // layers.0, the depthwise 7x7
  std::shared_ptr<nn::LayerNorm2d<T>> norm;   // layers.1
  std::shared_ptr<nn::Conv2d<T>> expand;      // layers.2, the 1x1 expansion to the bottleneck width
  std::shared_ptr<nn::Conv2d<T>> reduce;      // layers.4, the 1x1 reduction to growth_rate channels
  bool recompute_depthwise = true;            // RDNetConfig::recompute_depthwise
};

/// One dense layer: reads ALL features so far (concatenated), makes growth_rate new channels.
template <class T = float>
class DenseBlock : public nn::Module<T> {
 public:
  DenseBlock(int64_t num_input_features, int64_t growth_rate, double bottleneck_width_ratio, double drop_path_rate,
             double drop_rate, bool ese, double ls_init_value, double eps, bool memory_efficient = false)
      : drop_rate(drop_rate), memory_efficient(memory_efficient) {
    if (ls_init_value > 0) gamma = this->register_parameter("gamma", dg::full<T>({growth_rate}, T(ls_init_value)));
    // the bottleneck width rounds down to a multiple of 8, as in timm
    int64_t inter_chs = static_cast<int64_t>(static_cast<double>(num_input_features) * bottleneck_width_ratio / 8) * 8;
    drop_path = this->register_module("drop_path", std::make_shared<nn::DropPath<T>>(drop_path_rate));
    layers = this->register_module("layers", std::make_shared<Block<T>>(num_input_features, inter_chs, growth_rate, ese, eps));
  }
  /// features: all the stage's feature maps so far, concatenated: (N, C, H, W) -> (N, growth_rate, H, W).
  /// memory_efficient: keeps only `features` for backward, which runs body() again to recompute the
  /// rest (the same drop-path draws: dg::checkpoint replays the random generator); the block must
  /// then outlive that backward.
  Tensor<T> forward(const Tensor<T>& features) {
    if (!memory_efficient) return body(features);
    const bool training = this->is_training();
    return dg::checkpoint(
        [this, training](const std::vector<Tensor<T>>& in) {
          DG_CHECK(this->is_training() == training, "DenseBlock: train/eval mode changed between the forward and "
                   "the backward of a memory_efficient block (backward recomputes the block in the mode it ran in)");
          return body(in[0]);
        },
        {features});
  }
  /// The block's computation: Block, layer scale, drop path, dropout.
  Tensor<T> body(const Tensor<T>& features) {
    Tensor<T> x = layers->forward(features);                    // dense connectivity: see everything
    if (gamma.defined()) x = x * gamma.reshape({1, -1, 1, 1});  // layer scale
    x = drop_path->forward(x);
    if (drop_rate > 0) x = dg::dropout(x, drop_rate, this->is_training(), dg::default_generator());
    return x;
  }
  Tensor<T> gamma;
  std::shared_ptr<nn::DropPath<T>> drop_path;
  std::shared_ptr<Block<T>> layers;
  double drop_rate;
  bool memory_efficient;
};

/// A dense stage: blocks named "dense_block<i>"; the output is the concatenation of the
/// input and every block's new features: C_out = C_in + num_blocks * growth_rate.
template <class T = float>
class DenseStage : public nn::Layer<T> {
 public:
  DenseStage(int64_t num_block, int64_t num_input_features, const std::vector<double>& drop_path_rates,
             int64_t growth_rate, double bottleneck_width_ratio, double drop_rate, bool ese, double ls_init_value,
             double eps, bool dense_buffer = true, bool memory_efficient = false)
      : dense_buffer(dense_buffer) {
    for (int64_t i = 0; i < num_block; ++i) {
      blocks.push_back(this->register_module(
          "dense_block" + std::to_string(i),
          std::make_shared<DenseBlock<T>>(num_input_features, growth_rate, bottleneck_width_ratio, drop_path_rates[i],
                                          drop_rate, ese, ls_init_value, eps, memory_efficient)));
      num_input_features += growth_rate;
    }
    num_out_features = num_input_features;
  }
  Tensor<T> forward(const Tensor<T>& init_feature) override {
    if (!dense_buffer) {  // naive: every block reads a fresh concat of ALL features so far
      std::vector<Tensor<T>> features{init_feature};
      for (auto& block : blocks) features.push_back(block->forward(dg::concat(features, 1)));
      return dg::concat(features, 1);
    }
    // zero copy: one buffer for all num_out_features channels; each block's new channels are
    // copied into their slice once, and "all features so far" is a view of the filled prefix
    dg::DenseBuffer<T> features(init_feature, num_out_features);
    Tensor<T> all = features.append(init_feature);
    for (auto& block : blocks) all = features.append(block->forward(all));
    return all;  // the whole buffer
  }
  std::vector<std::shared_ptr<DenseBlock<T>>> blocks;
  int64_t num_out_features = 0;
  bool dense_buffer;
};

/// timm's NormMlpClassifierHead without hidden layer: global avg pool -> LayerNorm2d ->
/// flatten -> dropout -> fc.
/// One entry of RDNet's dense_stages: the transition from the stage before, when there is one
/// (LayerNorm2d, then a conv compressing the channels: "<i>.0" and "<i>.1", as in timm), then the
/// DenseStage (last). The transition runs as one op, dg::layer_norm2d_conv2d: the values of the
/// two layers, but backward normalizes the stage's features again instead of keeping them
/// normalized (the features themselves are kept anyway, by the blocks that read them).
template <class T = float>
class Stage : public nn::Sequential<T> {
 public:
  Tensor<T> forward(const Tensor<T>& x) override {
    if (!norm) return dense->forward(x);
    const nn::Conv2dOptions& o = conv->options;
    return dense->forward(dg::layer_norm2d_conv2d(x, norm->weight, norm->bias, norm->eps, conv->weight, conv->bias,
                                                  o.stride(), o.padding(), o.dilation(), o.groups()));
  }
  std::shared_ptr<nn::LayerNorm2d<T>> norm;  // the transition, or none in the first stage
  std::shared_ptr<nn::Conv2d<T>> conv;
  std::shared_ptr<DenseStage<T>> dense;
};

template <class T = float>
class Head : public nn::Layer<T> {
 public:
  Head(int64_t in_features, int64_t num_classes, double drop_rate, double eps) : drop_rate(drop_rate) {
    norm = this->register_module("norm", std::make_shared<nn::LayerNorm2d<T>>(in_features, eps));
    fc = this->register_module("fc", std::make_shared<nn::Linear<T>>(in_features, num_classes));
  }
  Tensor<T> forward(const Tensor<T>& x) override {  // x: (N, C, H, W) -> (N, num_classes)
    Tensor<T> h = norm->forward(dg::adaptive_avg_pool2d(x, 1, 1)).flatten(1);
    h = dg::dropout(h, drop_rate, this->is_training(), dg::default_generator());
    return fc->forward(h);
  }
  std::shared_ptr<nn::LayerNorm2d<T>> norm;
  std::shared_ptr<nn::Linear<T>> fc;
  double drop_rate;
};

/// RDNet: patch stem -> dense stages (with transitions between) -> head.
template <class T = float>
class RDNet : public nn::Layer<T> {
 public:
  explicit RDNet(const RDNetConfig& cfg, dg::Generator& gen = dg::default_generator()) : config(cfg) {
    const size_t n = cfg.growth_rates.size();
    DG_CHECK(n > 0 && cfg.num_blocks_list.size() == n && cfg.block_type.size() == n && cfg.is_downsample_block.size() == n,
             "RDNet: growth_rates, num_blocks_list, block_type and is_downsample_block need one entry per stage (got ",
             cfg.growth_rates.size(), ", ", cfg.num_blocks_list.size(), ", ", cfg.block_type.size(), ", ",
             cfg.is_downsample_block.size(), ")");
    stem = this->register_module("stem", std::make_shared<nn::Sequential<T>>());
    stem->push_back(std::make_shared<nn::Conv2d<T>>(
        nn::Conv2dOptions(cfg.in_chans, cfg.num_init_features, cfg.patch_size).stride(cfg.patch_size)));
    stem->push_back(std::make_shared<nn::LayerNorm2d<T>>(cfg.num_init_features, cfg.norm_eps));

    // drop-path rates rise linearly from 0 to drop_path_rate over all blocks (timm)
    int64_t total = 0, seen = 0;
    for (int64_t b : cfg.num_blocks_list) total += b;
    dense_stages = this->register_module("dense_stages", std::make_shared<nn::Sequential<T>>());
    int64_t num_features = cfg.num_init_features, stride = cfg.patch_size;
    for (size_t i = 0; i < n; ++i) {
      auto stage = std::make_shared<Stage<T>>();
      if (i != 0) {  // transition: LayerNorm2d -> conv compressing channels (k2 s2 when downsampling)
        int64_t compressed = static_cast<int64_t>(static_cast<double>(num_features) * cfg.transition_compression_ratio / 8) * 8;
        int64_t k = cfg.is_downsample_block[i] ? 2 : 1;
        stride *= k;
        stage->norm = stage->push_back(std::make_shared<nn::LayerNorm2d<T>>(num_features, cfg.norm_eps));
        stage->conv = stage->push_back(std::make_shared<nn::Conv2d<T>>(nn::Conv2dOptions(num_features, compressed, k).stride(k)));
        num_features = compressed;
      }
      std::vector<double> dpr;
      for (int64_t b = 0; b < cfg.num_blocks_list[i]; ++b, ++seen)
        dpr.push_back(total > 1 ? cfg.drop_path_rate * static_cast<double>(seen) / static_cast<double>(total - 1) : 0.0);
      DG_CHECK(cfg.block_type[i] == "Block" || cfg.block_type[i] == "BlockESE", "RDNet: unknown block type '",
               cfg.block_type[i], "' (expected Block or BlockESE)");
      auto dense = stage->dense = stage->push_back(std::make_shared<DenseStage<T>>(
          cfg.num_blocks_list[i], num_features, dpr, cfg.growth_rates[i], cfg.bottleneck_width_ratio,
          cfg.proj_drop_rate, cfg.block_type[i] == "BlockESE", cfg.ls_init_value, cfg.norm_eps, cfg.dense_buffer,
          cfg.memory_efficient));
      for (auto& block : dense->blocks) block->layers->recompute_depthwise = cfg.recompute_depthwise;
      num_features = dense->num_out_features;
      dense_stages->push_back(stage);
      // a feature map is "final" for its resolution when the next stage downsamples
      if (i + 1 == n || cfg.is_downsample_block[i + 1]) feature_info.push_back({static_cast<int64_t>(i), num_features, stride});
    }
    this->num_features = num_features;
    head = this->register_module("head", std::make_shared<Head<T>>(num_features, cfg.num_classes, cfg.drop_rate, cfg.norm_eps));
    init_weights(gen);
  }

  /// timm's _init_weights: kaiming-normal conv weights, zero linear biases.
  void init_weights(dg::Generator& gen) {
    for (auto& [name, p] : this->named_parameters()) {
      bool is_weight = name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0;
      if (is_weight && p.dim() == 4) nn::init::kaiming_normal_(p, gen);
    }
    nn::init::zeros_(head->fc->bias);
  }

  /// Stem and dense stages: (N, in_chans, H, W) -> (N, num_features, H/32, W/32) for tiny.
  Tensor<T> forward_features(const Tensor<T>& x) {
    check_input(x);
    return dense_stages->forward(stem->forward(x));
  }
  /// The outputs of the stages in feature_info (one per resolution), for dense prediction.
  std::vector<Tensor<T>> forward_intermediates(const Tensor<T>& x) {
    check_input(x);
    std::vector<Tensor<T>> outs;
    Tensor<T> h = stem->forward(x);
    for (size_t i = 0; i < dense_stages->size(); ++i) {
      h = (*dense_stages)[i].forward(h);
      for (auto& f : feature_info)
        if (f.stage == static_cast<int64_t>(i)) outs.push_back(h);
    }
    return outs;
  }
  Tensor<T> forward(const Tensor<T>& x) override { return head->forward(forward_features(x)); }

  /// Loads a timm state dict (safetensors); also accepts the original checkpoints' "stem.stem." keys.
  nn::LoadResult load_timm(const std::string& path, bool strict = true) {
    std::map<std::string, Tensor<T>> sd;
    for (auto& [k, v] : dg::io::load_safetensors<T>(path)) {
      std::string key = k.rfind("stem.stem.", 0) == 0 ? "stem." + k.substr(10) : k;
      sd.emplace(key, v);
    }
    return this->load_state_dict(sd, strict);
  }

  struct FeatureInfo {
    int64_t stage, num_chs, reduction;
  };
  RDNetConfig config;
  std::vector<FeatureInfo> feature_info;
  int64_t num_features = 0;
  std::shared_ptr<nn::Sequential<T>> stem, dense_stages;
  std::shared_ptr<Head<T>> head;

 private:
  void check_input(const Tensor<T>& x) const {
    DG_CHECK(x.dim() == 4 && x.size(1) == config.in_chans, "RDNet: expected input (N, ", config.in_chans,
             ", H, W), got ", dg::shape_str(x.shape()));
    DG_CHECK(x.size(2) >= config.patch_size && x.size(3) >= config.patch_size, "RDNet: input ", dg::shape_str(x.shape()),
             " is smaller than the ", config.patch_size, "x", config.patch_size, " stem patch");
  }
};

}  // namespace rdnet
