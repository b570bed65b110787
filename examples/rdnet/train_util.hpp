// examples/rdnet/train_util.hpp: the bookkeeping around rdnet_train's loop: the progress bar,
// the per-epoch metrics (metrics.csv and curves.svg, drawn by hand), and checkpoint helpers.
// Not training logic: train.cpp holds the loop, so it reads top to bottom without this file.
#pragma once

#include <densegrad/densegrad.hpp>
#include <densegrad/io/tensor_io.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace train_util {

using dg::Tensor;

/// "1:05:09" for 3909 seconds, "4:05" for 245, "0:07" for 7; "?" when unknown (NaN / negative).
inline std::string format_duration(double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return "?";
  const auto s = static_cast<long long>(std::llround(seconds));
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", s / 3600, s / 60 % 60, s % 60);
  else std::snprintf(buf, sizeof buf, "%lld:%02lld", s / 60, s % 60);
  return buf;
}

// ---------------------------------------------------------------- progress

/// What one epoch looks like while it runs. On a terminal (tty) one line redrawn with '\r':
///   epoch 2/8 [########......] 234/468 loss 0.4210 lr 1.9e-03 412 img/s ETA 0:57
/// Otherwise (a log file, CTest) the same fields as plain lines, about every 10% of the epoch.
class Progress {
 public:
  Progress(std::ostream& out, bool tty, int64_t epoch, int64_t epochs, int64_t steps)
      : out_(out), tty_(tty), epoch_(epoch), epochs_(epochs), steps_(std::max<int64_t>(steps, 1)) {}

  /// After optimizer step `step` (1-based) of this epoch: `loss` is the epoch's mean so far,
  /// `images` the images trained on in `seconds` since the epoch began.
  void update(int64_t step, double loss, double lr, int64_t images, double seconds) {
    const double per_step = seconds / static_cast<double>(std::max<int64_t>(step, 1));
    char fields[160];
    std::snprintf(fields, sizeof fields, "%lld/%lld loss %.4f lr %.2e %.0f img/s ETA %s", static_cast<long long>(step),
                  static_cast<long long>(steps_), loss, lr, seconds > 0 ? static_cast<double>(images) / seconds : 0.0,
                  format_duration(per_step * static_cast<double>(steps_ - step)).c_str());
    const std::string head = "epoch " + std::to_string(epoch_) + "/" + std::to_string(epochs_) + " ";
    if (tty_) {
      constexpr int64_t width = 20;
      const int64_t done = step * width / steps_;
      out_ << '\r' << head << '[' << std::string(static_cast<size_t>(done), '#')
           << std::string(static_cast<size_t>(width - done), '.') << "] " << fields << "\033[K" << std::flush;
      drawn_ = true;
    } else if (step * 10 / steps_ > last_decile_ || step == steps_) {  // crossed a 10% mark
      last_decile_ = step * 10 / steps_;
      out_ << head << "step " << fields << '\n' << std::flush;
    }
  }
  /// Ends the bar's line (on a tty) so the next output starts on a fresh one.
  void finish() {
    if (tty_ && drawn_) out_ << '\n' << std::flush;
    drawn_ = false;
  }

 private:
  std::ostream& out_;
  bool tty_;
  int64_t epoch_, epochs_, steps_;
  int64_t last_decile_ = 0;
  bool drawn_ = false;
};

// ---------------------------------------------------------------- metrics

/// One row of metrics.csv. test_loss / test_acc are NaN for epochs without evaluation
/// (--eval-every) and written as empty fields. test_acc is in percent, like timm's summary.csv.
struct EpochRecord {
  int64_t epoch = 0;
  double train_loss = 0, test_loss = NAN, test_acc = NAN, lr = 0, seconds = 0;
};

inline const char* kMetricsHeader = "epoch,train_loss,test_loss,test_acc,lr,seconds";

