// tests/cuda/test_cuda_conv.cu: the CUDA conv2d kernels (tiled depthwise, pointwise GEMM,
// im2col + GEMM, grouped, the GEMM fallback of depthwise convs too large for shared memory, and
// the GEMM path split into several image chunks) and bmm: forward and every gradient against the
// ref kernels on the CPU, in float and double, on odd shapes; and the GEMM paths with bf16
// products against float64 on bf16-rounded operands. Each test is skipped without a GPU.
#include <catch2/catch.hpp>
#include <densegrad/densegrad.hpp>
#include <densegrad/cuda.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace test_cuda_conv {  // one namespace per file: test_cuda compiles them as one unit

using namespace dg;

namespace {

/// Allowed max |got - ref|, relative to max |ref|.
template <class T>
double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}

/// Checks that a CUDA result matches the CPU reference: same shape and
/// max |got - ref| <= rel * max |ref| (NaN fails).
template <class T>
void require_matches(const Tensor<T>& got_dev, const Tensor<T>& want, const std::string& what,
                     double rel = tolerance<T>()) {
  INFO(what);
  REQUIRE(got_dev.device().is_cuda());
  const Tensor<T> got = got_dev.to(Device::cpu());
  REQUIRE(shape_str(got.shape()) == shape_str(want.shape()));
  const std::vector<T> a = got.to_vector(), b = want.to_vector();
  double scale = 0, worst = 0;
  for (T v : b) scale = std::max(scale, std::abs(double(v)));
  for (size_t i = 0; i < a.size(); ++i) {
    double e = std::abs(double(a[i]) - double(b[i]));
    worst = std::max(worst, std::isnan(e) ? INFINITY : e);
  }
  INFO("max |got - ref| = " << worst << ", max |ref| = " << scale);
  REQUIRE(worst <= rel * scale);
}

/// One conv2d call's arguments.
struct Case {
  Shape x, w;
  Pair2 stride = 1, padding = 0, dilation = 1;
  int64_t groups = 1;
  bool bias = true;
};

/// One conv2d call's random operands on the CPU (drawn in this order: x, w, b, dout) and geometry.
template <class T>
struct ConvData {
  Tensor<T> x, w, b, dout;
  Conv2dGeometry g;
};
template <class T>
ConvData<T> conv_data(const Case& c, uint64_t seed) {
  Generator gen(seed);
  ConvData<T> d;
  d.x = randn<T>(c.x, gen);
  d.w = randn<T>(c.w, gen);
  if (c.bias) d.b = randn<T>({c.w[0]}, gen);
  const Shape bshape{c.w[0]};
  d.g = conv2d_geometry(c.x, c.w, c.bias ? &bshape : nullptr, c.stride, c.padding, c.dilation, c.groups);
  d.dout = randn<T>(d.g.out_shape(), gen);
  return d;
}

/// Forward, grad input, grad weight and grad bias on the GPU vs dg::ref on the CPU.
template <class T>
void check_conv(const Case& c, uint64_t seed) {
  INFO((std::is_same_v<T, float> ? "float" : "double") << ", x " << shape_str(c.x) << ", weight " << shape_str(c.w));
  const auto [x, w, b, dout, g] = conv_data<T>(c, seed);
  const Device gpu = Device::cuda();
  const Tensor<T> xd = x.to(gpu), wd = w.to(gpu), dd = dout.to(gpu);
  const Tensor<T> bd = c.bias ? b.to(gpu) : Tensor<T>();
  require_matches(cuda::conv2d_forward(xd, wd, bd, g), ref::conv2d_forward(x, w, b, g), "forward");
  require_matches(cuda::conv2d_backward_input(dd, wd, g), ref::conv2d_backward_input(dout, w, g), "grad input");
  require_matches(cuda::conv2d_backward_weight(dd, xd, g), ref::conv2d_backward_weight(dout, x, g), "grad weight");
  require_matches(cuda::conv2d_backward_bias(dd, g), ref::conv2d_backward_bias(dout, g), "grad bias");
}

