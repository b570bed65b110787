// examples/rdnet/study_util.hpp: what pilot_study and rank_study share: small image classifiers
// that differ only in their shortcut (concatenation, as in DenseNet and RDNet, or addition, as
// in ResNet and ConvNeXt), their parameter and MAC counts, pairing an additive net with a
// concatenation net under the same budget, data loading, and a short AdamW training loop.
// Not RDNet: no layer scale, drop path or SE; one block design, the same for both kinds.
//
// Shape legend: N batch, C channels, H x W spatial, K classes; features are NCHW.
#pragma once

#include <densegrad/data/data.hpp>
#include <densegrad/densegrad.hpp>
#include <densegrad/optim/optim.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#ifdef DENSEGRAD_WITH_OPENMP
#include <omp.h>
#endif

namespace study {

using dg::Tensor;
namespace nn = dg::nn;
namespace data = dg::data;

/// How a block's output joins the features it read.
enum class Shortcut {
  concat,  // x <- [x, block(x)] along channels: a stage's width grows by `growth` per block
  add,     // x <- x + block(x): a stage's width stays
};
inline const char* name(Shortcut s) { return s == Shortcut::concat ? "concat" : "add"; }

/// A small classifier: a patch stem (conv patch x patch, stride patch, + LayerNorm2d), stages of blocks at
/// halving resolutions (transition between stages: LayerNorm2d + conv 2x2 stride 2), and a head
/// (global average pool, LayerNorm, linear). Every block: depthwise kernel x kernel conv ->
/// LayerNorm2d -> 1x1 conv to round(C_in * expansion) -> GELU -> 1x1 conv to its output.
struct NetSpec {
  Shortcut shortcut = Shortcut::concat;
  int64_t in_chans = 1, num_classes = 10, image_size = 28;
  int64_t patch = 2;                 // the stem's kernel and stride
  std::vector<int64_t> blocks{3};    // blocks per stage
  std::vector<int64_t> widths{24};   // channels entering each stage (stem / transition output);
                                     // add: also every block's width in that stage
  std::vector<int64_t> growth{12};   // concat: channels each block of the stage appends
  int64_t kernel = 5;                // depthwise kernel size (odd)
  double expansion = 2.0;            // bottleneck width over the block's input width
  double lr = 2e-3;                  // peak AdamW learning rate to train it with

