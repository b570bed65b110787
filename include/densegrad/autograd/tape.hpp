// densegrad/autograd/tape.hpp: the tape (a per-thread Wengert list of nodes) and backward().
// Each op that sees an input requiring grad records one Node: edges to its inputs (not their
// values), a weak link to its output, and a backward closure holding only what the op saved.
// backward() replays the nodes reachable from the loss in reverse creation order and then frees
// what they saved.
// First-order gradients only: backward closures run with recording off. Leaves may carry
// post-accumulate-grad hooks (register_post_accumulate_grad_hook), run when backward() is done with them.
#pragma once

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "../backend/cpu/parallel.hpp"
#include "../core/tensor.hpp"
#include "grad_mode.hpp"
#include "profiler.hpp"

namespace dg::autograd {

/// One recorded op. seq orders nodes: a node only ever depends on nodes with smaller seq.
struct Node {
  const char* name = "";
  uint64_t seq = 0;
  bool released = false;  // saved tensors freed by a backward() without retain_graph
  std::string profile_shapes;  // the inputs' shapes, kept only while a Profiler records shapes
  virtual ~Node() = default;
  /// Calls f on each input that requires grad (the graph's edges).
  virtual void for_each_input(const std::function<void(ImplBase&)>& f) const = 0;
  /// Takes the gradient that arrived at the output and pushes input gradients.
  virtual void apply() = 0;
  /// Drops saved tensors and edges.
  virtual void release() = 0;
  /// Moves out the grad_fn of every input that only this node still holds (the input dies with
  /// this node). Destroying a long chain then walks it in a loop instead of recursing once per
  /// node, which would overflow the stack for graphs thousands of ops deep.
  virtual void steal_unique_edges(std::vector<std::shared_ptr<Node>>& out) = 0;
};

/// The per-thread list of recorded nodes, oldest first. Nodes are owned by the tensors
/// they produced (grad_fn), so a graph nobody holds any more disappears by itself.
class Tape {
 public:
  static Tape& current() {
    thread_local Tape tape;
    return tape;
  }
  uint64_t push(const std::shared_ptr<Node>& n) {
    if (nodes_.size() >= 2 * live_hint_ + 64) prune();
    nodes_.push_back(n);
    return next_seq_++;
  }
  /// Nodes still holding saved tensors (recorded, not yet consumed by backward()).
  size_t live_nodes() {
    prune();
    return nodes_.size();
  }