template <class T>
void check_bmm(int64_t B, int64_t M, int64_t K, int64_t N, uint64_t seed, double rel = tolerance<T>()) {
  Generator gen(seed);
  const Tensor<T> a = randn<T>({B, M, K}, gen), c = randn<T>({B, K, N}, gen);
  require_matches(cuda::bmm(a.to(Device::cuda()), c.to(Device::cuda())), ref::bmm(a, c), "bmm", rel);
}

/// t rounded to bfloat16, as double: the exact operand values of the bf16 GEMMs.
Tensor<double> rounded(const Tensor<float>& t) { return t.to<bfloat16>().to<double>(); }

Tensor<double> abs_of(const Tensor<double>& t) {
  std::vector<double> v = t.contiguous().to_vector();
  for (double& e : v) e = std::abs(e);
  return dg::tensor<double>(v, t.shape());
}

/// |got - want| <= 4e-5 * bound elementwise, where bound is the same sum over |operands|: float
/// sums of exact bf16 products are off by a few float ulps of the sum of magnitudes at most.
void require_within(const Tensor<float>& got_dev, const Tensor<double>& want, const Tensor<double>& bound,
                    const std::string& what) {
  INFO(what);
  const std::vector<float> g = got_dev.to(Device::cpu()).to_vector();
  const std::vector<double> w = want.to_vector(), b = bound.to_vector();
  REQUIRE(g.size() == w.size());
  for (size_t i = 0; i < g.size(); ++i) {
    INFO("element " << i << ": got " << g[i] << ", want " << w[i] << ", sum of |products| " << b[i]);
    REQUIRE(std::abs(double(g[i]) - w[i]) <= 4e-5 * b[i] + 1e-30);
  }
}

double max_abs_diff(const Tensor<float>& a, const Tensor<float>& b) {
  const std::vector<float> va = a.to(Device::cpu()).to_vector(), vb = b.to(Device::cpu()).to_vector();
  double m = 0;
  for (size_t i = 0; i < va.size(); ++i) m = std::max(m, std::abs(double(va[i]) - double(vb[i])));
  return m;
}

/// bf16 products (Conv2dGeometry::bf16) on the GPU: forward, grad input and grad weight against
/// the float64 ref kernels on the operands rounded to bfloat16, and different from the fp32
/// products of the same call (so the rounding did happen). Grad bias never multiplies.
void check_conv_bf16(const Case& c, uint64_t seed) {
  INFO("bf16, x " << shape_str(c.x) << ", weight " << shape_str(c.w));
  const auto [x, w, b, dout, g] = conv_data<float>(c, seed);
  Conv2dGeometry gb = g;
  gb.bf16 = true;
  const Device gpu = Device::cuda();
  const Tensor<float> xd = x.to(gpu), wd = w.to(gpu), dd = dout.to(gpu);
  const Tensor<float> bd = c.bias ? b.to(gpu) : Tensor<float>();
  const Tensor<double> xr = rounded(x), wr = rounded(w), dr = rounded(dout);
  const Tensor<double> bdbl = c.bias ? b.to<double>() : Tensor<double>();
  const Tensor<double> babs = c.bias ? abs_of(bdbl) : Tensor<double>();

  const Tensor<float> y = cuda::conv2d_forward(xd, wd, bd, gb);
  require_within(y, ref::conv2d_forward(xr, wr, bdbl, g), ref::conv2d_forward(abs_of(xr), abs_of(wr), babs, g),
                 "forward");
  const Tensor<float> dx = cuda::conv2d_backward_input(dd, wd, gb);
  require_within(dx, ref::conv2d_backward_input(dr, wr, g), ref::conv2d_backward_input(abs_of(dr), abs_of(wr), g),
                 "grad input");
  const Tensor<float> dw = cuda::conv2d_backward_weight(dd, xd, gb);
  require_within(dw, ref::conv2d_backward_weight(dr, xr, g), ref::conv2d_backward_weight(abs_of(dr), abs_of(xr), g),
                 "grad weight");
  CHECK(max_abs_diff(y, cuda::conv2d_forward(xd, wd, bd, g)) > 0);
  CHECK(max_abs_diff(dx, cuda::conv2d_backward_input(dd, wd, g)) > 0);
  CHECK(max_abs_diff(dw, cuda::conv2d_backward_weight(dd, xd, g)) > 0);
}

