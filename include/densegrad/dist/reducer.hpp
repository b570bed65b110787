// densegrad/dist/reducer.hpp: data-parallel gradient averaging in buckets, each bucket's sum
// started during backward() as soon as its gradients are final (torch DDP's Reducer).
// Needs no MPI: the communication is behind Collective (MPI in dist.hpp, NCCL in nccl.hpp).
// Not a model wrapper: the training loop calls set_sync() before backward() and finish() after.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../densegrad.hpp"

namespace dg::dist {

/// What a Reducer needs from a communication library: in-place sums over all ranks of flat
/// buffers, started in the same order on every rank and awaited later. MpiCollective
/// (dist.hpp) sums host buffers, NcclCollective (nccl.hpp) CUDA buffers.
class Collective {
 public:
  virtual ~Collective() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  /// Where the buffers given to start_sum live.
  virtual Device device() const = 0;
  /// Starts summing `count` elements of `dtype` at `data` over all ranks, in place, as request
  /// `slot`. Every rank starts the same slots, with the same counts, in the same order.
  virtual void start_sum(void* data, int64_t count, DType dtype, int slot) = 0;
  /// Makes later work see request `slot`'s result (MPI: waits; NCCL: orders the default stream).
  virtual void wait(int slot) = 0;
  /// Lets started requests progress (MPI moves a nonblocking collective only inside MPI calls).
  virtual void poll() {}
  /// Throws dg::Error on every rank unless all ranks pass the same value; `what` names it.
  virtual void check_uniform(int64_t value, const std::string& what) = 0;
};

/// Reducer settings (torch DDP's bucket_cap_mb).
struct ReducerOptions {
  int64_t bucket_cap_bytes = int64_t(1) << 20;  // a bucket closes once its gradients reach this size
  ReducerOptions& bucket_cap(int64_t bytes) { bucket_cap_bytes = bytes; return *this; }
};

/// Averages parameter gradients over the ranks of a Collective, like torch's
/// DistributedDataParallel: parameters are grouped into buckets in reverse registration order
/// (the last layers get their gradients first), a post-accumulate-grad hook copies each
/// gradient into its bucket's flat buffer when backward() is done with it, and a full bucket's
/// sum is started at once, so communication overlaps the rest of backward(). Buckets start in
/// index order on every rank, whatever order the hooks fire in.
///   dist::Reducer<float> reducer(model, collective);
///   for (micro-batches of a step) {
///     reducer.set_sync(last micro-batch);  // earlier ones only accumulate (DDP's no_sync)
///     loss.backward();
///   }
///   reducer.finish();                      // every .grad() is now the mean over the ranks
///   opt.step();
/// A parameter no rank gave a gradient keeps none (as in one process with the global batch);
/// one that some ranks did gets the mean, the others counting as zero. With one rank the
/// Reducer does nothing. Every rank must pass the same parameters in the same order (checked).
template <class T>
class Reducer {
 public:
  using Named = std::vector<std::pair<std::string, Tensor<T>>>;

