// rdnet_bench: throughput and peak memory of one RDNet training step (forward, cross entropy,
// backward, AdamW) or one inference forward, on random images, on the CPU or a CUDA device.
// Not a training run: the data is random and the loss is not looked at until the end.
//   rdnet_bench --model tiny --batch 8 --res 224 --mode train --threads 2
//   rdnet_bench --model tiny --batch 8 --precision bf16   (conv GEMM products in bfloat16, CPU or GPU)
//   rdnet_bench --model tiny --batch 64 --mode infer --device cuda --tf32
//   rdnet_bench --model tiny --batch 16 --iters 1 --warmup 0 --naive-concat   (peak RSS per dense path)
//   rdnet_bench --op dwconv7 --batch 8 --res 56 --channels 128   (one op: forward + backward, or forward)
//   rdnet_bench --model tiny --batch 64 --device cuda --tf32 --profile shapes   (time per op, after the timing)
// The last line is machine-readable (bench/compare and bench/gpu_compare.sh parse it):
//   RESULT model=tiny mode=train batch=8 res=224 device=cpu img_per_s=X peak_rss_mb=Y peak_gpu_mb=Z
//       peak_tensors_mb=T precision=fp32 gmacs=M   (M: multiply-adds of one image's forward, in 1e9)
//
// Plain C++: in a build with CUDA, the CUDA backend comes from one more object file linked in
// (examples/cuda_backend.cu), and dg::cuda_* (core/device_kernels.hpp) reach it from here.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include <sys/resource.h>

#ifdef DENSEGRAD_WITH_OPENMP
#include <omp.h>
#endif

#include <densegrad/densegrad.hpp>
#include <densegrad/optim/optim.hpp>

#include "rdnet/rdnet.hpp"

using dg::Tensor;
using Clock = std::chrono::steady_clock;

/// What the command line sets.
struct BenchArgs {
  std::string model = "tiny", mode = "train", device = "cpu", precision = "fp32";
  int64_t batch = 8, res = 224, iters = 10, warmup = 3;
  int threads = 0;  // 0: OpenMP's default
  bool tf32 = false;
  bool naive_concat = false, memory_efficient = false;  // RDNetConfig::dense_buffer = !naive_concat, memory_efficient
  double cache_budget = 0;  // dg::set_cpu_cache_budget; 0: the allocator's default, or 1.25 with --memory-efficient
  std::string op = "none";  // one op instead of the model: dwconv7, layernorm2d, pwconv, concat
  int64_t channels = 128;   // the op's input channels
  uint64_t seed = 0;
  std::string profile = "none";  // after the timed iterations, profile as many more: by op name or by op and shapes
};

/// Waits for the device's queued work, so a clock read after it sees that work done.
void synchronize(bool cuda) {
  if (cuda) dg::cuda_synchronize();
}

/// The process's peak resident set in MiB (getrusage's ru_maxrss is in KiB on Linux).
double peak_rss_mb() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;
}

/// The most memory live CPU tensors held at once, in MiB (dg::cpu_max_memory_allocated): the
/// part of the peak RSS that is tensors, not the allocator's cache, code or scratch buffers.
double peak_tensors_mb() { return static_cast<double>(dg::cpu_max_memory_allocated()) / (1024.0 * 1024.0); }

/// The device allocator's peak since the last reset, in MiB; 0 on the CPU.
double peak_gpu_mb(bool cuda) {
  return cuda ? static_cast<double>(dg::cuda_max_memory_allocated()) / (1024.0 * 1024.0) : 0.0;
}

/// The median of the times.
double median_of(std::vector<double> ms) {
  std::sort(ms.begin(), ms.end());
  const size_t n = ms.size();
  return n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
}

