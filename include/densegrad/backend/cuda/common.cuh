// densegrad/backend/cuda/common.cuh: what every CUDA kernel file shares: error checks, the
// stream, launch sizes, device storage (a caching allocator over cudaMalloc, never managed
// memory), host<->device copies, cuBLAS (loaded on first use) and its handle, and strided
// indexing for kernels. Compiled only by nvcc (this and every .cuh under backend/cuda).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <link.h>

#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "../../core/device_kernels.hpp"
#include "../../core/tensor.hpp"

/// Throws dg::Error naming the CUDA call and its error string.
#define DG_CUDA_CHECK(expr)                                                                                   \
  do {                                                                                                        \
    cudaError_t dg_cuda_err_ = (expr);                                                                        \
    DG_CHECK(dg_cuda_err_ == cudaSuccess, "CUDA error in ", #expr, ": ", cudaGetErrorString(dg_cuda_err_)); \
  } while (0)

/// Throws dg::Error naming the cuBLAS call and its status.
#define DG_CUBLAS_CHECK(expr)                                                                                 \
  do {                                                                                                        \
    cublasStatus_t dg_cublas_st_ = (expr);                                                                    \
    DG_CHECK(dg_cublas_st_ == CUBLAS_STATUS_SUCCESS, "cuBLAS error in ", #expr, ": ",                         \
             ::dg::cuda::cublas_api().get_status_string(dg_cublas_st_));                                      \
  } while (0)

namespace dg::cuda {

/// The stream every densegrad kernel and copy runs on: the legacy default stream, so work is
/// ordered without events and the caching allocator may hand a freed block to the next kernel.
inline cudaStream_t stream() { return 0; }

/// Checks the launch just made (bad configuration shows here; faults show at the next sync).
inline void check_launch(const char* op) {
  cudaError_t e = cudaGetLastError();
  DG_CHECK(e == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(e));
}

constexpr int kThreads = 256;

/// Blocks for a grid-stride loop over n elements (capped: each thread then loops).
inline unsigned blocks_for(int64_t n, int threads = kThreads) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return static_cast<unsigned>(b > 65535 * 8 ? 65535 * 8 : b);
}

/// Streaming multiprocessors of the current device (sizes grids that must fill the GPU).
inline int sm_count() {
  int dev = 0, n = 0;
  DG_CUDA_CHECK(cudaGetDevice(&dev));
  DG_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n > 0 ? n : 1;
}

/// Number of CUDA devices (0 when there is no driver or no GPU); `why` gets the driver's reason.
inline int device_count(std::string* why = nullptr) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (why) *why = cudaGetErrorString(e);
    (void)cudaGetLastError();  // clear the error
    return 0;
  }
  if (why && n == 0) *why = "no GPU found";
  return n;
}

/// Makes `dev` this thread's current CUDA device (cudaSetDevice, as torch's device guard), after
/// checking that it exists: kernels, cuBLAS calls and allocations that follow run on it.
inline void activate(Device dev) {
  static const int count = device_count();  // asked once: the answer does not change
  DG_CHECK(dev.is_cuda() && dev.index >= 0 && dev.index < count, dev.str(), ": no such CUDA device (this machine has ",
           count, count == 1 ? " GPU)" : " GPUs)");
  int current = -1;
  DG_CUDA_CHECK(cudaGetDevice(&current));
  if (current != dev.index) DG_CUDA_CHECK(cudaSetDevice(dev.index));
}

