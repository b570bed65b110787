// tests/cuda/test_cuda_norm.cu: the CUDA layer-norm, softmax, cross-entropy and adaptive-pool
// kernels against the ref kernels on CPU, in float and double, on odd shapes (size-1 channels,
// rows longer than a warp handles, overlapping pool bins). Kernels are reached through a kernel
// table filled by the register_* functions, which tests them too. Skipped without a CUDA device.
#include <catch2/catch.hpp>
#include <densegrad/densegrad.hpp>
#include <densegrad/cuda.cuh>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

namespace test_cuda_norm {  // one namespace per file: test_cuda compiles them as one unit

using namespace dg;

namespace {

/// The kernels of this file's families, registered into a table of our own.
template <class T>
DeviceKernels<T> kernels() {
  DeviceKernels<T> k;
  dg::cuda::register_norm(k);
  dg::cuda::register_softmax(k);
  dg::cuda::register_pool(k);
  return k;
}

template <class T>
Tensor<T> gpu(const Tensor<T>& t) { return t.to(Device::cuda()); }

/// float: 1e-5, double: 1e-12, relative to the largest |expected| element.
template <class T>
double rel_tol() { return std::is_same_v<T, float> ? 1e-5 : 1e-12; }

/// got (a CUDA tensor) equals want (a CPU tensor, any strides) elementwise within
/// rel_tol<T>() * max |want|; reports the worst element.
template <class T>
void require_near(const Tensor<T>& got_dev, const Tensor<T>& want, const std::string& what) {
  INFO(what);
  REQUIRE(got_dev.defined());
  REQUIRE(want.defined());
  REQUIRE(got_dev.device().is_cuda());
  REQUIRE(got_dev.is_contiguous());
  const Tensor<T> got = got_dev.to(Device::cpu());
  REQUIRE(shape_str(got.shape()) == shape_str(want.shape()));
  const auto g = got.to_vector(), w = want.to_vector();
  double scale = 0;
  for (T v : w) scale = std::max(scale, std::abs(double(v)));
  const double bound = rel_tol<T>() * scale;
  double worst = 0;
  size_t worst_i = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    const double e = std::abs(double(g[i]) - double(w[i]));
    if (!(e <= worst)) {  // NaN counts as worst
      worst = std::isnan(e) ? INFINITY : e;
      worst_i = i;
    }
  }
  INFO("worst element " << worst_i << " of " << g.size() << ": " << (g.empty() ? 0.0 : double(g[worst_i]))
                        << " vs expected " << (w.empty() ? 0.0 : double(w[worst_i])) << ", |error| " << worst
                        << " > bound " << bound);
  REQUIRE(worst <= bound);
}

/// Layer-norm gradients, CUDA against ref, for the members both computed.
template <class T>
void require_grads_near(const ref::LayerNormGrads<T>& got, const ref::LayerNormGrads<T>& want, bool need_x,
                        bool need_w, bool need_b) {
  REQUIRE(got.dx.defined() == need_x);
  REQUIRE(got.dweight.defined() == need_w);
  REQUIRE(got.dbias.defined() == need_b);
  if (need_x) require_near(got.dx, want.dx, "dx");
  if (need_w) require_near(got.dweight, want.dweight, "dweight");
  if (need_b) require_near(got.dbias, want.dbias, "dbias");
}

}  // namespace

// ---------------------------------------------------------------- layer norm