/// Caps the GEMM path's scratch memory for one scope, so that it splits the batch into chunks.
struct WorkspaceLimit {
  int64_t saved = cuda::conv_detail::workspace_limit();
  explicit WorkspaceLimit(int64_t elems) { cuda::conv_detail::workspace_limit() = elems; }
  ~WorkspaceLimit() { cuda::conv_detail::workspace_limit() = saved; }
};

}  // namespace

// ---------------------------------------------------------------- depthwise: tiled direct kernels

TEST_CASE("cuda conv2d depthwise 7x7 pad 3 vs ref", "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const Case c{{2, 5, 9, 11}, {5, 1, 7, 7}, 1, 3, 1, 5};
  check_conv<float>(c, 1);
  check_conv<double>(c, 2);
}

TEST_CASE("cuda conv2d depthwise stride 1, 3x3/5x5/7x7 (register kernels): strips, chunks, any padding vs ref",
          "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  // 23 rows: the last strip of 7 is partial; 3 images of 37 channels: grad weight in 3 chunks
  check_conv<float>({{3, 37, 23, 29}, {37, 1, 7, 7}, 1, 3, 1, 37}, 11);
  check_conv<double>({{3, 37, 23, 29}, {37, 1, 7, 7}, 1, 3, 1, 37}, 12);
  // no padding (the output is smaller), padding past K - 1 (the grad input's padding is negative)
  for (int64_t pad : {0, 1, 3}) {
    INFO("3x3, padding " << pad);
    check_conv<float>({{2, 6, 13, 10}, {6, 1, 3, 3}, 1, pad, 1, 6}, 13 + pad);
    check_conv<double>({{2, 6, 13, 10}, {6, 1, 3, 3}, 1, pad, 1, 6, false}, 17 + pad);
  }
  check_conv<float>({{1, 130, 7, 7}, {130, 1, 5, 5}, 1, Pair2(1, 2), 1, 130}, 21);  // one image, rows != cols padding
  check_conv<double>({{70, 2, 14, 14}, {2, 1, 7, 7}, 1, 3, 1, 2}, 22);  // many images, few channels
}

TEST_CASE("cuda conv2d depthwise reads a batch-strided input (a window of channels) in place", "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  Generator gen(23);
  const Tensor<float> big = randn<float>({3, 11, 16, 15}, gen), w = randn<float>({6, 1, 7, 7}, gen);
  const Tensor<float> b = randn<float>({6}, gen), dout = randn<float>({3, 6, 16, 15}, gen);
  const Tensor<float> x = big.narrow(1, 2, 6);  // images 11*16*15 apart: batch-strided, not contiguous
  REQUIRE_FALSE(x.is_contiguous());
  const Shape bshape{6};
  const Conv2dGeometry g = conv2d_geometry(x.shape(), w.shape(), &bshape, 1, 3, 1, 6);
  const Device gpu = Device::cuda();
  const Tensor<float> xd = big.to(gpu).narrow(1, 2, 6);
  REQUIRE(batch_stride(xd) == 11 * 16 * 15);
  const Tensor<float> xc = x.contiguous();
  require_matches(cuda::conv2d_forward(xd, w.to(gpu), b.to(gpu), g), ref::conv2d_forward(xc, w, b, g), "forward");
  require_matches(cuda::conv2d_backward_weight(dout.to(gpu), xd, g), ref::conv2d_backward_weight(dout, xc, g),
                  "grad weight");
  // A stride-2 depthwise conv takes the tiled kernels, which copy such a view first.
  const Conv2dGeometry g2 = conv2d_geometry(x.shape(), w.shape(), &bshape, 2, 3, 1, 6);
  const Tensor<float> dout2 = randn<float>(g2.out_shape(), gen);
  require_matches(cuda::conv2d_forward(xd, w.to(gpu), b.to(gpu), g2), ref::conv2d_forward(xc, w, b, g2),
                  "forward, stride 2");
  require_matches(cuda::conv2d_backward_weight(dout2.to(gpu), xd, g2), ref::conv2d_backward_weight(dout2, xc, g2),
                  "grad weight, stride 2");
  // Any other layout is refused by name.
  const Tensor<float> t = big.to(gpu).narrow(3, 0, 6).narrow(1, 0, 6).narrow(2, 0, 6);
  const Conv2dGeometry g3 = conv2d_geometry(t.shape(), w.shape(), &bshape, 1, 3, 1, 6);
  CHECK_THROWS_WITH(cuda::conv2d_forward(t, w.to(gpu), b.to(gpu), g3),
                    Catch::Contains("expects contiguous tensors (or batch-strided)"));
}

