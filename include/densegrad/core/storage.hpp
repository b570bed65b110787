// densegrad/core/storage.hpp: refcounted bytes on a device, from a per-device allocator.
// Views share one Storage; the bytes are freed when the last view goes away. The default CPU
// allocator caches freed blocks: small ones by size class (a training step frees and re-requests
// the same sizes every step), blocks of 1 MiB and more as pieces of mapped pages that are split
// to serve smaller requests, merged with free neighbours when freed, and grown (mremap) for a
// request that none holds; with a budget it gives
// cached memory back when a request misses and the total would pass the budget.
// CPU memory statistics (cpu_memory_allocated and friends) count the bytes that live CPU
// storages requested, like torch.cuda.memory_allocated does for the GPU.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define DENSEGRAD_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DENSEGRAD_ASAN 1
#endif
#endif
#ifdef DENSEGRAD_ASAN
#include <sanitizer/asan_interface.h>  // cached blocks are poisoned: a use after free still trips ASan
#define DENSEGRAD_POISON_(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define DENSEGRAD_UNPOISON_(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define DENSEGRAD_POISON_(p, n) ((void)(p), (void)(n))
#define DENSEGRAD_UNPOISON_(p, n) ((void)(p), (void)(n))
#endif

#if defined(__linux__) && !defined(DENSEGRAD_ASAN)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "device.hpp"
#include "error.hpp"