/// Runs `step` a.warmup times, then a.iters timed times; prints the per-iteration summary and
/// returns the times in ms.
template <class Step>
std::vector<double> time_iterations(const BenchArgs& a, bool cuda, Step&& step) {
  for (int64_t i = 0; i < a.warmup; ++i) step();
  synchronize(cuda);
  std::vector<double> ms;
  for (int64_t i = 0; i < a.iters; ++i) {
    const auto t0 = Clock::now();
    step();
    synchronize(cuda);
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  const double mean = std::accumulate(ms.begin(), ms.end(), 0.0) / static_cast<double>(ms.size());
  std::printf("rdnet_bench: per iteration: median %.2f ms, mean %.2f ms, min %.2f ms, max %.2f ms\n", median_of(ms),
              mean, *std::min_element(ms.begin(), ms.end()), *std::max_element(ms.begin(), ms.end()));
  return ms;
}

/// Runs `step` a.iters more times under a Profiler and prints its table, times per step.
template <class Step>
void profile_steps(const BenchArgs& a, Step&& step) {
  dg::autograd::ProfilerOptions opts;
  opts.record_shapes = a.profile == "shapes";
  dg::autograd::Profiler prof(opts);
  for (int64_t i = 0; i < a.iters; ++i) step();
  prof.stop();
  std::printf("\nrdnet_bench: profile of %lld more iterations (%s), each op timed on its own: %.2f ms per "
              "iteration\n\n%s\n",
              static_cast<long long>(a.iters), opts.record_shapes ? "by op and input shapes" : "by op",
              prof.wall_ms() / static_cast<double>(a.iters), prof.table(opts.record_shapes ? 60 : 40, a.iters).c_str());
}

/// Images per second over all timed iterations.
double images_per_second(const BenchArgs& a, const std::vector<double>& ms) {
  const double total = std::accumulate(ms.begin(), ms.end(), 0.0);
  return static_cast<double>(a.batch) * static_cast<double>(ms.size()) / (total / 1000.0);
}

/// --op: one op of a dense block on x (batch, channels, res, res), forward + backward of a fixed
/// output gradient (train) or forward without grad (infer). Prints a RESULT line with model=op:NAME.
int run_op(const BenchArgs& a, dg::Device device, int threads) {
  const bool cuda = device.is_cuda(), train = a.mode == "train";
  const int64_t N = a.batch, C = a.channels, R = a.res;
  dg::Generator gen(a.seed);
  auto param = [&](dg::Shape s) { return dg::randn<float>(std::move(s), gen).to(device).requires_grad_(train); };
  Tensor<float> x = param({N, C, R, R});
  Tensor<float> w, b, other;
  if (a.op == "dwconv7") w = param({C, 1, 7, 7}), b = param({C});
  if (a.op == "layernorm2d") w = param({C}), b = param({C});
  if (a.op == "pwconv") w = param({4 * C, C, 1, 1}), b = param({4 * C});
  if (a.op == "concat") other = param({N, 32, R, R});
  auto forward = [&]() -> Tensor<float> {
    if (a.op == "dwconv7") return dg::conv2d(x, w, b, 1, 3, 1, C);
    if (a.op == "layernorm2d") return dg::layer_norm2d(x, w, b, 1e-6);
    if (a.op == "pwconv") return dg::conv2d(x, w, b);
    return dg::concat<float>({x, other}, 1);
  };
  Tensor<float> grad_out;
  {
    dg::NoGradGuard no_grad;
    grad_out = dg::randn<float>(forward().shape(), gen).to(device);
  }
  std::printf("rdnet_bench: op %s, %s, input (%lld, %lld, %lld, %lld), device %s, threads %d, %lld warmup + %lld "
              "timed iterations\n",
              a.op.c_str(), train ? "forward + backward" : "forward", static_cast<long long>(N),
              static_cast<long long>(C), static_cast<long long>(R), static_cast<long long>(R), device.str().c_str(),
              threads, static_cast<long long>(a.warmup), static_cast<long long>(a.iters));
  std::fflush(stdout);
  auto step = [&]() {
    if (train) {
      forward().backward(grad_out);
    } else {
      dg::NoGradGuard no_grad;
      forward();
    }
  };
  const std::vector<double> ms = time_iterations(a, cuda, step);
  std::printf("RESULT model=op:%s mode=%s batch=%lld res=%lld device=%s img_per_s=%.2f peak_rss_mb=%.1f "
              "peak_gpu_mb=%.1f median_ms=%.3f channels=%lld\n",
              a.op.c_str(), a.mode.c_str(), static_cast<long long>(N), static_cast<long long>(R), a.device.c_str(),
              images_per_second(a, ms), peak_rss_mb(), peak_gpu_mb(cuda), median_of(ms),
              static_cast<long long>(C));
  return 0;
}

int main(int argc, char** argv) {
  BenchArgs a;
  CLI::App app{"rdnet_bench: RDNet training-step or inference throughput on random images"};
  app.option_defaults()->always_capture_default();
  app.add_option("--model", a.model, "RDNet preset")->check(CLI::IsMember({"tiny", "small", "base", "large", "nano"}));
  app.add_option("--batch", a.batch, "images per iteration")->check(CLI::Range(int64_t{1}, int64_t{1} << 16));
  app.add_option("--res", a.res, "image height and width in pixels (nano: 28-32)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 14));
  app.add_option("--mode", a.mode, "train: forward + backward + AdamW step; infer: eval-mode forward, no grad")
      ->check(CLI::IsMember({"train", "infer"}));
  app.add_option("--iters", a.iters, "timed iterations")->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--warmup", a.warmup, "untimed iterations first")->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  app.add_option("--threads", a.threads, "OpenMP threads (0: the OpenMP default)")->check(CLI::Range(0, 1024));
  app.add_option("--device", a.device, "where the model and data live")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_flag("--tf32", a.tf32, "let CUDA matrix products use TF32 tensor cores (--device cuda only)");
  app.add_option("--precision", a.precision,
                 "fp32, or bf16: conv GEMM products in bfloat16 with float32 accumulation (a GPU, or a CPU with "
                 "AVX512-BF16); with --tf32 the other float GEMMs use TF32")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--seed", a.seed, "seeds the weights and the random data");
  app.add_flag("--naive-concat", a.naive_concat,
               "dense stages concat all features for every block (the naive path) instead of filling one buffer");
  app.add_flag("--memory-efficient", a.memory_efficient,
               "recompute each dense block in backward instead of keeping its activations");
  app.add_option("--cache-budget", a.cache_budget,
                 "the CPU allocator holds memory in use plus cached up to this factor of the most in use at once "
                 "(default: the allocator's, 1.2 on Linux and no bound elsewhere, or 1.25 with --memory-efficient)")
      ->check(CLI::Range(1.0, 1e6));
  app.add_option("--op", a.op,
                 "time one op of a dense block instead of the model, on (batch, channels, res, res): depthwise 7x7 "
                 "conv, LayerNorm2d, 1x1 conv to 4 x channels, or concat with 32 more channels")
      ->check(CLI::IsMember({"none", "dwconv7", "layernorm2d", "pwconv", "concat"}));
  app.add_option("--profile", a.profile,
                 "after the timed iterations, run as many more under dg::autograd::Profiler and print where the time "
                 "goes: per op name (ops), or per op and input shapes (shapes); ops then run one after another")
      ->check(CLI::IsMember({"none", "ops", "shapes"}));
  app.add_option("--channels", a.channels, "--op: input channels")->check(CLI::Range(int64_t{1}, int64_t{1} << 16));
  CLI11_PARSE(app, argc, argv);

  const bool cuda = a.device == "cuda";
  if (cuda && !dg::has_cuda_kernels<float>()) {
    std::fprintf(stderr, "rdnet_bench: error: rdnet_bench was built without CUDA (configure on a machine with "
                         "nvcc and cuBLAS)\n");
    return 1;
  }
  if (a.tf32 && !cuda) {
    std::fprintf(stderr, "rdnet_bench: error: --tf32 needs --device cuda (the CPU computes in fp32)\n");
    return 1;
  }

  const bool bf16_as_fp32 = a.precision == "bf16" && !cuda && !dg::cpu::kBf16Gemm;  // as in rdnet_train
  if (bf16_as_fp32)
    std::printf("rdnet_bench: this build has no AVX512-BF16 (compile with -march=native on a CPU that has it): "
                "--precision bf16 runs fp32 products; gelu_conv2d still keeps its input in bfloat16\n");
  dg::set_matmul_precision(dg::parse_matmul_precision(a.precision));

#ifdef DENSEGRAD_WITH_OPENMP
  if (a.threads > 0) omp_set_num_threads(a.threads);
  const int threads = omp_get_max_threads();
#else
  if (a.threads > 1) std::printf("rdnet_bench: built without OpenMP, --threads %d has no effect\n", a.threads);
  const int threads = 1;
#endif

  try {
    dg::Device device = dg::Device::cpu();
    if (cuda) {
      DG_CHECK(dg::cuda_is_available(), "--device cuda: no CUDA device found");
      device = dg::Device::cuda(0);
      dg::cuda_set_allow_tf32(a.tf32);
      dg::cuda_reset_peak_memory_stats();
    }

    if (a.op != "none") return run_op(a, device, threads);

    // ---- model and optimizer (timm's param groups: no weight decay on 1-D params)
    rdnet::RDNetConfig cfg = rdnet::RDNetConfig::by_name(a.model);
    cfg.dense_buffer = !a.naive_concat;
    cfg.memory_efficient = a.memory_efficient;
    rdnet::set_cache_budget_for(cfg, a.cache_budget);
    dg::Generator gen(a.seed);
    rdnet::RDNet<float> model(cfg, gen);
    model.to(device);
    const bool train = a.mode == "train";
    dg::optim::AdamW<float> opt(dg::optim::timm_param_groups(model, 0.05),
                                dg::optim::AdamWOptions().lr(1e-3).weight_decay(0.05));
    if (train) model.train();
    else model.eval();

    // ---- one batch of random data, moved once: the loop measures the model, not the copies
    Tensor<float> x = dg::randn<float>({a.batch, cfg.in_chans, a.res, a.res}, gen).to(device);  // (N, C, H, W)
    std::vector<int64_t> label_values(static_cast<size_t>(a.batch));
    for (int64_t& l : label_values) l = static_cast<int64_t>(gen.uniform() * static_cast<double>(cfg.num_classes));
    Tensor<int64_t> labels = dg::tensor<int64_t>(label_values).to(device);  // (N,)

    std::printf("rdnet_bench: %s (%lld parameters, %.2f GMACs per image), %s, dense path %s%s, batch %lld of "
                "%lldx%lldx%lld, device %s%s, %s products, threads %d, %lld warmup + %lld timed iterations\n",
                a.model.c_str(), static_cast<long long>(model.num_parameters()),
                static_cast<double>(rdnet::count_macs(cfg, a.res, a.res)) / 1e9, a.mode.c_str(),
                cfg.dense_buffer ? "buffer" : "naive concat", cfg.memory_efficient ? " + recompute" : "",
                static_cast<long long>(a.batch), static_cast<long long>(cfg.in_chans), static_cast<long long>(a.res),
                static_cast<long long>(a.res), device.str().c_str(), a.tf32 ? " (tf32)" : "",
                bf16_as_fp32 ? "fp32 (bf16 asked, no AVX512-BF16)" : a.precision.c_str(), threads,
                static_cast<long long>(a.warmup), static_cast<long long>(a.iters));
    std::fflush(stdout);

    // ---- one iteration: what is timed
    Tensor<float> last;  // the last loss (train) or logits (infer), looked at after the timing
    auto step = [&]() {
      if (train) {
        Tensor<float> logits = model.forward(x);  // (N, num_classes)
        Tensor<float> loss = dg::cross_entropy(logits, labels, 0.1);
        loss.backward();
        dg::autograd::ProfileScope scope("AdamW step + zero_grad");  // a row of its own under --profile
        opt.step();
        opt.zero_grad();
        last = loss.detach();
      } else {
        dg::NoGradGuard no_grad;
        last = model.forward(x);
      }
    };

    const std::vector<double> ms = time_iterations(a, cuda, step);
    const Tensor<float> check = last.to(dg::Device::cpu()).contiguous();
    double sum = 0;
    for (int64_t i = 0; i < check.numel(); ++i) sum += static_cast<double>(check.data()[i]);
    if (!std::isfinite(sum))
      std::printf("rdnet_bench: warning: the last %s is not finite\n", train ? "loss" : "output");
    else if (train)
      std::printf("rdnet_bench: last loss %.4f\n", sum);

    const double img_per_s = images_per_second(a, ms);
    if (a.profile != "none") profile_steps(a, step);
    std::printf("RESULT model=%s mode=%s batch=%lld res=%lld device=%s img_per_s=%.2f peak_rss_mb=%.1f "
                "peak_gpu_mb=%.1f peak_tensors_mb=%.1f precision=%s gmacs=%.6f\n",
                a.model.c_str(), a.mode.c_str(), static_cast<long long>(a.batch), static_cast<long long>(a.res),
                a.device.c_str(), img_per_s, peak_rss_mb(), peak_gpu_mb(cuda), peak_tensors_mb(), a.precision.c_str(),
                static_cast<double>(rdnet::count_macs(cfg, a.res, a.res)) / 1e9);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rdnet_bench: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
