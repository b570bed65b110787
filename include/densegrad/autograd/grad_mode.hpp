// densegrad/autograd/grad_mode.hpp: the per-thread switch that turns recording on and off.
// NoGradGuard is torch.no_grad(): ops run, nothing is recorded. EnableGradGuard is
// torch.enable_grad(): recording on again, e.g. inside a backward closure that re-runs a forward.
#pragma once

namespace dg {

namespace detail {
inline bool& grad_mode_flag() {
  thread_local bool enabled = true;
  return enabled;
}
}  // namespace detail

/// Whether ops on this thread record onto the tape.
inline bool is_grad_enabled() { return detail::grad_mode_flag(); }

/// RAII: records nothing on this thread while alive (torch.no_grad()).
/// Example: { dg::NoGradGuard g; auto y = model.forward(x); }
class NoGradGuard {
 public:
  NoGradGuard() : prev_(detail::grad_mode_flag()) { detail::grad_mode_flag() = false; }
  ~NoGradGuard() { detail::grad_mode_flag() = prev_; }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool prev_;
};

/// RAII: records on this thread while alive, even inside a NoGradGuard or a backward closure
/// (torch.enable_grad()). Example: { dg::EnableGradGuard g; auto y = f(x); }  // y has a grad_fn
class EnableGradGuard {
 public:
  EnableGradGuard() : prev_(detail::grad_mode_flag()) { detail::grad_mode_flag() = true; }
  ~EnableGradGuard() { detail::grad_mode_flag() = prev_; }
  EnableGradGuard(const EnableGradGuard&) = delete;
  EnableGradGuard& operator=(const EnableGradGuard&) = delete;

 private:
  bool prev_;
};

}  // namespace dg
