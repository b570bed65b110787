// memory_study: how much memory one training step of a dense stage needs as the stage gets
// deeper, for RDNet's three ways of running it (examples/rdnet/rdnet.hpp, DenseStage):
//   naive              every block reads a fresh concat of all features so far (dg::concat)
//   buffer             one shared feature buffer, blocks read prefix views (dg::DenseBuffer)
//   buffer + recompute the same, and each block's activations are recomputed in backward
//                      instead of kept (dg::checkpoint; RDNetConfig::memory_efficient)
// All three compute the same numbers (tests/test_dense.cpp). Memory is densegrad's own count of
// bytes held by tensors (dg::cpu_max_memory_allocated), not the process's RSS, so every
// configuration is measured in one process. Prints a table and draws, against depth, the memory
// kept from forward for backward and the peak of the whole step (SVG).
//   memory_study                                  # depths 2..32, growth 32, 16x16 maps, batch 8
//   memory_study --depths 4,8,16 --bottleneck 1   # a thin bottleneck: concat copies matter more
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>

#include "plot.hpp"
#include "rdnet.hpp"
#include "study_util.hpp"

using dg::Tensor;
using Clock = std::chrono::steady_clock;

namespace {

struct Mode {
  const char* name;
  bool dense_buffer, memory_efficient;
  const char* color;
};
const Mode kModes[] = {{"naive", false, false, "#d62728"},
                       {"buffer", true, false, "#ff7f0e"},
                       {"buffer + recompute", true, true, "#1f77b4"}};

struct Measured {
  double kept_mib, peak_mib, param_mib, seconds;
};

/// One training step (forward, loss, backward) of a fresh dense stage of `depth` blocks on x.
/// kept: the bytes held by tensors right after forward, above what was held before it (the
/// stage's parameters and x): what the graph keeps for backward, plus the output. peak: the
/// most held at any moment of the step, above the same base; it includes the parameters'
/// gradients, made in backward (param_mib: the stage's parameters, which in RDNet's blocks grow
/// quadratically with depth whatever the method: the bottleneck is 4x the block's input width).
Measured measure(const Mode& m, int64_t depth, const Tensor<float>& x, int64_t growth, double bottleneck) {
  dg::manual_seed(1);  // the stage's weights
  rdnet::DenseStage<float> stage(depth, x.size(1), std::vector<double>(static_cast<size_t>(depth), 0.0), growth,
                                 bottleneck, /*drop_rate=*/0.0, /*ese=*/false, /*ls_init_value=*/1e-6, /*eps=*/1e-6,
                                 m.dense_buffer, m.memory_efficient);
  stage.train();
  Tensor<float> input = x.detach();  // a fresh leaf sharing x's values: its gradient is new each step
  input.requires_grad_();            // as a stage inside a network: its input needs a gradient too
  const double mib = 1024.0 * 1024.0;
  const size_t held = dg::cpu_memory_allocated();
  dg::cpu_reset_peak_memory_stats();
  const auto t0 = Clock::now();
  Tensor<float> out = stage.forward(input);
  const double kept = static_cast<double>(dg::cpu_memory_allocated() - held) / mib;
  dg::mean(out).backward();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const double peak = static_cast<double>(dg::cpu_max_memory_allocated() - held) / mib;
  return {kept, peak, static_cast<double>(stage.num_parameters()) * sizeof(float) / mib, seconds};
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> depths{2, 4, 8, 16, 32};
  int64_t growth = 32, channels = 64, size = 16, batch = 8;
  double bottleneck = 4.0;
  int threads = 1;
  std::string svg = "memory_study.svg";
  CLI::App app{"memory_study: peak memory of a dense stage's training step vs depth: naive concat, shared buffer, "
               "buffer + recomputation"};
  app.option_defaults()->always_capture_default();
  app.add_option("--depths", depths, "blocks in the stage, one measurement each")->delimiter(',')->check(CLI::PositiveNumber);
  app.add_option("--growth", growth, "channels each block adds (growth_rate)")->check(CLI::PositiveNumber);
  app.add_option("--channels", channels, "channels entering the stage")->check(CLI::PositiveNumber);
  app.add_option("--size", size, "feature map height and width")->check(CLI::PositiveNumber);
  app.add_option("--batch", batch, "images per step")->check(CLI::PositiveNumber);
  app.add_option("--bottleneck", bottleneck, "bottleneck_width_ratio of the blocks (RDNet: 4)")->check(CLI::PositiveNumber);
  app.add_option("--threads", threads, "OpenMP threads")->check(CLI::PositiveNumber);
  app.add_option("--svg", svg, "where to write the figure");
  CLI11_PARSE(app, argc, argv);

  try {
    study::set_threads(threads);
    dg::Generator gen(0);
    const Tensor<float> x = dg::randn<float>({batch, channels, size, size}, gen);
    const double mib = 1024.0 * 1024.0, image_mib = static_cast<double>(batch * size * size * 4) / mib;  // per channel
    std::printf("memory_study: one dense stage (rdnet::DenseStage, Block, bottleneck %g), %lld input channels, "
                "growth %lld, batch %lld, %lldx%lld maps, float32; one "
                "training step, MiB above the parameters and input held before it, threads %d\n",
                bottleneck, static_cast<long long>(channels), static_cast<long long>(growth), static_cast<long long>(batch),
                static_cast<long long>(size), static_cast<long long>(size), threads);
    std::printf("memory_study: MiB; output: the stage's output tensor, which every method holds; params: the "
                "stage's parameters, whose gradients are part of every peak; n / b / r: naive / buffer / buffer + "
                "recompute\n");
    std::printf("%6s %6s %7s %7s | %-30s | %-30s | %s\n", "depth", "C_out", "output", "params",
                "kept after forward: n / b / r", "peak of the step: n / b / r", "step seconds: n / b / r");
    const size_t M = std::size(kModes);
    std::vector<plot::Series> kept_lines, peak_lines;
    for (const Mode& m : kModes) kept_lines.emplace_back(m.name, m.color), peak_lines.emplace_back(m.name, m.color);
    plot::Series params("parameters (= their gradients)", "#888888");
    params.dashed = true, params.dots = false;
    std::vector<std::vector<Measured>> rows;  // [depth][mode]
    for (int64_t depth : depths) {
      std::vector<Measured> r;
      for (size_t k = 0; k < M; ++k) {
        r.push_back(measure(kModes[k], depth, x, growth, bottleneck));
        kept_lines[k].points.emplace_back(static_cast<double>(depth), r.back().kept_mib);
        peak_lines[k].points.emplace_back(static_cast<double>(depth), r.back().peak_mib);
      }
      params.points.emplace_back(static_cast<double>(depth), r[0].param_mib);
      const int64_t c_out = channels + depth * growth;  // the stage's output: what any method must hold
      std::printf("%6lld %6lld %7.2f %7.2f | %8.2f / %8.2f / %8.2f | %8.2f / %8.2f / %8.2f | %.2f / %.2f / %.2f\n",
                  static_cast<long long>(depth), static_cast<long long>(c_out), static_cast<double>(c_out) * image_mib,
                  r[0].param_mib, r[0].kept_mib, r[1].kept_mib, r[2].kept_mib, r[0].peak_mib, r[1].peak_mib,
                  r[2].peak_mib, r[0].seconds, r[1].seconds, r[2].seconds);
      std::fflush(stdout);
      rows.push_back(r);
    }
    // growth per doubling of depth, from the last two depths: about 4 is quadratic, about 2 linear
    const size_t n = depths.size();
    if (n >= 2) {
      const std::vector<Measured>&a = rows[n - 2], &b = rows[n - 1];
      std::printf("memory_study: from depth %lld to %lld: kept after forward x%.2f / x%.2f / x%.2f, peak x%.2f / x%.2f / "
                  "x%.2f (naive / buffer / buffer + recompute); params x%.2f\n",
                  static_cast<long long>(depths[n - 2]), static_cast<long long>(depths[n - 1]),
                  b[0].kept_mib / a[0].kept_mib, b[1].kept_mib / a[1].kept_mib, b[2].kept_mib / a[2].kept_mib,
                  b[0].peak_mib / a[0].peak_mib, b[1].peak_mib / a[1].peak_mib, b[2].peak_mib / a[2].peak_mib,
                  b[0].param_mib / a[0].param_mib);
    }
    const std::vector<Measured>& last = rows.back();
    std::printf("memory_study: depth %lld: kept after forward: naive %.2f MiB, buffer %.2f MiB, buffer + recompute "
                "%.2f MiB (%.0f%% of naive)\n",
                static_cast<long long>(depths.back()), last[0].kept_mib, last[1].kept_mib, last[2].kept_mib,
                100 * last[2].kept_mib / last[0].kept_mib);
    std::printf("memory_study: depth %lld: naive %.2f MiB, buffer %.2f MiB, buffer + recompute %.2f MiB at the peak "
                "(%.0f%% of naive)\n",
                static_cast<long long>(depths.back()), last[0].peak_mib, last[1].peak_mib, last[2].peak_mib,
                100 * last[2].peak_mib / last[0].peak_mib);

    std::vector<std::pair<double, std::string>> ticks;
    for (int64_t d : depths) ticks.emplace_back(static_cast<double>(d), std::to_string(d));
    plot::Axes kept_ax("kept from forward for backward", "blocks in the stage (depth)", "MiB");
    plot::Axes peak_ax("peak of the whole step", "blocks in the stage (depth)", "MiB");
    for (plot::Axes* ax : {&kept_ax, &peak_ax}) ax->xticks = ticks, ax->y_min = 0, ax->legend = plot::Legend::top_left;
    peak_lines.push_back(params);
    const std::string title = study::format(
        "one training step of a dense stage: growth %lld, %lld input channels, bottleneck %g, batch %lld, %lldx%lld maps",
        static_cast<long long>(growth), static_cast<long long>(channels), bottleneck, static_cast<long long>(batch),
        static_cast<long long>(size), static_cast<long long>(size));
    train_util::write_text_atomic(svg, plot::document(960, 420, title,
                                                      {plot::chart(0, 30, 480, 390, kept_ax, kept_lines),
                                                       plot::chart(480, 30, 480, 390, peak_ax, peak_lines)}));
    std::printf("memory_study: wrote %s\n", svg.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "memory_study: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