  int64_t num_stages() const { return static_cast<int64_t>(blocks.size()); }
  /// Channels leaving stage i: widths[i] + blocks[i] * growth[i] (concat) or widths[i] (add).
  int64_t stage_out(int64_t i) const {
    return shortcut == Shortcut::concat ? widths[i] + blocks[i] * growth[i] : widths[i];
  }
  /// The bottleneck width of a block reading c channels.
  int64_t inter(int64_t c) const { return std::max<int64_t>(4, std::llround(static_cast<double>(c) * expansion)); }
  /// One line: "concat: widths 24/20, growth 12/16, blocks 3/2, kernel 5, expansion 2, lr 2.0e-03".
  std::string str() const {
    auto list = [](const std::vector<int64_t>& v) {
      std::string s;
      for (size_t i = 0; i < v.size(); ++i) s += (i ? "/" : "") + std::to_string(v[i]);
      return s;
    };
    char tail[96];
    std::snprintf(tail, sizeof tail, "blocks %s, kernel %lld, expansion %g, lr %.1e", list(blocks).c_str(),
                  static_cast<long long>(kernel), expansion, lr);
    return std::string(name(shortcut)) + ": widths " + list(widths) +
           (shortcut == Shortcut::concat ? ", growth " + list(growth) : std::string()) + ", " + tail;
  }
  void check() const {
    const size_t n = blocks.size();
    DG_CHECK(n > 0 && widths.size() == n && (shortcut == Shortcut::add || growth.size() == n),
             "NetSpec: blocks, widths (and growth for concat) need one entry per stage, got ", blocks.size(), ", ",
             widths.size(), ", ", growth.size());
    DG_CHECK(kernel > 0 && kernel % 2 == 1, "NetSpec: kernel must be odd and positive, got ", kernel);
    DG_CHECK(patch > 0 && (image_size / patch) >> (n - 1) >= 1, "NetSpec: a patch ", patch, " stem and ", n,
             " stages shrink a ", image_size, " px image below 1 px");
  }
};

// ---------------------------------------------------------------- counting

/// Parameters of a conv (with bias): out * in / groups * k * k + out.
inline int64_t conv_params(int64_t c_in, int64_t c_out, int64_t k, int64_t groups = 1) {
  return c_out * (c_in / groups) * k * k + c_out;
}

/// Number of parameters of the network spec describes (equals StudyNet::num_parameters()).
inline int64_t count_params(const NetSpec& s) {
  int64_t p = conv_params(s.in_chans, s.widths[0], s.patch) + 2 * s.widths[0];  // stem conv + LayerNorm2d
  int64_t c = s.widths[0];
  for (int64_t i = 0; i < s.num_stages(); ++i) {
    if (i > 0) p += 2 * c + conv_params(c, s.widths[i], 2), c = s.widths[i];  // transition
    for (int64_t b = 0; b < s.blocks[i]; ++b) {
      const int64_t out = s.shortcut == Shortcut::concat ? s.growth[i] : c;
      p += conv_params(c, c, s.kernel, c) + 2 * c + conv_params(c, s.inter(c), 1) + conv_params(s.inter(c), out, 1);
      if (s.shortcut == Shortcut::concat) c += out;
    }
  }
  return p + 2 * c + c * s.num_classes + s.num_classes;  // head: LayerNorm + linear
}

/// Multiply-accumulates of one forward pass on one image: convolutions and the classifier
/// (norms, activations, pooling and the shortcut itself excluded, as rdnet::count_macs).
inline int64_t count_macs(const NetSpec& s) {
  int64_t hw = s.image_size / s.patch;  // the stem's patch x patch, stride patch conv
  int64_t m = hw * hw * s.widths[0] * s.in_chans * s.patch * s.patch, c = s.widths[0];
  for (int64_t i = 0; i < s.num_stages(); ++i) {
    if (i > 0) hw /= 2, m += hw * hw * s.widths[i] * c * 4, c = s.widths[i];
    for (int64_t b = 0; b < s.blocks[i]; ++b) {
      const int64_t out = s.shortcut == Shortcut::concat ? s.growth[i] : c, e = s.inter(c);
      m += hw * hw * (c * s.kernel * s.kernel + c * e + e * out);
      if (s.shortcut == Shortcut::concat) c += out;
    }
  }
  return m + c * s.num_classes;
}

// ---------------------------------------------------------------- the network

/// depthwise k x k -> LayerNorm2d -> 1x1 expand -> GELU -> 1x1 to c_out: (N, C_in, H, W) -> (N, C_out, H, W).
class Block : public nn::Layer<float> {
 public:
  Block(int64_t c_in, int64_t inter, int64_t c_out, int64_t k, dg::Generator& gen) {
    layers = register_module("layers", std::make_shared<nn::Sequential<float>>());
    layers->push_back(std::make_shared<nn::Conv2d<float>>(nn::Conv2dOptions(c_in, c_in, k).padding(k / 2).groups(c_in), gen));
    layers->push_back(std::make_shared<nn::LayerNorm2d<float>>(c_in));
    layers->push_back(std::make_shared<nn::Conv2d<float>>(nn::Conv2dOptions(c_in, inter, 1), gen));
    layers->push_back(std::make_shared<nn::GELU<float>>());
    layers->push_back(std::make_shared<nn::Conv2d<float>>(nn::Conv2dOptions(inter, c_out, 1), gen));
  }
  Tensor<float> forward(const Tensor<float>& x) override { return layers->forward(x); }
  std::shared_ptr<nn::Sequential<float>> layers;
};

/// A stage of blocks joined by `shortcut`. concat: one shared buffer (dg::DenseBuffer), each
/// block reads every channel so far and appends its own: C_out = C_in + blocks * growth.
/// add: each block's output is added to its input: C_out = C_in.
class Stage : public nn::Layer<float> {
 public:
  Stage(const NetSpec& s, int64_t i, dg::Generator& gen) : shortcut(s.shortcut), out_channels(s.stage_out(i)) {
    int64_t c = s.widths[i];
    for (int64_t b = 0; b < s.blocks[i]; ++b) {
      const int64_t out = shortcut == Shortcut::concat ? s.growth[i] : c;
      blocks.push_back(register_module("block" + std::to_string(b), std::make_shared<Block>(c, s.inter(c), out, s.kernel, gen)));
      if (shortcut == Shortcut::concat) c += out;
    }
  }
  Tensor<float> forward(const Tensor<float>& x) override {  // x: (N, C_in, H, W)
    if (shortcut == Shortcut::add) {
      Tensor<float> h = x;
      for (auto& block : blocks) h = h + block->forward(h);  // additive shortcut
      return h;
    }
    dg::DenseBuffer<float> features(x, out_channels);  // concatenation shortcut, zero copy
    Tensor<float> all = features.append(x);
    for (auto& block : blocks) all = features.append(block->forward(all));
    return all;  // (N, C_out, H, W)
  }
  Shortcut shortcut;
  int64_t out_channels;
  std::vector<std::shared_ptr<Block>> blocks;
};

/// The network a NetSpec describes; the weights come from `gen` (torch's default inits).
class StudyNet : public nn::Layer<float> {
 public:
  StudyNet(const NetSpec& s, dg::Generator& gen) : spec(s) {
    s.check();
    stem = register_module("stem", std::make_shared<nn::Sequential<float>>());
    stem->push_back(std::make_shared<nn::Conv2d<float>>(nn::Conv2dOptions(s.in_chans, s.widths[0], s.patch).stride(s.patch), gen));
    stem->push_back(std::make_shared<nn::LayerNorm2d<float>>(s.widths[0]));
    int64_t c = s.widths[0];
    for (int64_t i = 0; i < s.num_stages(); ++i) {
      auto stage = register_module("stages" + std::to_string(i), std::make_shared<nn::Sequential<float>>());
      if (i > 0) {  // transition: halve the resolution, set the next stage's input width
        stage->push_back(std::make_shared<nn::LayerNorm2d<float>>(c));
        stage->push_back(std::make_shared<nn::Conv2d<float>>(nn::Conv2dOptions(c, s.widths[i], 2).stride(2), gen));
      }
      stage->push_back(std::make_shared<Stage>(s, i, gen));
      stages.push_back(stage);
      c = s.stage_out(i);
    }
    norm = register_module("norm", std::make_shared<nn::LayerNorm<float>>(dg::Shape{c}));
    fc = register_module("fc", std::make_shared<nn::Linear<float>>(c, s.num_classes, true, gen));
    DG_CHECK(num_parameters() == count_params(s), "StudyNet: ", num_parameters(), " parameters, count_params says ",
             count_params(s), " (", s.str(), ")");
  }
  /// The output of every stage: (N, C_out_i, H_i, W_i), i = 0 .. num_stages - 1.
  std::vector<Tensor<float>> forward_stages(const Tensor<float>& x) {  // x: (N, in_chans, H, W)
    std::vector<Tensor<float>> outs;
    Tensor<float> h = stem->forward(x);
    for (auto& stage : stages) outs.push_back(h = stage->forward(h));
    return outs;
  }
  Tensor<float> forward(const Tensor<float>& x) override {  // -> logits (N, K)
    Tensor<float> h = forward_stages(x).back();
    return fc->forward(norm->forward(dg::adaptive_avg_pool2d(h, 1).flatten(1)));
  }
  NetSpec spec;
  std::shared_ptr<nn::Sequential<float>> stem;
  std::vector<std::shared_ptr<nn::Sequential<float>>> stages;
  std::shared_ptr<nn::LayerNorm<float>> norm;
  std::shared_ptr<nn::Linear<float>> fc;
};

// ---------------------------------------------------------------- pairs under one budget

/// The input width of a concat stage after one that ended with c channels: half of them
/// (DenseNet's compression 0.5), rounded to a multiple of 4, at least 8.
inline int64_t compressed(int64_t c) { return std::max<int64_t>(8, (c / 2 + 2) / 4 * 4); }

/// The additive net matched to a concatenation net: the same stages, blocks, kernel, expansion
/// and learning rate; stage widths chosen so that its parameter count and MACs come closest to
/// the concat net's (the larger of the two relative mismatches is minimized). Search: the best
/// widths in proportion to the concat stages' outputs, then every pair of stage widths over
/// 4..512 while that improves the match (with two or more stages both budgets can be met).
inline NetSpec additive_twin(const NetSpec& concat) {
  DG_CHECK(concat.shortcut == Shortcut::concat, "additive_twin: expected a concat NetSpec, got ", concat.str());
  const double p0 = static_cast<double>(count_params(concat)), f0 = static_cast<double>(count_macs(concat));
  auto mismatch = [&](const NetSpec& a) {
    return std::max(std::abs(static_cast<double>(count_params(a)) / p0 - 1),
                    std::abs(static_cast<double>(count_macs(a)) / f0 - 1));
  };
  NetSpec best = concat;
  best.shortcut = Shortcut::add;
  best.growth.clear();
  double best_err = INFINITY;
  for (int64_t m = 4; m <= 1024; ++m) {  // proportional widths: m for the first stage
    NetSpec a = best;
    for (int64_t i = 0; i < concat.num_stages(); ++i)
      a.widths[i] = std::max<int64_t>(4, std::llround(static_cast<double>(m) * static_cast<double>(concat.stage_out(i)) /
                                                      static_cast<double>(concat.stage_out(0))));
    if (const double e = mismatch(a); e < best_err) best_err = e, best = a;
  }
  for (bool improved = true; improved;) {  // then two stage widths at a time, every pair of stages
    improved = false;
    for (int64_t i = 0; i < concat.num_stages(); ++i)
      for (int64_t j = i + 1; j < concat.num_stages(); ++j)
        for (int64_t wi = 4; wi <= 512; ++wi)
          for (int64_t wj = 4; wj <= 512; ++wj) {
            NetSpec a = best;
            a.widths[i] = wi, a.widths[j] = wj;
            if (const double e = mismatch(a); e < best_err - 1e-12) best_err = e, best = a, improved = true;
          }
  }
  return best;
}

/// A random concatenation net for image_size px images behind a patch x patch stem, drawn from `gen`: 1 or 2 stages of
/// 2-4 blocks, stem width 16/24/32, growth 8/12/16 per stage, kernel 3/5/7, expansion 1-3,
/// lr log-uniform in [lr_min, lr_max]. A stage after the first starts from compressed() channels.
inline NetSpec sample_concat(dg::Generator& gen, int64_t in_chans, int64_t num_classes, int64_t image_size,
                             int64_t patch = 4, double lr_min = 2e-3, double lr_max = 1e-2) {
  auto pick = [&](std::initializer_list<int64_t> v) { return *(v.begin() + gen.randint(v.size())); };
  NetSpec s;
  s.in_chans = in_chans, s.num_classes = num_classes, s.image_size = image_size, s.patch = patch;
  const int64_t stages = 1 + static_cast<int64_t>(gen.randint(2));
  s.blocks.clear(), s.widths.clear(), s.growth.clear();
  s.kernel = pick({3, 5, 7});
  s.expansion = static_cast<double>(pick({1, 2, 3}));
  s.lr = lr_min * std::pow(lr_max / lr_min, gen.uniform());
  for (int64_t i = 0; i < stages; ++i) {
    s.widths.push_back(i == 0 ? pick({16, 24, 32}) : compressed(s.stage_out(i - 1)));
    s.growth.push_back(pick({8, 12, 16}));
    s.blocks.push_back(pick({2, 3, 4}));
  }
  return s;
}

// ---------------------------------------------------------------- data and training

/// A dataset split, with the normalization its images get (no other augmentation).
struct Data {
  data::Dataset train, test;
  data::AugmentOptions normalize;
  std::string name;
};

/// Fashion-MNIST (dir: its directory, empty for the default one) or CIFAR-10 (dir: the directory
/// holding cifar-10-batches-bin); the first limit_train / limit_test images of each split (0: all).
inline Data load_data(const std::string& which, const std::string& dir, int64_t limit_train, int64_t limit_test) {
  Data d;
  d.name = which;
  if (which == "fashion-mnist") {
    const std::string where = dir.empty() ? data::default_fashion_mnist_dir() : dir;
    d.train = data::load_fashion_mnist(where, true);
    d.test = data::load_fashion_mnist(where, false);
    d.normalize.normalize({0.2860f}, {0.3530f});
  } else {
    DG_CHECK(which == "cifar10", "--data: expected fashion-mnist or cifar10, got '", which, "'");
    DG_CHECK(!dir.empty(), "--data cifar10 needs --data-dir (the directory holding cifar-10-batches-bin)");
    d.train = data::load_cifar10(dir, true);
    d.test = data::load_cifar10(dir, false);
    d.normalize.normalize({0.4914f, 0.4822f, 0.4465f}, {0.2470f, 0.2435f, 0.2616f});
  }
  if (limit_train > 0) d.train = d.train.head(limit_train);
  if (limit_test > 0) d.test = d.test.head(limit_test);
  return d;
}

/// How a net is trained: AdamW (weight decay on weights, not on norms and biases, as timm) with
/// a cosine schedule after a linear warmup over the first warmup_fraction of the steps.
struct TrainOptions {
  int64_t epochs = 1, batch_size = 64;
  double weight_decay = 0.05, warmup_fraction = 0.1;
  uint64_t seed = 0;  // the data order
};

/// Trains net at net.spec.lr on d.train; returns the mean training loss of the last epoch.
inline double train(StudyNet& net, const Data& d, const TrainOptions& o) {
  data::DataLoader loader(d.train, data::LoaderOptions()
                                       .batch(o.batch_size)
                                       .with_seed(o.seed)
                                       .augmentation(d.normalize)
                                       .drop_last_batch(true));
  DG_CHECK(loader.size() > 0, "train: ", d.train.size(), " training images are fewer than one batch of ", o.batch_size);
  const double steps = static_cast<double>(o.epochs * loader.size());
  dg::optim::AdamW<float> opt(dg::optim::timm_param_groups(net, o.weight_decay),
                              dg::optim::AdamWOptions().lr(net.spec.lr).weight_decay(o.weight_decay));
  dg::optim::CosineSchedule sched(net.spec.lr, steps, o.warmup_fraction * steps, net.spec.lr * 0.01, net.spec.lr * 0.01);
  net.train();
  double loss_sum = 0;
  int64_t step = 0;
  for (int64_t epoch = 0; epoch < o.epochs; ++epoch) {
    loader.set_epoch(epoch);
    loss_sum = 0;
    for (data::Batch& b : loader) {
      sched.apply(opt, static_cast<double>(step++));
      Tensor<float> loss = dg::cross_entropy(net.forward(b.images), b.labels);
      loss.backward();
      opt.step();
      opt.zero_grad();
      loss_sum += loss.item();
    }
  }
  return loss_sum / static_cast<double>(loader.size());
}

/// Top-1 accuracy on d.test in percent (eval mode, nothing recorded).
inline double accuracy(StudyNet& net, const Data& d) {
  dg::NoGradGuard no_grad;
  net.eval();
  data::DataLoader loader(d.test, data::LoaderOptions().batch(250).shuffled(false).augmentation(d.normalize));
  int64_t correct = 0;
  for (data::Batch& b : loader) {
    const Tensor<float> logits = net.forward(b.images).contiguous();  // (B, K)
    const int64_t K = logits.size(1);
    for (int64_t i = 0; i < b.size(); ++i) {
      const float* row = logits.data() + i * K;
      correct += std::max_element(row, row + K) - row == b.labels.data()[i];
    }
  }
  net.train();
  return 100.0 * static_cast<double>(correct) / static_cast<double>(std::max<int64_t>(d.test.size(), 1));
}

// ---------------------------------------------------------------- small things

/// Mean and sample standard deviation (n - 1; 0 for one value).
inline std::pair<double, double> mean_std(const std::vector<double>& v) {
  double m = 0, ss = 0;
  for (double x : v) m += x;
  m /= static_cast<double>(std::max<size_t>(v.size(), 1));
  for (double x : v) ss += (x - m) * (x - m);
  return {m, v.size() > 1 ? std::sqrt(ss / static_cast<double>(v.size() - 1)) : 0.0};
}

/// OpenMP threads for the kernels (a no-op without OpenMP).
inline void set_threads(int n) {
#ifdef DENSEGRAD_WITH_OPENMP
  omp_set_num_threads(n);
#else
  (void)n;
#endif
}

/// printf into a std::string.
template <class... A>
std::string format(const char* f, A... a) {
  char buf[512];
  std::snprintf(buf, sizeof buf, f, a...);
  return buf;
}

}  // namespace study
