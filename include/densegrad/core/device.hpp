// densegrad/core/device.hpp: where a tensor's bytes live (CPU or CUDA:n).
// A tag only; moving data between devices is the backends' job.
#pragma once

#include <string>

/// Marks a scalar function that CUDA kernels call too (the same formula on both sides);
/// empty for host compilers.
#ifdef __CUDACC__
#define DENSEGRAD_HOST_DEVICE __host__ __device__
#else
#define DENSEGRAD_HOST_DEVICE
#endif

namespace dg {

/// A device tag like torch.device: Device::cpu(), Device::cuda(0).
struct Device {
  enum class Kind { CPU, CUDA };
  Kind kind = Kind::CPU;
  int index = 0;

  static Device cpu() { return {Kind::CPU, 0}; }
  static Device cuda(int i = 0) { return {Kind::CUDA, i}; }
  bool is_cpu() const { return kind == Kind::CPU; }
  bool is_cuda() const { return kind == Kind::CUDA; }
  std::string str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

}  // namespace dg
