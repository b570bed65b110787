// examples/rdnet/plot.hpp: small self-contained SVG charts for the study programs (pilot_study,
// rank_study, memory_study): lines, dots, error bars, reference lines, linear or log axes,
// named ticks. Built on train_util's tick rules and file writer (the same look as curves.svg).
// Not a plotting library: no automatic layout beyond one legend box per panel.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "train_util.hpp"

namespace plot {

/// One data series: points (x, y), optionally a +-err per point drawn as an error bar.
/// line: join the points; dots: mark them. Points with a non-finite y (or y <= 0 on a log
/// axis) are left out.
struct Series {
  Series(std::string name, std::string color, std::vector<std::pair<double, double>> points = {},
         std::vector<double> err = {})
      : name(std::move(name)), color(std::move(color)), points(std::move(points)), err(std::move(err)) {}
  std::string name, color;
  std::vector<std::pair<double, double>> points;
  std::vector<double> err;  // empty, or one per point
  bool line = true, dots = true;
  bool dashed = false;
  bool in_legend = true;
};

/// A horizontal reference line at y (a threshold, a mean), labelled at its right end.
struct HLine {
  double y;
  std::string label, color;
};

enum class Legend { top_left, top_right, bottom_left, bottom_right, none };

/// Axis titles and scales of one panel. xticks: ticks at these x with these labels (categories,
/// chosen depths); empty: round values from the data.
struct Axes {
  Axes(std::string title, std::string xlabel, std::string ylabel)
      : title(std::move(title)), xlabel(std::move(xlabel)), ylabel(std::move(ylabel)) {}
  std::string title, xlabel, ylabel;
  bool log_y = false;
  std::vector<std::pair<double, std::string>> xticks;
  double y_min = NAN, y_max = NAN;  // force the y range to include these (NaN: from the data)
  Legend legend = Legend::top_right;
};

namespace detail {
using train_util::detail::fmt;

inline std::string line(double x1, double y1, double x2, double y2, const std::string& stroke, double width = 1,
                        bool dashed = false) {
  return "<line x1=\"" + fmt("%.1f", x1) + "\" y1=\"" + fmt("%.1f", y1) + "\" x2=\"" + fmt("%.1f", x2) + "\" y2=\"" +
         fmt("%.1f", y2) + "\" stroke=\"" + stroke + "\" stroke-width=\"" + fmt("%.1f", width) + "\"" +
         (dashed ? " stroke-dasharray=\"6,4\"" : "") + "/>\n";
}
inline std::string text(double x, double y, const std::string& s, const char* anchor = "middle", const char* extra = "") {
  return "<text x=\"" + fmt("%.1f", x) + "\" y=\"" + fmt("%.1f", y) + "\" text-anchor=\"" + anchor + "\"" + extra + ">" +
         s + "</text>\n";
}
// "1e-3" style labels for decades on a log axis.
inline std::string decade_label(int e) { return e == 0 ? "1" : e == 1 ? "10" : "1e" + std::to_string(e); }
}  // namespace detail

/// One chart panel at (x0, y0) of size w x h, as SVG elements (wrap panels with document()).
inline std::string chart(double x0, double y0, double w, double h, const Axes& ax, const std::vector<Series>& series,
                         const std::vector<HLine>& hlines = {}) {
  using detail::fmt;
  const bool logy = ax.log_y;
  auto usable = [&](double y) { return std::isfinite(y) && (!logy || y > 0); };
  auto ty = [&](double y) { return logy ? std::log10(y) : y; };  // the plotted coordinate
  double xlo = INFINITY, xhi = -INFINITY, ylo = INFINITY, yhi = -INFINITY;
  for (const Series& s : series)
    for (size_t i = 0; i < s.points.size(); ++i) {
      auto [x, y] = s.points[i];
      if (!usable(y)) continue;
      const double e = i < s.err.size() && std::isfinite(s.err[i]) ? s.err[i] : 0;
      xlo = std::min(xlo, x), xhi = std::max(xhi, x);
      ylo = std::min(ylo, ty(logy ? y : y - e)), yhi = std::max(yhi, ty(logy ? y : y + e));
    }
  for (const HLine& l : hlines)
    if (usable(l.y)) ylo = std::min(ylo, ty(l.y)), yhi = std::max(yhi, ty(l.y));
  for (double y : {ax.y_min, ax.y_max})
    if (usable(y)) ylo = std::min(ylo, ty(y)), yhi = std::max(yhi, ty(y));
  for (const auto& [x, label] : ax.xticks) xlo = std::min(xlo, x), xhi = std::max(xhi, x);
  if (!(xlo <= xhi)) xlo = 0, xhi = 1;
  if (!(ylo <= yhi)) ylo = 0, yhi = 1;

  // y ticks: round values, or whole decades on a log axis
  std::vector<std::pair<double, std::string>> yticks;
  if (logy) {
    const int e0 = static_cast<int>(std::floor(ylo + 1e-9)), e1 = static_cast<int>(std::ceil(yhi - 1e-9));
    ylo = e0, yhi = std::max(e1, e0 + 1);
    const int every = std::max(1, (static_cast<int>(yhi) - e0 + 5) / 6);  // at most ~6 labels
    for (int e = e0; e <= static_cast<int>(yhi); e += every) yticks.emplace_back(e, detail::decade_label(e));
  } else {
    std::vector<double> t = train_util::nice_ticks(ylo, yhi, 5);
    const double step = t.size() > 1 ? t[1] - t[0] : 1;
    ylo = t.front(), yhi = t.back();
    for (double v : t) yticks.emplace_back(v, train_util::detail::tick_label(v, step));
  }
  // x ticks: the given ones, or round values; the x range gets a margin for dots at the ends
  std::vector<std::pair<double, std::string>> xticks = ax.xticks;
  if (xticks.empty()) {
    std::vector<double> t = train_util::nice_ticks(xlo, xhi, 6);
    const double step = t.size() > 1 ? t[1] - t[0] : 1;
    for (double v : t) xticks.emplace_back(v, train_util::detail::tick_label(v, step));
    xlo = std::min(xlo, t.front()), xhi = std::max(xhi, t.back());
  } else {
    const double pad = std::max((xhi - xlo) * 0.06, 0.5);  // dots at the first and last tick stay inside
    xlo -= pad, xhi += pad;
  }

  const double L = x0 + 64, R = x0 + w - 15, T = y0 + 30, B = y0 + h - 45;  // plot area
  auto px = [&](double x) { return L + (x - xlo) / (xhi - xlo) * (R - L); };
  auto py = [&](double v) { return B - (v - ylo) / (yhi - ylo) * (B - T); };  // v: plotted coordinate
  std::string s = detail::text((L + R) / 2, y0 + 18, ax.title, "middle", " font-size=\"15\" font-weight=\"bold\"");
  for (const auto& [v, label] : yticks) {
    s += detail::line(L, py(v), R, py(v), "#e0e0e0") + detail::line(L - 5, py(v), L, py(v), "#333");
    s += detail::text(L - 8, py(v) + 4, label, "end");
  }
  for (const auto& [x, label] : xticks) {
    if (x < xlo - 1e-12 || x > xhi + 1e-12) continue;
    s += detail::line(px(x), B, px(x), B + 5, "#333") + detail::text(px(x), B + 19, label);
  }
  s += "<rect x=\"" + fmt("%.1f", L) + "\" y=\"" + fmt("%.1f", T) + "\" width=\"" + fmt("%.1f", R - L) + "\" height=\"" +
       fmt("%.1f", B - T) + "\" fill=\"none\" stroke=\"#333\"/>\n";
  s += detail::text((L + R) / 2, B + 38, ax.xlabel);
  s += "<text transform=\"translate(" + fmt("%.1f", x0 + 16) + "," + fmt("%.1f", (T + B) / 2) +
       ") rotate(-90)\" text-anchor=\"middle\">" + ax.ylabel + "</text>\n";

  for (const HLine& l : hlines) {
    if (!usable(l.y)) continue;
    s += detail::line(L, py(ty(l.y)), R, py(ty(l.y)), l.color, 1.5, true);
    s += detail::text(R - 4, py(ty(l.y)) - 5, l.label, "end", (" fill=\"" + l.color + "\"").c_str());
  }
  for (const Series& se : series) {
    std::string pts;
    for (size_t i = 0; i < se.points.size(); ++i) {
      auto [x, y] = se.points[i];
      if (!usable(y)) continue;
      pts += fmt("%.1f", px(x)) + "," + fmt("%.1f", py(ty(y))) + " ";
      if (i < se.err.size() && std::isfinite(se.err[i]) && se.err[i] > 0 && !logy) {  // error bar with caps
        const double a = py(y - se.err[i]), b = py(y + se.err[i]);
        s += detail::line(px(x), a, px(x), b, se.color, 1.5) + detail::line(px(x) - 6, a, px(x) + 6, a, se.color, 1.5) +
             detail::line(px(x) - 6, b, px(x) + 6, b, se.color, 1.5);
      }
      if (se.dots)
        s += "<circle cx=\"" + fmt("%.1f", px(x)) + "\" cy=\"" + fmt("%.1f", py(ty(y))) + "\" r=\"3.5\" fill=\"" +
             se.color + "\"><title>" + se.name + ": (" + fmt("%.4g", x) + ", " + fmt("%.4g", y) + ")</title></circle>\n";
    }
    if (se.line && !pts.empty())
      s += "<polyline fill=\"none\" stroke=\"" + se.color + "\" stroke-width=\"2\"" +
           (se.dashed ? " stroke-dasharray=\"6,4\"" : "") + " points=\"" + pts + "\"/>\n";
  }

  std::vector<const Series*> named;
  for (const Series& se : series)
    if (se.in_legend) named.push_back(&se);
  if (ax.legend != Legend::none && !named.empty()) {  // a white box with one row per named series
    size_t longest = 0;
    for (const Series* se : named) longest = std::max(longest, se->name.size());
    const double bw = 40 + 7.0 * static_cast<double>(longest), bh = 18.0 * static_cast<double>(named.size()) + 6;
    const bool left = ax.legend == Legend::top_left || ax.legend == Legend::bottom_left;
    const bool top = ax.legend == Legend::top_left || ax.legend == Legend::top_right;
    const double bx = left ? L + 6 : R - 6 - bw, by = top ? T + 6 : B - 6 - bh;
    s += "<rect x=\"" + fmt("%.1f", bx) + "\" y=\"" + fmt("%.1f", by) + "\" width=\"" + fmt("%.1f", bw) + "\" height=\"" +
         fmt("%.1f", bh) + "\" fill=\"white\" fill-opacity=\"0.85\" stroke=\"#ccc\"/>\n";
    for (size_t k = 0; k < named.size(); ++k) {
      const double ly = by + 17 + 18 * static_cast<double>(k);
      if (named[k]->line)
        s += detail::line(bx + 6, ly - 4, bx + 28, ly - 4, named[k]->color, 2, named[k]->dashed);
      else  // a dot, as the series is drawn
        s += "<circle cx=\"" + fmt("%.1f", bx + 17) + "\" cy=\"" + fmt("%.1f", ly - 4) + "\" r=\"3.5\" fill=\"" +
             named[k]->color + "\"/>\n";
      s += detail::text(bx + 34, ly, named[k]->name, "start");
    }
  }
  return s;
}

/// A whole SVG document of size w x h: a white page, a title line, then the panels' elements.
inline std::string document(double w, double h, const std::string& title, const std::vector<std::string>& panels) {
  using detail::fmt;
  std::string s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + fmt("%.0f", w) + "\" height=\"" + fmt("%.0f", h) +
                  "\" viewBox=\"0 0 " + fmt("%.0f", w) + " " + fmt("%.0f", h) +
                  "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"" + fmt("%.0f", w) + "\" height=\"" +
                  fmt("%.0f", h) + "\" fill=\"white\"/>\n";
  s += detail::text(w / 2, 20, title, "middle", " font-size=\"14\"");
  for (const std::string& p : panels) s += p;
  return s + "</svg>\n";
}

/// The colors the study programs give each kind of network, so figures agree with one another.
inline const char* kConcatColor = "#1f77b4";  // concatenation shortcut (dense)
inline const char* kAddColor = "#d62728";     // additive shortcut (residual)

}  // namespace plot
