// densegrad/cuda.cuh: the CUDA backend. Include it in ONE translation unit built by nvcc (a .cu
// file) of a program: it registers the device allocator, the host<->device copies and every CUDA
// kernel with core/device_kernels.hpp when the program starts; after that, tensors and modules
// moved with .to(dg::Device::cuda()) run all their ops on the GPU. Host-only translation units of
// the same program keep including <densegrad/densegrad.hpp>; they never see CUDA.
// Element types on CUDA: float and double.
#pragma once

#include "densegrad.hpp"
#include "backend/cuda/common.cuh"
#include "backend/cuda/concat.cuh"
#include "backend/cuda/conv.cuh"
#include "backend/cuda/elementwise.cuh"
#include "backend/cuda/matmul.cuh"
#include "backend/cuda/norm.cuh"
#include "backend/cuda/optim.cuh"
#include "backend/cuda/pool.cuh"
#include "backend/cuda/reduce.cuh"
#include "backend/cuda/softmax.cuh"

namespace dg::cuda {

/// Every CUDA kernel for T, in one table.
template <class T>
DeviceKernels<T>* make_kernels() {
  static DeviceKernels<T> k;
  register_elementwise(k);
  register_reduce(k);
  register_concat(k);
  register_matmul(k);
  register_conv(k);
  register_norm(k);
  register_softmax(k);
  register_pool(k);
  register_optim(k);
  return &k;
}

/// Installs the backend (runs once, at program start, from the variable below).
inline bool install() {
  static CudaRuntime runtime;
  runtime.device_count = [] { return device_count(); };
  runtime.synchronize = &synchronize;
  runtime.memory_allocated = &memory_allocated;
  runtime.max_memory_allocated = &max_memory_allocated;
  runtime.reset_peak_memory_stats = &reset_peak_memory_stats;
  runtime.empty_cache = &empty_cache;
  runtime.set_allow_tf32 = [](bool on) { allow_tf32() = on; };
  set_cuda_runtime(&runtime);
  set_allocator(Device::Kind::CUDA, &allocator());
  set_device_copy(Device::Kind::CUDA, &copy_bytes_cuda);
  set_cuda_kernels<float>(make_kernels<float>());
  set_cuda_kernels<double>(make_kernels<double>());
  return true;
}

inline const bool installed = install();

}  // namespace dg::cuda
