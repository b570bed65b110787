// rank_study: "the concatenation shortcut is an effective way of increasing rank" (DenseNets
// Reloaded, section 5.1), measured. A concatenation net and its additive twin (same blocks,
// matched parameters and MACs, study_util.hpp) each turn a batch of test images into one feature
// matrix per stage output: rows are the N*H*W positions, columns the channels. Its singular
// values (Eigen's BDCSVD) give the numerical rank, the number of s_i > s_max * threshold, and
// the effective rank exp(entropy of s / sum(s)) (Roy & Vetterli 2007), at init and after brief
// training. Prints a table and draws the normalized singular value spectra (SVG).
// Not a proof of anything: one pair of small nets, one batch, one threshold (all flags).
//   rank_study                                 # 2 stages of 4 blocks, 1 epoch on 20000 images
//   rank_study --threshold 1e-2 --images 512
#include <CLI/CLI.hpp>
#include <Eigen/SVD>

#include <chrono>
#include <cstdio>

#include "plot.hpp"
#include "study_util.hpp"

using dg::Tensor;
using Clock = std::chrono::steady_clock;

namespace {

/// One stage output's spectrum: singular values, largest first, and the ranks they give.
struct Spectrum {
  std::vector<double> s;
  int64_t channels = 0, rank = 0;
  double effective_rank = 0;
};

/// features: (N, C, H, W) -> the (N*H*W, C) matrix's singular values and ranks.
Spectrum spectrum(const Tensor<float>& features, double threshold) {
  const Tensor<float> f = features.contiguous();
  const int64_t N = f.size(0), C = f.size(1), HW = f.size(2) * f.size(3);
  Eigen::MatrixXd m(N * HW, C);  // row: one position of one image; column: one channel
  const float* p = f.data();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < HW; ++i) m(n * HW + i, c) = p[(n * C + c) * HW + i];
  Eigen::BDCSVD<Eigen::MatrixXd> svd(m);  // singular values only
  Spectrum r;
  r.channels = C;
  const Eigen::VectorXd& sv = svd.singularValues();
  r.s.assign(sv.data(), sv.data() + sv.size());
  const double smax = r.s.empty() ? 0 : r.s[0];
  double sum = 0, entropy = 0;
  for (double v : r.s) r.rank += v > smax * threshold, sum += v;
  for (double v : r.s)
    if (v > 0) entropy -= v / sum * std::log(v / sum);
  r.effective_rank = std::exp(entropy);
  return r;
}

