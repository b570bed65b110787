// rdnet_train: train an RDNet image classifier on Fashion-MNIST, CIFAR-10 or synthetic data,
// on the CPU or a CUDA GPU: AdamW + cosine LR with warmup, label smoothing / mixup / cutmix, drop
// path, gradient accumulation, EMA, checkpoints that resume bit for bit; data-parallel over MPI
// (each of P ranks trains on its shard, a step sees P x batch images); --precision bf16 takes
// the conv products in bfloat16 (float32 weights, activations and gradients), on the CPU or a GPU.
//   rdnet_train                                  # nano on Fashion-MNIST, the default schedule
//   rdnet_train --epochs 2 --limit-train 5000    # a quick look
//   rdnet_train --resume runs/nano-fashion-mnist/last.safetensors
//   mpirun -np 2 rdnet_train --threads 1         # 2 processes (docs/distributed.md)
// Writes OUT/metrics.csv, OUT/curves.svg, OUT/last.safetensors and OUT/best.safetensors.
//
// The default schedule (nano, 1x28x28): 24 epochs, batch 128, lr 4e-3, 0.2 warmup epochs, label
// smoothing 0.1, layer scale starting at 1, random crop (pad 2) + horizontal flip from the second
// epoch on, no mixup/cutmix/drop path; conv products in bfloat16 where the CPU build has
// AVX512-BF16 (--precision auto), float32 elsewhere. Regularization grows with training, as in
// EfficientNetV2's progressive learning: on Fashion-MNIST the first epoch reached 85.5-86.1%
// without augmentation and 81.6% with it, while ten epochs without any augmentation overfit (test
// loss rising from epoch 6, 90.8% at epoch 8). In a sweep of the recipe
// (docs/results/nano-recipe-sweep.md) the length of the schedule moved the final accuracy most
// (91.2-91.7% after ten epochs, 92.2% after fifteen); 24 epochs with the layer scale at 1 ended at
// 93.15%. bf16 products ended fifteen epochs at 92.15% against float32's 92.12%, and run a step
// 1.1-1.4x faster, which is what lets 24 epochs fit in about half an hour on 2 Zen 4 cores.
// 32 px images (CIFAR-10) get random crop (pad 4) + horizontal flip from the start.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <unistd.h>

#ifdef DENSEGRAD_WITH_OPENMP
#include <omp.h>
#endif

#include <densegrad/data/data.hpp>
#include <densegrad/optim/optim.hpp>

#include "rdnet.hpp"
#include "train_util.hpp"

#ifdef DENSEGRAD_WITH_MPI
#include <densegrad/dist/dist.hpp>
namespace dist = dg::dist;
#else  // built without MPI: a world of one, where every collective is the identity
namespace dist {
inline int rank() { return 0; }
inline int world_size() { return 1; }
inline std::string rank_tag() { return ""; }
inline void all_reduce_sum(double*, int) {}
inline bool all_true(bool b) { return b; }
inline void check_uniform(int64_t, const std::string&) {}
inline const dg::data::Dataset& eval_shard(const dg::data::Dataset& set) { return set; }
template <class M> void broadcast_parameters(const M&) {}
template <class M> void check_in_sync(const M&, const std::string&) {}
struct Reducer { void set_sync(bool) {} void finish() {} int64_t num_buckets() const { return 0; } };
}  // namespace dist
#endif
#ifdef DENSEGRAD_WITH_NCCL
#include <densegrad/dist/nccl.hpp>  // --device cuda on several ranks: gradient sums with NCCL
#endif

using dg::Tensor;
using Clock = std::chrono::steady_clock;

/// Everything the command line sets. A checkpoint stores these (as "--name=value" lines), and
/// --resume starts from them: what is given on the command line wins.
struct Args {
  std::string data = "fashion-mnist", data_dir, model = "nano", out, resume, nan_policy = "stop", device = "cpu";
  std::string precision = "auto";
  int64_t epochs = 24, batch_size = 128, accum_steps = 1, limit_train = 0, limit_test = 0, eval_every = 1;
  int64_t stop_after = 0, crop_pad = -1, aug_start = -1;
  bool memory_efficient = false;
  double cache_budget = 0;  // dg::set_cpu_cache_budget; 0: the allocator's default, or 1.25 with --memory-efficient
  double ls_init = 0;  // 0: 1 for nano, timm's 1e-6 for the other presets
  double lr = 4e-3, min_lr = 1e-5, weight_decay = 0.05, warmup_epochs = 0.2, label_smoothing = 0.1;
  double mixup = 0, cutmix = 0, drop_path = 0, ema = 0, clip_grad = 0, hflip = -1, reprob = 0;
  uint64_t seed = 0;
  int threads = 2, workers = 1;
};