/// The text of metrics.csv: the header, then one line per epoch.
inline std::string metrics_csv(const std::vector<EpochRecord>& rows) {
  std::string s = std::string(kMetricsHeader) + "\n";
  auto num = [](const char* fmt, double v) {
    if (std::isnan(v)) return std::string();
    char buf[48];
    std::snprintf(buf, sizeof buf, fmt, v);
    return std::string(buf);
  };
  for (const auto& r : rows)
    s += std::to_string(r.epoch) + "," + num("%.6f", r.train_loss) + "," + num("%.6f", r.test_loss) + "," +
         num("%.2f", r.test_acc) + "," + num("%.6e", r.lr) + "," + num("%.1f", r.seconds) + "\n";
  return s;
}

/// Reads metrics_csv() text back (a checkpoint keeps the history in its metadata).
inline std::vector<EpochRecord> parse_metrics_csv(const std::string& text) {
  std::istringstream in(text);
  std::string line;
  DG_CHECK(std::getline(in, line) && line == kMetricsHeader, "metrics: expected the header '", kMetricsHeader,
           "', got '", line, "'");
  std::vector<EpochRecord> rows;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    std::vector<std::string> f;
    std::stringstream ls(line);
    for (std::string cell; std::getline(ls, cell, ',');) f.push_back(cell);
    if (!line.empty() && line.back() == ',') f.push_back("");
    DG_CHECK(f.size() == 6, "metrics: expected 6 fields per line, got ", f.size(), " in '", line, "'");
    auto num = [&](const std::string& cell) {  // strtod: no exception, a full-cell check
      if (cell.empty()) return std::numeric_limits<double>::quiet_NaN();
      char* end = nullptr;
      const double v = std::strtod(cell.c_str(), &end);
      DG_CHECK(end != cell.c_str() && *end == '\0', "metrics: '", cell, "' is not a number (line '", line, "')");
      return v;
    };
    char* end = nullptr;
    errno = 0;
    const long long epoch = std::strtoll(f[0].c_str(), &end, 10);
    DG_CHECK(!f[0].empty() && *end == '\0' && errno == 0 && epoch >= 0, "metrics: expected an epoch number, got '",
             f[0], "' (line '", line, "')");
    rows.push_back({epoch, num(f[1]), num(f[2]), num(f[3]), num(f[4]), num(f[5])});
  }
  return rows;
}

/// Writes a text file atomically (temp file + rename), like io::write_safetensors does, so a
/// crash mid-write never leaves half a metrics.csv behind.
inline void write_text_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    DG_CHECK(f.good(), "cannot write '", tmp, "' (does the directory exist and is it writable?)");
    f << text;
    f.flush();
    DG_CHECK(f.good(), "error while writing '", tmp, "'");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  DG_CHECK(!ec, "cannot rename '", tmp, "' to '", path, "': ", ec.message());
}

// ---------------------------------------------------------------- curves.svg