TEMPLATE_TEST_CASE("cuda layer_norm2d matches ref on NCHW", "[cuda][norm]", float, double) {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const DeviceKernels<TestType> k = kernels<TestType>();
  Generator gen(11);
  // one block of 32 pixels; blocks across images with C not a multiple of the 8 channel groups;
  // planes over 512 pixels (the dweight/dbias threads step across images)
  for (const Shape& shape : {Shape{2, 7, 5, 3}, Shape{2, 1, 5, 3}, Shape{3, 37, 9, 13}, Shape{2, 9, 23, 25}}) {
    const int64_t C = shape[1];
    for (bool affine : {true, false}) {
      INFO("x " << shape_str(shape) << (affine ? ", weight and bias" : ", no affine"));
      const auto x = randn<TestType>(shape, gen, 0.5, 2.0), dy = randn<TestType>(shape, gen);
      const Tensor<TestType> w = affine ? randn<TestType>({C}, gen, 1.0, 0.5) : Tensor<TestType>();
      const Tensor<TestType> b = affine ? randn<TestType>({C}, gen) : Tensor<TestType>();
      const auto want = ref::layer_norm2d_forward(x, w, b, 1e-6);
      const Tensor<TestType> xd = gpu(x), wd = affine ? gpu(w) : w, bd = affine ? gpu(b) : b;
      const auto got = k.layer_norm2d_forward(xd, wd, bd, 1e-6);
      require_near(got.y, want.y, "y");
      require_near(got.mean, want.mean, "mean");
      require_near(got.rstd, want.rstd, "rstd");
      const auto gwant = ref::layer_norm2d_backward(dy, x, want.mean, want.rstd, w, true, true, true);
      const auto ggot = k.layer_norm2d_backward(gpu(dy), xd, got.mean, got.rstd, wd, true, true, true);
      require_grads_near(ggot, gwant, true, true, true);
      const auto only_x = k.layer_norm2d_backward(gpu(dy), xd, got.mean, got.rstd, wd, true, false, false);
      require_grads_near(only_x, gwant, true, false, false);
      const auto only_wb = k.layer_norm2d_backward(gpu(dy), xd, got.mean, got.rstd, wd, false, true, true);
      require_grads_near(only_wb, gwant, false, true, true);
    }
  }
}

TEMPLATE_TEST_CASE("cuda layer_norm over the last k dims matches ref", "[cuda][norm]", float, double) {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const DeviceKernels<TestType> k = kernels<TestType>();
  Generator gen(12);
  // (shape, k): rows of 7 and 35 elements (a warp per row), 1500 and 1221 (a block per row), 1
  const std::vector<std::pair<Shape, int64_t>> cases{
      {{3, 5, 7}, 1}, {{3, 5, 7}, 2}, {{2, 1500}, 1}, {{3, 33, 37}, 2}, {{1, 7}, 1}, {{4, 1}, 1}};
  for (const auto& [shape, nk] : cases) {
    const Shape inner(shape.end() - nk, shape.end());
    for (bool affine : {true, false}) {
      INFO("x " << shape_str(shape) << ", k = " << nk << (affine ? ", weight and bias" : ", no affine"));
      const auto x = randn<TestType>(shape, gen, 0.5, 2.0), dy = randn<TestType>(shape, gen);
      const Tensor<TestType> w = affine ? randn<TestType>(inner, gen, 1.0, 0.5) : Tensor<TestType>();
      const Tensor<TestType> b = affine ? randn<TestType>(inner, gen) : Tensor<TestType>();
      const auto want = ref::layer_norm_forward(x, nk, w, b, 1e-5);
      const Tensor<TestType> xd = gpu(x), wd = affine ? gpu(w) : w, bd = affine ? gpu(b) : b;
      const auto got = k.layer_norm_forward(xd, nk, wd, bd, 1e-5);
      require_near(got.y, want.y, "y");
      require_near(got.mean, want.mean, "mean");
      require_near(got.rstd, want.rstd, "rstd");
      const auto gwant = ref::layer_norm_backward(dy, x, want.mean, want.rstd, w, nk, true, true, true);
      const auto ggot = k.layer_norm_backward(gpu(dy), xd, got.mean, got.rstd, wd, nk, true, true, true);
      require_grads_near(ggot, gwant, true, true, true);
      const auto only_b = k.layer_norm_backward(gpu(dy), xd, got.mean, got.rstd, wd, nk, false, false, true);
      require_grads_near(only_b, gwant, false, false, true);
    }
  }
}

// ---------------------------------------------------------------- softmax

