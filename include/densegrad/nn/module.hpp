// densegrad/nn/module.hpp: Module, the container of named parameters, buffers and children
// (torch.nn.Module), with dotted state_dict names so timm checkpoints map one to one.
// Not a layer library: layers are in nn/layers.hpp; a Module has no forward of its own.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../core/tensor.hpp"
#include "../io/tensor_io.hpp"
#include "../ops/shape.hpp"

namespace dg::nn {

/// What load_state_dict found: keys the module has but the file lacks, keys the file has but
/// the module lacks, and keys present in both with different shapes ("name: [a] vs [b]").
struct LoadResult {
  std::vector<std::string> missing, unexpected, mismatched;
  bool ok() const { return missing.empty() && unexpected.empty() && mismatched.empty(); }
  std::string str() const {
    std::string s;
    auto list = [&](const char* what, const std::vector<std::string>& v) {
      if (v.empty()) return;
      s += std::string(s.empty() ? "" : "; ") + what + " (" + std::to_string(v.size()) + "): ";
      for (size_t i = 0; i < v.size() && i < 8; ++i) s += (i ? ", " : "") + v[i];
      if (v.size() > 8) s += ", ...";
    };
    list("missing keys", missing);
    list("unexpected keys", unexpected);
    list("shape mismatches", mismatched);
    return s;
  }
};

/// Base of every model part (torch.nn.Module): registers parameters, buffers and children
/// under names, and walks them for parameters(), state_dict(), train()/eval().
template <class T = float>
class Module {
 public:
  using Named = std::vector<std::pair<std::string, Tensor<T>>>;

  virtual ~Module() = default;
  Module() = default;
  Module(const Module&) = delete;  // parameters are shared handles: copying would alias them
  Module& operator=(const Module&) = delete;

  /// All parameters, depth first in registration order (torch parameters()).
  std::vector<Tensor<T>> parameters() const {
    std::vector<Tensor<T>> r;
    for (auto& [n, p] : named_parameters()) r.push_back(p);
    return r;
  }
  /// Parameters with dotted names like "dense_stages.0.1.norm.weight" (torch named_parameters()).
  Named named_parameters(const std::string& prefix = "") const {
    Named r;
    visit(prefix, [&](const std::string& p, const Module& m) {
      for (auto& [n, t] : m.params_) r.emplace_back(p + n, t);
    });
    return r;
  }
  Named named_buffers(const std::string& prefix = "") const {
    Named r;
    visit(prefix, [&](const std::string& p, const Module& m) {
      for (auto& [n, t] : m.buffers_) r.emplace_back(p + n, t);
    });
    return r;
  }
  /// Direct children in registration order.
  const std::vector<std::pair<std::string, std::shared_ptr<Module>>>& named_children() const { return children_; }
  /// Total number of parameter elements.
  int64_t num_parameters() const {
    int64_t n = 0;
    for (auto& p : parameters()) n += p.numel();
    return n;
  }

  /// Training mode on/off for this module and all children (dropout, drop path).
  void train(bool on = true) {
    visit("", [&](const std::string&, const Module& m) { const_cast<Module&>(m).training_ = on; });
  }
  void eval() { train(false); }
  bool is_training() const { return training_; }
  /// Moves every parameter, gradient and buffer to `device` in place (torch Module.to(device)):
  /// handles held by layers see the move. Without that device's backend compiled in, throws.
  void to(Device device) {
    NoGradGuard no_grad;
    auto move = [&](Tensor<T> t) {
      Tensor<T> g = t.grad();
      t.set_data_(to_device(t.detach(), device));
      if (g.defined()) t.set_grad(to_device(g, device));
    };
    for (auto& [n, p] : named_parameters()) move(p);
    for (auto& [n, b] : named_buffers()) move(b);
  }
  /// Forgets every parameter's gradient (torch zero_grad(set_to_none=True)).
  void zero_grad() {
    for (auto& p : parameters()) p.zero_grad();
  }

