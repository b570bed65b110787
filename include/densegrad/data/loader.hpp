// densegrad/data/loader.hpp: DataLoader: seeded shuffling per epoch, per-rank shards like
// torch's DistributedSampler, batches built (and augmented) by worker threads ahead of the consumer.
// Batch k of an epoch depends only on (seed, epoch, k, rank), never on the number of workers.
// Not torch's DataLoader: threads, not processes; no collate hooks beyond a per-sample transform.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#include "augment.hpp"
#include "dataset.hpp"

namespace dg::data {

/// One batch. images: (B, C, H, W) float, augmented and normalized; labels: (B);
/// soft_targets: (B, K) when mixup/cutmix is enabled, else undefined; indices: the dataset
/// index of each sample.
struct Batch {
  Tensor<float> images;
  Tensor<int64_t> labels;
  Tensor<float> soft_targets;
  std::vector<int64_t> indices;
  int64_t size() const { return labels.defined() ? labels.size(0) : 0; }
};

/// torch.utils.data.DataLoader's arguments that apply here, plus DistributedSampler's.
struct LoaderOptions {
  int64_t batch_size = 64;
  bool shuffle = true;
  bool drop_last = false;     // drop the last batch when smaller than batch_size
  uint64_t seed = 0;          // with the epoch, decides the order and every random draw
  int num_workers = 0;        // 0: batches are built in the consumer's thread, on demand
  int prefetch_factor = 2;    // batches in flight per worker (torch's prefetch_factor)
  AugmentOptions augment;     // per-sample and per-batch augmentation (default: none)
  int64_t rank = 0, world_size = 1;  // DistributedSampler: this rank's shard of world_size
  /// Optional extra per-sample augmentation, run in the worker after `augment`'s per-sample steps
  /// and before mixup: image is a (C, H, W) view into the batch; index is the dataset index.
  /// Workers call it concurrently, so it must be thread-safe; what it throws reaches the consumer.
  std::function<void(Tensor<float>& image, int64_t index, Generator& gen)> transform;

  LoaderOptions& batch(int64_t b) { batch_size = b; return *this; }
  LoaderOptions& shuffled(bool s) { shuffle = s; return *this; }
  LoaderOptions& drop_last_batch(bool d) { drop_last = d; return *this; }
  LoaderOptions& with_seed(uint64_t s) { seed = s; return *this; }
  LoaderOptions& workers(int n, int prefetch = 2) { num_workers = n; prefetch_factor = prefetch; return *this; }
  LoaderOptions& augmentation(AugmentOptions a) { augment = std::move(a); return *this; }
  LoaderOptions& shard(int64_t r, int64_t world) { rank = r; world_size = world; return *this; }
};

namespace detail {
// splitmix64's finalizer: spreads (seed, epoch, batch, rank) into independent generator seeds.
inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
inline uint64_t mix_seed(std::initializer_list<uint64_t> parts) {
  uint64_t h = 0x2545f4914f6cdd1dull;
  for (uint64_t p : parts) h = mix64(h ^ mix64(p));
  return h;
}
}  // namespace detail

/// Iterates a Dataset in batches, like torch.utils.data.DataLoader with a DistributedSampler:
///   DataLoader loader(train_set, LoaderOptions().batch(128).workers(3).augmentation(aug));
///   for (int64_t epoch = 0; epoch < epochs; ++epoch) {
///     loader.set_epoch(epoch);                 // same seed + epoch -> same order, on any rank
///     for (Batch& b : loader) { ... b.images, b.labels, b.soft_targets ... }
///   }
/// Without set_epoch, each new pass over the loader moves on to the next epoch by itself.
/// The loader keeps a handle to the dataset (datasets share their buffers), so it may outlive it.
/// One pass at a time: starting a new pass (begin()) or destroying the loader stops the workers.
class DataLoader {
 public:
  DataLoader(const Dataset& dataset, LoaderOptions options) : ds_(dataset), o_(std::move(options)) {
    DG_CHECK(ds_.defined(), "DataLoader: the dataset is empty (default-constructed)");
    DG_CHECK(o_.batch_size > 0, "DataLoader: batch_size must be positive, got ", o_.batch_size);
    DG_CHECK(o_.num_workers >= 0 && o_.prefetch_factor > 0, "DataLoader: expected num_workers >= 0 and ",
             "prefetch_factor > 0, got ", o_.num_workers, " and ", o_.prefetch_factor);
    DG_CHECK(o_.world_size > 0 && o_.rank >= 0 && o_.rank < o_.world_size, "DataLoader: expected 0 <= rank < ",
             "world_size, got rank ", o_.rank, " and world_size ", o_.world_size);
    o_.augment.check(ds_.channels());
  }
  ~DataLoader() { stop_workers(); }
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  /// DistributedSampler.set_epoch: the next pass uses this epoch's order and random draws.
  void set_epoch(int64_t epoch) {
    epoch_ = epoch;
    epoch_pending_ = false;
  }
  /// The epoch the next pass (begin()) will use.
  int64_t epoch() const { return epoch_pending_ ? epoch_ + 1 : epoch_; }