TEST_CASE("cuda conv2d depthwise 3x3 stride 2 dilation 2 (several tiles per plane) vs ref", "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const Case c{{2, 3, 37, 70}, {3, 1, 3, 3}, 2, 1, 2, 3};
  check_conv<float>(c, 3);
  check_conv<double>(c, 4);
}

TEST_CASE("cuda conv2d depthwise 5x5 pad 2 on 40x45 (tiles of the weight reduction) vs ref", "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const Case c{{3, 4, 40, 45}, {4, 1, 5, 5}, 1, 2, 1, 4};
  check_conv<float>(c, 5);
  check_conv<double>(c, 6);
}

TEST_CASE("cuda conv2d depthwise 3x5 stride (2, 1) pad (0, 2) dilation (1, 2) without bias vs ref", "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const Case c{{2, 3, 20, 41}, {3, 1, 3, 5}, Pair2(2, 1), Pair2(0, 2), Pair2(1, 2), 3, false};
  check_conv<float>(c, 7);
  check_conv<double>(c, 8);
}

TEST_CASE("cuda conv2d depthwise 3x3 dilation 60 (patch too large for shared memory: GEMM path) vs ref",
          "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const Case c{{1, 2, 125, 125}, {2, 1, 3, 3}, 1, 0, 60, 2};
  check_conv<float>(c, 9);
  check_conv<double>(c, 10);
}

// ---------------------------------------------------------------- pointwise and im2col + GEMM

TEST_CASE("cuda conv2d 1x1 (N=3, 7->5 channels, 6x5) vs ref", "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const Case c{{3, 7, 6, 5}, {5, 7, 1, 1}};
  check_conv<float>(c, 11);
  check_conv<double>(c, 12);
}

TEST_CASE("cuda conv2d 1x1 on 64x64 maps (grad weight one image at a time) and on 7x7 (bias on small planes) vs ref",
          "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const Case big{{3, 6, 64, 64}, {10, 6, 1, 1}};  // 4096 positions: grad weight one image at a time
  check_conv<float>(big, 41);
  check_conv<double>(big, 42);
  check_conv_bf16(big, 43);
  const Case small{{5, 9, 7, 7}, {300, 9, 1, 1}};  // 49 positions per plane, 300 channels
  check_conv<float>(small, 44);
}

TEST_CASE("cuda conv2d stem-like 4x4 stride 4 (3->8, 12x16) vs ref", "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const Case c{{3, 3, 12, 16}, {8, 3, 4, 4}, 4};
  check_conv<float>(c, 13);
  check_conv<double>(c, 14);
}

TEST_CASE("cuda conv2d 2x2 stride 2 (6->4, odd map drops its last row and column) vs ref", "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const Case c{{2, 6, 9, 7}, {4, 6, 2, 2}, 2};
  check_conv<float>(c, 15);
  check_conv<double>(c, 16);
}

TEST_CASE("cuda conv2d grouped 3x3 groups 2 pad 1 without bias vs ref", "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const Case c{{2, 6, 7, 9}, {4, 3, 3, 3}, 1, 1, 1, 2, false};
  check_conv<float>(c, 17);
  check_conv<double>(c, 18);
}