/// A caching allocator for device memory (PyTorch's CUDA allocator in miniature): freed blocks
/// are kept by (device, size class) and reused, so steady-state steps never call cudaMalloc,
/// which synchronizes the device. Blocks are freed on the stream-ordered default stream, so a
/// reused block is never touched before the kernels that used it are done. On out-of-memory the
/// cache is released and the allocation tried once more.
class CachingCudaAllocator final : public Allocator {
 public:
  /// nbytes on GPU device.index (which becomes the current device).
  void* allocate_on(Device device, size_t nbytes) override {
    check_available();
    activate(device);
    return allocate(nbytes);
  }
  /// nbytes on the current device.
  void* allocate(size_t nbytes) override {
    check_available();
    int dev = 0;
    DG_CUDA_CHECK(cudaGetDevice(&dev));
    const size_t c = CachingCpuAllocator::size_class(nbytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto& bucket = free_[{dev, c}];
      if (!bucket.empty()) {
        void* p = bucket.back();
        bucket.pop_back();
        cached_ -= c;
        in_use_ += c;
        peak_ = in_use_ > peak_ ? in_use_ : peak_;
        return p;
      }
    }
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, c);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      release_cached();
      e = cudaMalloc(&p, c);
    }
    DG_CHECK(e == cudaSuccess, "out of memory: could not allocate ", nbytes, " bytes on cuda:", dev, " (",
             cudaGetErrorString(e), ")");
    std::lock_guard<std::mutex> lock(mu_);
    device_of_[p] = dev;
    in_use_ += c;
    peak_ = in_use_ > peak_ ? in_use_ : peak_;
    return p;
  }
  void deallocate(void* p, size_t nbytes) override {
    const size_t c = CachingCpuAllocator::size_class(nbytes);
    std::lock_guard<std::mutex> lock(mu_);
    free_[{device_of_[p], c}].push_back(p);
    cached_ += c;
    in_use_ -= c;
  }
  /// cudaFree of every cached block (torch.cuda.empty_cache), each on its own device.
  void release_cached() {
    std::lock_guard<std::mutex> lock(mu_);
    int current = -1;
    const bool restore = cudaGetDevice(&current) == cudaSuccess;
    for (auto& [key, blocks] : free_) {
      if (!blocks.empty()) (void)cudaSetDevice(key.first);
      for (void* p : blocks) {
        cudaFree(p);
        device_of_.erase(p);
      }
    }
    if (restore) (void)cudaSetDevice(current);
    free_.clear();
    cached_ = 0;
  }
  /// Throws, with the driver's reason, when the machine has no usable GPU.
  static void check_available() {
    static std::string why;
    static const int count = device_count(&why);  // asked once: the answer does not change
    DG_CHECK(count > 0, "no CUDA device available for a tensor on cuda (", why, ")");
  }
  size_t bytes_in_use() { std::lock_guard<std::mutex> lock(mu_); return in_use_; }
  size_t peak_bytes_in_use() { std::lock_guard<std::mutex> lock(mu_); return peak_; }
  void reset_peak() { std::lock_guard<std::mutex> lock(mu_); peak_ = in_use_; }

 private:
  std::mutex mu_;
  std::map<std::pair<int, size_t>, std::vector<void*>> free_;
  std::unordered_map<void*, int> device_of_;
  size_t cached_ = 0, in_use_ = 0, peak_ = 0;
};

/// The process's CUDA allocator (never destroyed: tensors may outlive static destruction order).
inline CachingCudaAllocator& allocator() {
  static CachingCudaAllocator* a = new CachingCudaAllocator;
  return *a;
}

/// Bytes of device memory held by live tensors, and the peak since the last reset
/// (torch.cuda.memory_allocated / max_memory_allocated, rounded to size classes).
inline size_t memory_allocated() { return allocator().bytes_in_use(); }
inline size_t max_memory_allocated() { return allocator().peak_bytes_in_use(); }
inline void reset_peak_memory_stats() { allocator().reset_peak(); }
inline void empty_cache() { allocator().release_cached(); }

/// Blocks the host until the device has finished all queued work (torch.cuda.synchronize).
inline void synchronize() { DG_CUDA_CHECK(cudaDeviceSynchronize()); }

/// Host <-> device and device <-> device byte copies (the copy hook of core/storage.hpp).
inline void copy_bytes_cuda(void* dst, Device dst_dev, const void* src, Device src_dev, size_t nbytes) {
  if (nbytes == 0) return;
  activate(dst_dev.is_cuda() ? dst_dev : src_dev);  // device to device: on the destination's GPU
  cudaMemcpyKind kind = dst_dev.is_cpu() ? cudaMemcpyDeviceToHost
                        : src_dev.is_cpu() ? cudaMemcpyHostToDevice
                                           : cudaMemcpyDeviceToDevice;
  DG_CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, kind, stream()));
  if (kind == cudaMemcpyDeviceToHost) DG_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

/// The cuBLAS functions densegrad calls, taken from libcublas when the first GEMM runs.
///
/// Why not link it: libcublas.so and its libcublasLt.so (about 600 MB of code) cost every
/// process that links them about 210 MiB of resident memory and 0.1-0.7 s at start, before
/// main(), even a CPU-only run of a CUDA build (`rdnet_train --help` measured 223 MiB with
/// them linked). Loaded here on first use, a run that never multiplies on a GPU never maps them.
/// Lookup: the usual dynamic-loader search for the soname (LD_LIBRARY_PATH, the program's
/// RUNPATH, ldconfig), then the directory libcudart was loaded from, then the toolkit's lib
/// directory this build was configured with.
struct CublasApi {
  decltype(&::cublasCreate_v2) create = nullptr;
  decltype(&::cublasSetStream_v2) set_stream = nullptr;
  decltype(&::cublasSetMathMode) set_math_mode = nullptr;
  // spelled out: C++ sees an overload of it too (taking a cudaDataType compute type)
  using GemmStridedBatchedEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int,
                                                  int, const void*, const void*, cudaDataType, int, long long,
                                                  const void*, cudaDataType, int, long long, const void*, void*,
                                                  cudaDataType, int, long long, int, cublasComputeType_t,
                                                  cublasGemmAlgo_t);
  GemmStridedBatchedEx gemm_strided_batched_ex = nullptr;
  decltype(&::cublasGetStatusString) get_status_string = nullptr;
};

