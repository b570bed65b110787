// Devices: Tensor::to(Device), Module::to(Device), and the backend hooks (allocator and
// cross-device copy) a device backend registers. A fake "cuda" backend made of host memory
// exercises the whole path without a GPU.
#include "test_util.hpp"

namespace test_device {

using dg::Device;
using dg::Tensor;

namespace {

struct HostAsDevice final : dg::Allocator {  // pretends host memory is device memory
  void* allocate(size_t n) override { return std::malloc(n ? n : 1); }
  void deallocate(void* p, size_t) override { std::free(p); }
};

void fake_copy(void* dst, Device, const void* src, Device, size_t n) { std::memcpy(dst, src, n); }

/// Installs the fake backend for the scope of a test, then removes it.
struct FakeCuda {
  HostAsDevice alloc;
  FakeCuda() {
    dg::set_allocator(Device::Kind::CUDA, &alloc);
    dg::set_device_copy(Device::Kind::CUDA, &fake_copy);
  }
  ~FakeCuda() {
    dg::set_allocator(Device::Kind::CUDA, nullptr);
    dg::set_device_copy(Device::Kind::CUDA, nullptr);
  }
};

}  // namespace

TEST_CASE("to(device) without a CUDA backend names what is missing") {
  auto x = dg::ones<float>({2, 2});
  CHECK(x.to(Device::cpu()).storage().is_alias_of(x.storage()));  // same device: the same tensor
  REQUIRE_THROWS_WITH(x.to(Device::cuda(0)), Catch::Contains("no allocator for device cuda:0"));
}

TEST_CASE("to(device) round trip through a device backend keeps values and gradients") {
  FakeCuda fake;
  dg::Generator gen(1);
  auto x = dg::randn<double>({3, 4}, gen).requires_grad_();
  auto xt = x.transpose(0, 1);  // non-contiguous source
  auto on_dev = xt.to(Device::cuda(0));
  CHECK(on_dev.device() == Device::cuda(0));
  CHECK(on_dev.is_contiguous());
  auto back = on_dev.to(Device::cpu());
  CHECK(back.device().is_cpu());
  dgtest::require_close(back, xt.contiguous(), 0, 0, "round trip is exact");
  (back * back).sum().backward();  // d/dx sum(x^2) = 2x, through both copies
  dgtest::require_close(x.grad(), x.detach() * 2.0, 1e-15, 0, "gradient through to(device)");
}

TEST_CASE("Module::to moves parameters in place, visible through the layer's own handles") {
  FakeCuda fake;
  dg::nn::Linear<float> lin(3, 2);
  Tensor<float> before = lin.weight.clone();
  lin.to(Device::cuda(0));
  for (auto& p : lin.parameters()) CHECK(p.device() == Device::cuda(0));
  CHECK(lin.weight.device() == Device::cuda(0));  // the layer's member saw the move
  lin.to(Device::cpu());
  CHECK(lin.weight.device().is_cpu());
  CHECK(lin.weight.requires_grad());
  dgtest::require_close(lin.weight, before, 0, 0, "weights survive the trip");
}

TEST_CASE("set_data_ rebinds every handle and refuses while recording a parameter") {
  auto a = dg::zeros<float>({2});
  auto alias = a;
  a.set_data_(dg::ones<float>({3}));
  CHECK(alias.shape() == dg::Shape{3});
  CHECK(alias.at({2}) == 1.0f);
  auto p = dg::zeros<float>({2}).requires_grad_();
  REQUIRE_THROWS_WITH(p.set_data_(dg::ones<float>({2})), Catch::Contains("set_data_: in-place change"));
}

}  // namespace test_device