 private:
  void prune() {
    nodes_.erase(std::remove_if(nodes_.begin(), nodes_.end(),
                                [](const std::weak_ptr<Node>& w) {
                                  auto n = w.lock();
                                  return !n || n->released;
                                }),
                 nodes_.end());
    live_hint_ = nodes_.size();
  }
  std::vector<std::weak_ptr<Node>> nodes_;
  size_t live_hint_ = 0;
  uint64_t next_seq_ = 1;
};

/// A node whose output has element type T: it buffers the gradient arriving at that output.
/// Gradients live here, on the graph, not on the output tensor: an intermediate tensor may
/// be gone by the time backward() reaches it, its node is not.
template <class T>
struct TypedNode : Node {
  Shape out_shape;
  std::shared_ptr<TensorImpl<T>> pending;  // sum of the gradients that reached the output so far
};

namespace detail {

/// Walks `shape` as rows: f(offsets, n) for each run of n elements that is contiguous
/// (stride 1) in every operand, where offsets are the runs' first elements. The run is the
/// longest block of trailing dims laid out densely in all operands (a narrow() along channels
/// keeps each H x W plane dense), so f's loop is a plain vectorizable one.
template <size_t K, class F>
void for_each_row(const Shape& shape, const std::array<const int64_t*, K>& strides, F&& f) {
  int64_t d = static_cast<int64_t>(shape.size()), run = 1;
  auto dense_from = [&](int64_t i) {  // dim i continues the dense block [i+1, nd) in every operand
    for (size_t k = 0; k < K; ++k)
      if (strides[k][i] != run && shape[i] != 1) return false;
    return true;
  };
  while (d > 0 && dense_from(d - 1)) run *= shape[--d];
  const Shape outer(shape.begin(), shape.begin() + d);
  std::array<int64_t, K> base{};
  for_each_strided<K>(outer, strides, base, [&](auto o) { f(o, run); });
}

/// Gradients this big are summed on all OpenMP threads (split along their first dim).
constexpr int64_t kParallelAccumulate = int64_t(1) << 15;

/// for_each_row over `shape`, its first dim split across the OpenMP threads when the tensor
/// has at least kParallelAccumulate elements: f(offsets, n) as for_each_row's, each run once.
template <size_t K, class F>
void for_each_row_parallel(const Shape& shape, const std::array<const int64_t*, K>& strides, F&& f) {
  const int64_t n0 = shape.empty() ? 1 : shape[0];
  if (n0 < 2 || shape_numel(shape) < kParallelAccumulate) {
    for_each_row<K>(shape, strides, f);
    return;
  }
  const Shape inner(shape.begin() + 1, shape.end());
  std::array<const int64_t*, K> inner_strides;
  for (size_t k = 0; k < K; ++k) inner_strides[k] = strides[k] + 1;
  DENSEGRAD_OMP(parallel for schedule(static))
  for (int64_t i = 0; i < n0; ++i)
    for_each_row<K>(inner, inner_strides, [&](auto off, int64_t n) {
      for (size_t k = 0; k < K; ++k) off[k] += i * strides[k][0];
      f(off, n);
    });
}

/// out = a + b for two tensors of one shape, in a fresh contiguous tensor.
template <class T>
Tensor<T> add_same_shape(const Tensor<T>& a, const Tensor<T>& b) {
  if (a.device().is_cuda()) {
    Tensor<T> out = Tensor<T>::empty(a.shape(), a.device());
    cuda_kernels<T>("backward (accumulate)").copy(out, a);
    cuda_kernels<T>("backward (accumulate)").add_into(out, b);
    return out;
  }
  Tensor<T> out = Tensor<T>::empty(a.shape());
  T* o = out.data();
  const T *pa = a.data(), *pb = b.data();
  for_each_row_parallel<3>(a.shape(), {out.strides().data(), a.strides().data(), b.strides().data()},
                           [&](auto k, int64_t n) {
    T *ro = o + k[0];
    const T *ra = pa + k[1], *rb = pb + k[2];
    for (int64_t i = 0; i < n; ++i) ro[i] = T(acc_t<T>(ra[i]) + acc_t<T>(rb[i]));
  });
  return out;
}

/// o += g elementwise, o being t's own gradient buffer (any strides, like g).
template <class T>
void add_into(const std::shared_ptr<TensorImpl<T>>& own, const Tensor<T>& g) {
  DG_CHECK(own->storage.device() == g.device(), "autograd: a gradient on ", g.device().str(),
           " meets one on ", own->storage.device().str(), " for the same tensor");
  if (g.device().is_cuda()) {
    cuda_kernels<T>("backward (accumulate)").add_into(Tensor<T>(own), g);
    return;
  }
  T* o = static_cast<T*>(own->storage.data()) + own->offset;
  const Shape& ostrides = own->strides;
  const T* pg = g.data();
  const Shape& shape = g.shape();
  const Shape& gstrides = g.strides();
  // g broadcast along its trailing dims (stride 0: a sum's or mean's gradient expanded back over
  // H, W) onto a contiguous own: one value of g per run of own, instead of runs of one element
  int64_t d = static_cast<int64_t>(shape.size()), run = 1;
  while (d > 0 && (shape[d - 1] == 1 || gstrides[d - 1] == 0)) run *= shape[--d];
  if (run > 1 && ostrides == contiguous_strides(shape)) {
    const int64_t blocks = shape_numel(shape) / run;  // outer elements, own's runs in order
    DENSEGRAD_OMP(parallel for schedule(static) if (blocks > 1 && blocks * run >= kParallelAccumulate))
    for (int64_t b = 0; b < blocks; ++b) {
      int64_t og = 0;  // g's offset of outer element b: b unravelled over dims [0, d)
      for (int64_t i = d - 1, rem = b; i >= 0; --i) {
        og += (rem % shape[i]) * gstrides[i];
        rem /= shape[i];
      }
      T* ro = o + b * run;
      const acc_t<T> v = acc_t<T>(pg[og]);
      for (int64_t i = 0; i < run; ++i) ro[i] = T(acc_t<T>(ro[i]) + v);
    }
    return;
  }
  for_each_row_parallel<2>(shape, {ostrides.data(), gstrides.data()}, [&](auto k, int64_t n) {
    T* ro = o + k[0];
    const T* rg = pg + k[1];
    for (int64_t i = 0; i < n; ++i) ro[i] = T(acc_t<T>(ro[i]) + acc_t<T>(rg[i]));
  });
}

/// True when nobody but this handle sees t's bytes, and they are dense: adding into them in
/// place is then invisible to everyone else.
template <class T>
bool owns_dense(const std::shared_ptr<TensorImpl<T>>& t) {
  return t.use_count() == 1 && t->storage.use_count() == 1 && t->strides == contiguous_strides(t->shape);
}

/// Adds gradient g into tensor t's slot: .grad for a leaf (in place, that buffer is ours),
/// the buffer of the node that made t otherwise. Gradients sum: a tensor used twice gets both.
/// A pending buffer that no one else sees is summed into in place (no new tensor per edge).
template <class T>
void accumulate(TensorImpl<T>& t, const Tensor<T>& g, const char* from) {
  DG_CHECK(g.shape() == t.shape, "autograd: backward of '", from, "' produced a gradient of shape ",
           shape_str(g.shape()), " for an input of shape ", shape_str(t.shape));
  if (t.grad_fn) {
    auto& pending = static_cast<TypedNode<T>&>(*t.grad_fn).pending;  // t's node outputs T
    if (!pending) {
      pending = g.impl();
    } else if (owns_dense(pending)) {
      add_into(pending, g);
    } else if (owns_dense(g.impl())) {  // a + b == b + a exactly: add into g's buffer instead
      Tensor<T> gg = g;
      Tensor<T> p(pending);
      pending = nullptr;
      add_into(gg.impl(), p);
      pending = gg.impl();
    } else {
      pending = add_same_shape(Tensor<T>(pending), g).impl();
    }
  } else if (!t.grad) {
    if (owns_dense(g.impl()) && !g.requires_grad()) {  // nobody else sees g: it becomes .grad as is
      t.grad = g.impl();
      return;
    }
    Tensor<T> own = Tensor<T>::empty(g.shape(), g.device());
    own.copy_(g);
    t.grad = own.impl();
  } else {
    add_into(t.grad, g);
  }
}

/// What a node keeps of one input: the graph's edge, never the input's values (what backward
/// needs of them its closure saves). A leaf that requires grad is kept as it is (its .grad and
/// hooks live in it, and its values are the caller's anyway); an op's output that requires grad
/// becomes a shell with its grad_fn and shape and no storage, so that the node does not hold the
/// bytes of a tensor its backward does not read (gelu_conv2d under bf16 products keeps a
/// bfloat16 copy of its input instead of it); an input that requires no grad is not kept at all.
/// grad_fn never changes once set (in-place changes of tensors that require grad are refused
/// while recording), so the shell's edge is the one the input had when the op ran.
template <class T>
Tensor<T> edge_of(const Tensor<T>& in) {
  if (!in.requires_grad()) return Tensor<T>();
  if (!in.impl()->grad_fn) return in;
  auto shell = std::make_shared<TensorImpl<T>>();
  shell->requires_grad = true;
  shell->grad_fn = in.impl()->grad_fn;
  shell->shape = in.shape();
  shell->strides = in.strides();
  return Tensor<T>(std::move(shell));
}

template <class TO, class TI>
struct FunctionNode final : TypedNode<TO> {
  using BackwardFn = std::function<std::vector<Tensor<TI>>(const Tensor<TO>&)>;
  std::vector<Tensor<TI>> inputs;
  BackwardFn backward_fn;

