// densegrad/autograd/profiler.hpp: where a step's time goes, op by op (torch.autograd.profiler's
// key_averages(), in small). While a Profiler lives on a thread, every op that thread runs is
// timed in forward and in backward, and the times add up per op name (or per name and input
// shapes). On a GPU each measurement first waits for the queued work (cuda_synchronize), so an
// op's time is its own kernels' time plus the launches; the step runs slower while profiled,
// with nothing overlapping, and the table tells where it spends, not how fast it goes.
//
//   dg::autograd::Profiler prof({/*record_shapes=*/true});
//   auto loss = dg::cross_entropy(model.forward(x), y);   // forward: one timing per op
//   loss.backward();                                       // backward: one timing per node
//   { dg::autograd::ProfileScope s("optimizer.step"); opt.step(); }  // a labelled region
//   std::cout << prof.table();
//
// How the forward is timed: an op records itself when its output is ready, so an op's forward
// time is the time since the previous event (the previous op, a scope's end, a backward's end or
// the profiler's start). Host code that runs between ops counts towards the op that follows it;
// put it in a ProfileScope to see it apart. Work inside a backward node (including forwards
// recomputed by checkpoint()) counts towards that node only.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "../core/device_kernels.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"

namespace dg::autograd {

/// One line of a profile: an op (or scope), its calls and its summed times in milliseconds.
struct ProfileRow {
  std::string name;
  std::string shapes;  // the inputs' shapes, "[64, 256, 56, 56] [256, 1, 7, 7]", with record_shapes
  int64_t forward_calls = 0, backward_calls = 0;
  double forward_ms = 0, backward_ms = 0;
  double total_ms() const { return forward_ms + backward_ms; }
};

struct ProfilerOptions {
  bool record_shapes = false;  // one row per op name and input shapes, not per name
  bool synchronize = true;     // wait for the GPU (if any) before each reading: needed for GPU times
};

namespace detail {

/// The running profile of one thread. Only Profiler creates one; the tape reports to it.
class ProfileState {
 public:
  using Clock = std::chrono::steady_clock;
  explicit ProfileState(ProfilerOptions o)
      : opts(o), sync_cuda(o.synchronize && cuda_is_available()), start(now()), last(start) {}

  static ProfileState*& active() {
    thread_local ProfileState* state = nullptr;
    return state;
  }

  Clock::time_point now() const {
    if (sync_cuda) cuda_synchronize();
    return Clock::now();
  }
  static double ms(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  }
  /// An op's output is ready: its forward time is the time since the last event.
  /// Returns the row key (kept by the op's node, so its backward lands on the same row).
  template <class TI>
  std::string forward_op(const char* name, const std::vector<Tensor<TI>>& inputs) {
    std::string shapes;
    if (opts.record_shapes)
      for (const Tensor<TI>& t : inputs) {
        if (!shapes.empty()) shapes += ' ';
        shapes += t.defined() ? shape_str(t.shape()) : "-";
      }
    if (nested > 0) return shapes;  // inside a backward node: that node's time holds it
    const auto t = now();
    ProfileRow& r = row(name, shapes);
    ++r.forward_calls;
    r.forward_ms += ms(last, t);
    last = now();  // our own bookkeeping is nobody's time
    return shapes;
  }
  /// Time not spent in any op (before a scope, before a backward) goes to the row "(between ops)".
  void gap() {
    if (nested > 0) return;
    const auto t = now();
    ProfileRow& r = row("(between ops)", "");
    ++r.forward_calls;
    r.forward_ms += ms(last, t);
    last = now();
  }
  void add_backward(const std::string& name, const std::string& shapes, double t_ms) {
    ProfileRow& r = row(name, shapes);
    ++r.backward_calls;
    r.backward_ms += t_ms;
  }
  void add_scope(const std::string& name, double t_ms) {
    ProfileRow& r = row(name, "");
    ++r.forward_calls;
    r.forward_ms += t_ms;
  }

  /// Marks the work of a backward node or a scope (exception-safe): events inside are its time.
  struct Nest {
    explicit Nest(ProfileState& s) : s_(s) { ++s_.nested; }
    ~Nest() { --s_.nested; }
    Nest(const Nest&) = delete;
    Nest& operator=(const Nest&) = delete;

   private:
    ProfileState& s_;
  };

  ProfilerOptions opts;
  bool sync_cuda;  // a GPU is there to wait for
  Clock::time_point start, last;
  int nested = 0;  // > 0 while a backward node or a scope runs: inner events are its time
  std::map<std::pair<std::string, std::string>, ProfileRow> rows;