TEST_CASE("cuda conv2d grouped 1x1 groups 3 and 3x3 groups 3 on 4 images vs ref", "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  // 4 images > 3 groups: the GEMMs batch over images, one call per group
  check_conv<float>({{4, 6, 5, 7}, {9, 2, 1, 1}, 1, 0, 1, 3}, 19);
  check_conv<double>({{4, 6, 5, 7}, {9, 2, 1, 1}, 1, 0, 1, 3}, 20);
  check_conv<float>({{4, 6, 5, 7}, {3, 2, 3, 3}, 2, 1, 1, 3}, 21);
  check_conv<double>({{4, 6, 5, 7}, {3, 2, 3, 3}, 2, 1, 1, 3}, 22);
}

TEST_CASE("cuda conv2d GEMM path in chunks of 2 images (N=3) vs ref", "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  {
    // stem: 48 column rows x 12 positions per image; grad weight adds 8 dout rows
    WorkspaceLimit limit(2 * (48 + 8) * 12);
    const Case c{{3, 3, 12, 16}, {8, 3, 4, 4}, 4};
    check_conv<float>(c, 23);
    check_conv<double>(c, 24);
  }
  {
    // pointwise: grad weight gathers 7 input + 5 dout rows x 30 positions per image
    WorkspaceLimit limit(2 * (7 + 5) * 30);
    const Case c{{3, 7, 6, 5}, {5, 7, 1, 1}};
    check_conv<float>(c, 25);
    check_conv<double>(c, 26);
  }
}

// ---------------------------------------------------------------- bf16 products

TEST_CASE("cuda conv2d with bf16 products equals float64 on bf16-rounded operands", "[cuda][bf16]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  check_conv_bf16({{3, 37, 7, 7}, {20, 37, 1, 1}}, 40);                        // 1x1: rounded copy of x
  check_conv_bf16({{2, 24, 8, 8}, {40, 24, 1, 1}, 1, 0, 1, 1, false}, 41);    // 1x1 without bias
  check_conv_bf16({{3, 3, 12, 16}, {8, 3, 4, 4}, 4}, 42);                     // stem-like 4x4 stride 4
  check_conv_bf16({{2, 6, 9, 11}, {4, 6, 2, 2}, 2}, 43);                      // transition 2x2 stride 2
  check_conv_bf16({{2, 5, 10, 9}, {6, 5, 3, 3}, 1, 1}, 44);                   // 3x3 pad 1 (col2im)
  check_conv_bf16({{2, 8, 64, 65}, {4, 8, 1, 1}}, 45);                        // 4160 positions: dW per image
  {
    WorkspaceLimit limit(2 * (7 + 5) * 30);  // chunks of 2 images in every GEMM path
    check_conv_bf16({{3, 7, 6, 5}, {5, 7, 1, 1}}, 46);
    check_conv_bf16({{3, 3, 12, 16}, {8, 3, 4, 4}, 4}, 47);
  }
}

