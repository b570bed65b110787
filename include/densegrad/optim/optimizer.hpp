// densegrad/optim/optimizer.hpp: the Optimizer base (param groups, per-parameter state, step,
// zero_grad, a state_dict made only of tensors) and timm's weight-decay param group split.
// Not an update rule: SGD and AdamW (sgd.hpp, adamw.hpp) each implement one update().
#pragma once

#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../autograd/grad_mode.hpp"
#include "../core/options.hpp"
#include "../core/tensor.hpp"
#include "../nn/module.hpp"
#include "../ops/shape.hpp"


namespace dg::optim {

/// Parameters that share a learning rate and weight decay (one torch param_group dict).
/// A field left NaN takes the optimizer's option, like a torch group without that key.
/// Example: optim::AdamW<float> opt({{decay_params}, {no_decay_params, NAN, 0.0}}, opts);
template <class T>
struct ParamGroup {
  std::vector<Tensor<T>> params;
  double lr = std::numeric_limits<double>::quiet_NaN();
  double weight_decay = std::numeric_limits<double>::quiet_NaN();
};

namespace detail {
/// Tensors this big update on all OpenMP threads; smaller ones are not worth waking them.
constexpr int64_t kParallelMin = 1 << 15;

/// Runs f(k) for k in [0, n): the elementwise loop of every update rule.
template <class F>
void parallel_for(int64_t n, F&& f) {
#ifdef DENSEGRAD_WITH_OPENMP
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
#endif
  for (int64_t k = 0; k < n; ++k) f(k);
}
}  // namespace detail

/// Base of every optimizer (torch.optim.Optimizer): owns the param groups and, per parameter,
/// a step count and named state buffers shaped like it (zero until its first update).
/// State is kept in acc_t<T>: fp32 for bfloat16 parameters, so small updates still accumulate.
///
/// Gradient accumulation needs nothing from the optimizer: backward() adds into .grad(), so
/// summing k micro-batches and stepping once equals one big batch when each loss is scaled 1/k:
///
///     for (int64_t it = 0; it < iters; ++it) {
///       Tensor<float> loss = dg::cross_entropy(model.forward(x[it]), y[it]);
///       (loss * (1.0 / accum_steps)).backward();       // grads add up over the k micro-batches
///       if ((it + 1) % accum_steps == 0) {
///         sched.apply(opt, (it + 1) / accum_steps);    // schedules count optimizer steps
///         optim::clip_grad_norm_(model.parameters(), 1.0);
///         opt.step();
///         opt.zero_grad();
///       }
///     }
template <class T>
class Optimizer {
 public:
  using S = acc_t<T>;  // element type of the state: fp32 for bfloat16 parameters, T otherwise
  using StateDict = std::map<std::string, Tensor<S>>;

  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;  // options are registered by address
  Optimizer& operator=(const Optimizer&) = delete;

  /// One update of every parameter that has a gradient (torch optimizer.step()).
  /// Parameters without a gradient are skipped and keep their step count, as in torch.
  void step() {
    NoGradGuard no_grad;
    for (size_t g = 0; g < groups_.size(); ++g) {
      check_group(g);
      DG_CHECK(groups_[g].params.size() == state_[g].size(), name_, ": param group ", g, " now has ",
               groups_[g].params.size(), " parameters, it was built with ", state_[g].size(),
               " (change lr and weight_decay in param_groups(), never the parameter list)");
    }
    ++step_count_;
    for (size_t g = 0; g < groups_.size(); ++g)
      for (size_t i = 0; i < groups_[g].params.size(); ++i) {
        Tensor<T>& p = groups_[g].params[i];
        Tensor<T> grad = p.grad();
        if (!grad.defined()) continue;
        if (!grad.is_contiguous()) grad = grad.contiguous();  // update() reads it as a flat array
        DG_CHECK(grad.device() == p.device(), name_, ": a gradient on ", grad.device().str(), " for a parameter on ",
                 p.device().str());
        ++state_[g][i].step;
        update(groups_[g], p, grad, state_[g][i]);
      }
  }

  /// Forgets every gradient (torch zero_grad(set_to_none=True)).
  void zero_grad() {
    for (auto& group : groups_)
      for (auto& p : group.params) p.zero_grad();
  }

  /// The groups; change lr and weight_decay here (what a schedule does), not the parameter lists.
  std::vector<ParamGroup<T>>& param_groups() { return groups_; }
  const std::vector<ParamGroup<T>>& param_groups() const { return groups_; }
  /// How many times step() ran.
  int64_t step_count() const { return step_count_; }