/// The spectra of every stage output of net on images, in eval mode, nothing recorded.
std::vector<Spectrum> spectra(study::StudyNet& net, const Tensor<float>& images, double threshold) {
  dg::NoGradGuard no_grad;
  net.eval();
  std::vector<Spectrum> out;
  for (const Tensor<float>& f : net.forward_stages(images)) out.push_back(spectrum(f, threshold));
  net.train();
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t stem = 24, growth = 16, kernel = 5, patch = 4, epochs = 1, limit_train = 20000, limit_test = 5000;
  int64_t batch_size = 32, images = 256;
  std::vector<int64_t> blocks{4, 4};
  double expansion = 2, lr = 5e-3, threshold = 1e-3;
  uint64_t seed = 0;
  int threads = 1;
  std::string data_name = "fashion-mnist", data_dir, svg = "rank_study.svg";
  CLI::App app{"rank_study: numerical rank of stage features, concatenation vs additive shortcuts"};
  app.option_defaults()->always_capture_default();
  app.add_option("--stem", stem, "concat net: channels out of the stem")->check(CLI::PositiveNumber);
  app.add_option("--growth", growth, "concat net: channels each block appends")->check(CLI::PositiveNumber);
  app.add_option("--blocks", blocks, "blocks per stage, e.g. 4,4 (both nets)")->delimiter(',')->check(CLI::PositiveNumber);
  app.add_option("--kernel", kernel, "depthwise kernel size (odd)")->check(CLI::PositiveNumber);
  app.add_option("--expansion", expansion, "bottleneck width over block input width")->check(CLI::PositiveNumber);
  app.add_option("--patch", patch, "the stem's patch size")->check(CLI::PositiveNumber);
  app.add_option("--lr", lr, "peak AdamW learning rate (both nets)")->check(CLI::PositiveNumber);
  app.add_option("--epochs", epochs, "training epochs")->check(CLI::PositiveNumber);
  app.add_option("--limit-train", limit_train, "train on the first N training images (0: all)")->check(CLI::NonNegativeNumber);
  app.add_option("--limit-test", limit_test, "test accuracy on the first N test images (0: all)")->check(CLI::NonNegativeNumber);
  app.add_option("--batch-size", batch_size, "images per step")->check(CLI::PositiveNumber);
  app.add_option("--images", images, "test images whose features are measured")->check(CLI::PositiveNumber);
  app.add_option("--threshold", threshold, "numerical rank counts s_i > s_max * threshold")->check(CLI::PositiveNumber);
  app.add_option("--seed", seed, "seeds the weights and the data order");
  app.add_option("--data", data_name, "dataset")->check(CLI::IsMember({"fashion-mnist", "cifar10"}));
  app.add_option("--data-dir", data_dir, "dataset directory (Fashion-MNIST: its default one when empty)");
  app.add_option("--threads", threads, "OpenMP threads (these nets are small: 1 is usually fastest)")->check(CLI::PositiveNumber);
  app.add_option("--svg", svg, "where to write the figure");
  CLI11_PARSE(app, argc, argv);

  try {
    study::set_threads(threads);
    const auto start = Clock::now();
    const study::Data d = study::load_data(data_name, data_dir, limit_train, limit_test);
    // the measured batch: the first `images` test images, normalized like every batch
    dg::data::DataLoader probe_loader(
        d.test, dg::data::LoaderOptions().batch(images).shuffled(false).augmentation(d.normalize));
    const Tensor<float> probe = (*probe_loader.begin()).images;  // (images, C, H, W)

    study::NetSpec c;
    c.in_chans = d.train.channels(), c.num_classes = d.train.num_classes(), c.image_size = d.train.height();
    c.patch = patch, c.kernel = kernel, c.expansion = expansion, c.lr = lr, c.blocks = blocks;
    c.widths.clear(), c.growth.assign(blocks.size(), growth);
    for (size_t i = 0; i < blocks.size(); ++i) c.widths.push_back(i == 0 ? stem : study::compressed(c.stage_out(i - 1)));
    const study::NetSpec a = study::additive_twin(c);
    std::printf("rank_study: %s, %lld train / %lld test images, %lld epoch(s), batch %lld; features of %lld test "
                "images; threshold %g\n",
                d.name.c_str(), static_cast<long long>(d.train.size()), static_cast<long long>(d.test.size()),
                static_cast<long long>(epochs), static_cast<long long>(batch_size),
                static_cast<long long>(probe.size(0)), threshold);

    // ---- both nets: spectra at init, train, spectra again
    std::vector<Spectrum> init[2], trained[2];
    double acc[2];
    for (int k = 0; k < 2; ++k) {
      const study::NetSpec& spec = k == 0 ? c : a;
      dg::Generator gen(seed);
      study::StudyNet net(spec, gen);
      std::printf("  %-62s %6lld params %5.2f MMACs\n", spec.str().c_str(), static_cast<long long>(study::count_params(spec)),
                  static_cast<double>(study::count_macs(spec)) / 1e6);
      init[k] = spectra(net, probe, threshold);
      study::TrainOptions o;
      o.epochs = epochs, o.batch_size = batch_size, o.seed = seed;
      study::train(net, d, o);
      acc[k] = study::accuracy(net, d);
      trained[k] = spectra(net, probe, threshold);
    }

    // ---- the table
    std::printf("\n%5s %7s %7s %8s | %-24s | %-24s\n", "stage", "net", "C", "rows", "at init: rank (/C), erank",
                "trained: rank (/C), erank");
    for (size_t s = 0; s < blocks.size(); ++s)
      for (int k = 0; k < 2; ++k) {
        const Spectrum &i0 = init[k][s], &t1 = trained[k][s];
        const int64_t rows = probe.size(0) * (d.train.height() / patch >> s) * (d.train.height() / patch >> s);
        std::printf("%5zu %7s %7lld %8lld | %4lld (%.2f), %7.1f       | %4lld (%.2f), %7.1f\n", s + 1, k == 0 ? "concat" : "add",
                    static_cast<long long>(i0.channels), static_cast<long long>(rows), static_cast<long long>(i0.rank),
                    static_cast<double>(i0.rank) / static_cast<double>(i0.channels), i0.effective_rank,
                    static_cast<long long>(t1.rank), static_cast<double>(t1.rank) / static_cast<double>(t1.channels),
                    t1.effective_rank);
      }
    std::printf("\nrank_study: test accuracy concat %.2f%%, add %.2f%%; %s total\n", acc[0], acc[1],
                train_util::format_duration(std::chrono::duration<double>(Clock::now() - start).count()).c_str());
    for (size_t s = 0; s < blocks.size(); ++s) {
      const Spectrum &tc = trained[0][s], &ta = trained[1][s];
      std::printf("rank_study: trained, stage %zu: concat rank %lld/%lld (%.2f), add rank %lld/%lld (%.2f)\n", s + 1,
                  static_cast<long long>(tc.rank), static_cast<long long>(tc.channels),
                  static_cast<double>(tc.rank) / static_cast<double>(tc.channels), static_cast<long long>(ta.rank),
                  static_cast<long long>(ta.channels), static_cast<double>(ta.rank) / static_cast<double>(ta.channels));
    }

    // ---- figure: one panel per stage, s_i / s_max against i / C, log scale
    std::vector<std::string> panels;
    const double panel_w = 460;
    for (size_t s = 0; s < blocks.size(); ++s) {
      std::vector<plot::Series> lines;
      for (int k = 0; k < 2; ++k)
        for (int when = 0; when < 2; ++when) {
          const Spectrum& sp = when == 0 ? init[k][s] : trained[k][s];
          plot::Series se(std::string(k == 0 ? "concat" : "add") + (when == 0 ? ", init" : ", trained"),
                          k == 0 ? plot::kConcatColor : plot::kAddColor);
          se.dashed = when == 0, se.dots = false;
          for (size_t i = 0; i < sp.s.size(); ++i) {
            const double v = sp.s[i] / sp.s[0];
            se.points.emplace_back(static_cast<double>(i + 1) / static_cast<double>(sp.channels), v >= 1e-7 ? v : NAN);
          }
          lines.push_back(se);
        }
      plot::Axes ax(study::format("stage %zu output", s + 1), "singular value index / channels", "s_i / s_max");
      ax.log_y = true;
      ax.legend = plot::Legend::bottom_left;
      panels.push_back(plot::chart(panel_w * static_cast<double>(s), 30, panel_w, 380, ax, lines,
                                   {{threshold, study::format("threshold %g", threshold), "#555555"}}));
    }
    train_util::write_text_atomic(
        svg, plot::document(panel_w * static_cast<double>(blocks.size()), 410,
                            study::format("normalized singular values of stage features (%lld test images; below 1e-7 not drawn)",
                                          static_cast<long long>(probe.size(0))),
                            panels));
    std::printf("rank_study: wrote %s\n", svg.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank_study: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