/// libcublas's soname for the toolkit these headers came from, e.g. "libcublas.so.13".
inline std::string cublas_soname() { return "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR); }

/// The directory (with a trailing '/') of the libcudart this process loaded, or "" when cudart
/// is linked statically: the CUDA toolkit's lib directory, where libcublas lies beside it.
inline std::string loaded_cudart_dir() {
  void* rt = dlopen(("libcudart.so." + std::to_string(CUDART_VERSION / 1000)).c_str(), RTLD_LAZY | RTLD_NOLOAD);
  if (rt == nullptr) return {};
  link_map* lm = nullptr;
  std::string dir;
  if (dlinfo(rt, RTLD_DI_LINKMAP, &lm) == 0 && lm != nullptr && lm->l_name != nullptr) {
    dir = lm->l_name;
    dir.erase(dir.rfind('/') == std::string::npos ? 0 : dir.rfind('/') + 1);
  }
  dlclose(rt);  // only drops the reference NOLOAD took
  return dir;
}

/// Loads libcublas once per process (thread-safe) and returns its functions; throws dg::Error
/// naming the library, where it looked and the loader's message when it is missing.
inline const CublasApi& cublas_api() {
  static const CublasApi api = [] {
    const std::string soname = cublas_soname();
    std::vector<std::string> candidates{soname};
    if (std::string dir = loaded_cudart_dir(); !dir.empty()) candidates.push_back(dir + soname);
#ifdef DENSEGRAD_CUDA_LIBRARY_DIR  // the toolkit this build was configured with
    candidates.push_back(std::string(DENSEGRAD_CUDA_LIBRARY_DIR) + "/" + soname);
#endif
    void* lib = nullptr;
    std::string tried, why;
    for (const std::string& c : candidates) {
      lib = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (lib != nullptr) break;
      tried += (tried.empty() ? "" : ", ") + c;
      why = dlerror();
    }
    DG_CHECK(lib != nullptr, "cuBLAS: could not load ", soname, " (tried ", tried, "; last error: ", why,
             "); put the CUDA toolkit's lib directory on LD_LIBRARY_PATH");
    CublasApi a;
    auto take = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      DG_CHECK(fn != nullptr, "cuBLAS: ", soname, " has no ", name, " (expected cuBLAS ", CUBLAS_VER_MAJOR, ".x)");
    };
    take(a.create, "cublasCreate_v2");
    take(a.set_stream, "cublasSetStream_v2");
    take(a.set_math_mode, "cublasSetMathMode");
    take(a.gemm_strided_batched_ex, "cublasGemmStridedBatchedEx");
    take(a.get_status_string, "cublasGetStatusString");
    return a;  // the library stays loaded for the life of the process
  }();
  return api;
}

/// This thread's cuBLAS handle for the current device (cuBLAS handles are not thread-safe).
inline cublasHandle_t cublas() {
  thread_local std::map<int, cublasHandle_t> handles;
  int dev = 0;
  DG_CUDA_CHECK(cudaGetDevice(&dev));
  auto it = handles.find(dev);
  if (it == handles.end()) {
    const CublasApi& api = cublas_api();
    cublasHandle_t h = nullptr;
    DG_CUBLAS_CHECK(api.create(&h));
    DG_CUBLAS_CHECK(api.set_stream(h, stream()));
    it = handles.emplace(dev, h).first;
  }
  return it->second;
}

/// Throws unless every defined tensor is on `dev`.
template <class T>
void check_device(const char* op, Device dev, std::initializer_list<const Tensor<T>*> ts) {
  for (const Tensor<T>* t : ts)
    DG_CHECK(!t->defined() || t->device() == dev, op, ": expected all tensors on ", dev.str(), ", got one on ",
             t->device().str());
}

/// A new contiguous tensor on `dev`.
template <class T>
Tensor<T> empty(const Shape& shape, Device dev) { return Tensor<T>::empty(shape, dev); }