  /// Everything needed to resume, as tensors (a safetensors checkpoint holds nothing else):
  ///   "step"                          0-D, number of step() calls
  ///   "options.<name>"                0-D, the optimizer's numeric options (betas, eps, momentum...)
  ///   "param_groups.<g>.lr"           0-D, and "param_groups.<g>.weight_decay"
  ///   "state.<g>.<i>.step"            0-D, updates parameter i of group g received
  ///   "state.<g>.<i>.<buffer>"        shaped like the parameter (exp_avg, momentum_buffer, ...)
  /// Counts are exact up to 2^24 in fp32. State buffers are shared, not copied (like torch's).
  StateDict state_dict() const {
    StateDict sd;
    sd.emplace("step", scalar_tensor<S>(S(step_count_)));
    for (auto& [name, v] : options_) sd.emplace("options." + name, scalar_tensor<S>(S(*v)));
    for (size_t g = 0; g < groups_.size(); ++g) {
      const std::string pg = "param_groups." + std::to_string(g) + ".";
      sd.emplace(pg + "lr", scalar_tensor<S>(S(groups_[g].lr)));
      sd.emplace(pg + "weight_decay", scalar_tensor<S>(S(groups_[g].weight_decay)));
      for (size_t i = 0; i < state_[g].size(); ++i) {
        const std::string st = "state." + std::to_string(g) + "." + std::to_string(i) + ".";
        sd.emplace(st + "step", scalar_tensor<S>(S(state_[g][i].step)));
        for (auto& [name, buf] : state_[g][i].buffers) sd.emplace(st + name, buf);
      }
    }
    return sd;
  }

  /// Restores state_dict() output (torch optimizer.load_state_dict). The keys and shapes must
  /// match this optimizer exactly (same groups, parameter shapes, amsgrad / momentum); otherwise
  /// it throws dg::Error listing every missing, unexpected and mis-shaped key, changing nothing.
  /// A saved hyperparameter equal to the current one rounded to S keeps the current (exact) value.
  void load_state_dict(const StateDict& sd) {
    nn::LoadResult r;
    StateDict mine = state_dict();
    for (auto& [key, t] : mine) {
      auto it = sd.find(key);
      if (it == sd.end()) r.missing.push_back(key);
      else if (it->second.shape() != t.shape())
        r.mismatched.push_back(key + ": checkpoint " + shape_str(it->second.shape()) + " vs optimizer " +
                               shape_str(t.shape()));
    }
    for (auto& [key, t] : sd)
      if (!mine.count(key)) r.unexpected.push_back(key);
    DG_CHECK(r.ok(), name_, " load_state_dict: ", r.str(),
             " (the checkpoint must come from an optimizer with the same groups, parameter shapes and options)");
    auto count = [&](const std::string& key) {
      double v = static_cast<double>(sd.at(key).item());
      DG_CHECK(v >= 0 && v == std::floor(v), name_, " load_state_dict: '", key, "' must be a count, got ", v);
      return static_cast<int64_t>(v);
    };
    auto restore = [&](double& dst, const std::string& key) {
      S v = sd.at(key).item();
      if (S(dst) != v) dst = static_cast<double>(v);
    };
    // Validate everything first (so a bad checkpoint changes nothing), then copy.
    count("step");
    for (size_t g = 0; g < groups_.size(); ++g) {
      const std::string pg = "param_groups." + std::to_string(g) + ".";
      for (const char* h : {"lr", "weight_decay"}) {
        double v = static_cast<double>(sd.at(pg + h).item());
        DG_CHECK(v >= 0 && std::isfinite(v), name_, " load_state_dict: '", pg, h, "' must be >= 0, got ", v);
      }
      for (size_t i = 0; i < state_[g].size(); ++i) count(state_key(g, i) + "step");
    }
    std::vector<double> old_options;
    for (auto& [name, v] : options_) old_options.push_back(*v);
    for (auto& [name, v] : options_) restore(*v, "options." + name);
    try {
      check_options();
    } catch (const Error&) {  // put the old options back: a failed load changes nothing
      for (size_t k = 0; k < options_.size(); ++k) *options_[k].second = old_options[k];
      throw;
    }
    step_count_ = count("step");
    for (size_t g = 0; g < groups_.size(); ++g) {
      const std::string pg = "param_groups." + std::to_string(g) + ".";
      restore(groups_[g].lr, pg + "lr");
      restore(groups_[g].weight_decay, pg + "weight_decay");
      for (size_t i = 0; i < state_[g].size(); ++i) {
        state_[g][i].step = count(state_key(g, i) + "step");
        for (auto& [name, buf] : state_[g][i].buffers) buf.copy_(sd.at(state_key(g, i) + name));
      }
    }
  }

 protected:
  /// What the optimizer remembers about one parameter.
  struct ParamState {
    int64_t step = 0;  // updates received (per parameter, as torch: skipped steps do not count)
    std::vector<std::pair<std::string, Tensor<S>>> buffers;  // contiguous, shaped like the parameter
    S* buffer(size_t k) { return buffers[k].second.data(); }
  };