namespace dg {

/// Hands out raw device memory. Backends (a caching allocator, CUDA) install their own
/// with set_allocator(); the default CPU one is 64-byte aligned malloc.
struct Allocator {
  virtual ~Allocator() = default;
  virtual void* allocate(size_t nbytes) = 0;
  virtual void deallocate(void* p, size_t nbytes) = 0;
  /// nbytes on one device of the allocator's kind (Storage calls this). By default the device
  /// index is not looked at; the CUDA allocator allocates on that GPU.
  virtual void* allocate_on(Device device, size_t nbytes) {
    (void)device;
    return allocate(nbytes);
  }
};

struct CpuAllocator final : Allocator {
  void* allocate(size_t nbytes) override {
    size_t rounded = (nbytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded ? rounded : 64);
    DG_CHECK(p != nullptr, "out of memory: could not allocate ", nbytes, " bytes on cpu");
    return p;
  }
  void deallocate(void* p, size_t) override { std::free(p); }
};

/// CpuAllocator plus a cache: a freed block is kept, keyed by its size class, and handed out
/// again for the next request of that class instead of going back to the OS (fresh pages cost
/// a page fault and a zeroing each: several percent of a small model's training step).
/// Classes are 4 per power of two (at most 25% slack): finer ones (16 above 1 MiB) measured
/// more peak RSS, not less (fewer requests share a class, so more blocks stay cached).
/// Best fit: a request that finds no cached block of its own class takes one of the smallest
/// larger class that has one, up to twice its own (set_fit_ratio), and the block goes back to its
/// own class when freed. Freed activations then serve the gradients of the next smaller size in
/// backward, and a pass's outputs each other's, instead of lying in the cache beside new blocks:
/// RDNet-T at 224 px, peak RSS of a training step at batch 8 1686 -> 1401 MiB, at batch 16 2978
/// -> 2465, inference at batch 8 980 -> 715 and at 448 px 3041 -> 1983, with fewer page faults
/// (training at batch 8: 446k -> 373k) and no slower.
/// Big blocks (1 MiB and more, on Linux; not under ASan, whose malloc redzones catch overflows):
/// pieces of mapped pages instead of classes. A request takes the smallest free piece that holds
/// it, page-rounded, and the rest of the piece stays free; a freed piece merges with free
/// neighbours. Classes keep each freed block for its own sizes (and up to fit_ratio x), so a
/// training step's cache held blocks that no later request fitted: RDNet-T at batch 16, 224 px,
/// 2049 MiB cached beside 310 in use after a step, for 1533 MiB of tensors at the peak. Pieces
/// let the memory an activation held serve whatever is asked next, of any size: peak RSS of that
/// step 2164 -> 1926 MiB, inference at batch 8 563 -> 502 (448 px: 1443 -> 1181), no slower.
/// The fit ratio and size classes then concern the small blocks only.
/// Thread-safe.
/// With a budget (set_budget(factor)), a request that no cached block fits (a miss) first gives
/// back the oldest cached blocks while memory in use plus cached would pass `factor` times the
/// most ever in use at once (in size classes). Without one, blocks freed in one size and wanted
/// in another pile up: RDNet-T's training step at batch 16, 224 px, --memory-efficient, reached
/// 2554 MiB peak RSS with a cache that only grew (1059 MiB of tensors), 2420 MiB at 2x the peak.
/// A bound trades speed for memory, and by default there is none: inference frees each output
/// soon after use, so its peak in use is small while a pass asks for many sizes, and at 2x the
/// peak every pass gave back and re-faulted its blocks (RDNet-T inference at batch 8 ran at
/// 11.8 img/s against 14.5-15.1 without a bound, nano's at batch 256 at 1280 against 1861
/// img/s), while the training steps' peak RSS was the same either way. At 1.25x, RDNet nano's
/// training steps ran 20% slower. Those costs were the size classes': a class's blocks are given
/// back to make room for another class's, which then fault in. Pieces serve every size from the
/// same pages, so a tight bound costs faults only while a program warms up: at 1.1x, RDNet nano's
/// training steps faulted 62.4k times in 10 steps and in 40 (55.8k without a bound), RDNet-T's
/// training step at batch 16 510k times either way, and peak RSS went 1926 -> 1720 MiB (RDNet-T
/// train, batch 16), 502 -> 465 (RDNet-T inference, batch 8), 210 -> 203 (nano train); 1.0 (in
/// use + cached never above the peak) doubled the faults. Later steps with other tensor sizes
/// (nano under bf16 products, whose saved GELU inputs are half as wide) split the pieces so that
/// 1.1 never settled: 3-4 misses per step, each for a block (13 or 24.5 MiB) that none of 9-13
/// free pieces (up to 73 MiB in all) held, 14k page faults per bf16 step and 1.8k per float32
/// one. A miss now grows the largest free piece into the block (mremap: its resident pages serve
/// again, only the rest is new), which halves those faults; at 1.2 there are none once warm,
/// for peak RSS 152 -> 165 MiB (nano bf16), 188 -> 190 (nano float32) and 1399 -> 1405 (RDNet-T
/// train, batch 16). So the default (kDefaultBudget) is 1.2 where big blocks are pieces and no
/// bound elsewhere. set_budget() sets the factor
/// (set_cpu_cache_budget() for the default allocator); release_cached() frees every cached block;
/// set_max_cached_bytes() caps the cache.
class CachingCpuAllocator final : public Allocator {
 public:
  CachingCpuAllocator() = default;
  CachingCpuAllocator(const CachingCpuAllocator&) = delete;
  CachingCpuAllocator& operator=(const CachingCpuAllocator&) = delete;
  ~CachingCpuAllocator() override { release_cached(); }
  void* allocate(size_t nbytes) override {
    const size_t c = size_class(nbytes);
    if (in_pieces(c)) return allocate_piece(nbytes);
    std::vector<Block> evicted;
    std::vector<Range> evicted_pieces;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // the smallest class that holds a cached block, from c up to fit_ratio_ * c; in it, the
      // newest block (warm in cache)
      const double most = fit_ratio_ * static_cast<double>(c);
      for (auto it = free_.lower_bound(c); it != free_.end() && static_cast<double>(it->first) <= most; ++it) {
        if (it->second.empty()) continue;
        const size_t bc = it->first;
        auto node = it->second.back();
        it->second.pop_back();
        void* p = node->p;
        lru_.erase(node);
        cached_ -= bc;
        in_use_ += bc;
        peak_ = std::max(peak_, in_use_);
        if (bc != c) larger_[p] = bc;  // deallocate() will be told a size of class c
        DENSEGRAD_UNPOISON_(p, nbytes);  // under ASan the rest of the block stays poisoned
        return p;
      }
      evict_for(c, evicted, evicted_pieces);
      in_use_ += c;
    }
    return fresh(c, nbytes, evicted, evicted_pieces, new_block);
  }
  void deallocate(void* p, size_t nbytes) override {
    size_t c = size_class(nbytes);
    if (in_pieces(c)) return deallocate_piece(p);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!larger_.empty()) {  // a block of a larger class than asked for goes back to its own
        auto it = larger_.find(p);
        if (it != larger_.end()) {
          c = it->second;
          larger_.erase(it);
        }
      }
      in_use_ -= std::min(in_use_, c);
      if (cached_ + c <= max_cached_bytes_) {
        DENSEGRAD_POISON_(p, c);
        free_[c].push_back(lru_.insert(lru_.end(), Block{p, c}));
        cached_ += c;
        return;
      }
    }
    release_block(p, c);
  }
  /// Frees every cached block and free piece (memory in use is untouched).
  void release_cached() {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Block& b : lru_) {
      DENSEGRAD_UNPOISON_(b.p, b.c);
      release_block(b.p, b.c);
    }
    lru_.clear();
    free_.clear();
    for (const auto& [bytes, p] : free_pieces_) {
      pieces_.erase(p);
      unmap(p, bytes);
    }
    free_pieces_.clear();
    cached_ = 0;
  }
  /// Bytes held in the cache, not in use.
  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }
  /// Caps the cache (0 disables caching); frees everything cached when lowering it.
  void set_max_cached_bytes(size_t n) {
    release_cached();
    std::lock_guard<std::mutex> lock(mu_);
    max_cached_bytes_ = n;
  }
  /// Bytes handed out and not given back, in the classes of the blocks that serve them.
  size_t in_use_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return in_use_;
  }
  /// A request of size class c may take a cached block of a class up to `ratio` times c (>= 1;
  /// 1: its own class only; the default 2). Big blocks, where they are pieces (kPieces), are
  /// served from any free piece that holds them, whatever the ratio.
  void set_fit_ratio(double ratio) {
    DG_CHECK(ratio >= 1.0, "cache fit ratio: expected a ratio >= 1, got ", ratio);  // NaN fails too
    std::lock_guard<std::mutex> lock(mu_);
    fit_ratio_ = ratio;
  }
  /// Memory in use plus cached may reach `factor` times the most ever in use (>= 1; the default,
  /// infinity, is no bound).
  void set_budget(double factor) {
    DG_CHECK(factor >= 1.0, "cache budget: expected a factor >= 1, got ", factor);  // NaN fails too
    std::lock_guard<std::mutex> lock(mu_);
    budget_ = factor;
  }
  /// The smallest class >= nbytes: a multiple of 64 up to 256 bytes, else a multiple of 1/8 of the
  /// power of two at or above nbytes.
  static size_t size_class(size_t nbytes) {
    if (nbytes <= 256) return nbytes == 0 ? 64 : (nbytes + 63) / 64 * 64;
    size_t step = 64;
    while (step * 8 < nbytes) step *= 2;
    return (nbytes + step - 1) / step * step;
  }
  /// Whether blocks of 1 MiB and more are pieces of mapped pages here (Linux, not under ASan).
