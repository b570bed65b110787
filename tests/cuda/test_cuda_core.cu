// The CUDA backend through the public ops: every op RDNet uses, run on the GPU and on the CPU
// from the same inputs, outputs and gradients compared; device moves and copies; AdamW, gradient
// clipping, SGD; a small RDNet training step (drop path on) on both devices, and the same model
// with bf16 products on the GPU. Each test skips with
// "no CUDA device" where there is no GPU; the last tests check the error a GPU-less machine gives
// and that cuBLAS is loaded on first use (which needs no GPU).
#include <catch2/catch.hpp>
#include <dlfcn.h>

#include <filesystem>
#include <functional>

#include <densegrad/cuda.cuh>
#include <densegrad/densegrad.hpp>

#include "rdnet/rdnet.hpp"

namespace test_cuda_core {  // one namespace per file: test_cuda compiles them as one unit

using dg::Device;
using dg::Tensor;

#define DG_REQUIRE_GPU()                     \
  if (dg::cuda::device_count() == 0) {       \
    WARN("no CUDA device: skipped");         \
    return;                                  \
  }

namespace {

const Device kGpu = Device::cuda(0), kCpu = Device::cpu();

/// max |gpu - cpu| <= tol * max(1, max |cpu|), element by element over one shape.
template <class T>
void require_close(const Tensor<T>& cpu, const Tensor<T>& gpu, double tol, const std::string& what) {
  INFO(what);
  REQUIRE(gpu.device().is_cuda());
  REQUIRE(cpu.shape() == gpu.shape());
  const std::vector<T> a = cpu.to_vector(), b = gpu.to_vector();
  double scale = 1.0, worst = 0.0;
  for (T v : a) scale = std::max(scale, std::abs(double(v)));
  for (size_t i = 0; i < a.size(); ++i) {
    const double da = double(a[i]), db = double(b[i]);
    if (std::isnan(da) || std::isnan(db)) {
      REQUIRE(std::isnan(da) == std::isnan(db));
      continue;
    }
    worst = std::max(worst, std::abs(da - db));
  }
  INFO("max abs diff " << worst << ", scale " << scale);
  REQUIRE(worst <= tol * scale);
}

/// Runs f on copies of `inputs` on the CPU and on the GPU, backpropagates one random projection
/// of the output on both, and compares the outputs and every input gradient.
template <class T>
void check_op(const std::string& name, const std::function<Tensor<T>(const std::vector<Tensor<T>>&)>& f,
              const std::vector<Tensor<T>>& inputs, double tol) {
  std::vector<Tensor<T>> on_cpu, on_gpu;
  for (const auto& x : inputs) {
    on_cpu.push_back(x.clone().detach().requires_grad_());
    on_gpu.push_back(x.to(kGpu).requires_grad_());
  }
  Tensor<T> y_cpu = f(on_cpu), y_gpu = f(on_gpu);
  require_close(y_cpu, y_gpu, tol, name + ": output");
  dg::Generator gen(11);
  Tensor<T> w = dg::randn<T>(y_cpu.shape(), gen);
  (y_cpu * w).sum().backward();
  (y_gpu * w.to(kGpu)).sum().backward();
  for (size_t i = 0; i < inputs.size(); ++i) {
    REQUIRE(on_cpu[i].grad().defined() == on_gpu[i].grad().defined());
    if (on_cpu[i].grad().defined())
      require_close(on_cpu[i].grad(), on_gpu[i].grad(), tol, name + ": gradient of input " + std::to_string(i));
  }
}

template <class T>
Tensor<T> rnd(const dg::Shape& s, uint64_t seed, double lo = -2.0, double hi = 2.0) {
  dg::Generator gen(seed);
  return dg::rand<T>(s, gen, lo, hi);
}

}  // namespace

TEST_CASE("cuda: tensors move to the device and back (fill, copy, views, item)") {
  DG_REQUIRE_GPU();
  Tensor<float> x = rnd<float>({3, 4, 5}, 1);
  Tensor<float> g = x.to(kGpu);
  REQUIRE(g.device() == kGpu);
  REQUIRE(g.to(kCpu).to_vector() == x.to_vector());
  // a transposed (strided) view made contiguous on the device
  Tensor<float> t = dg::contiguous(g.transpose(0, 2));
  REQUIRE(t.is_contiguous());
  REQUIRE(t.to_vector() == dg::contiguous(x.transpose(0, 2)).to_vector());
  // fill_ and copy_ into a strided slice on the device
  Tensor<float> z = dg::zeros<float>({4, 6}, kGpu);
  {
    dg::NoGradGuard ng;
    z.slice(1, 1, 6, 2).fill_(2.5f);
    z.narrow(0, 3, 1).copy_(dg::ones<float>({1, 6}));  // from the host, broadcast-free
  }
  std::vector<float> zv = z.to_vector();
  REQUIRE(zv[1] == 2.5f);
  REQUIRE(zv[2] == 0.0f);
  REQUIRE(zv[3 * 6 + 2] == 1.0f);
  REQUIRE(g.at({2, 3, 4}) == x.at({2, 3, 4}));
  REQUIRE(dg::full<double>({}, 4.25, kGpu).item() == 4.25);
  // dtype conversion of a device tensor stays on the device
  Tensor<double> d = dg::to_dtype<double>(g);
  REQUIRE(d.device() == kGpu);
  REQUIRE(double(d.at({1, 1, 1})) == double(x.at({1, 1, 1})));
}

TEST_CASE("cuda: elementwise ops with broadcasting match the CPU, outputs and gradients") {
  DG_REQUIRE_GPU();
  using V = std::vector<Tensor<float>>;
  Tensor<float> a = rnd<float>({3, 1, 5}, 2), b = rnd<float>({4, 5}, 3), pos = rnd<float>({3, 4, 5}, 4, 0.2, 3.0);
  check_op<float>("add", [](const V& v) { return v[0] + v[1]; }, {a, b}, 1e-6);
  check_op<float>("sub", [](const V& v) { return v[0] - v[1]; }, {a, b}, 1e-6);
  check_op<float>("mul", [](const V& v) { return v[0] * v[1]; }, {a, b}, 1e-6);
  check_op<float>("div", [](const V& v) { return v[0] / v[1]; }, {a, pos}, 1e-5);
  check_op<float>("scalar ops", [](const V& v) { return (v[0] * 3.0 + 1.5) / 2.0 - v[0]; }, {a}, 1e-6);
  check_op<float>("exp", [](const V& v) { return dg::exp(v[0]); }, {a}, 1e-6);
  check_op<float>("log", [](const V& v) { return dg::log(v[0]); }, {pos}, 1e-6);
  check_op<float>("sqrt", [](const V& v) { return dg::sqrt(v[0]); }, {pos}, 1e-6);
  check_op<float>("pow scalar", [](const V& v) { return dg::pow(v[0], 2.5); }, {pos}, 1e-5);
  check_op<float>("pow tensor", [](const V& v) { return dg::pow(v[0], v[1]); }, {pos, a}, 1e-5);
  check_op<float>("abs", [](const V& v) { return dg::abs(v[0]); }, {a}, 1e-6);
  check_op<float>("clamp", [](const V& v) { return dg::clamp(v[0], -0.5, 1.0); }, {a}, 1e-6);
  Tensor<float> wide = rnd<float>({2, 3, 7, 5}, 5, -8.0, 8.0);
  check_op<float>("gelu", [](const V& v) { return dg::gelu(v[0]); }, {wide}, 1e-6);
  // tanhf on the GPU is within 2 ulp, not correctly rounded: the tanh form's gradient gets 5e-6
  check_op<float>("gelu tanh", [](const V& v) { return dg::gelu(v[0], true); }, {wide}, 5e-6);
  check_op<float>("hard_sigmoid", [](const V& v) { return dg::hard_sigmoid(v[0]); }, {wide}, 1e-6);
  check_op<float>("relu", [](const V& v) { return dg::relu(v[0]); }, {wide}, 1e-6);
  check_op<float>("relu6", [](const V& v) { return dg::relu6(v[0]); }, {wide}, 1e-6);
  check_op<float>("sigmoid", [](const V& v) { return dg::sigmoid(v[0]); }, {wide}, 1e-6);
  // a strided (transposed) input goes through the indexer
  check_op<float>("mul of a transposed view", [](const V& v) { return v[0].transpose(0, 1) * v[1]; },
                  {rnd<float>({5, 4}, 6), rnd<float>({4, 5}, 7)}, 1e-6);
  using VD = std::vector<Tensor<double>>;
  check_op<double>("double gelu * x", [](const VD& v) { return dg::gelu(v[0]) * v[1]; },
                   {rnd<double>({3, 5}, 8), rnd<double>({3, 5}, 9)}, 1e-12);
}

TEST_CASE("cuda: the elementwise kernels' 32-bit indices equal the 64-bit ones, and are used only where offsets fit") {
  // host-side: runs without a GPU too
  struct Layout {
    dg::Shape shape;
    std::array<dg::Shape, 2> strides;
  };
  const Layout layouts[] = {
      {{64, 64, 56, 56}, {dg::Shape{200704, 3136, 56, 1}, dg::Shape{0, 1, 0, 0}}},          // x * gamma (1, C, 1, 1)
      {{8, 64, 7, 9}, {dg::Shape{64 * 63, 63, 9, 1}, dg::Shape{192 * 63, 63, 9, 1}}},       // a copy into a stage's slice
      {{5, 3, 4, 6}, {dg::Shape{1, 5, 15, 60}, dg::Shape{72, 0, 6, 1}}},                   // transposed, broadcast
      {{7, 1, 9}, {dg::Shape{9, 9, 1}, dg::Shape{0, 0, 1}}},
  };
  for (const Layout& l : layouts) {
    INFO(dg::shape_str(l.shape));
    const auto ix = dg::cuda::make_indexer<2>(l.shape, l.strides, "test");
    const int64_t n = dg::shape_numel(l.shape);
    REQUIRE(ix.fits_int(n));
    int64_t checked = 0, differing = 0;
    for (int64_t i = 0; i < n; i += 1 + i % 7, ++checked) {
      int64_t o64[2];
      int o32[2];
      ix.offsets(i, o64);
      ix.offsets_as<int>(int(i), o32);
      differing += o32[0] != o64[0] || o32[1] != o64[1];
    }
    CHECK(checked > n / 5);
    CHECK(differing == 0);
  }
  // offsets of 2^30 or more (or as many elements) take the 64-bit kernels
  const auto big = dg::cuda::make_indexer<2>({2, 3}, {dg::Shape{int64_t(1) << 30, 1}, dg::Shape{3, 1}}, "test");
  CHECK_FALSE(big.fits_int(6));
  const auto many = dg::cuda::make_indexer<2>({int64_t(1) << 30}, {dg::Shape{1}, dg::Shape{1}}, "test");
  CHECK_FALSE(many.fits_int(int64_t(1) << 30));
  CHECK(dg::cuda::make_indexer<2>({(int64_t(1) << 30) - 1}, {dg::Shape{1}, dg::Shape{1}}, "test").fits_int((int64_t(1) << 30) - 1));
}

TEST_CASE("cuda: reductions, views, concat and split match the CPU") {
  DG_REQUIRE_GPU();
  using V = std::vector<Tensor<float>>;
  Tensor<float> x = rnd<float>({3, 4, 5, 6}, 10);
  check_op<float>("sum all", [](const V& v) { return v[0].sum(); }, {x}, 1e-5);
  check_op<float>("sum (0, 2, 3)", [](const V& v) { return v[0].sum({0, 2, 3}); }, {x}, 1e-5);
  check_op<float>("mean (2, 3) keepdim", [](const V& v) { return v[0].mean({2, 3}, true); }, {x}, 1e-6);
  check_op<float>("sum of a permuted view", [](const V& v) { return v[0].permute({2, 0, 3, 1}).sum({1, 3}); }, {x},
                  1e-5);
  check_op<float>("max over dim 1", [](const V& v) { return v[0].max({1}); }, {x}, 1e-6);
  // reduced dims ending in a dense run of >= 128 elements: rows of runs split over blocks
  Tensor<float> big = rnd<float>({37, 3, 16, 17}, 13);
  check_op<float>("sum (0, 2, 3) in runs", [](const V& v) { return v[0].sum({0, 2, 3}); }, {big}, 1e-5);
  check_op<float>("max (0, 2, 3) in runs", [](const V& v) { return v[0].max({0, 2, 3}); }, {big}, 1e-6);
  check_op<float>("sum (0, 2, 3) of a channel window", [](const V& v) { return v[0].narrow(1, 1, 2).sum({0, 2, 3}); },
                  {big}, 1e-5);
  check_op<float>("mean (1, 2, 3) in runs", [](const V& v) { return v[0].mean({1, 2, 3}); }, {big}, 1e-6);
  check_op<float>("concat dim 1", [](const V& v) { return dg::concat(std::vector<Tensor<float>>{v[0], v[1], v[0]}, 1); },
                  {x, rnd<float>({3, 2, 5, 6}, 11)}, 1e-6);
  check_op<float>("concat of views dim 3",
                  [](const V& v) { return dg::concat(std::vector<Tensor<float>>{v[0].transpose(2, 3), v[1]}, 3); },
                  {x, rnd<float>({3, 4, 6, 2}, 12)}, 1e-6);
  check_op<float>("split", [](const V& v) { return dg::split(v[0], {1, 3}, 1)[1] * 2.0; }, {x}, 1e-6);
  check_op<float>("reshape and expand", [](const V& v) { return v[0].reshape({12, 30}).unsqueeze(0).expand({2, 12, 30}); },
                  {x}, 1e-6);
}

TEST_CASE("cuda: matmul, linear, conv2d, norms, softmax, pooling and losses match the CPU") {
  DG_REQUIRE_GPU();
  using V = std::vector<Tensor<float>>;
  check_op<float>("matmul batched broadcast", [](const V& v) { return dg::matmul(v[0], v[1]); },
                  {rnd<float>({2, 3, 5, 7}, 20), rnd<float>({7, 4}, 21)}, 1e-5);
  check_op<float>("linear", [](const V& v) { return dg::linear(v[0], v[1], v[2]); },
                  {rnd<float>({6, 9}, 22), rnd<float>({5, 9}, 23), rnd<float>({5}, 24)}, 1e-5);
  Tensor<float> x = rnd<float>({2, 6, 9, 11}, 25);
  check_op<float>("conv2d depthwise 7x7", [](const V& v) { return dg::conv2d(v[0], v[1], v[2], 1, 3, 1, 6); },
                  {x, rnd<float>({6, 1, 7, 7}, 26), rnd<float>({6}, 27)}, 1e-5);
  check_op<float>("conv2d 1x1", [](const V& v) { return dg::conv2d(v[0], v[1], v[2]); },
                  {x, rnd<float>({10, 6, 1, 1}, 28), rnd<float>({10}, 29)}, 1e-5);
  check_op<float>("conv2d 2x2 stride 2", [](const V& v) { return dg::conv2d(v[0], v[1], v[2], 2); },
                  {x, rnd<float>({4, 6, 2, 2}, 30), rnd<float>({4}, 31)}, 1e-5);
  check_op<float>("conv2d 3x3 pad 1 no bias", [](const V& v) { return dg::conv2d(v[0], v[1], Tensor<float>(), 1, 1); },
                  {x, rnd<float>({5, 6, 3, 3}, 32)}, 1e-5);
  check_op<float>("layer_norm2d", [](const V& v) { return dg::layer_norm2d(v[0], v[1], v[2]); },
                  {x, rnd<float>({6}, 33), rnd<float>({6}, 34)}, 1e-5);
  // the fused ops RDNet's blocks and transitions run (ops/fused.hpp)
  check_op<float>("gelu_conv2d 1x1", [](const V& v) { return dg::gelu_conv2d(v[0], v[1], v[2]); },
                  {x, rnd<float>({10, 6, 1, 1}, 40), rnd<float>({10}, 41)}, 1e-5);
  check_op<float>("layer_norm2d_conv2d 1x1",
                  [](const V& v) { return dg::layer_norm2d_conv2d(v[0], v[1], v[2], 1e-6, v[3], v[4]); },
                  {x, rnd<float>({6}, 42), rnd<float>({6}, 43), rnd<float>({10, 6, 1, 1}, 44), rnd<float>({10}, 45)},
                  1e-5);
  check_op<float>("layer_norm2d_conv2d 2x2 stride 2, no conv bias",
                  [](const V& v) { return dg::layer_norm2d_conv2d(v[0], v[1], v[2], 1e-6, v[3], {}, 2); },
                  {x, rnd<float>({6}, 46), rnd<float>({6}, 47), rnd<float>({4, 6, 2, 2}, 48)}, 1e-5);
  // a dense stage's prefix: the first 5 of 9 channels, a view with the buffer's batch stride
  check_op<float>("layer_norm2d_conv2d on a prefix view",
                  [](const V& v) {
                    return dg::layer_norm2d_conv2d(v[0].narrow(1, 0, 5), v[1], v[2], 1e-6, v[3], v[4]);
                  },
                  {rnd<float>({3, 9, 7, 7}, 49), rnd<float>({5}, 50), rnd<float>({5}, 51),
                   rnd<float>({8, 5, 1, 1}, 52), rnd<float>({8}, 53)},
                  1e-5);
  check_op<float>("depthwise_layer_norm2d_conv2d 7x7 pad 3 -> 1x1",
                  [](const V& v) {
                    return dg::depthwise_layer_norm2d_conv2d(v[0], v[1], v[2], 3, v[3], v[4], 1e-6, v[5], v[6]);
                  },
                  {x, rnd<float>({6, 1, 7, 7}, 54, -0.3, 0.3), rnd<float>({6}, 55), rnd<float>({6}, 56),
                   rnd<float>({6}, 57), rnd<float>({10, 6, 1, 1}, 58), rnd<float>({10}, 59)},
                  1e-5);
  check_op<float>("depthwise_layer_norm2d_conv2d on a prefix view, no biases",
                  [](const V& v) {
                    return dg::depthwise_layer_norm2d_conv2d(v[0].narrow(1, 0, 5), v[1], {}, 3, v[2], v[3], 1e-6, v[4]);
                  },
                  {rnd<float>({3, 9, 12, 10}, 60), rnd<float>({5, 1, 7, 7}, 61, -0.3, 0.3), rnd<float>({5}, 62),
                   rnd<float>({5}, 63), rnd<float>({8, 5, 1, 1}, 64)},
                  1e-5);
  check_op<float>("layer_norm last dim", [](const V& v) { return dg::layer_norm(v[0], {11}, v[1], v[2]); },
                  {x, rnd<float>({11}, 35), rnd<float>({11}, 36)}, 1e-5);
  check_op<float>("softmax dim 1", [](const V& v) { return dg::softmax(v[0], 1); }, {x}, 1e-6);
  check_op<float>("log_softmax last dim", [](const V& v) { return dg::log_softmax(v[0], -1); }, {x}, 1e-6);
  check_op<float>("adaptive_avg_pool2d 1x1", [](const V& v) { return dg::adaptive_avg_pool2d(v[0], 1); }, {x}, 1e-6);
  check_op<float>("adaptive_avg_pool2d 4x3", [](const V& v) { return dg::adaptive_avg_pool2d(v[0], 4, 3); }, {x},
                  1e-6);
  Tensor<int64_t> labels = dg::tensor<int64_t>({3, 0, 9, 9, 1, 4}).to(kGpu);
  check_op<float>("cross_entropy labels + smoothing",
                  [&](const V& v) {
                    return dg::cross_entropy(v[0], v[0].device().is_cuda() ? labels : labels.to(kCpu), 0.1);
                  },
                  {rnd<float>({6, 10}, 37)}, 1e-6);
  check_op<float>("cross_entropy soft targets", [](const V& v) { return dg::cross_entropy(v[0], v[1], 0.1); },
                  {rnd<float>({6, 10}, 38), dg::softmax(rnd<float>({6, 10}, 39), 1)}, 1e-6);
  // dropout and drop_path draw their masks on the host: the same seed gives the same mask on both
  check_op<float>("dropout",
                  [](const V& v) {
                    dg::Generator gen(5);
                    return dg::dropout(v[0], 0.3, true, gen);
                  },
                  {x}, 1e-6);
  check_op<float>("drop_path",
                  [](const V& v) {
                    dg::Generator gen(6);
                    return dg::drop_path(v[0], 0.5, true, gen);
                  },
                  {x}, 1e-6);
}

TEST_CASE("cuda: ops refuse tensors on different devices with a clear error") {
  DG_REQUIRE_GPU();
  Tensor<float> a = rnd<float>({2, 3}, 40), b = a.to(kGpu);
  REQUIRE_THROWS_WITH(a + b, Catch::Contains("expected all tensors on one device"));
  REQUIRE_THROWS_WITH(dg::conv2d(rnd<float>({1, 2, 4, 4}, 41).to(kGpu), rnd<float>({2, 2, 1, 1}, 42)),
                      Catch::Contains("one device"));
  REQUIRE_THROWS_WITH(dg::layer_norm2d(rnd<float>({1, 2, 4, 4}, 43), rnd<float>({2}, 44).to(kGpu)),
                      Catch::Contains("layer_norm2d: weight is on cuda:0, the input on cpu"));
}

TEST_CASE("cuda: tensors on cuda:N live and run on GPU N, and a GPU that does not exist is refused by name") {
  DG_REQUIRE_GPU();
  const int n = dg::cuda::device_count();
  REQUIRE_THROWS_WITH(dg::zeros<float>({3}, Device::cuda(n)),
                      Catch::Contains("cuda:" + std::to_string(n) + ": no such CUDA device (this machine has"));
  REQUIRE_THROWS_WITH(rnd<float>({2}, 45).to(Device::cuda(n)), Catch::Contains("no such CUDA device"));
  const Tensor<float> x = rnd<float>({2, 3, 6, 5}, 46), w = rnd<float>({4, 3, 3, 3}, 47);
  const Tensor<float> want = dg::conv2d(x, w);
  for (int i = n - 1; i >= 0; --i) {  // the last GPU first: each op must switch to its tensors' GPU
    INFO("cuda:" << i);
    const Device d = Device::cuda(i);
    Tensor<float> xd = x.to(d).requires_grad_();
    Tensor<float> y = dg::conv2d(xd, w.to(d));
    REQUIRE(y.device() == d);
    cudaPointerAttributes attr{};
    REQUIRE(cudaPointerGetAttributes(&attr, y.data()) == cudaSuccess);
    REQUIRE(attr.device == i);
    require_close(want, y, 1e-5, "conv2d on cuda:" + std::to_string(i));
    y.sum().backward();
    REQUIRE(xd.grad().device() == d);
  }
}

TEST_CASE("cuda: AdamW steps, gradient clipping and the finite check match the CPU") {
  DG_REQUIRE_GPU();
  dg::Generator gen(50);
  std::vector<Tensor<float>> cpu_params{dg::randn<float>({7, 5}, gen), dg::randn<float>({5}, gen)};
  std::vector<Tensor<float>> gpu_params;
  for (auto& p : cpu_params) {
    p.requires_grad_();
    gpu_params.push_back(p.to(kGpu).detach().requires_grad_());
  }
  auto opts = dg::optim::AdamWOptions().lr(1e-2).weight_decay(0.05);
  dg::optim::AdamW<float> cpu_opt(cpu_params, opts), gpu_opt(gpu_params, opts);
  Tensor<float> x = dg::randn<float>({4, 5}, gen), xg = x.to(kGpu);
  for (int step = 0; step < 3; ++step) {
    for (auto [params, in, opt] : {std::tuple{&cpu_params, &x, &cpu_opt}, std::tuple{&gpu_params, &xg, &gpu_opt}}) {
      Tensor<float> loss =
          dg::pow(dg::linear(*in, (*params)[0], Tensor<float>()) + (*params)[1].narrow(0, 0, 1), 2.0).mean();
      loss.backward();
      const double norm = dg::optim::clip_grad_norm_(*params, 0.5);
      CHECK(norm > 0);
      REQUIRE(dg::optim::grads_finite(*params));
      opt->step();
      opt->zero_grad();
    }
  }
  for (size_t i = 0; i < cpu_params.size(); ++i) require_close(cpu_params[i], gpu_params[i], 1e-6, "parameter");
  // the optimizer state lives on the parameters' device and round-trips through the host
  auto sd = gpu_opt.state_dict();
  REQUIRE(sd.at("state.0.0.exp_avg").device() == kGpu);
  dg::optim::AdamW<float> again(gpu_params, opts);
  again.load_state_dict(sd);
  REQUIRE(again.state_dict().at("state.0.0.exp_avg_sq").to_vector() == sd.at("state.0.0.exp_avg_sq").to_vector());
}

TEST_CASE("cuda: SGD steps (momentum, dampening, Nesterov, weight decay) match the CPU") {
  DG_REQUIRE_GPU();
  const std::vector<dg::optim::SGDOptions> options{
      dg::optim::SGDOptions().lr(0.1),
      dg::optim::SGDOptions().lr(0.05).momentum(0.9).nesterov(true).weight_decay(1e-2),
      dg::optim::SGDOptions().lr(0.05).momentum(0.8).dampening(0.3).weight_decay(0.05)};
  for (size_t o = 0; o < options.size(); ++o) {
    INFO("options " << o);
    dg::Generator gen(70 + o);
    std::vector<Tensor<float>> cpu_params{dg::randn<float>({6, 5}, gen), dg::randn<float>({6}, gen)};
    std::vector<Tensor<float>> gpu_params;
    for (auto& p : cpu_params) {
      p.requires_grad_();
      gpu_params.push_back(p.to(kGpu).detach().requires_grad_());
    }
    dg::optim::SGD<float> cpu_opt(cpu_params, options[o]), gpu_opt(gpu_params, options[o]);
    Tensor<float> x = dg::randn<float>({4, 5}, gen), xg = x.to(kGpu);
    for (int step = 0; step < 3; ++step) {
      for (auto [params, in, opt] : {std::tuple{&cpu_params, &x, &cpu_opt}, std::tuple{&gpu_params, &xg, &gpu_opt}}) {
        dg::pow(dg::linear(*in, (*params)[0], (*params)[1]), 2.0).mean().backward();
        opt->step();
        opt->zero_grad();
      }
    }
    for (size_t i = 0; i < cpu_params.size(); ++i) require_close(cpu_params[i], gpu_params[i], 1e-6, "parameter");
    if (options[o].momentum() != 0) {
      auto sd = gpu_opt.state_dict();
      REQUIRE(sd.at("state.0.0.momentum_buffer").device() == kGpu);
      require_close(cpu_opt.state_dict().at("state.0.0.momentum_buffer"), sd.at("state.0.0.momentum_buffer"), 1e-6,
                    "momentum buffer");
    }
  }
}

/// A small RDNet with every block kind (drop path on), small enough for exact CPU comparisons.
rdnet::RDNetConfig small_config() {
  rdnet::RDNetConfig c;
  c.in_chans = 3;
  c.num_classes = 7;
  c.growth_rates = {8, 16, 16};
  c.num_blocks_list = {2, 2, 1};
  c.block_type = {"Block", "BlockESE", "BlockESE"};
  c.is_downsample_block = {false, true, false};
  c.num_init_features = 16;
  c.patch_size = 4;
  c.drop_path_rate = 0.2;
  return c;
}

/// Two small RDNets with the same random weights (layer scale far from its 1e-6 init), one on
/// the CPU and one moved to the GPU.
struct TwinModels {
  dg::Generator init;
  rdnet::RDNet<float> cpu, gpu;
  TwinModels(uint64_t init_seed, uint64_t weight_seed)
      : init(init_seed), cpu(small_config(), init), gpu(small_config(), init) {
    {
      dg::NoGradGuard ng;
      dg::Generator gen(weight_seed);
      auto pa = cpu.parameters(), pb = gpu.parameters();
      for (size_t i = 0; i < pa.size(); ++i) {
        pa[i].copy_(dg::randn<float>(pa[i].shape(), gen, 0.0, 0.3));
        pb[i].copy_(pa[i]);
      }
    }
    gpu.to(kGpu);
  }
};

TEST_CASE("cuda: a small RDNet trains the same on the GPU as on the CPU (logits, loss, grads, AdamW)") {
  DG_REQUIRE_GPU();
  TwinModels twins(60, 61);
  rdnet::RDNet<float>& cpu_model = twins.cpu;
  rdnet::RDNet<float>& gpu_model = twins.gpu;
  auto opts = dg::optim::AdamWOptions().lr(1e-3).weight_decay(0.05);
  dg::optim::AdamW<float> cpu_opt(dg::optim::timm_param_groups(cpu_model, 0.05), opts);
  dg::optim::AdamW<float> gpu_opt(dg::optim::timm_param_groups(gpu_model, 0.05), opts);
  dg::Generator data(62);
  Tensor<float> x = dg::randn<float>({4, 3, 32, 32}, data);
  Tensor<int64_t> y = dg::tensor<int64_t>({0, 3, 6, 2});
  for (int step = 0; step < 2; ++step) {
    dg::manual_seed(100 + step);  // drop path draws from the default generator: same masks on both
    Tensor<float> lc = cpu_model.forward(x);
    dg::manual_seed(100 + step);
    Tensor<float> lg = gpu_model.forward(x.to(kGpu));
    require_close(lc, lg, 1e-4, "logits at step " + std::to_string(step));
    Tensor<float> loss_c = dg::cross_entropy(lc, y, 0.1), loss_g = dg::cross_entropy(lg, y.to(kGpu), 0.1);
    REQUIRE(loss_g.device() == kGpu);
    REQUIRE(std::abs(loss_c.item() - loss_g.item()) <= 1e-5 * std::max(1.0f, std::abs(loss_c.item())));
    loss_c.backward();
    loss_g.backward();
    auto nc = cpu_model.named_parameters(), ng = gpu_model.named_parameters();
    for (size_t i = 0; i < nc.size(); ++i) require_close(nc[i].second.grad(), ng[i].second.grad(), 1e-4, nc[i].first);
    cpu_opt.step();
    gpu_opt.step();
    cpu_opt.zero_grad();
    gpu_opt.zero_grad();
  }
  auto pc = cpu_model.parameters(), pg = gpu_model.parameters();
  for (size_t i = 0; i < pc.size(); ++i) require_close(pc[i], pg[i], 1e-4, "parameter after 2 AdamW steps");
  // and the model comes back to the host with its state dict
  gpu_model.to(kCpu);
  REQUIRE(gpu_model.parameters()[0].device() == kCpu);
}

TEST_CASE("cuda: bf16 products in a small RDNet stay close to fp32 (logits, grads) and train") {
  DG_REQUIRE_GPU();
  TwinModels twins(63, 64);
  rdnet::RDNet<float>& cpu_model = twins.cpu;
  rdnet::RDNet<float>& gpu_model = twins.gpu;
  dg::Generator data(65);
  const Tensor<float> x = dg::randn<float>({4, 3, 32, 32}, data);
  const Tensor<int64_t> y = dg::tensor<int64_t>({1, 4, 6, 0});
  dg::manual_seed(7);
  const Tensor<float> l32 = gpu_model.forward(x.to(kGpu)).detach();
  dg::manual_seed(7);
  Tensor<float> lc = cpu_model.forward(x);
  Tensor<float> lg;
  {
    dg::MatmulPrecisionGuard bf16(dg::MatmulPrecision::bf16);
    dg::manual_seed(7);
    lg = gpu_model.forward(x.to(kGpu));
  }
  // the products were rounded (the logits moved), and by about bf16's 2^-9 relative step only
  const std::vector<float> a = l32.to_vector(), b = lg.detach().to_vector();
  double moved = 0;
  for (size_t i = 0; i < a.size(); ++i) moved = std::max(moved, std::abs(double(a[i]) - double(b[i])));
  CHECK(moved > 0);
  require_close(lc, lg, 3e-2, "bf16 logits against fp32 on the CPU");
  // backward runs outside the guard and follows the precision of the forward
  dg::cross_entropy(lc, y, 0.1).backward();
  dg::cross_entropy(lg, y.to(kGpu), 0.1).backward();
  auto nc = cpu_model.named_parameters(), ng = gpu_model.named_parameters();
  for (size_t i = 0; i < nc.size(); ++i) require_close(nc[i].second.grad(), ng[i].second.grad(), 5e-2, nc[i].first);
  dg::optim::AdamW<float> opt(dg::optim::timm_param_groups(gpu_model, 0.05), dg::optim::AdamWOptions().lr(1e-3));
  opt.step();
  for (auto& p : gpu_model.parameters()) REQUIRE(p.device() == kGpu);
  REQUIRE(dg::optim::grads_finite(gpu_model.parameters()));
}

TEST_CASE("cuda: without a GPU, moving a tensor to cuda fails with a clear error") {
  if (dg::cuda::device_count() > 0) return;  // the GPU tests above cover machines with one
  Tensor<float> x = dg::ones<float>({2, 2});
  REQUIRE_THROWS_WITH(x.to(kGpu), Catch::Contains("no CUDA device available"));
  REQUIRE_THROWS_WITH(dg::zeros<float>({3}, kGpu), Catch::Contains("no CUDA device available"));
}

namespace {
/// Whether libcublas is mapped into this process now (RTLD_NOLOAD loads nothing).
bool cublas_mapped() {
  void* h = dlopen(dg::cuda::cublas_soname().c_str(), RTLD_LAZY | RTLD_NOLOAD);
  if (h != nullptr) dlclose(h);
  return h != nullptr;
}
/// Taken during static initialization: after the loader mapped every linked library, before
/// main() and any test ran, so the answer does not depend on which tests ran first.
const bool cublas_mapped_at_start = cublas_mapped();
}  // namespace

TEST_CASE("cuda: cuBLAS is loaded on first use and not when the program starts") {
  CHECK_FALSE(cublas_mapped_at_start);
  const std::string dir = dg::cuda::loaded_cudart_dir();  // where the toolkit's libraries are
  REQUIRE(!dir.empty());
  CHECK(dir.back() == '/');
  CHECK(std::filesystem::exists(dir + dg::cuda::cublas_soname()));
  const dg::cuda::CublasApi& api = dg::cuda::cublas_api();  // loading needs the library, not a GPU
  CHECK(cublas_mapped());
  CHECK(api.create != nullptr);
  CHECK(api.set_stream != nullptr);
  CHECK(api.set_math_mode != nullptr);
  CHECK(api.gemm_strided_batched_ex != nullptr);
  REQUIRE(api.get_status_string != nullptr);
  CHECK_THAT(api.get_status_string(CUBLAS_STATUS_NOT_INITIALIZED), Catch::Contains("not initialized"));
  CHECK(&dg::cuda::cublas_api() == &api);  // loaded once
}

}  // namespace test_cuda_core