  /// Takes the groups; NaN lr / weight_decay in a group become `lr` / `weight_decay`.
  /// Every parameter must be a contiguous leaf, in exactly one group. The state lives on each
  /// parameter's device: build the optimizer after moving the model.
  Optimizer(const char* name, std::vector<ParamGroup<T>> groups, double lr, double weight_decay)
      : name_(name), groups_(std::move(groups)) {
    DG_CHECK(!groups_.empty(), name_, ": got an empty list of parameter groups");
    std::set<const void*> seen;
    for (size_t g = 0; g < groups_.size(); ++g) {
      ParamGroup<T>& group = groups_[g];
      if (std::isnan(group.lr)) group.lr = lr;
      if (std::isnan(group.weight_decay)) group.weight_decay = weight_decay;
      check_group(g);
      for (size_t i = 0; i < group.params.size(); ++i) {
        const Tensor<T>& p = group.params[i];
        DG_CHECK(p.defined(), name_, ": parameter ", i, " of group ", g, " is an undefined tensor");
        DG_CHECK(p.is_leaf(), name_, ": parameter ", i, " of group ", g,
                 " is not a leaf (it was computed by an op); optimize the tensor it came from");
        DG_CHECK(p.is_contiguous(), name_, ": parameter ", i, " of group ", g,
                 " must be a contiguous tensor (shape ", shape_str(p.shape()), ", strides ", shape_str(p.strides()),
                 ")");
        DG_CHECK(seen.insert(p.impl().get()).second, name_, ": parameter ", i, " of group ", g,
                 " appears in more than one place in the parameter groups");
      }
    }
  }

  /// Registers a numeric option saved as "options.<name>" (subclass constructors call this).
  void register_option(const std::string& name, double* value) { options_.emplace_back(name, value); }

  /// Gives every parameter zero-filled buffers with these names (torch creates them lazily on
  /// the first step; creating them here gives state_dict() the same keys at every step).
  void init_state(const std::vector<std::string>& buffer_names) {
    state_.assign(groups_.size(), {});
    for (size_t g = 0; g < groups_.size(); ++g)
      for (auto& p : groups_[g].params) {
        ParamState st;
        for (auto& n : buffer_names) st.buffers.emplace_back(n, zeros<S>(p.shape(), p.device()));
        state_[g].push_back(std::move(st));
      }
  }

  /// Checks the registered options (after construction and after load_state_dict).
  virtual void check_options() const = 0;

  /// Updates one parameter in place. `grad` is contiguous and shaped like p; st.step already
  /// counts this update. Runs under NoGradGuard.
  virtual void update(const ParamGroup<T>& group, Tensor<T>& p, const Tensor<T>& grad, ParamState& st) = 0;

  const char* name_;

 private:
  void check_group(size_t g) const {
    double lr = groups_[g].lr, wd = groups_[g].weight_decay;
    DG_CHECK(lr >= 0 && std::isfinite(lr), name_, ": invalid learning rate ", lr, " in param group ", g,
             " (expected a finite value >= 0)");
    DG_CHECK(wd >= 0 && std::isfinite(wd), name_, ": invalid weight_decay ", wd, " in param group ", g,
             " (expected a finite value >= 0)");
  }
  static std::string state_key(size_t g, size_t i) {
    return "state." + std::to_string(g) + "." + std::to_string(i) + ".";
  }

  std::vector<ParamGroup<T>> groups_;
  std::vector<std::vector<ParamState>> state_;  // [group][param]
  std::vector<std::pair<std::string, double*>> options_;
  int64_t step_count_ = 0;
};

/// timm's param_groups_weight_decay: group 0 holds the parameters that must not decay
/// (1-D or 0-D ones: norm weights and biases, conv/linear biases, layer-scale gamma; any name
/// ending in ".bias"; names in `no_weight_decay`) with weight_decay 0, group 1 the rest with
/// `weight_decay`. Parameters that do not require grad are left out. lr stays the optimizer's.
/// Example: optim::AdamW<float> opt(optim::timm_param_groups(model, 0.05), AdamWOptions().lr(1e-3));
template <class T>
std::vector<ParamGroup<T>> timm_param_groups(const nn::Module<T>& model, double weight_decay,
                                             const std::set<std::string>& no_weight_decay = {}) {
  ParamGroup<T> no_decay, decay;
  no_decay.weight_decay = 0.0;
  decay.weight_decay = weight_decay;
  for (auto& [name, p] : model.named_parameters()) {
    if (!p.requires_grad()) continue;
    bool ends_in_bias = name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    if (p.dim() <= 1 || ends_in_bias || no_weight_decay.count(name)) no_decay.params.push_back(p);
    else decay.params.push_back(p);
  }
  return {no_decay, decay};
}

}  // namespace dg::optim