#if defined(__linux__) && !defined(DENSEGRAD_ASAN)
  static constexpr bool kPieces = true;
#else
  static constexpr bool kPieces = false;
#endif
  /// The system's page size (4 KiB on x86-64, up to 64 KiB on some Arm kernels): pieces are
  /// page-rounded, split and unmapped at page boundaries.
  static size_t page_bytes() {
#if defined(__linux__) && !defined(DENSEGRAD_ASAN)
    static const size_t bytes = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    return bytes;
#else
    return 4096;
#endif
  }
  /// The budget a new allocator starts with (see the class comment): 1.2 with pieces, else none.
  static constexpr double kDefaultBudget = kPieces ? 1.2 : HUGE_VAL;

 private:
  // Blocks of 1 MiB and more are pages of their own (mmap), so a block given back leaves the RSS
  // at once; from malloc's heap, freed memory may stay resident. Not under ASan: its malloc
  // puts redzones around each block, which catch overflows.
  static constexpr size_t kMappedBytes = size_t{1} << 20;
  static bool in_pieces(size_t c) { return kPieces && c >= kMappedBytes; }
  static void* new_block(size_t c) { return std::aligned_alloc(64, c); }  // c is a multiple of 64
  static void release_block(void* p, size_t) { std::free(p); }
#if defined(__linux__) && !defined(DENSEGRAD_ASAN)
  static char* map(size_t bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : static_cast<char*>(p);
  }
  static void unmap(char* p, size_t bytes) { ::munmap(p, bytes); }  // any page-aligned part of a mapping
  /// The mapped pages [p, p + bytes) grown to `to` bytes: in place, or moved (their page table
  /// entries, not their contents) to where `to` bytes fit; the pages past `bytes` are new. Null
  /// when the kernel refuses (e.g. a range over two mappings that it did not merge): p untouched.
  static char* grow(char* p, size_t bytes, size_t to) {
    void* q = ::mremap(p, bytes, to, MREMAP_MAYMOVE);
    return q == MAP_FAILED ? nullptr : static_cast<char*>(q);
  }