/// About `n` round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]:
/// nice_ticks(0.23, 0.91) = {0.2, 0.4, 0.6, 0.8, 1.0}.
inline std::vector<double> nice_ticks(double lo, double hi, int n = 5) {
  if (!(hi > lo)) {  // one value (or none): a small range around it
    const double pad = std::abs(lo) > 0 ? std::abs(lo) * 0.1 : 1.0;
    lo -= pad;
    hi += pad;
  }
  const double raw = (hi - lo) / std::max(n - 1, 1), mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = 10 * mag;
  for (double m : {1.0, 2.0, 2.5, 5.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> t;
  for (double v = std::floor(lo / step) * step; v < hi + step * 0.999; v += step) t.push_back(std::abs(v) < step * 1e-9 ? 0.0 : v);
  return t;
}

namespace detail {
inline std::string fmt(const char* f, double v) {
  char buf[48];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}
// A tick label with just enough decimals for the tick spacing.
inline std::string tick_label(double v, double step) {
  const int decimals = std::max(0, static_cast<int>(std::ceil(-std::log10(step) - 1e-9)));
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

struct Series {
  std::string name, color;
  std::vector<std::pair<double, double>> points;  // (epoch, value), NaN values left out
};

// One chart at (x0, y0) of size w x h: frame, ticks and grid on both axes, axis labels,
// a polyline with dots per series, and a legend in the top (falling curves) or bottom right corner.
inline std::string svg_chart(double x0, double y0, double w, double h, const std::string& title,
                             const std::string& ylabel, const std::vector<Series>& series, int64_t max_epoch,
                             bool legend_top) {
  double lo = INFINITY, hi = -INFINITY;
  for (const auto& s : series)
    for (auto [x, y] : s.points) lo = std::min(lo, y), hi = std::max(hi, y);
  if (!(lo <= hi)) lo = 0, hi = 1;  // nothing to plot yet
  std::vector<double> yt = nice_ticks(lo, hi, 5);
  const double ylo = yt.front(), yhi = yt.back(), ystep = yt.size() > 1 ? yt[1] - yt[0] : 1;
  std::vector<double> xt = nice_ticks(1, static_cast<double>(std::max<int64_t>(max_epoch, 2)), 6);
  std::vector<double> xticks;
  for (double v : xt)
    if (v >= 1 && v <= std::max<int64_t>(max_epoch, 2) && v == std::floor(v)) xticks.push_back(v);  // whole epochs
  const double xlo = 1, xhi = static_cast<double>(std::max<int64_t>(max_epoch, 2));
  const double L = x0 + 60, R = x0 + w - 15, T = y0 + 30, B = y0 + h - 45;  // plot area
  auto px = [&](double e) { return L + (e - xlo) / (xhi - xlo) * (R - L); };
  auto py = [&](double v) { return B - (v - ylo) / (yhi - ylo) * (B - T); };
  std::string s;
  s += "<text x=\"" + fmt("%.1f", (L + R) / 2) + "\" y=\"" + fmt("%.1f", y0 + 18) +
       "\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">" + title + "</text>\n";
  for (double v : yt) {  // horizontal grid lines and y tick labels
    s += "<line x1=\"" + fmt("%.1f", L) + "\" y1=\"" + fmt("%.1f", py(v)) + "\" x2=\"" + fmt("%.1f", R) + "\" y2=\"" +
         fmt("%.1f", py(v)) + "\" stroke=\"#e0e0e0\"/>\n";
    s += "<line x1=\"" + fmt("%.1f", L - 5) + "\" y1=\"" + fmt("%.1f", py(v)) + "\" x2=\"" + fmt("%.1f", L) +
         "\" y2=\"" + fmt("%.1f", py(v)) + "\" stroke=\"#333\"/>\n";
    s += "<text x=\"" + fmt("%.1f", L - 8) + "\" y=\"" + fmt("%.1f", py(v) + 4) + "\" text-anchor=\"end\">" +
         tick_label(v, ystep) + "</text>\n";
  }
  for (double e : xticks) {  // x ticks at whole epochs
    s += "<line x1=\"" + fmt("%.1f", px(e)) + "\" y1=\"" + fmt("%.1f", B) + "\" x2=\"" + fmt("%.1f", px(e)) +
         "\" y2=\"" + fmt("%.1f", B + 5) + "\" stroke=\"#333\"/>\n";
    s += "<text x=\"" + fmt("%.1f", px(e)) + "\" y=\"" + fmt("%.1f", B + 19) + "\" text-anchor=\"middle\">" +
         fmt("%.0f", e) + "</text>\n";
  }
  s += "<rect x=\"" + fmt("%.1f", L) + "\" y=\"" + fmt("%.1f", T) + "\" width=\"" + fmt("%.1f", R - L) +
       "\" height=\"" + fmt("%.1f", B - T) + "\" fill=\"none\" stroke=\"#333\"/>\n";
  s += "<text x=\"" + fmt("%.1f", (L + R) / 2) + "\" y=\"" + fmt("%.1f", B + 38) +
       "\" text-anchor=\"middle\">epoch</text>\n";
  s += "<text transform=\"translate(" + fmt("%.1f", x0 + 16) + "," + fmt("%.1f", (T + B) / 2) +
       ") rotate(-90)\" text-anchor=\"middle\">" + ylabel + "</text>\n";
  for (size_t k = 0; k < series.size(); ++k) {
    const Series& se = series[k];
    std::string pts;
    for (auto [e, v] : se.points) pts += fmt("%.1f", px(e)) + "," + fmt("%.1f", py(v)) + " ";
    if (se.points.size() > 1)
      s += "<polyline fill=\"none\" stroke=\"" + se.color + "\" stroke-width=\"2\" points=\"" + pts + "\"/>\n";
    for (auto [e, v] : se.points)
      s += "<circle cx=\"" + fmt("%.1f", px(e)) + "\" cy=\"" + fmt("%.1f", py(v)) + "\" r=\"3\" fill=\"" + se.color +
           "\"><title>" + se.name + " epoch " + fmt("%.0f", e) + ": " + fmt("%.4g", v) + "</title></circle>\n";
    const double ly = (legend_top ? T + 16 : B - 10 - 18 * static_cast<double>(series.size() - 1)) + 18 * static_cast<double>(k);
    s += "<rect x=\"" + fmt("%.1f", R - 136) + "\" y=\"" + fmt("%.1f", ly - 13) + "\" width=\"130\" height=\"18\" fill=\"white\" fill-opacity=\"0.8\"/>\n";
    s += "<line x1=\"" + fmt("%.1f", R - 130) + "\" y1=\"" + fmt("%.1f", ly - 4) + "\" x2=\"" + fmt("%.1f", R - 108) +
         "\" y2=\"" + fmt("%.1f", ly - 4) + "\" stroke=\"" + se.color + "\" stroke-width=\"2\"/>\n";
    s += "<text x=\"" + fmt("%.1f", R - 102) + "\" y=\"" + fmt("%.1f", ly) + "\">" + se.name + "</text>\n";
  }
  return s;
}
}  // namespace detail

/// curves.svg: train and test loss (left) and test accuracy (right) per epoch, with ticks,
/// grid, axis labels and legends; a self-contained SVG a browser shows as is.
inline std::string curves_svg(const std::vector<EpochRecord>& rows, const std::string& title) {
  detail::Series train{"train loss", "#1f77b4", {}}, test{"test loss", "#d62728", {}}, acc{"test accuracy", "#2ca02c", {}};
  int64_t max_epoch = 1;
  for (const auto& r : rows) {
    auto e = static_cast<double>(r.epoch);
    max_epoch = std::max(max_epoch, r.epoch);
    if (std::isfinite(r.train_loss)) train.points.emplace_back(e, r.train_loss);
    if (std::isfinite(r.test_loss)) test.points.emplace_back(e, r.test_loss);
    if (std::isfinite(r.test_acc)) acc.points.emplace_back(e, r.test_acc);
  }
  const double W = 900, H = 380;
  std::string s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"900\" height=\"380\" viewBox=\"0 0 900 380\" "
                  "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"900\" height=\"380\" fill=\"white\"/>\n";
  s += "<text x=\"450\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">" + title + "</text>\n";
  s += detail::svg_chart(0, 30, W / 2, H - 30, "loss", "cross-entropy", {train, test}, max_epoch, true);
  s += detail::svg_chart(W / 2, 30, W / 2, H - 30, "test accuracy", "accuracy (%)", {acc}, max_epoch, false);
  return s + "</svg>\n";
}

// ---------------------------------------------------------------- checkpoints

/// A checkpoint being assembled or read: tensors by full name ("model.<key>", "optim.<key>", ...)
/// and the free-text __metadata__. Written with io::write_safetensors (temp file + rename).
struct Checkpoint {
  std::map<std::string, dg::io::RawTensor> tensors;
  std::map<std::string, std::string> metadata;

  /// Adds every tensor of a state dict under "<prefix>.<key>", stored as T's own dtype.
  template <class T>
  void put(const std::string& prefix, const std::map<std::string, Tensor<T>>& sd) {
    for (const auto& [key, t] : sd) tensors[prefix + "." + key] = dg::io::to_raw(t);
  }
  /// The tensors under "<prefix>." with the prefix cut off, converted to T (a state dict again).
  template <class T>
  std::map<std::string, Tensor<T>> get(const std::string& prefix) const {
    std::map<std::string, Tensor<T>> sd;
    const std::string p = prefix + ".";
    for (const auto& [name, raw] : tensors)
      if (name.compare(0, p.size(), p) == 0) sd.emplace(name.substr(p.size()), dg::io::from_raw<T>(raw));
    return sd;
  }
  /// One int64 value (an epoch or step count), stored as a 0-D I64 tensor.
  void put_int(const std::string& name, int64_t v) { tensors[name] = dg::io::RawTensor::from_vector<int64_t>({}, {v}); }
  int64_t get_int(const std::string& name) const { return one(name).to_vector<int64_t>()[0]; }
  /// One double (the best accuracy), stored as a 0-D F64 tensor.
  void put_double(const std::string& name, double v) { tensors[name] = dg::io::RawTensor::from_vector<double>({}, {v}); }
  double get_double(const std::string& name) const { return one(name).to_vector<double>()[0]; }

  /// A std::mt19937_64 (what dg::Generator wraps) by its standard text form (operator<<: 312
  /// numbers and an index), kept as an I64 tensor of the characters: safetensors has no text dtype
  /// we read, and an I64 tensor keeps every piece of resumable state in the tensors.
  void put_rng(const std::string& name, const std::mt19937_64& engine) {
    std::ostringstream os;
    os << engine;
    const std::string text = os.str();
    tensors[name] = dg::io::RawTensor::from_vector<int64_t>({static_cast<int64_t>(text.size())},
                                                            std::vector<int64_t>(text.begin(), text.end()));
  }
  void get_rng(const std::string& name, std::mt19937_64& engine) const {
    std::string text;
    for (int64_t c : at(name).to_vector<int64_t>()) {
      DG_CHECK(c > 0 && c < 128, "checkpoint: '", name, "' is not the text of a random engine state");
      text += static_cast<char>(c);
    }
    std::istringstream is(text);
    std::mt19937_64 e;
    is >> e;
    DG_CHECK(!is.fail(), "checkpoint: '", name, "' does not hold a std::mt19937_64 state");
    engine = e;
  }

  const dg::io::RawTensor& at(const std::string& name) const {
    auto it = tensors.find(name);
    DG_CHECK(it != tensors.end(), "checkpoint: no tensor '", name, "' (is this an rdnet_train checkpoint?)");
    return it->second;
  }
  std::string meta(const std::string& key) const {
    auto it = metadata.find(key);
    return it == metadata.end() ? std::string() : it->second;
  }

  void save(const std::string& path) const { dg::io::write_safetensors(path, tensors, metadata); }
  static Checkpoint load(const std::string& path) {
    dg::io::Safetensors st = dg::io::read_safetensors(path);
    return {std::move(st.tensors), std::move(st.metadata)};
  }

 private:
  const dg::io::RawTensor& one(const std::string& name) const {
    const auto& r = at(name);
    DG_CHECK(r.numel() == 1, "checkpoint: '", name, "' should hold one value, has shape ", dg::io::detail::shape_str(r.shape));
    return r;
  }
};

// ---------------------------------------------------------------- data files

/// True when `dir` holds Fashion-MNIST's training images where load_fashion_mnist looks
/// (dir, dir/FashionMNIST/raw, dir/raw; plain or .gz): lets rdnet_train say in one line what to install.
inline bool has_fashion_mnist(const std::string& dir) {
  std::error_code ec;
  for (const std::string& d : {dir, dir + "/FashionMNIST/raw", dir + "/raw"})
    for (const char* f : {"train-images-idx3-ubyte", "train-images-idx3-ubyte.gz", "train-images.idx3-ubyte", "train-images.idx3-ubyte.gz"})
      if (std::filesystem::is_regular_file(d + "/" + f, ec)) return true;
  return false;
}

}  // namespace train_util