  void for_each_input(const std::function<void(ImplBase&)>& f) const override {
    for (const auto& in : inputs)
      if (in.requires_grad()) f(*in.impl());
  }
  void apply() override {
    DG_CHECK(!this->released, "autograd: backward through '", this->name,
             "' a second time, but its saved tensors were freed after the first backward();"
             " pass retain_graph=true to the first call");
    if (!this->pending) return;  // no gradient flowed into this node
    Tensor<TO> dout(std::move(this->pending));
    std::vector<Tensor<TI>> grads = backward_fn(dout);
    DG_CHECK(grads.size() == inputs.size(), "autograd: backward of '", this->name, "' returned ", grads.size(),
             " gradients for ", inputs.size(), " inputs");
    for (size_t i = 0; i < inputs.size(); ++i)
      if (inputs[i].requires_grad() && grads[i].defined()) accumulate(*inputs[i].impl(), grads[i], this->name);
  }
  void release() override {
    this->released = true;
    backward_fn = nullptr;
    inputs.clear();
  }
  void steal_unique_edges(std::vector<std::shared_ptr<Node>>& out) override {
    for (auto& in : inputs)
      if (in.impl().use_count() == 1 && in.impl()->grad_fn) out.push_back(std::move(in.impl()->grad_fn));
  }
  ~FunctionNode() override {
    // Tear down the part of the graph only we kept alive, iteratively (see steal_unique_edges).
    std::vector<std::shared_ptr<Node>> doomed;
    steal_unique_edges(doomed);
    while (!doomed.empty()) {
      std::shared_ptr<Node> n = std::move(doomed.back());
      doomed.pop_back();
      if (n.use_count() == 1) n->steal_unique_edges(doomed);
    }  // n is destroyed here, its uniquely held inputs no longer own any node
  }
};

}  // namespace detail

/// Records `out = op(inputs)` when recording is on and some input requires grad.
/// `backward_fn(dout)` returns one gradient per input (an undefined Tensor for "none").
/// It must not capture `out` itself (that would be a cycle): save `out.detach()` instead.
/// Returns `out`, now part of the graph.
template <class TO, class TI, class F>
Tensor<TO> record(const char* name, const Tensor<TO>& out, std::vector<Tensor<TI>> inputs, F&& backward_fn) {
  detail::ProfileState* prof = detail::ProfileState::active();
  std::string shapes = prof ? prof->forward_op(name, inputs) : std::string();
  if (!is_grad_enabled()) return out;
  bool any = std::any_of(inputs.begin(), inputs.end(), [](const Tensor<TI>& t) { return t.requires_grad(); });
  if (!any) return out;
  DG_CHECK(out.impl().use_count() == 1 && !out.impl()->grad_fn,
           "autograd: op '", name, "' must return a fresh tensor to record");
  auto node = std::make_shared<detail::FunctionNode<TO, TI>>();
  node->name = name;
  node->profile_shapes = std::move(shapes);
  node->out_shape = out.shape();
  node->inputs.reserve(inputs.size());
  for (const Tensor<TI>& in : inputs) node->inputs.push_back(detail::edge_of(in));
  node->backward_fn = std::forward<F>(backward_fn);
  node->seq = Tape::current().push(node);
  out.impl()->requires_grad = true;
  out.impl()->grad_fn = node;
  return out;
}

/// Same, with the inputs as a braced list: record("add", out, {a, b}, fn).
template <class TO, class TI, class F>
Tensor<TO> record(const char* name, const Tensor<TO>& out, std::initializer_list<Tensor<TI>> inputs, F&& fn) {
  return record(name, out, std::vector<Tensor<TI>>(inputs), std::forward<F>(fn));
}

// ---- post-accumulate-grad hooks: "this leaf's gradient is final for this backward()"

namespace detail {
/// Every registered hook, by the address of its leaf; shared by all threads. A hook holds only a
/// weak link to its leaf, so the entry of a dead leaf (whose address may be reused) never runs.
struct GradHooks {
  std::mutex m;
  std::unordered_map<const ImplBase*, std::vector<std::pair<uint64_t, std::function<void()>>>> by_leaf;
  std::atomic<size_t> count{0};  // hooks registered anywhere: backward() does no hook work at 0
  uint64_t next_id = 1;
  static GradHooks& get() {
    static GradHooks* hooks = new GradHooks;  // never destroyed: handles may outlive static destruction
    return *hooks;
  }
};

/// The hooks one backward() will run: per hooked leaf, the graph's edges into it not yet applied.
/// When the last one has been applied, the leaf's .grad() holds this backward's whole sum.
class PendingHooks {
 public:
  /// Counts the edges from `order`'s nodes into hooked leaves (nothing to do without hooks).
  void collect(const std::vector<std::shared_ptr<Node>>& order) {
    GradHooks& g = GradHooks::get();
    if (g.count.load(std::memory_order_relaxed) == 0) return;
    std::lock_guard<std::mutex> lock(g.m);
    for (const auto& n : order)
      n->for_each_input([&](ImplBase& in) {
        if (in.grad_fn) return;
        auto it = g.by_leaf.find(&in);
        if (it == g.by_leaf.end()) return;
        Leaf& leaf = leaves_[&in];
        if (leaf.edges++ == 0)
          for (const auto& [id, f] : it->second) leaf.hooks.push_back(f);
      });
  }
  /// Node n has been applied: its edges are done; run the hooks of the leaves that had their last.
  void applied(const Node& n) {
    if (leaves_.empty()) return;
    n.for_each_input([&](ImplBase& in) {
      auto it = leaves_.find(&in);
      if (it != leaves_.end() && --it->second.edges == 0)
        for (const auto& f : it->second.hooks) f();
    });
  }
  /// Runs the hooks of one leaf now (backward() called on a leaf itself).
  static void run(const ImplBase& leaf) {
    GradHooks& g = GradHooks::get();
    if (g.count.load(std::memory_order_relaxed) == 0) return;
    std::vector<std::function<void()>> hooks;
    {
      std::lock_guard<std::mutex> lock(g.m);
      auto it = g.by_leaf.find(&leaf);
      if (it != g.by_leaf.end())
        for (const auto& [id, f] : it->second) hooks.push_back(f);
    }
    for (const auto& f : hooks) f();
  }