#else
  static char* map(size_t) { return nullptr; }  // never called: no pieces here
  static void unmap(char*, size_t) {}
  static char* grow(char*, size_t, size_t) { return nullptr; }
#endif
  struct Block {
    void* p;
    size_t c;  // its size class
  };
  using Range = std::pair<char*, size_t>;  // a free piece taken out, to unmap outside the lock

  /// Under the lock, on a miss for c bytes: gives back cached memory (the largest free pieces,
  /// then the oldest blocks) while in use + cached + c would pass the budget.
  void evict_for(size_t c, std::vector<Block>& blocks, std::vector<Range>& ranges) {
    // the peak with this request; kept in peak_ once the request is served (fresh())
    const double budget = budget_ * static_cast<double>(std::max(peak_, in_use_ + c));  // infinite: no budget
    while (static_cast<double>(in_use_ + cached_ + c) > budget) {
      if (!free_pieces_.empty()) {
        auto largest = std::prev(free_pieces_.end());
        ranges.emplace_back(largest->second, largest->first);
        cached_ -= largest->first;
        pieces_.erase(largest->second);
        free_pieces_.erase(largest);
      } else if (!lru_.empty()) {
        const Block b = lru_.front();
        auto& same = free_[b.c];  // oldest first too: b is its front
        same.erase(same.begin());
        lru_.pop_front();
        cached_ -= b.c;
        blocks.push_back(b);
      } else {
        break;
      }
    }
  }
  /// A miss's new memory, once evict_for() has made room and `bytes` count as in use: gives the
  /// evicted memory back, then asks make(bytes) (a size class's block or mapped pages). Out of
  /// memory, it gives the whole cache back and asks once more; failing again, the request no
  /// longer counts as in use (nor in the peak the budget scales with) and the error names the
  /// bytes asked for (`nbytes`).
  template <class P>
  P fresh(size_t bytes, size_t nbytes, const std::vector<Block>& evicted, const std::vector<Range>& evicted_pieces,
          P (*make)(size_t)) {
    release(evicted, evicted_pieces);
    P p = make(bytes);
    if (!p) {
      release_cached();
      p = make(bytes);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (p) {
        peak_ = std::max(peak_, in_use_);
        return p;
      }
      in_use_ -= std::min(in_use_, bytes);
    }
    DG_CHECK(false, "out of memory: could not allocate ", nbytes, " bytes on cpu");
    return p;
  }
  static void release(const std::vector<Block>& blocks, const std::vector<Range>& ranges) {
    for (const Block& b : blocks) {
      DENSEGRAD_UNPOISON_(b.p, b.c);
      release_block(b.p, b.c);
    }
    for (const Range& r : ranges) unmap(r.first, r.second);
  }

  /// A big block: the smallest free piece that holds the page-rounded request (split when larger),
  /// or on a miss the largest free piece grown to the request (grow(): its pages, already
  /// resident, keep serving, and only the rest is new), else newly mapped pages.
  void* allocate_piece(size_t nbytes) {
    const size_t page = page_bytes(), r = (nbytes + page - 1) / page * page;
    std::vector<Block> evicted;
    std::vector<Range> evicted_pieces;
    Range base{nullptr, 0};  // on a miss: the free piece the block grows from
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto f = free_pieces_.lower_bound({r, nullptr});
      if (f != free_pieces_.end()) {
        const auto [bytes, p] = *f;
        free_pieces_.erase(f);
        pieces_.at(p) = Piece{r, false};
        if (bytes > r) {  // the rest stays free, a piece of its own
          pieces_.emplace(p + r, Piece{bytes - r, true});
          free_pieces_.emplace(bytes - r, p + r);
        }
        cached_ -= r;
        in_use_ += r;
        peak_ = std::max(peak_, in_use_);
        return p;
      }
      if (!free_pieces_.empty()) {  // all smaller than r here
        auto largest = std::prev(free_pieces_.end());
        base = {largest->second, largest->first};
        free_pieces_.erase(largest);
        pieces_.erase(base.first);
        cached_ -= base.second;
      }
      evict_for(r, evicted, evicted_pieces);  // in use + cached + r: the new pages past base's
      in_use_ += r;
    }
    char* p = base.first ? grow(base.first, base.second, r) : nullptr;
    if (p) {
      release(evicted, evicted_pieces);
    } else {
      if (base.first) {  // not grown: a free piece again, and the budget checked again without it
        std::lock_guard<std::mutex> lock(mu_);
        in_use_ -= r;
        pieces_.emplace(base.first, Piece{base.second, false});
        free_piece(base.first);
        evict_for(r, evicted, evicted_pieces);
        in_use_ += r;
      }
      p = fresh(r, nbytes, evicted, evicted_pieces, map);
    }
    std::lock_guard<std::mutex> lock(mu_);
    peak_ = std::max(peak_, in_use_);
    pieces_.emplace(p, Piece{r, false});
    return p;
  }
  /// A big block back: merged with the free pieces on either side, or unmapped past the cap.
  void deallocate_piece(void* ptr) {
    char* p = static_cast<char*>(ptr);
    std::unique_lock<std::mutex> lock(mu_);
    auto it = pieces_.find(p);
    DG_CHECK(it != pieces_.end() && !it->second.free, "CachingCpuAllocator: freeing ", ptr,
             ", which is no block in use of this allocator");
    size_t bytes = it->second.bytes;
    in_use_ -= std::min(in_use_, bytes);
    if (cached_ + bytes > max_cached_bytes_) {  // past the cap: straight back to the OS
      pieces_.erase(it);
      lock.unlock();
      unmap(p, bytes);
      return;
    }
    free_piece(p);
  }
  /// Under the lock: the piece at p (in pieces_, not free) becomes a free piece, merged with
  /// free neighbours, and counts as cached.
  void free_piece(char* p) {
    auto it = pieces_.find(p);
    size_t bytes = it->second.bytes;
    cached_ += bytes;
    auto next = std::next(it);
    if (next != pieces_.end() && next->second.free && next->first == p + bytes) {
      free_pieces_.erase({next->second.bytes, next->first});
      bytes += next->second.bytes;
      pieces_.erase(next);
    }
    if (it != pieces_.begin()) {
      auto prev = std::prev(it);
      if (prev->second.free && prev->first + prev->second.bytes == p) {
        free_pieces_.erase({prev->second.bytes, prev->first});
        bytes += prev->second.bytes;
        pieces_.erase(it);
        it = prev;
      }
    }
    it->second = Piece{bytes, true};
    free_pieces_.emplace(bytes, it->first);
  }
  struct Piece {
    size_t bytes;  // a multiple of the page size
    bool free;
  };
  std::mutex mu_;
  std::list<Block> lru_;  // every cached block, oldest first
  std::map<size_t, std::vector<std::list<Block>::iterator>> free_;  // size class -> its blocks in lru_, oldest first
  size_t cached_ = 0, max_cached_bytes_ = SIZE_MAX;
  size_t in_use_ = 0, peak_ = 0;  // bytes handed out now and at most (size classes)
  double budget_ = kDefaultBudget;  // in use + cached <= budget_ * peak_ after a miss (HUGE_VAL: no bound)
  double fit_ratio_ = 2.0;         // a request of class c may take a cached block of class <= fit_ratio_ * c
  std::unordered_map<void*, size_t> larger_;  // blocks in use of a larger class than their request's
  std::map<char*, Piece> pieces_;                    // big blocks: every mapped piece, by address
  std::set<std::pair<size_t, char*>> free_pieces_;  // the free ones by size, smallest first
};