  /// Samples this rank sees per epoch: N, or ceil(N / world_size) when sharded (padded by repeats).
  int64_t num_samples() const {
    return o_.world_size == 1 ? ds_.size() : (ds_.size() + o_.world_size - 1) / o_.world_size;
  }
  /// Batches per epoch (torch len(loader)).
  int64_t size() const {
    return o_.drop_last ? num_samples() / o_.batch_size : (num_samples() + o_.batch_size - 1) / o_.batch_size;
  }
  const Dataset& dataset() const { return ds_; }
  const LoaderOptions& options() const { return o_; }

  /// This rank's sample order for an epoch: a permutation of 0..N-1 seeded by (seed, epoch)
  /// (the same on every rank), padded to a multiple of world_size by repeating its start,
  /// then every world_size-th index from `rank` on (torch DistributedSampler.__iter__).
  std::vector<int64_t> epoch_indices(int64_t epoch) const {
    const int64_t n = ds_.size();
    std::vector<int64_t> perm(static_cast<size_t>(n));
    std::iota(perm.begin(), perm.end(), int64_t(0));
    if (o_.shuffle) {  // Fisher-Yates
      Generator gen(detail::mix_seed({o_.seed, static_cast<uint64_t>(epoch), 0x5348554646ull /* "SHUFF" */}));
      for (int64_t i = n - 1; i > 0; --i)
        std::swap(perm[static_cast<size_t>(i)], perm[gen.randint(static_cast<uint64_t>(i + 1))]);
    }
    if (o_.world_size == 1) return perm;
    std::vector<int64_t> shard;
    const int64_t total = num_samples() * o_.world_size;
    for (int64_t j = o_.rank; j < total && n > 0; j += o_.world_size) shard.push_back(perm[static_cast<size_t>(j % n)]);
    return shard;
  }

  /// Batch k of `epoch`, built in the calling thread (what the workers call). Deterministic:
  /// its random draws come from a generator seeded by (seed, epoch, k, rank).
  Batch make_batch(int64_t epoch, int64_t k, const std::vector<int64_t>& order) const {
    const int64_t begin = k * o_.batch_size;
    DG_CHECK(k >= 0 && begin < static_cast<int64_t>(order.size()), "DataLoader: batch ", k, " out of range (",
             size(), " batches)");
    const int64_t B = std::min<int64_t>(o_.batch_size, static_cast<int64_t>(order.size()) - begin);
    const int64_t C = ds_.channels(), H = ds_.height(), W = ds_.width(), n = C * H * W;
    Generator gen(detail::mix_seed({o_.seed, static_cast<uint64_t>(epoch), static_cast<uint64_t>(k),
                                    static_cast<uint64_t>(o_.rank)}));
    Batch b;
    b.images = Tensor<float>::empty({B, C, H, W});
    b.labels = Tensor<int64_t>::empty({B});
    b.indices.assign(order.begin() + begin, order.begin() + begin + B);
    for (int64_t i = 0; i < B; ++i) {
      const int64_t idx = b.indices[static_cast<size_t>(i)];
      float* img = b.images.data() + i * n;
      ds_.copy_image(idx, img);
      b.labels.data()[i] = ds_.label(idx);
      augment_sample_(img, C, H, W, o_.augment, gen);
      if (o_.transform) {
        Tensor<float> view = Tensor<float>::from_storage(b.images.storage(), {C, H, W}, {H * W, W, 1},
                                                         b.images.offset() + i * n);
        o_.transform(view, idx, gen);
      }
    }
    if (o_.augment.mix_enabled()) b.soft_targets = mixup_(b.images, b.labels, ds_.num_classes(), o_.augment, gen);
    return b;
  }

  /// An input iterator over one pass; ++ blocks until the next batch is ready and rethrows
  /// (in the consumer's thread) any exception a worker raised while building it.
  class Iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = Batch;
    using difference_type = std::ptrdiff_t;
    using pointer = Batch*;
    using reference = Batch&;