void add_options(CLI::App& app, Args& a) {
  app.option_defaults()->always_capture_default()->take_last();  // a later --x overrides an earlier one
  app.add_option("--data", a.data, "dataset")->check(CLI::IsMember({"fashion-mnist", "cifar10", "synthetic"}));
  app.add_option("--data-dir", a.data_dir, "dataset directory (default: Fashion-MNIST's, see DENSEGRAD_FASHION_MNIST_DIR)");
  app.add_option("--model", a.model, "RDNet preset: nano (28-32 px), tiny, small, base, large");
  app.add_option("--epochs", a.epochs, "length of the schedule")->check(CLI::PositiveNumber);
  app.add_option("--batch-size", a.batch_size, "images per micro-batch")->check(CLI::PositiveNumber);
  app.add_option("--lr", a.lr, "peak learning rate (AdamW)")->check(CLI::NonNegativeNumber);
  app.add_option("--min-lr", a.min_lr, "learning rate at the end of the cosine")->check(CLI::NonNegativeNumber);
  app.add_option("--weight-decay", a.weight_decay, "AdamW decoupled weight decay (not on 1-D params)");
  app.add_option("--warmup-epochs", a.warmup_epochs, "linear warmup, in epochs (fractions work)");
  app.add_option("--label-smoothing", a.label_smoothing, "label smoothing (folded into the mixup targets)");
  app.add_option("--mixup", a.mixup, "mixup alpha (0: off)")->check(CLI::NonNegativeNumber);
  app.add_option("--cutmix", a.cutmix, "cutmix alpha (0: off)")->check(CLI::NonNegativeNumber);
  app.add_option("--drop-path", a.drop_path, "stochastic depth rate of the last block")->check(CLI::Range(0.0, 1.0));
  app.add_option("--ls-init", a.ls_init,
                 "initial layer scale (gamma) of every dense block (0: 1 for nano, timm's 1e-6 for the other presets)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--memory-efficient", a.memory_efficient,
               "recompute each dense block in backward instead of keeping its activations (less memory, same numbers)")
      ->capture_default_str();
  app.add_option("--cache-budget", a.cache_budget,
                 "the CPU allocator holds memory in use plus cached up to this factor of the most in use at once "
                 "(>= 1; 0, the default: the allocator's, 1.2 on Linux and no bound elsewhere, or 1.25 with --memory-efficient)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--accum-steps", a.accum_steps, "micro-batches per optimizer step")->check(CLI::PositiveNumber);
  app.add_option("--ema", a.ema, "EMA decay of the weights; evaluated and recorded instead of the raw weights (0: off)")->check(CLI::Range(0.0, 1.0));
  app.add_option("--clip-grad", a.clip_grad, "max global gradient norm (0: off)")->check(CLI::NonNegativeNumber);
  app.add_option("--crop-pad", a.crop_pad, "random crop padding (-1: 4 for 32 px images, 2 for 28 px, 0 for synthetic)");
  app.add_option("--aug-start", a.aug_start,
                 "first epoch (0-based) with crop/flip/erasing; earlier epochs see plain images (-1: 1 for 28 px, else 0)");
  app.add_option("--hflip", a.hflip, "horizontal flip probability (-1: 0.5, 0 for synthetic)");
  app.add_option("--reprob", a.reprob, "random erasing probability")->check(CLI::Range(0.0, 1.0));
  app.add_option("--seed", a.seed, "seeds the weights, the data order, augmentation and drop path");
  app.add_option("--threads", a.threads, "OpenMP threads")->check(CLI::PositiveNumber);
  app.add_option("--device", a.device, "where the model trains (cuda: the first GPU; needs a CUDA build)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--precision", a.precision,
                 "fp32, or bf16: conv products in bfloat16 with float32 sums, weights and gradients (a GPU, or a "
                 "CPU with AVX512-BF16); auto: bf16 on a CPU build with AVX512-BF16, else fp32")
      ->check(CLI::IsMember({"auto", "fp32", "bf16"}));
  app.add_option("--workers", a.workers, "data loader threads (0: load in the training thread)")->check(CLI::NonNegativeNumber);
  app.add_option("--out", a.out, "output directory (default: runs/<model>-<data>)");
  app.add_option("--resume", a.resume, "continue from a checkpoint (its settings are the defaults)");
  app.add_option("--limit-train", a.limit_train, "use the first N training images (synthetic: N, default 2048)");
  app.add_option("--limit-test", a.limit_test, "use the first N test images (synthetic: N, default 512)");
  app.add_option("--eval-every", a.eval_every, "evaluate every N epochs (and after the last)")->check(CLI::PositiveNumber);
  app.add_option("--nan-policy", a.nan_policy, "on a NaN/Inf loss or gradient")->check(CLI::IsMember({"stop", "skip"}));
  app.add_option("--stop-after", a.stop_after, "exit after this many epochs of the schedule (0: run it all)");
}