namespace detail {
/// The default CPU allocator. Never destroyed: storage freed during static destruction (a
/// global tensor) must still find it.
inline CachingCpuAllocator& default_cpu_allocator() {
  static CachingCpuAllocator* a = new CachingCpuAllocator;
  return *a;
}
inline std::array<Allocator*, 2>& allocator_table() {
  static std::array<Allocator*, 2> table{&default_cpu_allocator(), nullptr};
  return table;
}

/// Bytes requested by live CPU storages, and the most there were since the last reset. Relaxed
/// atomics: each counter is exact; a reset racing with allocations may keep a slightly stale peak.
struct CpuMemoryStats {
  std::atomic<size_t> allocated{0}, peak{0};
  void add(size_t n) {
    const size_t now = allocated.fetch_add(n, std::memory_order_relaxed) + n;
    size_t p = peak.load(std::memory_order_relaxed);
    while (now > p && !peak.compare_exchange_weak(p, now, std::memory_order_relaxed)) {
    }
  }
  void sub(size_t n) { allocated.fetch_sub(n, std::memory_order_relaxed); }
};
/// Never destroyed, like the allocator: storage freed during static destruction still counts.
inline CpuMemoryStats& cpu_memory_stats() {
  static CpuMemoryStats* s = new CpuMemoryStats;
  return *s;
}
}  // namespace detail