  /// Buckets and hooks `params` (name, parameter), summing over `collective`, which must outlive it.
  Reducer(Named params, Collective& collective, ReducerOptions options = {}) : c_(&collective) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "dist::Reducer: gradients are summed in float or double (keep fp32 master weights)");
    DG_CHECK(options.bucket_cap_bytes > 0, "dist::Reducer: bucket_cap_bytes must be positive, got ",
             options.bucket_cap_bytes);
    int64_t total = 0;
    uint64_t shapes = 1469598103934665603ull;  // FNV-1a over every shape, to compare the ranks' models
    for (size_t i = 0; i < params.size(); ++i) {
      const Tensor<T>& p = params[i].second;
      DG_CHECK(p.defined() && p.is_leaf() && p.requires_grad(), "dist::Reducer: '", params[i].first,
               "' is not a leaf that requires grad (a parameter)");
      total += p.numel();
      for (int64_t d : p.shape()) shapes = (shapes ^ static_cast<uint64_t>(d + 1)) * 1099511628211ull;
      shapes = (shapes ^ 0xffull) * 1099511628211ull;
    }
    c_->check_uniform(static_cast<int64_t>(params.size()), "the number of parameters");
    c_->check_uniform(total, "the number of parameter elements");
    c_->check_uniform(static_cast<int64_t>(shapes >> 1), "the parameter shapes (a hash of them)");
    // Buckets, last parameter first: a bucket closes when its gradients reach the cap.
    for (size_t r = params.size(); r-- > 0;) {
      if (buckets_.empty() || buckets_.back().numel * int64_t(sizeof(T)) >= options.bucket_cap_bytes)
        buckets_.emplace_back();
      Bucket& b = buckets_.back();
      slots_.push_back({params[r].first, params[r].second, buckets_.size() - 1, b.numel, b.params.size(), false});
      b.params.push_back(slots_.size() - 1);
      b.numel += params[r].second.numel();
    }
    if (c_->world_size() == 1) return;  // nothing to average: no buffers, no hooks
    // Each bucket's buffer: its gradients back to back, then one "had a gradient" flag per parameter.
    for (Bucket& b : buckets_) {
      b.buffer = Tensor<T>::empty({b.numel + static_cast<int64_t>(b.params.size())}, c_->device());
      b.pending = static_cast<int64_t>(b.params.size());
    }
    for (size_t i = 0; i < slots_.size(); ++i)
      hooks_.push_back(autograd::register_post_accumulate_grad_hook<T>(
          slots_[i].param, [this, i](const Tensor<T>&) { ready(i); }));
  }
  /// Same, for a model's parameters.
  Reducer(const nn::Module<T>& model, Collective& collective, ReducerOptions options = {})
      : Reducer(model.named_parameters(), collective, options) {}
  Reducer(const Reducer&) = delete;  // the hooks point at this object
  Reducer& operator=(const Reducer&) = delete;

  /// Whether backward() starts the buckets' sums (default on). Off, backward() only
  /// accumulates locally: turn it off for all but the last micro-batch of an optimizer step
  /// (torch DDP's no_sync()); finish() then reduces what the micro-batches summed.
  void set_sync(bool on) { sync_ = on; }
  bool sync() const { return sync_; }

  /// Makes every parameter's .grad() the mean over the ranks: fills and starts the buckets
  /// backward() did not start (all of them after a backward() without sync), waits for all of
  /// them, and copies the means back. Call it on every rank before the optimizer step.
  void finish() {
    if (c_->world_size() == 1) return;
    for (size_t k = next_; k < buckets_.size(); ++k)
      for (size_t i : buckets_[k].params)
        if (!slots_[i].ready) mark(i);
    start_ready(false);
    const double inv = 1.0 / static_cast<double>(c_->world_size());
    for (size_t k = 0; k < buckets_.size(); ++k) {
      c_->wait(static_cast<int>(k));
      unpack(buckets_[k], inv);
    }
    last_started_in_backward_ = started_in_backward_;
    started_in_backward_ = 0;
    next_ = 0;
    for (Slot& s : slots_) s.ready = false;
    for (Bucket& b : buckets_) b.pending = static_cast<int64_t>(b.params.size());
  }

  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }
  /// Parameter names of bucket k, in the order their gradients are laid out.
  std::vector<std::string> bucket_names(int64_t k) const {
    std::vector<std::string> names;
    for (size_t i : buckets_.at(static_cast<size_t>(k)).params) names.push_back(slots_[i].name);
    return names;
  }
  /// Buckets whose sum backward() started (overlapping it) in the last finish()ed step.
  int64_t started_in_backward() const { return last_started_in_backward_; }

 private:
  struct Slot {
    std::string name;
    Tensor<T> param;
    size_t bucket;
    int64_t offset;  // of its gradient in the bucket's buffer
    size_t index;    // within the bucket: its flag is at buffer[numel + index]
    bool ready;      // copied into the bucket in this step
  };
  struct Bucket {
    std::vector<size_t> params;  // slots
    int64_t numel = 0;           // gradient elements (the flags follow)
    Tensor<T> buffer;            // (numel + params.size()), on the collective's device
    int64_t pending = 0;         // slots not yet ready
  };

  // The hook of slot i: backward() is done with its parameter.
  void ready(size_t i) {
    if (!sync_) return;
    DG_CHECK(!slots_[i].ready, "dist::Reducer: '", slots_[i].name, "' got a second gradient before finish(); with "
             "gradient accumulation, set_sync(false) before every backward() of a step but the last");
    mark(i);
    start_ready(true);
    c_->poll();
  }

  // Copies slot i's gradient (zeros if none) and its flag into the bucket.
  void mark(size_t i) {
    Slot& s = slots_[i];
    Bucket& b = buckets_[s.bucket];
    const Tensor<T> g = s.param.grad();
    Tensor<T> view = Tensor<T>::from_storage(b.buffer.storage(), s.param.shape(), contiguous_strides(s.param.shape()),
                                             b.buffer.offset() + s.offset);
    Tensor<T> flag = Tensor<T>::from_storage(b.buffer.storage(), {1}, {1},
                                             b.buffer.offset() + b.numel + static_cast<int64_t>(s.index));
    if (g.defined()) view.copy_(g);
    else view.zero_();
    flag.fill_(T(g.defined() ? 1 : 0));
    s.ready = true;
    --b.pending;
  }

  // Starts the next buckets in index order while they are full: the same order on every rank.
  void start_ready(bool in_backward) {
    while (next_ < buckets_.size() && buckets_[next_].pending == 0) {
      Bucket& b = buckets_[next_];
      c_->start_sum(b.buffer.data(), b.buffer.numel(), dtype_of<T>(), static_cast<int>(next_));
      if (in_backward) ++started_in_backward_;
      ++next_;
    }
  }

  // Writes sum / world_size back into .grad() of each parameter some rank had a gradient for.
  void unpack(Bucket& b, double inv) {
    const std::vector<T> flags =
        Tensor<T>::from_storage(b.buffer.storage(), {static_cast<int64_t>(b.params.size())}, {1},
                                b.buffer.offset() + b.numel).to_vector();  // one copy for a device buffer
    for (size_t j = 0; j < b.params.size(); ++j) {
      Slot& s = slots_[b.params[j]];
      if (!(flags[j] > T(0))) continue;  // no rank had one: it stays without, as in one process
      Tensor<T> g = s.param.grad();
      if (!g.defined()) {
        g = Tensor<T>::empty(s.param.shape(), s.param.device());
        s.param.set_grad(g);
      }
      Tensor<T> sum = Tensor<T>::from_storage(b.buffer.storage(), s.param.shape(), contiguous_strides(s.param.shape()),
                                              b.buffer.offset() + s.offset);
      if (g.device().is_cpu() && sum.device().is_cpu() && g.is_contiguous()) {
        T* pg = g.data();
        const T* ps = sum.data();
        const int64_t n = g.numel();
        for (int64_t e = 0; e < n; ++e) pg[e] = static_cast<T>(ps[e] * inv);
      } else {
        g.copy_(sum * inv);
      }
    }
  }

  Collective* c_;
  std::vector<Slot> slots_;
  std::vector<Bucket> buckets_;
  std::vector<autograd::HookHandle> hooks_;  // declared last: unhooked before the rest goes
  size_t next_ = 0;                          // the next bucket to start
  bool sync_ = true;
  int64_t started_in_backward_ = 0, last_started_in_backward_ = 0;
};

}  // namespace dg::dist
