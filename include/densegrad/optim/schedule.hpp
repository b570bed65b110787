// densegrad/optim/schedule.hpp: learning-rate schedules as small objects: lr(t) is a pure
// function of the step, apply() writes it into the optimizer's groups. timm's formulas.
// Not a scheduler that counts by itself: the training loop passes the step it is at.
#pragma once

#include <cmath>
#include <map>
#include <string>

#include "optimizer.hpp"

namespace dg::optim {

/// Base of the schedules: linear warmup shared by all, apply(), and a state_dict.
/// t counts optimizer steps from 0 (timm with t_in_epochs=False, scheduler.step_update(t));
/// a fractional t (e.g. epochs as a double) works the same way.
class LRSchedule {
 public:
  virtual ~LRSchedule() = default;

  /// The learning rate at step t.
  virtual double lr(double t) const = 0;

  /// Sets every param group's lr to lr(t) and remembers t (timm's step_update(t)).
  /// Returns the lr it set.
  template <class T>
  double apply(Optimizer<T>& opt, double t) {
    double v = lr(t);
    for (auto& group : opt.param_groups()) group.lr = v;
    last_step_ = t;
    return v;
  }
  /// The t of the last apply() (0 before any).
  double last_step() const { return last_step_; }

  /// {"last_step": 0-D}: the schedule's only state (its settings come from the constructor).
  template <class T = float>
  std::map<std::string, Tensor<T>> state_dict() const {
    return {{"last_step", scalar_tensor<T>(T(last_step_))}};
  }
  template <class T>
  void load_state_dict(const std::map<std::string, Tensor<T>>& sd) {
    auto it = sd.find("last_step");
    DG_CHECK(it != sd.end() && sd.size() == 1, "LRSchedule load_state_dict: expected exactly the key 'last_step', got ",
             sd.size(), " keys", it == sd.end() ? " without it" : "");
    DG_CHECK(it->second.numel() == 1, "LRSchedule load_state_dict: 'last_step' must hold one value, got shape ",
             shape_str(it->second.shape()));
    double t = static_cast<double>(it->second.item());
    DG_CHECK(t >= 0 && std::isfinite(t), "LRSchedule load_state_dict: 'last_step' must be >= 0, got ", t);
    last_step_ = t;
  }

 protected:
  LRSchedule(const char* name, double base_lr, double warmup_steps, double warmup_lr_init, bool warmup_prefix)
      : base_lr_(base_lr), warmup_steps_(warmup_steps), warmup_lr_init_(warmup_lr_init),
        warmup_prefix_(warmup_prefix) {
    DG_CHECK(base_lr >= 0 && std::isfinite(base_lr), name, ": invalid base learning rate ", base_lr,
             " (expected >= 0)");
    DG_CHECK(warmup_steps >= 0 && warmup_lr_init >= 0, name, ": warmup_steps (", warmup_steps,
             ") and warmup_lr_init (", warmup_lr_init, ") must be >= 0");
  }
  bool in_warmup(double t) const { return t < warmup_steps_; }
  /// timm: warmup_lr_init + t * (base_lr - warmup_lr_init) / warmup_t, for t < warmup_t.
  double warmup_lr(double t) const { return warmup_lr_init_ + t * ((base_lr_ - warmup_lr_init_) / warmup_steps_); }
  /// The t the decay sees: with warmup_prefix the decay starts after the warmup, without it
  /// (timm's default) the warmup overlays the first warmup_steps of the decay.
  double decay_t(double t) const { return warmup_prefix_ ? t - warmup_steps_ : t; }

  double base_lr_, warmup_steps_, warmup_lr_init_;
  bool warmup_prefix_;
  double last_step_ = 0;
};

/// timm's CosineLRScheduler (one cycle, t_in_epochs=False):
///   t <  warmup_steps:  warmup_lr_init + t * (base_lr - warmup_lr_init) / warmup_steps
///   t <  total_steps:   min_lr + (base_lr - min_lr) * (1 + cos(pi * t / total_steps)) / 2
///   t >= total_steps:   min_lr
/// (t shifted by warmup_steps in the cosine when warmup_prefix). torch's CosineAnnealingLR
/// without warmup gives the same values.
/// Example: optim::CosineSchedule sched(1e-3, epochs * steps_per_epoch, 5 * steps_per_epoch, 1e-6, 1e-5);
class CosineSchedule : public LRSchedule {
 public:
  CosineSchedule(double base_lr, double total_steps, double warmup_steps = 0, double warmup_lr_init = 0,
                 double min_lr = 0, bool warmup_prefix = false)
      : LRSchedule("CosineSchedule", base_lr, warmup_steps, warmup_lr_init, warmup_prefix),
        total_steps_(total_steps), min_lr_(min_lr) {
    DG_CHECK(total_steps > 0, "CosineSchedule: total_steps must be > 0, got ", total_steps);
    DG_CHECK(min_lr >= 0, "CosineSchedule: min_lr must be >= 0, got ", min_lr);
  }
  double lr(double t) const override {
    if (in_warmup(t)) return warmup_lr(t);
    t = decay_t(t);
    if (t >= total_steps_) return min_lr_;
    constexpr double pi = 3.14159265358979323846;
    return min_lr_ + 0.5 * (base_lr_ - min_lr_) * (1 + std::cos(pi * t / total_steps_));
  }

 private:
  double total_steps_, min_lr_;
};

/// timm's StepLRScheduler (torch's StepLR plus warmup):
///   t <  warmup_steps:  linear warmup as in CosineSchedule
///   otherwise:          base_lr * gamma ^ floor((t - warmup_steps) / step_size)
/// As in timm, warmup_prefix defaults to true here (the decay clock starts after the warmup);
/// with false, floor(t / step_size). Without warmup both are torch's StepLR.
/// Example: optim::StepSchedule sched(0.1, 30 * steps_per_epoch, 0.1);
class StepSchedule : public LRSchedule {
 public:
  StepSchedule(double base_lr, double step_size, double gamma, double warmup_steps = 0, double warmup_lr_init = 0,
               bool warmup_prefix = true)
      : LRSchedule("StepSchedule", base_lr, warmup_steps, warmup_lr_init, warmup_prefix),
        step_size_(step_size), gamma_(gamma) {
    DG_CHECK(step_size > 0, "StepSchedule: step_size must be > 0, got ", step_size);
    DG_CHECK(gamma >= 0, "StepSchedule: gamma must be >= 0, got ", gamma);
  }
  double lr(double t) const override {
    if (in_warmup(t)) return warmup_lr(t);
    return base_lr_ * std::pow(gamma_, std::floor(decay_t(t) / step_size_));
  }

 private:
  double step_size_, gamma_;
};

}  // namespace dg::optim