/// Bytes of CPU memory held by live tensors now: the sizes their storages requested, whichever
/// CPU allocator served them, cached blocks not counted (torch.cuda.memory_allocated's CPU twin;
/// compare dg::cuda_memory_allocated). Scratch memory inside kernels is not a tensor: not counted.
///   size_t before = dg::cpu_memory_allocated();
///   auto x = dg::zeros<float>({256});  // dg::cpu_memory_allocated() == before + 1024
inline size_t cpu_memory_allocated() { return detail::cpu_memory_stats().allocated.load(std::memory_order_relaxed); }
/// The most cpu_memory_allocated() has been since the program started or the last
/// cpu_reset_peak_memory_stats() (torch.cuda.max_memory_allocated's CPU twin).
inline size_t cpu_max_memory_allocated() { return detail::cpu_memory_stats().peak.load(std::memory_order_relaxed); }
/// Starts a new peak at what is allocated now (torch.cuda.reset_peak_memory_stats's CPU twin).
///   size_t held = dg::cpu_memory_allocated();
///   dg::cpu_reset_peak_memory_stats();
///   train_step();
///   size_t step_peak = dg::cpu_max_memory_allocated() - held;  // the step's peak above what it started with
inline void cpu_reset_peak_memory_stats() {
  detail::CpuMemoryStats& s = detail::cpu_memory_stats();
  s.peak.store(s.allocated.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

/// Frees the CPU blocks the default allocator keeps cached for reuse (torch.cuda.empty_cache's
/// CPU twin); memory in use by tensors is untouched. Returns the number of bytes freed.
inline size_t release_cached_cpu_memory() {
  size_t n = detail::default_cpu_allocator().cached_bytes();
  detail::default_cpu_allocator().release_cached();
  return n;
}

/// How much memory the default CPU allocator may hold: in use plus cached up to `factor` times the
/// most ever in use at once (default CachingCpuAllocator::kDefaultBudget: 1.2 on Linux, else no
/// bound; HUGE_VAL is no bound). Lower keeps the RSS nearer
/// to what tensors need, at the cost of giving blocks back and faulting fresh pages more often.
/// Frees nothing by itself.
///   dg::set_cpu_cache_budget(1.25);  // e.g. with RDNetConfig::memory_efficient
inline void set_cpu_cache_budget(double factor) { detail::default_cpu_allocator().set_budget(factor); }

/// How much larger than a request a cached block of the default CPU allocator may be and still
/// serve it: up to `ratio` times its size class (default 2; 1: blocks of its own class only).
///   dg::set_cpu_cache_fit_ratio(1.0);  // the exact-class cache
inline void set_cpu_cache_fit_ratio(double ratio) { detail::default_cpu_allocator().set_fit_ratio(ratio); }

/// The allocator used for new storage on devices of `kind`.
inline Allocator* get_allocator(Device::Kind kind) { return detail::allocator_table()[static_cast<int>(kind)]; }
/// Installs `a` for `kind`; storage allocated before keeps its old allocator.
inline void set_allocator(Device::Kind kind, Allocator* a) { detail::allocator_table()[static_cast<int>(kind)] = a; }

/// A standard-library allocator over the CPU allocator (the caching one by default), for the
/// scratch buffers of CPU kernels: buffers a training step asks for again every step (im2col
/// columns, packed GEMM operands, per-thread partial sums) then come from the cache. From
/// malloc, big ones came as fresh pages each time (glibc gives blocks of 128 KiB and more back
/// to the system, or trims them off its heaps): RDNet nano's training step at batch 128 took
/// 1.8k page faults per step in float32 and 4k in bf16 that way, about 3% of the step. Scratch
/// is not a tensor: cpu_memory_allocated() does not count it. Each buffer keeps the allocator it
/// was made with (set_allocator() later does not strand it).
template <class T>
struct CpuScratchAllocator {
  using value_type = T;
  Allocator* a = get_allocator(Device::Kind::CPU);
  CpuScratchAllocator() noexcept = default;
  template <class U>
  CpuScratchAllocator(const CpuScratchAllocator<U>& o) noexcept : a(o.a) {}
  T* allocate(size_t n) { return static_cast<T*>(a->allocate(n * sizeof(T))); }
  void deallocate(T* p, size_t n) noexcept { a->deallocate(p, n * sizeof(T)); }
  template <class U>
  bool operator==(const CpuScratchAllocator<U>& o) const noexcept { return a == o.a; }
  template <class U>
  bool operator!=(const CpuScratchAllocator<U>& o) const noexcept { return a != o.a; }
};
/// A kernel's scratch buffer: a std::vector whose memory comes from the CPU allocator.
///   dg::scratch_vector<float> col(K * P);  // zeroed, like any std::vector<float>(n)
template <class T>
using scratch_vector = std::vector<T, CpuScratchAllocator<T>>;

/// CpuScratchAllocator whose construct() without arguments leaves a trivially constructible
/// element as it is (default-, not value-initialized): scratch_buffer(n) and resize(n) do not
/// write memory that the kernel will overwrite anyway.
template <class T>
struct CpuScratchNoInitAllocator : CpuScratchAllocator<T> {
  template <class U>
  struct rebind {
    using other = CpuScratchNoInitAllocator<U>;
  };
  CpuScratchNoInitAllocator() noexcept = default;
  template <class U>
  CpuScratchNoInitAllocator(const CpuScratchNoInitAllocator<U>& o) noexcept : CpuScratchAllocator<T>(o) {}
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    if constexpr (sizeof...(Args) == 0 && std::is_trivially_default_constructible_v<U>)
      ::new (static_cast<void*>(p)) U;
    else
      ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
/// A kernel's scratch buffer whose every element is written before it is read: scratch_buffer(n)
/// and resize(n) leave new elements uninitialized (scratch_buffer(n, v) still fills them).
///   dg::scratch_buffer<float> out(OC * ld);  // the GEMM writes every element
template <class T>
using scratch_buffer = std::vector<T, CpuScratchNoInitAllocator<T>>;

/// Copies nbytes between devices: (dst, dst_device, src, src_device, nbytes). A backend
/// registers one for its device kind (the CUDA backend: cudaMemcpy); CPU <-> CPU is memcpy.
using DeviceCopyFn = void (*)(void*, Device, const void*, Device, size_t);

namespace detail {
inline std::array<DeviceCopyFn, 2>& device_copy_table() {
  static std::array<DeviceCopyFn, 2> table{nullptr, nullptr};
  return table;
}
}  // namespace detail

/// Installs the copy function for transfers to or from devices of `kind`.
inline void set_device_copy(Device::Kind kind, DeviceCopyFn fn) { detail::device_copy_table()[static_cast<int>(kind)] = fn; }

/// Copies bytes between any two devices whose backends are compiled in.
inline void copy_bytes(void* dst, Device dst_dev, const void* src, Device src_dev, size_t nbytes) {
  if (dst_dev.is_cpu() && src_dev.is_cpu()) {
    if (nbytes) std::memcpy(dst, src, nbytes);
    return;
  }
  Device other = dst_dev.is_cpu() ? src_dev : dst_dev;
  DeviceCopyFn fn = detail::device_copy_table()[static_cast<int>(other.kind)];
  DG_CHECK(fn != nullptr, "copy to ", dst_dev.str(), " from ", src_dev.str(), ": no backend for ", other.str(),
           " is compiled into this program (build with DENSEGRAD_WITH_CUDA and nvcc)");
  fn(dst, dst_dev, src, src_dev, nbytes);
}

/// Shared, untyped bytes. Copying a Storage shares the bytes.
class Storage {
 public:
  Storage() = default;
  static Storage allocate(size_t nbytes, Device device = Device::cpu()) {
    Allocator* a = get_allocator(device.kind);
    DG_CHECK(a != nullptr, "no allocator for device ", device.str(),
             " (is the CUDA backend compiled into this program?)");
    Storage s;
    s.impl_ = std::make_shared<Impl>(a->allocate_on(device, nbytes), nbytes, device, a);
    if (device.is_cpu()) detail::cpu_memory_stats().add(nbytes);  // counted once the bytes are ours
    return s;
  }
  void* data() const { return impl_ ? impl_->data : nullptr; }
  size_t nbytes() const { return impl_ ? impl_->nbytes : 0; }
  Device device() const { return impl_ ? impl_->device : Device::cpu(); }
  bool defined() const { return impl_ != nullptr; }
  /// True when both share the same bytes (views of one another).
  bool is_alias_of(const Storage& o) const { return impl_ && impl_ == o.impl_; }
  long use_count() const { return impl_.use_count(); }

 private:
  struct Impl {
    void* data;
    size_t nbytes;
    Device device;
    Allocator* allocator;
    Impl(void* d, size_t n, Device dev, Allocator* a) : data(d), nbytes(n), device(dev), allocator(a) {}
    ~Impl() {
      allocator->deallocate(data, nbytes);
      if (device.is_cpu()) detail::cpu_memory_stats().sub(nbytes);
    }
    Impl(const Impl&) = delete;
    Impl& operator=(const Impl&) = delete;
  };
  std::shared_ptr<Impl> impl_;
};

}  // namespace dg