TEST_CASE("cuda conv2d staging kernels: by quads on planes of 4k positions, one element at a time off a quad boundary",
          "[cuda][bf16]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const Case quads{{3, 12, 8, 6}, {10, 12, 1, 1}};  // 48 positions: bias, copies, wide gathers by quads
  check_conv<float>(quads, 60);
  check_conv<double>(quads, 61);  // 8-byte elements: one at a time
  check_conv_bf16(quads, 62);
  {
    WorkspaceLimit limit(2 * (12 + 10) * 48);  // grad weight gathers 2 images side by side
    check_conv<float>(quads, 63);
    check_conv_bf16(quads, 64);
  }
  // the same conv on tensors that start one float past a quad boundary
  const auto [x, w, b, dout, g] = conv_data<float>(quads, 65);
  const Device gpu = Device::cuda();
  auto off_quad = [&](const Tensor<float>& t) {
    const Tensor<float> flat = zeros<float>({t.numel() + 1}, gpu);
    Tensor<float> v = flat.narrow(0, 1, t.numel()).reshape(t.shape());
    v.copy_(t.to(gpu));
    REQUIRE(reinterpret_cast<uintptr_t>(v.data()) % 16 != 0);
    REQUIRE(v.is_contiguous());
    return v;
  };
  const Tensor<float> xo = off_quad(x), wo = off_quad(w), bo = off_quad(b), dd = off_quad(dout);
  Conv2dGeometry gb = g;
  gb.bf16 = true;
  require_matches(cuda::conv2d_forward(xo, wo, bo, g), ref::conv2d_forward(x, w, b, g), "forward, off a quad");
  require_matches(cuda::conv2d_backward_weight(dd, xo, g), ref::conv2d_backward_weight(dout, x, g),
                  "grad weight, off a quad");
  require_matches(cuda::conv2d_backward_bias(dd, g), ref::conv2d_backward_bias(dout, g), "grad bias, off a quad");
  // bf16 products: the same bits as on aligned copies
  const Tensor<float> xa = x.to(gpu), wa = w.to(gpu), ba = b.to(gpu), da = dout.to(gpu);
  CHECK(max_abs_diff(cuda::conv2d_forward(xo, wo, bo, gb), cuda::conv2d_forward(xa, wa, ba, gb)) == 0);
  CHECK(max_abs_diff(cuda::conv2d_backward_input(dd, wo, gb), cuda::conv2d_backward_input(da, wa, gb)) == 0);
  CHECK(max_abs_diff(cuda::conv2d_backward_weight(dd, xo, gb), cuda::conv2d_backward_weight(da, xa, gb)) == 0);
}

TEST_CASE("cuda conv2d with bf16 products on 7x7 maps: one GEMM over rows of 8 images' positions, then scattered",
          "[cuda][bf16]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const Case pointwise{{8, 12, 7, 7}, {10, 12, 1, 1}};        // rows of 8 * 49 positions
  const Case transition{{8, 6, 14, 14}, {4, 6, 2, 2}, 2};     // k2 s2 into 7x7: wide im2col and col2im
  const Case unbiased{{8, 12, 7, 7}, {10, 12, 1, 1}, 1, 0, 1, 1, false};
  check_conv_bf16(pointwise, 70);
  check_conv_bf16(transition, 71);
  check_conv_bf16(unbiased, 72);
  {
    // 10 images, workspace for 9: chunks of 8 (wide) and 2 (2 * 49 positions: per image)
    WorkspaceLimit limit(9 * (12 + 10) * 49);
    check_conv_bf16({{10, 12, 7, 7}, {10, 12, 1, 1}}, 73);
  }
  {
    WorkspaceLimit limit(9 * (6 * 4 + 4) * 49);
    check_conv_bf16({{10, 6, 14, 14}, {4, 6, 2, 2}, 2}, 74);
  }
  check_conv_bf16({{5, 12, 7, 7}, {10, 12, 1, 1}}, 75);  // 5 * 49 positions: no multiple of 8, per image
}

TEST_CASE("cuda conv2d: grouped and depthwise convs ignore bf16 (float products, as on the CPU)", "[cuda][bf16]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  for (const Case& c : {Case{{2, 6, 9, 8}, {4, 3, 3, 3}, 1, 1, 1, 2}, Case{{2, 5, 9, 11}, {5, 1, 7, 7}, 1, 3, 1, 5}}) {
    auto [x, w, b, dout, g] = conv_data<float>(c, 48);
    g.bf16 = true;
    const Device gpu = Device::cuda();
    require_matches(cuda::conv2d_forward(x.to(gpu), w.to(gpu), b.to(gpu), g), ref::conv2d_forward(x, w, b, g),
                    "forward " + shape_str(c.w));
    require_matches(cuda::conv2d_backward_input(dout.to(gpu), w.to(gpu), g), ref::conv2d_backward_input(dout, w, g),
                    "grad input " + shape_str(c.w));
    require_matches(cuda::conv2d_backward_weight(dout.to(gpu), x.to(gpu), g),
                    ref::conv2d_backward_weight(dout, x, g), "grad weight " + shape_str(c.w));
  }
}