 private:
  struct Leaf {
    int64_t edges = 0;
    std::vector<std::function<void()>> hooks;  // copied: they run without the registry's lock
  };
  std::unordered_map<const ImplBase*, Leaf> leaves_;
};
}  // namespace detail

/// Unregisters its hook when destroyed or on remove() (torch's RemovableHandle). Move-only.
class HookHandle {
 public:
  HookHandle() = default;
  HookHandle(const ImplBase* leaf, uint64_t id) : leaf_(leaf), id_(id) {}
  HookHandle(HookHandle&& o) noexcept : leaf_(o.leaf_), id_(std::exchange(o.id_, 0)) {}
  HookHandle& operator=(HookHandle&& o) noexcept {
    if (this != &o) {
      remove();
      leaf_ = o.leaf_;
      id_ = std::exchange(o.id_, 0);
    }
    return *this;
  }
  HookHandle(const HookHandle&) = delete;
  HookHandle& operator=(const HookHandle&) = delete;
  ~HookHandle() { remove(); }
  /// Unregisters the hook now; a second call does nothing.
  void remove() {
    if (id_ == 0) return;
    detail::GradHooks& g = detail::GradHooks::get();
    std::lock_guard<std::mutex> lock(g.m);
    auto it = g.by_leaf.find(leaf_);
    if (it != g.by_leaf.end()) {
      auto& v = it->second;
      const size_t before = v.size();
      v.erase(std::remove_if(v.begin(), v.end(), [&](const auto& e) { return e.first == id_; }), v.end());
      g.count -= before - v.size();
      if (v.empty()) g.by_leaf.erase(it);
    }
    id_ = 0;
  }

