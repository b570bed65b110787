// densegrad/autograd/checkpoint.hpp: checkpoint(fn, inputs), recomputation in backward
// (torch.utils.checkpoint.checkpoint). Forward runs fn without recording and keeps only its
// inputs; backward runs fn again, recording, and backpropagates through that second copy. One
// more forward of fn buys not holding fn's intermediate tensors from forward to backward (Chen
// et al. 2016; Pleiss et al. 2017 for dense nets). Not selective: every op inside fn is redone.
// Shape legend: whatever fn takes and returns; dout has the shape of fn's output.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "../core/generator.hpp"
#include "grad_mode.hpp"
#include "tape.hpp"

namespace dg {

namespace detail {
/// Sets this thread's default generator to `state` while alive, then puts back the state it had:
/// a recomputation draws the same numbers as the forward it repeats (dropout and drop-path
/// masks), and the random stream after it continues as if it had never run.
class GeneratorReplay {
 public:
  explicit GeneratorReplay(const Generator& state) : now_(default_generator()) { default_generator() = state; }
  ~GeneratorReplay() { default_generator() = now_; }
  GeneratorReplay(const GeneratorReplay&) = delete;
  GeneratorReplay& operator=(const GeneratorReplay&) = delete;

 private:
  Generator now_;
};
}  // namespace detail

/// torch.utils.checkpoint.checkpoint(fn, *inputs): y = fn(inputs), but fn's intermediate tensors
/// are freed at once and recomputed by backward. Rules for fn:
/// - it must compute the same function when called again: the same ops on the same inputs and
///   parameters. This thread's default generator is saved before fn runs and restored for the
///   recomputation, so dropout and drop-path masks repeat; fn must draw from no other generator,
///   and module modes (train/eval) must not change between forward and backward;
/// - parameters it reads get their .grad summed once per backward, from the recomputed graph;
///   inputs get theirs through the returned tensor, like any op's.
/// Without recording (NoGradGuard), fn simply runs. When recording but no input requires grad,
/// fn runs recorded as usual (saving its intermediates), so parameter gradients are never lost.
/// Example: auto y = dg::checkpoint([&](const auto& in) { return block.forward(in[0]); }, {x});
template <class T, class F>
Tensor<T> checkpoint(F fn, const std::vector<Tensor<T>>& inputs) {
  const bool any = std::any_of(inputs.begin(), inputs.end(), [](const Tensor<T>& t) { return t.requires_grad(); });
  if (!is_grad_enabled() || !any) return fn(inputs);
  const Generator rng = default_generator();  // the state fn starts from: backward replays it
  Tensor<T> out;
  {
    NoGradGuard no_grad;        // nothing inside fn is recorded, so nothing inside is saved
    out = fn(inputs).detach();  // a fresh handle: fn may return an input or a view of one
  }
  // Saves the inputs (handles to their values, no copy) and how fn began; nothing else.
  std::vector<Tensor<T>> saved;
  std::vector<bool> need;
  for (const Tensor<T>& t : inputs) {
    saved.push_back(t.defined() ? t.detach() : t);
    need.push_back(t.requires_grad());
  }
  const Shape out_shape = out.shape();
  return autograd::record("checkpoint", out, inputs, [fn, saved, need, rng, out_shape](const Tensor<T>& dout) {
    // Fresh leaves holding the saved values: the recomputed graph ends at them, not at the
    // outer graph, so backward through it stops there and leaves their gradients in .grad.
    std::vector<Tensor<T>> xs;
    for (size_t i = 0; i < saved.size(); ++i) {
      xs.push_back(saved[i].defined() ? saved[i].detach() : saved[i]);
      if (need[i]) xs.back().requires_grad_();
    }
    Tensor<T> y;
    {
      detail::GeneratorReplay replay(rng);
      EnableGradGuard record;  // backward closures run with recording off; this one must record
      y = fn(xs);
    }
    DG_CHECK(y.shape() == out_shape, "checkpoint: fn returned shape ", shape_str(y.shape()),
             " when recomputed in backward, but ", shape_str(out_shape),
             " in forward (fn must compute the same function both times)");
    std::vector<Tensor<T>> grads(xs.size());
    if (!y.requires_grad()) return grads;  // y depends on nothing that requires grad
    // Parameters read by fn are leaves of this graph: this backward adds to their .grad, once.
    autograd::backward(y, dout);
    for (size_t i = 0; i < xs.size(); ++i)
      if (need[i]) grads[i] = Tensor<T>(std::move(xs[i].impl()->grad));  // moved out: the tape may sum into it
    return grads;
  });
}

/// checkpoint(fn, {a, b}): the braced-list form (T deduced from the elements).
template <class T, class F>
Tensor<T> checkpoint(F fn, std::initializer_list<Tensor<T>> inputs) {
  return checkpoint(std::move(fn), std::vector<Tensor<T>>(inputs));
}

}  // namespace dg
