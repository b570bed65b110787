// tests/dist/test_nccl.cu: NcclCollective (dist/nccl.hpp) on GPUs, run as `mpiexec -n 2 test_nccl`
// with a GPU per rank: the Reducer's means over NCCL, on device buffers, equal its means over
// MPI on host copies of the same gradients. Built by nvcc wherever CUDA and NCCL are found, so the
// NCCL path always compiles; without a GPU per rank it prints "skipped" and passes.
#include <densegrad/densegrad.hpp>
#include <densegrad/dist/nccl.hpp>

#include <cstdio>
#include <vector>

namespace {
using namespace dg;

/// Two linear layers, 16 -> 32 -> 4.
struct Net : nn::Module<float> {
  explicit Net(Generator& g) {
    l1 = register_module("l1", std::make_shared<nn::Linear<float>>(16, 32, true, g));
    l2 = register_module("l2", std::make_shared<nn::Linear<float>>(32, 4, true, g));
  }
  Tensor<float> forward(const Tensor<float>& x) { return l2->forward(gelu(l1->forward(x))); }
  std::shared_ptr<nn::Linear<float>> l1, l2;
};

/// Every gradient element of m, on the host, in parameter order.
std::vector<float> flat_grads(const Net& m) {
  std::vector<float> r;
  for (const auto& p : m.parameters())
    for (float v : p.grad().to_vector()) r.push_back(v);
  return r;
}

int run() {
  int gpus = 0;
  if (cudaGetDeviceCount(&gpus) != cudaSuccess) {
    gpus = 0;
    (void)cudaGetLastError();
  }
  if (!dist::all_true(gpus >= dist::local_size())) {  // NCCL needs a GPU of its own per rank
    std::printf("test_nccl: skipped: %d GPUs for %d ranks on this host\n", gpus, dist::local_size());
    return 0;
  }
  dist::use_local_gpu();
  const Device cuda = Device::cuda(0);
  Generator g(7), data_gen(20 + static_cast<uint64_t>(dist::rank()));
  Net host(g);
  Net device(g);
  device.load_state_dict(host.state_dict());
  device.to(cuda);
  auto x = randn<float>({8, 16}, data_gen);

  dist::MpiCollective mpi;
  dist::Reducer<float> host_reducer(host, mpi, dist::ReducerOptions().bucket_cap(512));
  sum(pow(host.forward(x), 2.0)).backward();
  host_reducer.finish();

  dist::NcclCollective nccl(cuda);
  dist::Reducer<float> device_reducer(device, nccl, dist::ReducerOptions().bucket_cap(512));
  sum(pow(device.forward(x.to(cuda)), 2.0)).backward();
  device_reducer.finish();

  const std::vector<float> want = flat_grads(host), got = flat_grads(device);
  size_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i)
    bad += !(std::abs(got[i] - want[i]) <= 1e-5f + 1e-4f * std::abs(want[i]));
  std::printf("test_nccl: %d ranks, %lld buckets (%lld started in backward): %zu of %zu gradient elements differ\n",
              dist::world_size(), static_cast<long long>(device_reducer.num_buckets()),
              static_cast<long long>(device_reducer.started_in_backward()), bad, want.size());
  return dist::all_true(bad == 0 && device_reducer.started_in_backward() == device_reducer.num_buckets()) ? 0 : 1;
}
}  // namespace

int main(int argc, char** argv) {
  dg::dist::Environment mpi(argc, argv);
  int rc = 1;
  try {
    rc = run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "test_nccl: error: %s%s\n", dg::dist::rank_tag().c_str(), e.what());
  }
  return mpi.exit(rc);
}