/// Up to kMaxDims dims of shape + strides, passed to kernels by value: maps a linear
/// (row-major) index to the element offsets of K tensors that share the shape.
constexpr int kMaxDims = 8;
template <int K>
struct Indexer {
  int ndim = 0;
  int64_t size[kMaxDims];
  int64_t stride[K][kMaxDims];
  __host__ __device__ void offsets(int64_t i, int64_t* off) const { offsets_as<int64_t>(i, off); }
  /// offsets() in index type I: int where fits_int (32-bit division is several times cheaper).
  template <class I>
  __host__ __device__ void offsets_as(I i, I* off) const {
    for (int k = 0; k < K; ++k) off[k] = 0;
    for (int d = ndim - 1; d >= 1; --d) {  // inner dims: one division each
      const I sz = I(size[d]), q = i / sz, r = i - q * sz;
      for (int k = 0; k < K; ++k) off[k] += r * I(stride[k][d]);
      i = q;
    }
    if (ndim > 0)  // the outermost dim needs none (i < size[0]): a contiguous tensor costs no division
      for (int k = 0; k < K; ++k) off[k] += i * I(stride[k][0]);
  }
  /// True when n elements (a grid-stride loop over them) and every offset stay below 2^30, so
  /// that offsets_as<int> cannot overflow.
  bool fits_int(int64_t n) const {
    const int64_t lim = int64_t(1) << 30;
    if (n >= lim) return false;
    for (int k = 0; k < K; ++k) {
      int64_t m = 0;
      for (int d = 0; d < ndim; ++d) m += (size[d] - 1) * (stride[k][d] < 0 ? -stride[k][d] : stride[k][d]);
      if (m >= lim) return false;
    }
    return true;
  }
};

/// Runs f(I{}) with I = int when ix.fits_int(n), else with I = int64_t.
template <int K, class F>
void with_indexer_type(const Indexer<K>& ix, int64_t n, F&& f) {
  if (ix.fits_int(n)) f(int{});
  else f(int64_t{});
}

/// Builds an Indexer for `shape`, reading tensor k through strides[k] (0 along broadcast dims).
/// Dims of size 1 are dropped and neighbouring dims that are contiguous in every tensor merged,
/// so most calls index 1 to 3 dims.
template <int K>
Indexer<K> make_indexer(const Shape& shape, const std::array<Shape, K>& strides, const char* op) {
  Shape s;
  std::array<Shape, K> st;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    bool merge = !s.empty();
    for (int k = 0; k < K && merge; ++k) merge = st[k].back() == strides[k][d] * shape[d];
    if (merge) {
      s.back() *= shape[d];
      for (int k = 0; k < K; ++k) st[k].back() = strides[k][d];
    } else {
      s.push_back(shape[d]);
      for (int k = 0; k < K; ++k) st[k].push_back(strides[k][d]);
    }
  }
  DG_CHECK(static_cast<int>(s.size()) <= kMaxDims, op, ": CUDA kernels index at most ", kMaxDims,
           " non-trivial dims, got shape ", shape_str(shape));
  Indexer<K> ix;
  ix.ndim = static_cast<int>(s.size());
  for (int d = 0; d < ix.ndim; ++d) {
    ix.size[d] = s[d];
    for (int k = 0; k < K; ++k) ix.stride[k][d] = st[k][d];
  }
  return ix;
}

/// Strides that read t as if expanded to `target` (0 on broadcast dims, leading dims added).
template <class T>
Shape broadcast_strides(const Tensor<T>& t, const Shape& target) { return Tensor<T>::broadcast_strides(t, target); }

namespace guard_detail {
template <class A> struct is_tensor : std::false_type {};
template <class U> struct is_tensor<Tensor<U>> : std::true_type {};
template <class A> struct is_tensor_list : std::false_type {};
template <class U> struct is_tensor_list<std::vector<Tensor<U>>> : std::true_type {};

/// Sets index to a's CUDA device index when a is (or holds) a defined CUDA tensor and none was found yet.
template <class A>
void find_cuda(const A& a, int& index) {
  if constexpr (is_tensor<A>::value) {
    if (index < 0 && a.defined() && a.device().is_cuda()) index = a.device().index;
  } else if constexpr (is_tensor_list<A>::value) {
    for (const auto& t : a) find_cuda(t, index);
  }
}

/// A kernel-table entry that first makes its tensors' GPU the current device, then calls f.
template <class F, F f> struct OnDevice;
template <class R, class... Args, R (*f)(Args...)>
struct OnDevice<R (*)(Args...), f> {
  static R call(Args... args) {
    int index = -1;
    (find_cuda(args, index), ...);
    if (index >= 0) activate(Device::cuda(index));
    return f(args...);
  }
};
}  // namespace guard_detail

/// The kernel-table entry for fn: runs fn on the GPU its tensors live on (cuda:N, any N).
#define DG_CUDA_ON_DEVICE(fn) (&::dg::cuda::guard_detail::OnDevice<decltype(&fn), &fn>::call)

}  // namespace dg::cuda