    Iterator(DataLoader* l, int64_t k) : l_(l), k_(k) {}
    Batch& operator*() { return batch_; }
    Batch* operator->() { return &batch_; }
    Iterator& operator++() {
      batch_ = ++k_ < l_->size() ? l_->next(k_) : Batch();
      return *this;
    }
    bool operator==(const Iterator& o) const { return k_ == o.k_; }
    bool operator!=(const Iterator& o) const { return k_ != o.k_; }

   private:
    friend class DataLoader;
    DataLoader* l_;
    int64_t k_;
    Batch batch_;
  };

  /// Starts a pass (stopping any unfinished one) and returns its first batch.
  Iterator begin() {
    start_epoch();
    Iterator it(this, 0);
    if (size() > 0) it.batch_ = next(0);
    return it;
  }
  Iterator end() { return Iterator(this, size()); }

 private:
  // What the workers of one pass share. Batches are claimed in order (next_claim); at most
  // `capacity` claimed batches are not yet consumed, which bounds the memory held ahead.
  struct Slot {
    Batch batch;
    std::exception_ptr error;
  };
  struct Pass {
    int64_t epoch = 0, num_batches = 0, capacity = 0;
    std::vector<int64_t> order;
    std::mutex m;
    std::condition_variable work, ready;  // work: a claim became possible; ready: a batch arrived
    std::map<int64_t, Slot> done;         // built, not yet consumed
    int64_t next_claim = 0, next_consume = 0;
    bool stop = false;
  };

  void start_epoch() {
    stop_workers();
    if (epoch_pending_) ++epoch_;
    epoch_pending_ = true;  // the pass after this one moves on, unless set_epoch says otherwise
    pass_ = std::make_unique<Pass>();
    pass_->epoch = epoch_;
    pass_->order = epoch_indices(epoch_);
    pass_->num_batches = size();
    pass_->capacity = static_cast<int64_t>(o_.num_workers) * o_.prefetch_factor;
    for (int w = 0; w < o_.num_workers; ++w) workers_.emplace_back([this, p = pass_.get()] { worker(*p); });
  }

  void worker(Pass& p) {
    for (;;) {
      int64_t k;
      {
        std::unique_lock<std::mutex> lock(p.m);
        p.work.wait(lock, [&] {
          return p.stop || p.next_claim >= p.num_batches || p.next_claim < p.next_consume + p.capacity;
        });
        if (p.stop || p.next_claim >= p.num_batches) return;
        k = p.next_claim++;
      }
      Slot s;
      try {
        s.batch = make_batch(p.epoch, k, p.order);
      } catch (...) {
        s.error = std::current_exception();  // handed to the consumer with batch k
      }
      {
        std::lock_guard<std::mutex> lock(p.m);
        p.done.emplace(k, std::move(s));
      }
      p.ready.notify_all();
    }
  }

  // Batch k of the current pass: built here (no workers) or waited for.
  Batch next(int64_t k) {
    DG_CHECK(pass_ != nullptr, "DataLoader: no pass in progress (iterate with begin()/end())");
    Pass& p = *pass_;
    if (o_.num_workers == 0) return make_batch(p.epoch, k, p.order);
    Slot s;
    {
      std::unique_lock<std::mutex> lock(p.m);
      p.ready.wait(lock, [&] { return p.done.count(k) > 0 || p.stop; });
      auto it = p.done.find(k);
      DG_CHECK(it != p.done.end(), "DataLoader: batch ", k, " was requested after the pass stopped (after an error); ",
               "start a new pass with begin()");
      s = std::move(it->second);
      p.done.erase(it);
      p.next_consume = k + 1;
    }
    p.work.notify_all();
    if (s.error) {
      stop_workers();
      std::rethrow_exception(s.error);
    }
    if (k + 1 == p.num_batches) stop_workers();  // the pass is over: join the idle workers
    return std::move(s.batch);
  }

  // Tells the workers to stop (they finish the batch they are building) and joins them.
  void stop_workers() {
    if (pass_) {
      {
        std::lock_guard<std::mutex> lock(pass_->m);
        pass_->stop = true;
      }
      pass_->work.notify_all();
    }
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  Dataset ds_;
  LoaderOptions o_;
  int64_t epoch_ = 0;
  bool epoch_pending_ = false;  // a pass of epoch_ has started: the next begin() uses epoch_ + 1
  std::unique_ptr<Pass> pass_;
  std::vector<std::thread> workers_;
};

}  // namespace dg::data