 private:
  const ImplBase* leaf_ = nullptr;
  uint64_t id_ = 0;  // 0: no hook
};

/// Runs hook(leaf) whenever a backward() is done adding into leaf.grad() (torch's
/// Tensor.register_post_accumulate_grad_hook): once per backward() that reaches the leaf, right
/// after the last of that graph's edges into it has been applied, so .grad() then holds this
/// backward's whole contribution (it runs even if no gradient flowed through those edges).
/// Data-parallel training uses it to start reducing a gradient while backward() goes on with
/// the rest (dist/reducer.hpp). The hook runs in backward()'s thread with recording off, and
/// may read or replace .grad(). With checkpoint(), a parameter read inside fn is a leaf of the
/// recomputed graph: its hook runs at the end of that inner backward. The hook stays registered
/// as long as the returned handle lives.
/// Example: auto h = autograd::register_post_accumulate_grad_hook(w, [](const Tensor<float>& p) { use(p.grad()); });
template <class T>
[[nodiscard]] HookHandle register_post_accumulate_grad_hook(const Tensor<T>& leaf,
                                                            std::function<void(const Tensor<T>&)> hook) {
  DG_CHECK(leaf.defined() && leaf.is_leaf() && leaf.requires_grad(),
           "register_post_accumulate_grad_hook: expected a leaf tensor that requires grad (a parameter)");
  DG_CHECK(hook != nullptr, "register_post_accumulate_grad_hook: the hook is empty");
  std::weak_ptr<TensorImpl<T>> weak = leaf.impl();
  auto call = [weak, hook = std::move(hook)] {
    if (auto impl = weak.lock()) hook(Tensor<T>(impl));
  };
  detail::GradHooks& g = detail::GradHooks::get();
  std::lock_guard<std::mutex> lock(g.m);
  const uint64_t id = g.next_id++;
  g.by_leaf[leaf.impl().get()].emplace_back(id, std::move(call));
  ++g.count;
  return HookHandle(leaf.impl().get(), id);
}

/// Runs backward from `root` with gradient `grad` (torch.autograd.backward).
template <class T>
void backward(const Tensor<T>& root, Tensor<T> grad = Tensor<T>(), bool retain_graph = false) {
  DG_CHECK(root.requires_grad(), "backward: the tensor does not require grad and has no grad_fn "
           "(did any input call requires_grad_(), and was recording on?)");
  if (!grad.defined()) {
    DG_CHECK(root.numel() == 1, "backward: a gradient can be implied only for a scalar output; got shape ",
             shape_str(root.shape()), " (pass grad explicitly)");
    grad = full<T>(root.shape(), T(1), root.device());
  }
  DG_CHECK(grad.shape() == root.shape(), "backward: grad has shape ", shape_str(grad.shape()),
           ", output has shape ", shape_str(root.shape()));
  NoGradGuard no_grad;
  if (!root.impl()->grad_fn) {  // a leaf: its gradient is the given one
    detail::accumulate(*root.impl(), grad, "backward");
    detail::PendingHooks::run(*root.impl());
    return;
  }
  // Collect the nodes reachable from root (iterative DFS: graphs can be thousands deep).
  std::vector<std::shared_ptr<Node>> order;
  std::unordered_set<Node*> seen;
  std::vector<std::shared_ptr<Node>> stack{root.impl()->grad_fn};
  seen.insert(root.impl()->grad_fn.get());
  while (!stack.empty()) {
    auto n = stack.back();
    stack.pop_back();
    order.push_back(n);
    n->for_each_input([&](ImplBase& in) {
      if (in.grad_fn && seen.insert(in.grad_fn.get()).second) stack.push_back(in.grad_fn);
    });
  }
  // Reverse creation order is a valid reverse topological order of the tape.
  std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) { return a->seq > b->seq; });
  detail::PendingHooks hooks;  // leaves with post-accumulate-grad hooks, and their edges to go
  hooks.collect(order);
  static_cast<TypedNode<T>&>(*root.impl()->grad_fn).pending = grad.impl();
  detail::ProfileState* prof = detail::ProfileState::active();
  if (prof && prof->nested > 0) prof = nullptr;  // a backward inside a profiled node: its time
  if (prof) prof->gap();
  for (auto& n : order) {
    if (prof) {
      const auto t0 = prof->now();
      {
        detail::ProfileState::Nest nest(*prof);
        n->apply();
      }
      prof->add_backward(n->name, n->profile_shapes, detail::ProfileState::ms(t0, prof->now()));
    } else {
      n->apply();
    }
    hooks.applied(*n);  // before release(), which forgets the node's inputs
    if (!retain_graph) n->release();
  }
  if (prof) prof->last = prof->now();
}

}  // namespace dg::autograd

namespace dg {

template <class T>
void Tensor<T>::backward(const Tensor& grad, bool retain_graph) const {
  autograd::backward(*this, grad, retain_graph);
}

template <class T>
std::string Tensor<T>::grad_fn_name() const {
  return checked().grad_fn ? checked().grad_fn->name : "";
}

template <class T>
void Tensor<T>::check_inplace(const char* op) const {
  DG_CHECK(!(is_grad_enabled() && requires_grad()), op, ": in-place change of a tensor that requires grad "
           "while recording; wrap it in dg::NoGradGuard (as optimizers do) or detach() first");
}

}  // namespace dg