TEMPLATE_TEST_CASE("cuda softmax and log_softmax match ref along every dim", "[cuda][softmax]", float, double) {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const DeviceKernels<TestType> k = kernels<TestType>();
  Generator gen(13);
  // (3, 5, 7) along dims 0, 1 (one thread per line) and 2 (a warp per line); (2, 1500): a block per line
  const std::vector<std::pair<Shape, int64_t>> cases{{{3, 5, 7}, 0}, {{3, 5, 7}, 1}, {{3, 5, 7}, 2}, {{2, 1500}, 1}};
  for (const auto& [shape, dim] : cases) {
    for (bool log : {false, true}) {
      INFO((log ? "log_softmax" : "softmax") << " of " << shape_str(shape) << " along dim " << dim);
      const auto x = randn<TestType>(shape, gen, 0.0, 3.0), dy = randn<TestType>(shape, gen);
      const auto want = log ? ref::log_softmax(x, dim) : ref::softmax(x, dim);
      require_near(k.softmax(gpu(x), dim, log), want, "y");
      // backward from ref's y on both sides, so only the backward kernels differ
      require_near(k.softmax_backward(gpu(dy), gpu(want), dim, log), ref::softmax_backward(dy, want, dim, log),
                   "dx");
    }
  }
}

TEMPLATE_TEST_CASE("cuda cross_entropy matches ref", "[cuda][softmax]", float, double) {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const DeviceKernels<TestType> k = kernels<TestType>();
  Generator gen(14);
  const auto logp = ref::log_softmax_rows(randn<TestType>({6, 10}, gen, 0.0, 2.0));
  // soft targets with exact zeros, one one-hot row, one row that does not sum to 1
  auto q = rand<TestType>({6, 10}, gen);
  TestType* pq = q.data();
  for (int64_t i = 0; i < 60; i += 3) pq[i] = TestType(0);
  for (int64_t c = 0; c < 10; ++c) pq[10 + c] = TestType(c == 4 ? 1 : 0);
  const double want = ref::cross_entropy_mean(logp, q);
  const double got = k.cross_entropy_mean(gpu(logp), gpu(q));
  INFO("loss " << got << " vs expected " << want);
  REQUIRE(std::abs(got - want) <= rel_tol<TestType>() * std::abs(want));
  const double scale = 0.7 / 6;
  require_near(k.cross_entropy_backward(gpu(logp), gpu(q), scale), ref::cross_entropy_backward(logp, q, scale),
               "dlogits");
}

// ---------------------------------------------------------------- adaptive average pooling

TEMPLATE_TEST_CASE("cuda adaptive_avg_pool2d matches ref, global and overlapping bins", "[cuda][pool]", float,
                   double) {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const DeviceKernels<TestType> k = kernels<TestType>();
  Generator gen(15);
  const auto x = randn<TestType>({2, 3, 7, 9}, gen, 0.5, 2.0);
  for (auto [OH, OW] : {std::pair<int64_t, int64_t>{1, 1}, {3, 4}, {7, 9}, {2, 1}}) {
    INFO("7x9 -> " << OH << "x" << OW);
    require_near(k.adaptive_avg_pool2d(gpu(x), OH, OW), ref::adaptive_avg_pool2d(x, OH, OW), "out");
    const auto dout = randn<TestType>({2, 3, OH, OW}, gen);
    require_near(k.adaptive_avg_pool2d_backward(gpu(dout), 7, 9), ref::adaptive_avg_pool2d_backward(dout, 7, 9),
                 "dx");
  }
}

// ---------------------------------------------------------------- errors

TEST_CASE("cuda norm, softmax and pool kernels name the op on bad inputs", "[cuda][norm]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const auto x = gpu(zeros<float>({2, 3, 4}));
  REQUIRE_THROWS_WITH(dg::cuda::layer_norm2d_forward(x, Tensor<float>(), Tensor<float>(), 1e-6),
                      Catch::Contains("cuda::layer_norm2d_forward") && Catch::Contains("(N, C, H, W)"));
  REQUIRE_THROWS_WITH(dg::cuda::layer_norm_forward(x, int64_t(1), gpu(zeros<float>({3})), Tensor<float>(), 1e-5),
                      Catch::Contains("cuda::layer_norm_forward") && Catch::Contains("4 elements"));
  REQUIRE_THROWS_WITH(dg::cuda::softmax(x.permute({0, 2, 1}), 1, false),
                      Catch::Contains("cuda::softmax") && Catch::Contains("contiguous"));
  REQUIRE_THROWS_WITH(dg::cuda::adaptive_avg_pool2d(x, 1, 1), Catch::Contains("cuda::adaptive_avg_pool2d"));
  REQUIRE_THROWS_WITH(dg::cuda::cross_entropy_mean(x, x), Catch::Contains("cuda::cross_entropy_mean"));
}

}  // namespace test_cuda_norm