/// The settings as "--name=value" lines, what a checkpoint stores for --resume.
std::string settings_text(const CLI::App& app) {
  std::string text;
  for (const CLI::Option* o : app.get_options()) {
    if (o->get_lnames().empty() || o->get_lnames()[0] == "help") continue;
    const std::string name = o->get_lnames()[0];
    if (name == "resume" || name == "stop-after") continue;  // about this run only
    text += "--" + name + "=" + (o->count() ? o->results().back() : o->get_default_str()) + "\n";
  }
  return text;
}

/// Test loss (no smoothing) and top-1 accuracy in percent, in eval mode without recording.
/// With several ranks each evaluates its part of the test set (dist::eval_shard) and the sums are added.
std::pair<double, double> evaluate(rdnet::RDNet<float>& model, dg::data::DataLoader& loader, dg::Device dev) {
  dg::NoGradGuard no_grad;
  model.eval();
  double loss_sum = 0;
  int64_t correct = 0, seen = 0;
  for (dg::data::Batch& b : loader) {
    Tensor<float> logits = model.forward(b.images.to(dev));  // (B, K)
    loss_sum += static_cast<double>(dg::cross_entropy(logits, b.labels.to(dev)).item()) * static_cast<double>(b.size());
    const Tensor<float> l = logits.to(dg::Device::cpu()).contiguous();
    const int64_t K = l.size(1);
    for (int64_t i = 0; i < b.size(); ++i) {
      const float* row = l.data() + i * K;
      correct += std::max_element(row, row + K) - row == b.labels.data()[i];
    }
    seen += b.size();
  }
  model.train();
  double sums[3] = {loss_sum, static_cast<double>(correct), static_cast<double>(seen)};
  dist::all_reduce_sum(sums, 3);
  return {sums[0] / std::max(sums[2], 1.0), 100.0 * sums[1] / std::max(sums[2], 1.0)};
}

int train_main(int argc, char** argv) {
  // ---- settings: the command line, on top of the checkpoint's settings when resuming
  Args a;
  CLI::App app{"rdnet_train: train an RDNet on Fashion-MNIST, CIFAR-10 or synthetic data"};
  add_options(app, a);
  CLI11_PARSE(app, argc, argv);
  std::string settings = settings_text(app);
  train_util::Checkpoint resumed;
  if (!a.resume.empty()) {
    try {
      resumed = train_util::Checkpoint::load(a.resume);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "rdnet_train: error: cannot resume: %s\n", e.what());
      return 1;
    }
    std::vector<std::string> tokens;  // the checkpoint's settings, then this command line (last wins)
    std::istringstream saved(resumed.meta("args"));
    for (std::string line; std::getline(saved, line);)
      if (!line.empty()) tokens.push_back(line);
    tokens.insert(tokens.end(), argv + 1, argv + argc);
    std::reverse(tokens.begin(), tokens.end());  // CLI11 takes the vector in reverse order
    CLI::App app2{app.get_description()};
    a = Args{};
    add_options(app2, a);
    try {
      app2.parse(tokens);
    } catch (const CLI::ParseError& e) {
      return app2.exit(e);
    }
    settings = settings_text(app2);
  }
  if (a.precision == "auto") {  // resolved once; the checkpoint stores what it became, so --resume repeats it
    a.precision = a.device == "cpu" && dg::cpu::kBf16Gemm ? "bf16" : "fp32";
    const std::string from = "--precision=auto\n", to = "--precision=" + a.precision + "\n";
    if (const size_t at = settings.find(from); at != std::string::npos) settings.replace(at, from.size(), to);
  }
  if (a.out.empty())  // a resumed run goes on writing next to its checkpoint
    a.out = !a.resume.empty() ? std::filesystem::path(a.resume).parent_path().string() : "runs/" + a.model + "-" + a.data;
  if (a.out.empty()) a.out = ".";

  // bf16 asked on a CPU build without AVX512-BF16: the products stay float32, while gelu_conv2d
  // still keeps its input rounded to bfloat16 (that needs no special instructions)
  const bool bf16_as_fp32 = a.precision == "bf16" && a.device == "cpu" && !dg::cpu::kBf16Gemm;
  if (bf16_as_fp32)
    std::printf("rdnet_train: this build has no AVX512-BF16 (compile with -march=native on a CPU that has it): "
                "--precision bf16 runs fp32 products; gelu_conv2d still keeps its input in bfloat16\n");
  dg::set_matmul_precision(dg::parse_matmul_precision(a.precision));  // this thread runs every step