  /// Parameters and buffers by dotted name (torch state_dict()); tensors are shared, not copied.
  std::map<std::string, Tensor<T>> state_dict() const {
    std::map<std::string, Tensor<T>> sd;
    for (auto& [n, t] : named_parameters()) sd.emplace(n, t);
    for (auto& [n, t] : named_buffers()) sd.emplace(n, t);
    return sd;
  }

  /// Copies matching tensors in place (torch load_state_dict). With strict, any missing,
  /// unexpected or mis-shaped key throws dg::Error listing them all and nothing is changed.
  template <class U>
  LoadResult load_state_dict(const std::map<std::string, Tensor<U>>& sd, bool strict = true) {
    LoadResult r;
    auto mine = state_dict();
    for (auto& [name, t] : mine) {
      auto it = sd.find(name);
      if (it == sd.end()) r.missing.push_back(name);
      else if (it->second.shape() != t.shape())
        r.mismatched.push_back(name + ": checkpoint " + shape_str(it->second.shape()) + " vs model " + shape_str(t.shape()));
    }
    for (auto& [name, t] : sd)
      if (!mine.count(name)) r.unexpected.push_back(name);
    DG_CHECK(!strict || r.ok(), "load_state_dict: ", r.str());
    NoGradGuard no_grad;
    for (auto& [name, t] : mine) {
      auto it = sd.find(name);
      if (it == sd.end() || it->second.shape() != t.shape()) continue;
      if constexpr (std::is_same_v<T, U>) t.copy_(it->second);
      else t.copy_(it->second.template to<T>());
    }
    return r;
  }

  /// Writes state_dict() to a safetensors file (atomically: temp file + rename).
  void save(const std::string& path, const std::map<std::string, std::string>& metadata = {}) const {
    io::save_safetensors<T>(path, state_dict(), metadata);
  }
  /// Reads a safetensors file (any float dtype, converted) into this module.
  LoadResult load(const std::string& path, bool strict = true) {
    return load_state_dict(io::load_safetensors<T>(path), strict);
  }

 protected:
  /// Adds a parameter; the returned handle shares data with the registered one.
  Tensor<T> register_parameter(const std::string& name, Tensor<T> t, bool requires_grad = true) {
    check_name(name);
    if (requires_grad) t.requires_grad_();
    params_.emplace_back(name, t);
    return t;
  }
  /// Adds a buffer: saved in state_dict, not trained.
  Tensor<T> register_buffer(const std::string& name, Tensor<T> t) {
    check_name(name);
    buffers_.emplace_back(name, t);
    return t;
  }
  /// Adds a child module under `name` (its parameters become "name.*").
  template <class M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> m) {
    check_name(name);
    DG_CHECK(m != nullptr, "register_module: child '", name, "' is null");
    m->train(training_);
    children_.emplace_back(name, m);
    return m;
  }
  /// Replaces a registered parameter's tensor (same name), e.g. after re-initialization.
  void replace_parameter(const std::string& name, const Tensor<T>& t) {
    for (auto& [n, p] : params_)
      if (n == name) { p = t; return; }
    DG_THROW("replace_parameter: no parameter named '", name, "'");
  }

 private:
  template <class F>
  void visit(const std::string& prefix, F&& f) const {
    f(prefix, *this);
    for (auto& [n, c] : children_) c->visit(prefix + n + ".", f);
  }
  void check_name(const std::string& name) const {
    DG_CHECK(!name.empty() && name.find('.') == std::string::npos, "Module: invalid name '", name,
             "' (names are non-empty and contain no '.')");
    auto taken = [&](const auto& v) {
      for (auto& e : v) if (e.first == name) return true;
      return false;
    };
    DG_CHECK(!taken(params_) && !taken(buffers_) && !taken(children_), "Module: name '", name, "' registered twice");
  }

  Named params_, buffers_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  bool training_ = true;
};

/// A module with one input and one output; what Sequential chains.
template <class T = float>
class Layer : public Module<T> {
 public:
  virtual Tensor<T> forward(const Tensor<T>& x) = 0;
  Tensor<T> operator()(const Tensor<T>& x) { return forward(x); }
};

}  // namespace dg::nn