TEST_CASE("cuda gelu_conv2d with bf16 products keeps h in bfloat16: the two ops on round(h), and the CPU",
          "[cuda][bf16]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  struct GeluCase {
    Shape h, w;
    int64_t stride;
    bool bias, tanh_form;
    int64_t limit;  // > 0: the GEMM paths' scratch capped at this many elements
    const char* what;
  };
  const GeluCase cases[] = {
      {{3, 12, 9, 7}, {10, 12, 1, 1}, 1, true, false, 0, "1x1: one pass stages round(gelu(round(h))) and keeps round(h)"},
      {{3, 12, 9, 7}, {10, 12, 1, 1}, 1, false, true, 0, "1x1, tanh form, no bias"},
      {{3, 7, 6, 5}, {5, 7, 1, 1}, 1, true, false, 2 * (7 + 5) * 30, "1x1 in chunks of 2 images"},
      {{2, 8, 64, 65}, {4, 8, 1, 1}, 1, true, false, 0, "1x1 on 4160 positions: dweight one image at a time"},
      {{2, 6, 9, 11}, {4, 6, 2, 2}, 2, true, false, 0, "2x2 stride 2: gelu(round(h)) in float, then conv2d"},
      {{3, 12, 8, 6}, {10, 12, 1, 1}, 1, true, false, 0, "1x1 on 48 positions: staged by quads"},
      {{3, 12, 8, 6}, {10, 12, 1, 1}, 1, true, true, 2 * (12 + 10) * 48, "by quads in chunks of 2 images, tanh form"},
      {{2, 6, 8, 6}, {4, 6, 2, 2}, 2, true, false, 0, "2x2 stride 2 by quads: gelu(round(h)) in float first"},
      {{8, 12, 7, 7}, {10, 12, 1, 1}, 1, true, false, 0, "7x7 maps: one wide GEMM over 8 images, scattered with bias"},
      {{10, 12, 7, 7}, {10, 12, 1, 1}, 1, false, false, 9 * (12 + 10) * 49, "7x7 maps in chunks of 8 (wide) and 2"},
  };
  const Device gpu = Device::cuda();
  Generator gen(49);
  for (const GeluCase& c : cases) {
    INFO(c.what);
    const int64_t limit = c.limit > 0 ? c.limit : cuda::conv_detail::workspace_limit();
    WorkspaceLimit scoped(limit);
    const Tensor<float> h0 = randn<float>(c.h, gen) * 3.0f, w0 = randn<float>(c.w, gen), b0 = randn<float>({c.w[0]}, gen);
    auto leaf = [&](const Tensor<float>& t, Device d) { return t.to(d).requires_grad_(); };
    Tensor<float> h = leaf(h0, gpu), w = leaf(w0, gpu), b = leaf(b0, gpu);
    Tensor<float> hr = leaf(h0.to<bfloat16>().to<float>(), gpu), w2 = leaf(w0, gpu), b2 = leaf(b0, gpu);
    Tensor<float> hc = leaf(h0, Device::cpu()), wc = leaf(w0, Device::cpu()), bc = leaf(b0, Device::cpu());
    Tensor<float> fused, apart, on_cpu, unrounded;
    {
      MatmulPrecisionGuard bf16(MatmulPrecision::bf16);
      fused = gelu_conv2d(h, w, c.bias ? b : Tensor<float>(), c.stride, 0, 1, 1, c.tanh_form);
      apart = conv2d(gelu(hr, c.tanh_form), w2, c.bias ? b2 : Tensor<float>(), c.stride);
      on_cpu = gelu_conv2d(hc, wc, c.bias ? bc : Tensor<float>(), c.stride, 0, 1, 1, c.tanh_form);
      NoGradGuard no_grad;
      unrounded = conv2d(gelu(h0.to(gpu), c.tanh_form), w0.to(gpu), c.bias ? b0.to(gpu) : Tensor<float>(), c.stride);
    }
    const Tensor<float> want = apart.detach().to(Device::cpu());
    require_matches(fused.detach(), want, "output against the two ops");
    CHECK(max_abs_diff(fused.detach(), unrounded) > 1e-4 * max_abs_diff(unrounded, zeros<float>(unrounded.shape(), gpu)));
    const Tensor<float> dout = randn<float>(fused.shape(), gen);
    fused.backward(dout.to(gpu));
    apart.backward(dout.to(gpu));
    on_cpu.backward(dout);
    require_matches(h.grad(), hr.grad().to(Device::cpu()), "dh against the two ops");
    require_matches(w.grad(), w2.grad().to(Device::cpu()), "dweight against the two ops");
    if (c.bias) require_matches(b.grad(), b2.grad().to(Device::cpu()), "dbias against the two ops");
    // the CPU rounds h the same way; its products are bf16 where it has AVX512-BF16, else float32
    require_matches(fused.detach(), on_cpu.detach(), "output against the CPU", 2e-2);
    require_matches(h.grad(), hc.grad(), "dh against the CPU", 2e-2);
    require_matches(w.grad(), wc.grad(), "dweight against the CPU", 2e-2);
  }
  // the kernels check the kept tensor they are given
  const Shape xs{2, 4, 5, 5};
  Conv2dGeometry g = conv2d_geometry(xs, {3, 4, 1, 1}, nullptr, 1, 0, 1, 1);
  g.bf16 = true;
  const Tensor<float> x = zeros<float>(xs, gpu), wt = zeros<float>({3, 4, 1, 1}, gpu);
  CHECK_THROWS_WITH(cuda::gelu_conv2d_bf16_forward(x, Tensor<bfloat16>::empty({2, 4, 5}, gpu), wt, {}, g, false),
                    Catch::Contains("gelu_conv2d: expected a contiguous bfloat16 tensor of shape [2, 4, 5, 5]"));
  CHECK_THROWS_WITH(cuda::gelu_conv2d_bf16_backward_weight(zeros<float>({2, 3, 5, 5}, gpu),
                                                           Tensor<bfloat16>::empty(xs), g, false),
                    Catch::Contains("gelu_conv2d backward: expected a contiguous bfloat16 tensor"));
}