#ifdef DENSEGRAD_WITH_OPENMP
  omp_set_num_threads(a.threads);
#else
  if (a.threads > 1) std::printf("rdnet_train: built without OpenMP, --threads %d has no effect\n", a.threads);
#endif

  try {
    // ---- data: (N, C, H, W) images in [0, 1] and labels
    namespace data = dg::data;
    data::Dataset train_set, test_set;
    std::vector<float> mean, stdev;  // normalization per channel
    if (a.data == "fashion-mnist") {
      const std::string dir = a.data_dir.empty() ? data::default_fashion_mnist_dir() : a.data_dir;
      if (!train_util::has_fashion_mnist(dir)) {
        std::fprintf(stderr,
                     "rdnet_train: error: Fashion-MNIST not found in '%s': install it with `apt-get install "
                     "dataset-fashion-mnist` (or pass --data-dir DIR)\n",
                     dir.c_str());
        return 1;
      }
      train_set = data::load_fashion_mnist(dir, true);
      test_set = data::load_fashion_mnist(dir, false);
      mean = {0.2860f}, stdev = {0.3530f};
    } else if (a.data == "cifar10") {
      DG_CHECK(!a.data_dir.empty(), "--data cifar10 needs --data-dir (the directory holding cifar-10-batches-bin)");
      train_set = data::load_cifar10(a.data_dir, true);
      test_set = data::load_cifar10(a.data_dir, false);
      mean = {0.4914f, 0.4822f, 0.4465f}, stdev = {0.2470f, 0.2435f, 0.2616f};
    } else {  // synthetic: one seeded set (the classes' patterns), split into train and test
      const int64_t n_train = a.limit_train > 0 ? a.limit_train : 2048, n_test = a.limit_test > 0 ? a.limit_test : 512;
      data::Dataset all = data::make_synthetic(data::SyntheticOptions().samples(n_train + n_test).with_seed(1234));
      std::vector<int64_t> tr(static_cast<size_t>(n_train)), te(static_cast<size_t>(n_test));
      for (int64_t i = 0; i < n_train + n_test; ++i) (i < n_train ? tr[i] : te[i - n_train]) = i;
      train_set = all.subset(tr);
      test_set = all.subset(te);
    }
    if (a.limit_train > 0 && a.limit_train < train_set.size()) train_set = train_set.head(a.limit_train);
    if (a.limit_test > 0 && a.limit_test < test_set.size()) test_set = test_set.head(a.limit_test);

    // Augmentation (timm's train transform order): crop, flip, normalize, erase; then mixup/cutmix,
    // whose soft targets carry the label smoothing.
    const bool real = a.data != "synthetic";
    data::AugmentOptions aug;
    if (!mean.empty()) aug.normalize(mean, stdev);
    const bool mix = a.mixup > 0 || a.cutmix > 0;
    if (mix) aug.mixup(a.mixup).cutmix(a.cutmix).smoothing(a.label_smoothing);
    data::AugmentOptions plain = aug;  // the epochs before --aug-start: no crop, flip or erasing
    aug.crop(a.crop_pad >= 0 ? a.crop_pad : !real ? 0 : train_set.height() >= 32 ? 4 : 2)
        .flip(a.hflip >= 0 ? a.hflip : real ? 0.5 : 0.0)
        .random_erasing(a.reprob);
    const int64_t aug_start = a.aug_start >= 0 ? a.aug_start : real && train_set.height() < 32 ? 1 : 0;
    data::AugmentOptions test_aug;
    if (!mean.empty()) test_aug.normalize(mean, stdev);
    // Data-parallel: rank r of P trains on shard r of each epoch's order (a step sees P x batch
    // images) and evaluates every P-th test image.
    const int rank = dist::rank(), world = dist::world_size();
    auto train_options = [&](const data::AugmentOptions& augment) {
      return data::LoaderOptions().batch(a.batch_size).with_seed(a.seed).workers(a.workers).augmentation(augment).drop_last_batch(true).shard(rank, world);
    };
    data::DataLoader train_loader(train_set, train_options(aug)), plain_loader(train_set, train_options(plain));
    data::DataLoader test_loader(
        dist::eval_shard(test_set), data::LoaderOptions().batch(256).shuffled(false).workers(a.workers).augmentation(test_aug));
    const int64_t micro_batches = train_loader.size();  // per epoch
    DG_CHECK(micro_batches > 0, "the training set (", train_set.size(), " images) is smaller than one batch (",
             a.batch_size, world > 1 ? " per rank" : "", ")");
    dist::check_uniform(micro_batches, "the number of batches per epoch");  // the ranks step together
    const int64_t steps_per_epoch = (micro_batches + a.accum_steps - 1) / a.accum_steps;  // optimizer steps

    // ---- model, optimizer, schedule. The weights come from their own generator; drop path
    // draws from dg::default_generator(), seeded here and saved in every checkpoint.
    rdnet::RDNetConfig cfg = rdnet::RDNetConfig::by_name(a.model);
    cfg.in_chans = train_set.channels();
    cfg.num_classes = train_set.num_classes();
    cfg.drop_path_rate = a.drop_path;
    if (a.ls_init > 0) cfg.ls_init_value = a.ls_init;
    else if (a.model == "nano") cfg.ls_init_value = 1;
    cfg.memory_efficient = a.memory_efficient;
    rdnet::set_cache_budget_for(cfg, a.cache_budget);
    dg::Generator init_gen(a.seed);
    rdnet::RDNet<float> model(cfg, init_gen);
    // ---- device: the model moves before the optimizer is made (its state lives beside the weights)
    const dg::Device dev = a.device == "cuda" ? dg::Device::cuda(0) : dg::Device::cpu();
    DG_CHECK(dev.is_cpu() || dg::has_cuda_kernels<float>(),
             "--device cuda: this rdnet_train was built without CUDA (configure with nvcc present)");
#ifdef DENSEGRAD_WITH_NCCL
    if (dev.is_cuda() && world > 1) dist::use_local_gpu();  // one GPU per rank on each host
#endif
    model.to(dev);
    dg::manual_seed(a.seed ^ 0x6472'6f70'7061'7468ull);  // "droppath": a stream apart from the weights'
    dg::optim::AdamW<float> opt(dg::optim::timm_param_groups(model, a.weight_decay),
                                dg::optim::AdamWOptions().lr(a.lr).weight_decay(a.weight_decay));
    const double total_steps = static_cast<double>(a.epochs * steps_per_epoch);
    dg::optim::CosineSchedule sched(a.lr, total_steps, a.warmup_epochs * static_cast<double>(steps_per_epoch),
                                    /*warmup_lr_init=*/a.lr * 0.01, a.min_lr);
    std::unique_ptr<dg::optim::ModelEMA<float>> ema;
    std::unique_ptr<rdnet::RDNet<float>> ema_model;  // the averages are copied here to evaluate them
    if (a.ema > 0) {
      ema = std::make_unique<dg::optim::ModelEMA<float>>(model, a.ema);
      dg::Generator unused(0);
      ema_model = std::make_unique<rdnet::RDNet<float>>(cfg, unused);
      ema_model->to(dev);
    }

    // ---- resume: weights, optimizer moments, schedule, RNG, position, history
    int64_t start_epoch = 0, global_step = 0;  // epochs done, optimizer steps done
    double best_acc = -1;
    std::vector<train_util::EpochRecord> history;
    if (!a.resume.empty()) {
      model.load_state_dict(resumed.get<float>("model"));
      opt.load_state_dict(resumed.get<float>("optim"));
      sched.load_state_dict(resumed.get<double>("sched"));
      if (ema) ema->load_state_dict(resumed.get<float>("ema"));
      resumed.get_rng("rng.default_generator", dg::default_generator().engine());
      start_epoch = resumed.get_int("train.epoch");
      global_step = resumed.get_int("train.step");
      best_acc = resumed.get_double("train.best_acc");
      history = train_util::parse_metrics_csv(resumed.meta("metrics"));
      DG_CHECK(global_step == start_epoch * steps_per_epoch, "checkpoint ", a.resume, " was made with ",
               global_step / std::max<int64_t>(start_epoch, 1), " steps per epoch, this run has ", steps_per_epoch,
               " (same --data, --limit-train, --batch-size and --accum-steps needed)");
      std::printf("rdnet_train: resuming %s at epoch %lld (step %lld)\n", a.resume.c_str(),
                  static_cast<long long>(start_epoch + 1), static_cast<long long>(global_step));
    }
    if (rank == 0) std::filesystem::create_directories(a.out);  // rank 0 writes all files
    // Every rank starts from rank 0's weights; the Reducer averages the gradients over the ranks,
    // in buckets whose sums start during backward().
    dist::broadcast_parameters(model);
#ifdef DENSEGRAD_WITH_MPI
    std::unique_ptr<dist::Collective> collective = std::make_unique<dist::MpiCollective>();
#ifdef DENSEGRAD_WITH_NCCL
    if (dev.is_cuda() && world > 1) collective = std::make_unique<dist::NcclCollective>(dev);
#endif
    dist::Reducer<float> reducer(model, *collective);
#else
    dist::Reducer reducer;
#endif

    std::string model_text = a.model + ": in_chans " + std::to_string(cfg.in_chans) + ", num_classes " +
                             std::to_string(cfg.num_classes) + ", patch_size " + std::to_string(cfg.patch_size) +
                             ", num_init_features " + std::to_string(cfg.num_init_features) + ", growth_rates";
    for (int64_t g : cfg.growth_rates) model_text += " " + std::to_string(g);
    model_text += ", num_blocks_list";
    for (int64_t b : cfg.num_blocks_list) model_text += " " + std::to_string(b);

    // Every checkpoint holds all the state the loop has: one written after epoch e, resumed,
    // continues exactly as the uninterrupted run would have (same thread count assumed).
    auto save_checkpoint = [&](const std::string& path, int64_t epochs_done) {
      train_util::Checkpoint ck;
      ck.put("model", model.state_dict());
      ck.put("optim", opt.state_dict());
      ck.put("sched", sched.state_dict<double>());
      if (ema) ck.put("ema", ema->state_dict());
      ck.put_rng("rng.default_generator", dg::default_generator().engine());
      ck.put_int("train.epoch", epochs_done);
      ck.put_int("train.step", global_step);
      ck.put_double("train.best_acc", best_acc);
      ck.metadata = {{"format", "rdnet_train checkpoint v1"}, {"args", settings}, {"model", model_text},
                     {"metrics", train_util::metrics_csv(history)}, {"densegrad", DENSEGRAD_VERSION}};
      ck.save(path);
    };

    std::printf("rdnet_train: %s on %s: %lld train / %lld test images of %lldx%lldx%lld, %lld classes\n",
                a.model.c_str(), a.data.c_str(), static_cast<long long>(train_set.size()),
                static_cast<long long>(test_set.size()), static_cast<long long>(train_set.channels()),
                static_cast<long long>(train_set.height()), static_cast<long long>(train_set.width()),
                static_cast<long long>(train_set.num_classes()));
    std::printf("rdnet_train: %lld parameters, %.1f MMACs per image; %lld epochs x %lld steps of %lld images, "
                "AdamW lr %g wd %g, threads %d, %s, %s products%s -> %s\n",
                static_cast<long long>(model.num_parameters()),
                static_cast<double>(rdnet::count_macs(cfg, train_set.height(), train_set.width())) / 1e6,
                static_cast<long long>(a.epochs), static_cast<long long>(steps_per_epoch),
                static_cast<long long>(a.batch_size * a.accum_steps), a.lr, a.weight_decay, a.threads, dev.str().c_str(),
                bf16_as_fp32 ? "fp32" : a.precision.c_str(), bf16_as_fp32 ? " (bf16 asked, no AVX512-BF16)" : "",
                a.out.c_str());
    if (world > 1)
      std::printf("rdnet_train: data-parallel on %d ranks: each step sees %d x %lld images; gradients in %lld buckets\n",
                  world, world, static_cast<long long>(a.batch_size * a.accum_steps),
                  static_cast<long long>(reducer.num_buckets()));
    std::fflush(stdout);

    // ---- the loop
    const bool tty = isatty(fileno(stdout));
    const int64_t last_epoch = a.stop_after > 0 ? std::min(a.epochs, a.stop_after) : a.epochs;
    const auto run_start = Clock::now();
    int64_t skipped = 0;
    for (int64_t epoch = start_epoch; epoch < last_epoch; ++epoch) {
      const auto epoch_start = Clock::now();
      data::DataLoader& loader = epoch < aug_start ? plain_loader : train_loader;
      loader.set_epoch(epoch);  // the order and augmentation come from (seed, epoch) alone
      if (world > 1)  // drop path: each rank its own draws, from (seed, epoch, rank) alone (so resume repeats them)
        dg::manual_seed(data::detail::mix_seed({a.seed, static_cast<uint64_t>(epoch), static_cast<uint64_t>(rank)}));
      model.train();
      train_util::Progress bar(std::cout, tty, epoch + 1, a.epochs, steps_per_epoch);
      double loss_sum = 0, lr = sched.lr(static_cast<double>(global_step));
      int64_t loss_count = 0, images = 0, k = 0;
      bool group_ok = true;  // no NaN/Inf so far in this accumulation group
      for (dg::data::Batch& b : loader) {
        // The micro-batches of one optimizer step; the epoch's last group may be smaller, and
        // each loss is divided by the group's size so the summed gradient is the group's mean.
        const int64_t group = std::min(a.accum_steps, micro_batches - k / a.accum_steps * a.accum_steps);
        const int64_t step_in_epoch = k / a.accum_steps + 1;
        reducer.set_sync((k + 1) % a.accum_steps == 0 || k + 1 == micro_batches);  // the group's last backward
        Tensor<float> logits = model.forward(b.images.to(dev));  // (B, K)
        Tensor<float> loss = mix ? dg::cross_entropy(logits, b.soft_targets.to(dev))
                                 : dg::cross_entropy(logits, b.labels.to(dev), a.label_smoothing);
        const double loss_value = loss.item();
        if (std::isfinite(loss_value)) {
          (loss * (1.0 / static_cast<double>(group))).backward();  // gradients add up over the group
          loss_sum += loss_value;
          ++loss_count;
        } else {
          group_ok = false;
        }
        images += b.size();
        if (++k % a.accum_steps != 0 && k != micro_batches) continue;  // more of this group to come

        // ---- one optimizer step: gradient means over the ranks, schedule, NaN/Inf guard, clipping, AdamW, EMA
        reducer.finish();
        group_ok = dist::all_true(group_ok);  // a non-finite loss on any rank: every rank stops or skips
        lr = sched.apply(opt, static_cast<double>(global_step));  // per step, timm's step_update
        const bool ok = group_ok && dg::optim::grads_finite(model.parameters());
        if (!ok) {
          const char* what = group_ok ? "gradient" : "loss";
          if (a.nan_policy == "stop") {
            bar.finish();
            const std::string kept = epoch > 0 ? a.out + "/last.safetensors (epoch " + std::to_string(epoch) + ") is untouched"
                                               : "no checkpoint was written";
            std::fprintf(stderr,
                         "rdnet_train: error: non-finite %s at epoch %lld step %lld/%lld (global step %lld); stopping "
                         "(--nan-policy skip skips such steps); %s\n",
                         what, static_cast<long long>(epoch + 1), static_cast<long long>(step_in_epoch),
                         static_cast<long long>(steps_per_epoch), static_cast<long long>(global_step + 1), kept.c_str());
            return 1;
          }
          ++skipped;
          std::printf("%srdnet_train: skipping epoch %lld step %lld: non-finite %s\n", tty ? "\n" : "",
                      static_cast<long long>(epoch + 1), static_cast<long long>(step_in_epoch), what);
        } else {
          if (a.clip_grad > 0) dg::optim::clip_grad_norm_(model.parameters(), a.clip_grad);
          opt.step();
          if (ema) {  // the decay warms up, (1 + t) / (10 + t), so the first weights fade out fast
            const double t = static_cast<double>(global_step);
            ema->set_decay(std::min(a.ema, (1 + t) / (10 + t)));
            ema->update(model);
          }
        }
        opt.zero_grad();
        group_ok = true;
        ++global_step;
        bar.update(step_in_epoch, loss_count ? loss_sum / static_cast<double>(loss_count) : NAN, lr, images * world,
                   std::chrono::duration<double>(Clock::now() - epoch_start).count());
      }
      bar.finish();
      const double train_seconds = std::chrono::duration<double>(Clock::now() - epoch_start).count();

      // ---- evaluate, record, checkpoint
      train_util::EpochRecord rec;
      rec.epoch = epoch + 1;
      double loss_sums[2] = {loss_sum, static_cast<double>(loss_count)};
      dist::all_reduce_sum(loss_sums, 2);  // the mean over every rank's batches
      rec.train_loss = loss_sums[1] > 0 ? loss_sums[0] / loss_sums[1] : NAN;
      rec.lr = lr;
      std::string line = "epoch " + std::to_string(epoch + 1) + "/" + std::to_string(a.epochs) + ": train loss " +
                         train_util::detail::fmt("%.4f", rec.train_loss);
      if ((epoch + 1) % a.eval_every == 0 || epoch + 1 == a.epochs) {
        std::tie(rec.test_loss, rec.test_acc) = evaluate(model, test_loader, dev);
        line += " | test loss " + train_util::detail::fmt("%.4f", rec.test_loss) + " acc " +
                train_util::detail::fmt("%.2f%%", rec.test_acc);
        if (ema) {  // as timm's train.py: with EMA, the averaged weights' numbers are the ones recorded
          ema->copy_to(*ema_model);
          std::tie(rec.test_loss, rec.test_acc) = evaluate(*ema_model, test_loader, dev);
          line += " | ema loss " + train_util::detail::fmt("%.4f", rec.test_loss) + " acc " +
                  train_util::detail::fmt("%.2f%%", rec.test_acc);
        }
      }
      rec.seconds = std::chrono::duration<double>(Clock::now() - epoch_start).count();
      history.push_back(rec);
      const bool best = rec.test_acc > best_acc;  // false for NaN (not evaluated)
      if (best) best_acc = rec.test_acc;
      dist::check_in_sync(model, "after epoch " + std::to_string(epoch + 1));
      if (rank == 0) {
        train_util::write_text_atomic(a.out + "/metrics.csv", train_util::metrics_csv(history));
        train_util::write_text_atomic(a.out + "/curves.svg",
                                      train_util::curves_svg(history, "RDNet " + a.model + " on " + a.data));
        save_checkpoint(a.out + "/last.safetensors", epoch + 1);
        if (best) save_checkpoint(a.out + "/best.safetensors", epoch + 1);
      }

      const double total = std::chrono::duration<double>(Clock::now() - run_start).count();
      const double eta = total / static_cast<double>(epoch + 1 - start_epoch) * static_cast<double>(last_epoch - epoch - 1);
      std::printf("%s | lr %.2e | %.0f img/s | %s (total %s, ETA %s)%s\n", line.c_str(), lr,
                  static_cast<double>(images * world) / train_seconds, train_util::format_duration(rec.seconds).c_str(),
                  train_util::format_duration(total).c_str(), train_util::format_duration(eta).c_str(),
                  best ? " *best" : "");
      std::fflush(stdout);
    }
    if (last_epoch < a.epochs)
      std::printf("rdnet_train: stopped after epoch %lld of %lld (--stop-after); continue with --resume %s/last.safetensors\n",
                  static_cast<long long>(last_epoch), static_cast<long long>(a.epochs), a.out.c_str());
    if (skipped) std::printf("rdnet_train: %lld steps skipped (non-finite)\n", static_cast<long long>(skipped));
    std::printf("rdnet_train: done: best test accuracy %.2f%%; %s/{metrics.csv,curves.svg,last.safetensors,best.safetensors}\n",
                best_acc, a.out.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rdnet_train: error: %s%s\n", dist::rank_tag().c_str(), e.what());
    return 1;
  }
  return 0;
}

int main(int argc, char** argv) {
#ifdef DENSEGRAD_WITH_MPI
  dg::dist::Environment mpi(argc, argv);    // joins the MPI job when mpirun started us; else a world of one
  dg::dist::quiet_stdout_unless_main();      // rank 0 prints; every rank's errors go to stderr
  return mpi.exit(train_main(argc, argv));  // non-zero: MPI_Abort, so no rank waits for a failed one
#else
  return train_main(argc, argv);
#endif
}
