// densegrad/dist/nccl.hpp: NcclCollective, the Reducer's bucket sums on CUDA buffers with NCCL:
// ncclAllReduce on a stream of its own, ordered after the kernels that filled the bucket (on
// densegrad's stream, the legacy default one) by events, so sums overlap the rest of backward().
// Host code only (g++ or nvcc): needs <nccl.h>, the CUDA runtime, and MPI (dist.hpp) to hand
// NCCL's unique id to every rank. CMake target densegrad::nccl. Not a second process group:
// ranks, failure handling and the small collectives stay on MPI.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <string>
#include <vector>

#include "dist.hpp"

/// Throws dg::Error naming the NCCL call and NCCL's error string.
#define DG_NCCL_CHECK(expr)                                                                                   \
  do {                                                                                                        \
    ncclResult_t dg_nccl_rc_ = (expr);                                                                        \
    DG_CHECK(dg_nccl_rc_ == ncclSuccess, "NCCL error in ", #expr, ": ", ncclGetErrorString(dg_nccl_rc_));    \
  } while (0)

namespace dg::dist {

namespace detail {
/// Throws dg::Error naming the CUDA runtime call and its error string.
inline void check_cuda(cudaError_t e, const char* call) {
  DG_CHECK(e == cudaSuccess, "dist: ", call, " failed: ", cudaGetErrorString(e));
}
/// NCCL's datatype for a bucket's element type.
inline ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::Float32: return ncclFloat32;
    case DType::Float64: return ncclFloat64;
    case DType::BFloat16: return ncclBfloat16;
    case DType::Float16: return ncclFloat16;
    case DType::Int64: return ncclInt64;
  }
  DG_THROW("dist: no NCCL datatype for ", dtype_name(t));
}
}  // namespace detail

/// Makes GPU local_rank() % (GPUs on this host) this process's CUDA device and returns its
/// index: one GPU per rank on each host. Call it before the first CUDA tensor is made.
inline int use_local_gpu() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  DG_CHECK(e == cudaSuccess && n > 0, "dist: ", rank_tag(), "no CUDA device for this rank (",
           e == cudaSuccess ? "no GPU found" : cudaGetErrorString(e), ")");
  const int d = local_rank() % n;
  detail::check_cuda(cudaSetDevice(d), "cudaSetDevice");
  return d;
}

/// The Reducer's sums with NCCL, over all ranks of dist::comm(), on each rank's current CUDA
/// device (use_local_gpu()). Two ranks must not share a GPU (NCCL refuses). Every rank
/// constructs one at the same point (it is a collective call).
class NcclCollective final : public Collective {
 public:
  /// `device`: the tag of the parameters' device, which bucket buffers get too.
  explicit NcclCollective(Device device = Device::cuda(0)) : device_(device) {
    DG_CHECK(device.is_cuda(), "dist::NcclCollective: expected a CUDA device, got ", device.str());
    ncclUniqueId id{};
    if (dist::rank() == 0) DG_NCCL_CHECK(ncclGetUniqueId(&id));
    if (dist::world_size() > 1) detail::broadcast_bytes(reinterpret_cast<char*>(&id), sizeof id, 0, dist::comm());
    DG_NCCL_CHECK(ncclCommInitRank(&nccl_, dist::world_size(), id, dist::rank()));
    detail::check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  }
  NcclCollective(const NcclCollective&) = delete;
  NcclCollective& operator=(const NcclCollective&) = delete;
  ~NcclCollective() override {  // no throwing here: errors at exit are ignored
    if (stream_) cudaStreamSynchronize(stream_);
    for (cudaEvent_t e : filled_) cudaEventDestroy(e);
    for (cudaEvent_t e : summed_) cudaEventDestroy(e);
    if (nccl_) ncclCommDestroy(nccl_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  int rank() const override { return dist::rank(); }
  int world_size() const override { return dist::world_size(); }
  Device device() const override { return device_; }
  void start_sum(void* data, int64_t count, DType dtype, int slot) override {
    events_for(slot);
    const auto s = static_cast<size_t>(slot);
    // The bucket was filled by kernels on densegrad's stream: the sum waits for them, and only them.
    detail::check_cuda(cudaEventRecord(filled_[s], 0), "cudaEventRecord");
    detail::check_cuda(cudaStreamWaitEvent(stream_, filled_[s], 0), "cudaStreamWaitEvent");
    DG_NCCL_CHECK(ncclAllReduce(data, data, static_cast<size_t>(count), detail::nccl_type(dtype), ncclSum, nccl_, stream_));
    detail::check_cuda(cudaEventRecord(summed_[s], stream_), "cudaEventRecord");
  }
  /// Later work on densegrad's stream (copying the means back) runs after the sum; the host goes on.
  void wait(int slot) override {
    detail::check_cuda(cudaStreamWaitEvent(0, summed_.at(static_cast<size_t>(slot)), 0), "cudaStreamWaitEvent");
  }
  void check_uniform(int64_t value, const std::string& what) override { dist::check_uniform(value, what); }

 private:
  // Creates the events of slots up to `slot` (once: buckets keep their slots from step to step).
  void events_for(int slot) {
    while (filled_.size() <= static_cast<size_t>(slot)) {
      cudaEvent_t a = nullptr, b = nullptr;
      detail::check_cuda(cudaEventCreateWithFlags(&a, cudaEventDisableTiming), "cudaEventCreateWithFlags");
      detail::check_cuda(cudaEventCreateWithFlags(&b, cudaEventDisableTiming), "cudaEventCreateWithFlags");
      filled_.push_back(a);
      summed_.push_back(b);
    }
  }

  Device device_;
  ncclComm_t nccl_ = nullptr;
  cudaStream_t stream_ = nullptr;                // where the sums run, beside densegrad's stream
  std::vector<cudaEvent_t> filled_, summed_;     // per slot: bucket filled; its sum done
};

}  // namespace dg::dist