// ---------------------------------------------------------------- bmm and the kernel table

TEST_CASE("cuda bmm (B=3, M=5, K=7, N=9) vs ref", "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  check_bmm<float>(3, 5, 7, 9, 27);
  check_bmm<double>(3, 5, 7, 9, 28);
  check_bmm<float>(2, 3, 0, 4, 29);  // K = 0: zeros
}

TEST_CASE("cuda bmm with TF32 allowed stays close to ref", "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  struct Tf32On {  // restores the default even when a check fails
    Tf32On() { cuda::allow_tf32() = true; }
    ~Tf32On() { cuda::allow_tf32() = false; }
  } on;
  check_bmm<float>(2, 33, 65, 17, 30, 1e-2);  // TF32 keeps 10 mantissa bits
  check_bmm<double>(2, 33, 65, 17, 31);        // double never uses TF32
}

TEST_CASE("cuda conv2d and bmm are in the kernel table", "[cuda]") {
  if (dg::cuda::device_count() == 0) { WARN("no CUDA device: skipped"); return; }
  const DeviceKernels<float>& kf = cuda_kernels<float>("test");
  const DeviceKernels<double>& kd = cuda_kernels<double>("test");
  CHECK(kf.bmm != nullptr);
  CHECK(kf.conv2d_forward != nullptr);
  CHECK(kf.conv2d_backward_input != nullptr);
  CHECK(kf.conv2d_backward_weight != nullptr);
  CHECK(kf.conv2d_backward_bias != nullptr);
  CHECK(kd.bmm != nullptr);
  CHECK(kd.conv2d_forward != nullptr);
  CHECK(kd.conv2d_backward_input != nullptr);
  CHECK(kd.conv2d_backward_weight != nullptr);
  CHECK(kd.conv2d_backward_bias != nullptr);
}

}  // namespace test_cuda_conv