 private:
  ProfileRow& row(const std::string& name, const std::string& shapes) {
    ProfileRow& r = rows[{name, shapes}];
    if (r.name.empty()) {
      r.name = name;
      r.shapes = shapes;
    }
    return r;
  }
};

}  // namespace detail

/// Profiles the ops this thread runs for as long as it lives. One at a time per thread.
class Profiler {
 public:
  explicit Profiler(ProfilerOptions opts = {}) : state_(opts) {
    DG_CHECK(detail::ProfileState::active() == nullptr,
             "Profiler: this thread already has a running profiler; one at a time per thread");
    detail::ProfileState::active() = &state_;
  }
  ~Profiler() { stop(); }
  Profiler(const Profiler&) = delete;
  Profiler& operator=(const Profiler&) = delete;

  /// Stops recording (the destructor does it too); the rows stay readable.
  void stop() {
    if (!running_) return;
    running_ = false;
    wall_ms_ = detail::ProfileState::ms(state_.start, state_.now());
    detail::ProfileState::active() = nullptr;
  }
  /// Milliseconds since the start (until stop(), once stopped).
  double wall_ms() const { return running_ ? detail::ProfileState::ms(state_.start, state_.now()) : wall_ms_; }

  /// The rows, most total time first.
  std::vector<ProfileRow> rows() const {
    std::vector<ProfileRow> out;
    for (const auto& kv : state_.rows) out.push_back(kv.second);
    std::stable_sort(out.begin(), out.end(),
                     [](const ProfileRow& a, const ProfileRow& b) { return a.total_ms() > b.total_ms(); });
    return out;
  }

  /// A markdown table of the rows (at most max_rows, the rest summed into one), times and calls
  /// divided by `per` (the number of steps profiled, for figures per step).
  std::string table(size_t max_rows = 40, int64_t per = 1) const {
    DG_CHECK(per >= 1, "Profiler::table: expected per >= 1, got ", per);
    const std::vector<ProfileRow> all = rows();
    double total = 0;
    for (const ProfileRow& r : all) total += r.total_ms();
    const double d = static_cast<double>(per);
    std::string s = per == 1 ? "| op | forward ms | calls | backward ms | calls | total ms | share |\n"
                             : "| op | forward ms/step | calls/step | backward ms/step | calls/step | total ms/step | share |\n";
    s += "|---|---:|---:|---:|---:|---:|---:|\n";
    char buf[512];
    auto line = [&](const std::string& name, const ProfileRow& r) {
      std::snprintf(buf, sizeof buf, "| %s | %.3f | %.4g | %.3f | %.4g | %.3f | %.1f%% |\n", name.c_str(),
                    r.forward_ms / d, static_cast<double>(r.forward_calls) / d, r.backward_ms / d,
                    static_cast<double>(r.backward_calls) / d, r.total_ms() / d,
                    total > 0 ? 100.0 * r.total_ms() / total : 0.0);
      s += buf;
    };
    ProfileRow rest;
    for (size_t i = 0; i < all.size(); ++i) {
      if (i < max_rows) {
        line(all[i].shapes.empty() ? all[i].name : all[i].name + " " + all[i].shapes, all[i]);
      } else {
        rest.forward_calls += all[i].forward_calls;
        rest.backward_calls += all[i].backward_calls;
        rest.forward_ms += all[i].forward_ms;
        rest.backward_ms += all[i].backward_ms;
      }
    }
    if (all.size() > max_rows) line("(" + std::to_string(all.size() - max_rows) + " more rows)", rest);
    ProfileRow sum;
    for (const ProfileRow& r : all) {
      sum.forward_ms += r.forward_ms;
      sum.backward_ms += r.backward_ms;
    }
    std::snprintf(buf, sizeof buf, "| **all** | %.3f | | %.3f | | %.3f | 100%% |\n", sum.forward_ms / d,
                  sum.backward_ms / d, total / d);
    s += buf;
    return s;
  }

 private:
  detail::ProfileState state_;
  bool running_ = true;
  double wall_ms_ = 0;
};

/// Times a region under the running profiler as one row named `name` (torch's record_function);
/// does nothing when no profiler runs on this thread. Ops inside count towards the scope only.
class ProfileScope {
 public:
  explicit ProfileScope(std::string name) : state_(detail::ProfileState::active()), name_(std::move(name)) {
    if (!state_) return;
    state_->gap();
    ++state_->nested;
    t0_ = state_->now();
  }
  ~ProfileScope() {
    if (!state_ || detail::ProfileState::active() != state_) return;  // the profiler stopped first
    const auto t = state_->now();
    --state_->nested;
    if (state_->nested == 0) state_->add_scope(name_, detail::ProfileState::ms(t0_, t));
    state_->last = state_->now();
  }
  ProfileScope(const ProfileScope&) = delete;
  ProfileScope& operator=(const ProfileScope&) = delete;

 private:
  detail::ProfileState* state_;
  std::string name_;
  detail::ProfileState::Clock::time_point t0_;
};

}  // namespace dg::autograd
