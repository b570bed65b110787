// densegrad/core/storage.hpp: refcounted bytes on a device, from a per-device allocator.
// Views share one Storage; the bytes are freed when the last view goes away.
#pragma once

#include <array>
#include <cstdlib>
#include <memory>

#include "device.hpp"
#include "error.hpp"

namespace dg {

/// Hands out raw device memory. Backends (a caching allocator, CUDA) install their own
/// with set_allocator(); the default CPU one is 64-byte aligned malloc.
struct Allocator {
  virtual ~Allocator() = default;
  virtual void* allocate(size_t nbytes) = 0;
  virtual void deallocate(void* p, size_t nbytes) = 0;
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

namespace detail {
inline std::array<Allocator*, 2>& allocator_table() {
  static CpuAllocator cpu;
  static std::array<Allocator*, 2> table{&cpu, nullptr};
  return table;
}
}  // namespace detail

/// The allocator used for new storage on devices of `kind`.
inline Allocator* get_allocator(Device::Kind kind) { return detail::allocator_table()[static_cast<int>(kind)]; }
/// Installs `a` for `kind`; storage allocated before keeps its old allocator.
inline void set_allocator(Device::Kind kind, Allocator* a) { detail::allocator_table()[static_cast<int>(kind)] = a; }

/// Shared, untyped bytes. Copying a Storage shares the bytes.
class Storage {
 public:
  Storage() = default;
  static Storage allocate(size_t nbytes, Device device = Device::cpu()) {
    Allocator* a = get_allocator(device.kind);
    DG_CHECK(a != nullptr, "no allocator for device ", device.str(),
             " (is the CUDA backend compiled into this program?)");
    Storage s;
    s.impl_ = std::make_shared<Impl>(a->allocate(nbytes), nbytes, device, a);
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
    ~Impl() { allocator->deallocate(data, nbytes); }
    Impl(const Impl&) = delete;
    Impl& operator=(const Impl&) = delete;
  };
  std::shared_ptr<Impl> impl_;
};

}  // namespace dg
