// tests/test_memory_stats.cpp: the CPU memory statistics of core/storage.hpp
// (cpu_memory_allocated, cpu_max_memory_allocated, cpu_reset_peak_memory_stats): exact byte
// counts for known tensors, views and cached blocks, peak and reset, concurrent threads, and an
// RDNet training step whose peak shrinks with the shared buffer and with recomputation.
// Every check is a difference from the count at its start: other live tensors do not matter.
#include <rdnet/rdnet.hpp>

#include <thread>
#include <vector>

#include "test_util.hpp"

namespace test_memory_stats {

using namespace dg;

TEST_CASE("cpu_memory_allocated: the requested bytes of live tensors, exactly, and views add nothing") {
  const size_t before = cpu_memory_allocated();
  {
    Tensor<float> a = zeros<float>({256});  // 1024 bytes
    CHECK(cpu_memory_allocated() == before + 1024);
    Tensor<double> b = zeros<double>({3, 5});  // 120 bytes: the request, not the 128-byte size class
    CHECK(cpu_memory_allocated() == before + 1024 + 120);
    Tensor<int64_t> c = zeros<int64_t>({7});  // 56
    CHECK(cpu_memory_allocated() == before + 1024 + 120 + 56);
    Tensor<float> empty = zeros<float>({0, 4});  // no elements, no bytes
    CHECK(cpu_memory_allocated() == before + 1200);

    Tensor<float> v = a.narrow(0, 10, 100).reshape({10, 10});  // views share a's storage
    Tensor<float> shared = a;                                  // a second handle, same storage
    CHECK(cpu_memory_allocated() == before + 1200);
    a = Tensor<float>();  // the storage lives on in v and shared
    CHECK(cpu_memory_allocated() == before + 1200);
    v = Tensor<float>();
    shared = Tensor<float>();  // the last handle: 1024 bytes go
    CHECK(cpu_memory_allocated() == before + 176);
  }
  CHECK(cpu_memory_allocated() == before);
}

TEST_CASE("cpu_memory_allocated: a block served from the allocator's cache counts, a cached block does not") {
  release_cached_cpu_memory();
  const size_t before = cpu_memory_allocated();
  { Tensor<float> a = zeros<float>({1000}); }  // freed into the cache
  CHECK(cpu_memory_allocated() == before);    // cached, not held by a tensor
  Tensor<float> b = zeros<float>({1000});     // the same size class: the cached block again
  CHECK(cpu_memory_allocated() == before + 4000);
  b = Tensor<float>();
  CHECK(release_cached_cpu_memory() >= 4000);  // the cache held it; releasing it changes no count
  CHECK(cpu_memory_allocated() == before);
}

TEST_CASE("cpu_memory_allocated: storage from a user-installed CPU allocator counts too") {
  struct Counting final : Allocator {
    CpuAllocator base;
    int calls = 0;
    void* allocate(size_t n) override { ++calls; return base.allocate(n); }
    void deallocate(void* p, size_t n) override { base.deallocate(p, n); }
  } mine;
  Allocator* old = get_allocator(Device::Kind::CPU);
  set_allocator(Device::Kind::CPU, &mine);
  const size_t before = cpu_memory_allocated();
  Tensor<float> x = zeros<float>({33});
  set_allocator(Device::Kind::CPU, old);  // x keeps its own allocator for its free
  CHECK(mine.calls == 1);
  CHECK(cpu_memory_allocated() == before + 132);
  x = Tensor<float>();
  CHECK(cpu_memory_allocated() == before);
}

TEST_CASE("cpu_max_memory_allocated: the peak since the last reset, and a reset starts at what is held now") {
  const size_t before = cpu_memory_allocated();
  cpu_reset_peak_memory_stats();
  CHECK(cpu_max_memory_allocated() == before);
  Tensor<float> keep = zeros<float>({100});  // 400, held through the rest
  {
    Tensor<float> a = zeros<float>({1000});  // 4000
    Tensor<float> b = zeros<float>({500});   // 2000: the peak, 6400 above before
  }
  Tensor<float> c = zeros<float>({250});  // 1000: below the peak
  CHECK(cpu_memory_allocated() == before + 1400);
  CHECK(cpu_max_memory_allocated() == before + 6400);
  cpu_reset_peak_memory_stats();
  CHECK(cpu_max_memory_allocated() == before + 1400);
  c = Tensor<float>();
  CHECK(cpu_max_memory_allocated() == before + 1400);  // freeing never lowers the peak
  cpu_reset_peak_memory_stats();
  CHECK(cpu_max_memory_allocated() == before + 400);
}

TEST_CASE("cpu memory statistics: threads allocating and freeing at once leave exact counts") {
  const size_t before = cpu_memory_allocated();
  cpu_reset_peak_memory_stats();
  constexpr int kThreads = 4, kRounds = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([t] {
      std::vector<Tensor<float>> held;
      for (int i = 0; i < kRounds; ++i) {
        held.push_back(zeros<float>({static_cast<int64_t>(1 + (i * 7 + t) % 64)}));  // 4..256 bytes
        if (held.size() > 8) held.erase(held.begin());                               // at most 9 at once
      }
    });
  for (auto& th : threads) th.join();
  CHECK(cpu_memory_allocated() == before);
  // the peak saw some threads' tensors at once, never more than all of them: 4 x 9 x 256 bytes
  CHECK(cpu_max_memory_allocated() > before);
  CHECK(cpu_max_memory_allocated() <= before + kThreads * 9 * 256);
}

namespace {

/// Bytes above what was held before, at the peak of one training step (forward, loss,
/// backward) of a small RDNet whose one dense stage has 6 blocks.
size_t step_peak(bool dense_buffer, bool memory_efficient) {
  rdnet::RDNetConfig c;
  c.in_chans = 3;
  c.num_classes = 5;
  c.growth_rates = {16};
  c.num_blocks_list = {6};
  c.block_type = {"Block"};
  c.is_downsample_block = {false};
  c.num_init_features = 16;
  c.patch_size = 2;
  c.dense_buffer = dense_buffer;
  c.memory_efficient = memory_efficient;
  Generator gen(3);
  rdnet::RDNet<float> model(c, gen);
  model.train();
  Tensor<float> x = randn<float>({4, 3, 32, 32}, gen);
  Tensor<int64_t> y = tensor<int64_t>({0, 1, 2, 3});
  const size_t held = cpu_memory_allocated();
  cpu_reset_peak_memory_stats();
  cross_entropy(model.forward(x), y).backward();
  const size_t peak = cpu_max_memory_allocated() - held;
  // what stays after the step: one gradient per parameter, nothing else
  size_t grad_bytes = 0;
  for (auto& p : model.parameters()) grad_bytes += static_cast<size_t>(p.numel()) * sizeof(float);
  CHECK(cpu_memory_allocated() == held + grad_bytes);
  return peak;
}

}  // namespace

TEST_CASE("cpu_max_memory_allocated: an RDNet step peaks lower with the shared buffer, and lower again with recomputation") {
  const size_t naive = step_peak(false, false), buffer = step_peak(true, false), recompute = step_peak(true, true);
  INFO("peak bytes: naive " << naive << ", buffer " << buffer << ", buffer + recompute " << recompute);
  CHECK(buffer < naive);
  CHECK(recompute < buffer);
  CHECK(recompute * 10 < naive * 9);  // at least 10% below naive at 6 blocks
}

}  // namespace test_memory_stats
