// tests/test_bf16.cpp: products in bfloat16 (dg::MatmulPrecision::bf16): the conv2d panel GEMMs
// against the float64 ref kernels run on the same operands rounded to bfloat16, the precision
// setting and its guard, and that backward follows the precision its forward ran in.
#include <algorithm>
#include <cstring>
#include <random>
#include <thread>

#include "test_util.hpp"

namespace test_bf16 {

using namespace dg;

namespace {

/// t rounded to bfloat16, as float64 (the exact operand values the bf16 kernels multiply).
Tensor<double> rounded(const Tensor<float>& t) { return t.to<bfloat16>().to<double>(); }

Tensor<double> abs_of(const Tensor<double>& t) {
  Tensor<double> r = Tensor<double>::empty(t.shape());
  auto v = t.contiguous().to_vector();
  for (size_t i = 0; i < v.size(); ++i) r.data()[i] = std::abs(v[i]);
  return r;
}

/// |got - want| <= 2e-5 * bound elementwise, bound = the same sum over |operands| (float32
/// accumulation of K exact bf16 products: a few ulps of the sum of magnitudes).
void require_within(const Tensor<float>& got, const Tensor<double>& want, const Tensor<double>& bound,
                    const std::string& what) {
  INFO(what);
  REQUIRE(shape_str(got.shape()) == shape_str(want.shape()));
  auto g = got.to_vector();
  auto w = want.contiguous().to_vector(), b = bound.contiguous().to_vector();
  for (size_t i = 0; i < g.size(); ++i) {
    INFO("element " << i << ": got " << g[i] << ", want " << w[i] << ", sum of |products| " << b[i]);
    REQUIRE(std::abs(double(g[i]) - w[i]) <= 2e-5 * b[i] + 1e-30);
  }
}

double max_abs_diff(const Tensor<float>& a, const Tensor<float>& b) {
  auto va = a.to_vector(), vb = b.to_vector();
  double m = 0;
  for (size_t i = 0; i < va.size(); ++i) m = std::max(m, std::abs(double(va[i]) - double(vb[i])));
  return m;
}

struct Case {
  Shape x, w;
  int64_t stride = 1, padding = 0;
  int64_t extra_channels = 0;  // > 0: x is a batch-strided prefix view of a wider buffer
  const char* what;
};

}  // namespace

TEST_CASE("bf16 products: conv2d panel GEMMs equal float64 on bf16-rounded operands (forward, dx, dweight)") {
  // at least one image per thread, so that the panel GEMMs (the kernels with bf16 products) run
  const int64_t N = std::max<int64_t>(4, cpu::max_threads());
  const std::vector<Case> cases = {
      {{N, 24, 8, 8}, {40, 24, 1, 1}, 1, 0, 0, "1x1, 64 pixels in place, C_in < C_out"},
      {{N, 37, 7, 7}, {20, 37, 1, 1}, 1, 0, 0, "1x1, odd C_in, 49 pixels: in place + gathered tail"},
      {{N, 16, 3, 3}, {24, 16, 1, 1}, 1, 0, 0, "1x1 on a 3x3 map: all gathered"},
      {{N, 24, 8, 8}, {16, 24, 1, 1}, 1, 0, 8, "1x1 on a dense stage's prefix view"},
      {{N, 18, 10, 10}, {9, 18, 2, 2}, 2, 0, 0, "transition k2 s2"},
      {{N, 3, 16, 16}, {16, 3, 4, 4}, 4, 0, 0, "stem k4 s4"},
      {{N, 5, 9, 9}, {7, 5, 3, 3}, 1, 1, 0, "3x3 pad 1, odd K = 45"},
  };
  Generator gen(7);
  for (const Case& c : cases) {
    INFO(c.what);
    Tensor<float> x = randn<float>(c.x, gen);
    if (c.extra_channels > 0) {
      Shape wide = c.x;
      wide[1] += c.extra_channels;
      x = randn<float>(wide, gen).narrow(1, 0, c.x[1]);
    }
    Tensor<float> w = randn<float>(c.w, gen), b = randn<float>({c.w[0]}, gen);
    const Shape bshape{c.w[0]};
    Conv2dGeometry g = conv2d_geometry(x.shape(), w.shape(), &bshape, c.stride, c.padding, 1, 1);
    Tensor<float> dout = randn<float>(g.out_shape(), gen);
    Conv2dGeometry g16 = g;
    g16.bf16 = true;

    Tensor<float> y = cpu::conv2d_forward(x, w, b, g16), dx = cpu::conv2d_backward_input(dout, w, g16);
    Tensor<float> dw = cpu::conv2d_backward_weight(dout, x, g16);
    Tensor<float> y32 = cpu::conv2d_forward(x, w, b, g), dx32 = cpu::conv2d_backward_input(dout, w, g);
    Tensor<float> dw32 = cpu::conv2d_backward_weight(dout, x, g);
    {  // the gradients in one sweep: the bits of the three functions apart
      const std::array<Tensor<float>, 3> all = cpu::conv2d_backward(dout, x, w, g16, true, true, true);
      CHECK(max_abs_diff(all[0], dx) == 0);
      CHECK(max_abs_diff(all[1], dw) == 0);
      CHECK(max_abs_diff(all[2], cpu::conv2d_backward_bias(dout, g16)) == 0);
      const std::array<Tensor<float>, 3> xw = cpu::conv2d_backward(dout, x, w, g16, true, true, false);
      CHECK(max_abs_diff(xw[0], dx) == 0);
      CHECK(max_abs_diff(xw[1], dw) == 0);
    }
    // the request is honoured exactly where the build has AVX512-BF16, and ignored elsewhere
    if (cpu::kBf16Gemm) {
      // float64 references on the rounded operands (bias is added in float32, not rounded)
      const Tensor<double> xr = rounded(x), wr = rounded(w), dr = rounded(dout), bd = b.to<double>();
      const Tensor<double> xa = abs_of(xr), wa = abs_of(wr), da = abs_of(dr);
      require_within(y, ref::conv2d_forward(xr, wr, bd, g), ref::conv2d_forward(xa, wa, abs_of(bd), g), "forward");
      require_within(dx, ref::conv2d_backward_input(dr, wr, g), ref::conv2d_backward_input(da, wa, g), "dx");
      require_within(dw, ref::conv2d_backward_weight(dr, xr, g), ref::conv2d_backward_weight(da, xa, g), "dweight");
      CHECK(max_abs_diff(y, y32) > 0);
      CHECK(max_abs_diff(dx, dx32) > 0);
      CHECK(max_abs_diff(dw, dw32) > 0);
    } else {
      WARN("this build has no AVX512-BF16: bf16 requests run float32 products, checked bit for bit");
      CHECK(max_abs_diff(y, y32) == 0);
      CHECK(max_abs_diff(dx, dx32) == 0);
      CHECK(max_abs_diff(dw, dw32) == 0);
    }
  }
}

#if DENSEGRAD_BF16_GEMM
TEST_CASE("bf16 products: pack_a lays out rounded pairs exactly as element by element") {
  // rows of 8 and partial blocks, even and odd K, one segment and several (pixels of several
  // images in place), pair counts below, at and past a multiple of 8
  struct PackCase {
    int64_t M, seg_len, segs;
  };
  const std::vector<PackCase> cases = {{8, 16, 1}, {24, 49, 3}, {13, 9, 5}, {5, 7, 1}, {32, 196, 4}, {17, 3, 1}, {1, 1, 1}};
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (const PackCase& c : cases) {
    INFO("M " << c.M << ", " << c.segs << " segments of " << c.seg_len);
    const int64_t K = c.seg_len * c.segs, Kp = cpu::bf16_pairs(K);
    const int64_t lda = K + 5, seg_stride = c.seg_len + 3;  // rows and segments apart, as in place
    std::vector<float> a(static_cast<size_t>(c.M * lda + c.segs * seg_stride));
    for (float& v : a) v = normal(rng);
    std::vector<uint32_t> got(static_cast<size_t>(cpu::bf16_a_pairs(c.M, K)), 0xdeadbeefu), rows;
    cpu::pack_a(a.data(), lda, seg_stride, c.seg_len, c.segs, c.M, got.data(), rows);
    auto bits = [&](int64_t i, int64_t k) -> uint32_t {  // element (i, k) rounded, as dg::bfloat16
      if (k >= K) return 0;
      const float v = a[static_cast<size_t>(i * lda + (k / c.seg_len) * seg_stride + k % c.seg_len)];
      return bfloat16(v).bits;
    };
    int64_t wrong = 0;
    for (int64_t i = 0; i < c.M; ++i)
      for (int64_t kp = 0; kp < Kp; ++kp) {
        const uint32_t want = bits(i, 2 * kp) | (bits(i, 2 * kp + 1) << 16);
        const uint32_t at = got[static_cast<size_t>((i / 8) * 8 * Kp + kp * 8 + i % 8)];
        if (at != want && wrong++ == 0) UNSCOPED_INFO("first: row " << i << ", pair " << kp << ": got " << at << ", want " << want);
      }
    CHECK(wrong == 0);
  }
}
#endif

TEST_CASE("bf16 rounding of a range: the bits of dg::bfloat16 element by element, and with the GELU after it") {
  // normal values, ties to even both ways, the largest finite float (rounds to infinity), both
  // infinities, NaNs of either sign and payload, subnormals, zeros; lengths below, at and past a
  // whole SIMD register, so whole packets and a partial last one
  std::vector<float> special;
  for (uint32_t u : {0x3f808000u, 0x3f818000u, 0x3f80ffffu, 0x7f7fffffu, 0x7f800000u, 0xff800000u, 0x7fc00001u,
                     0xffc12345u, 0x7f800001u, 0x00000001u, 0x807fffffu, 0x00000000u, 0x80000000u, 0x3f7f8000u}) {
    float f;
    std::memcpy(&f, &u, 4);
    special.push_back(f);
  }
  std::mt19937 rng(21);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (const int64_t n : {int64_t(1), int64_t(7), int64_t(16), int64_t(37), int64_t(100)}) {
    INFO("n " << n);
    std::vector<float> x(static_cast<size_t>(n)), r(x.size()), y(x.size()), g(x.size()), gt(x.size());
    for (int64_t i = 0; i < n; ++i) x[i] = i % 3 == 0 ? special[(i / 3) % special.size()] : normal(rng);
    std::vector<bfloat16> hs(x.size()), hs2(x.size());
    cpu::round_bf16_range(x.data(), hs.data(), r.data(), n);
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; ++i) {
      const bfloat16 want(x[i]);
      uint32_t rb, wb;
      const float wf = float(want);
      std::memcpy(&rb, &r[i], 4);
      std::memcpy(&wb, &wf, 4);
      if ((hs[i].bits != want.bits || rb != wb) && wrong++ == 0)
        UNSCOPED_INFO("first: element " << i << " (" << x[i] << "): got bits " << hs[i].bits << ", want " << want.bits);
    }
    CHECK(wrong == 0);
    for (const bool tanh_form : {false, true}) {  // one pass equals the rounding, then gelu_range
      cpu::round_bf16_gelu_range(x.data(), hs2.data(), g.data(), n, tanh_form);
      cpu::gelu_range(r.data(), gt.data(), n, tanh_form);
      CHECK(std::memcmp(hs2.data(), hs.data(), hs.size() * sizeof(bfloat16)) == 0);
      CHECK(std::memcmp(g.data(), gt.data(), g.size() * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("bf16 products: depthwise convs and double tensors ignore the setting") {
  Generator gen(8);
  Tensor<float> x = randn<float>({4, 6, 9, 9}, gen), w = randn<float>({6, 1, 7, 7}, gen);
  Tensor<double> xd = x.to<double>(), wd = randn<double>({5, 6, 1, 1}, gen);
  Tensor<float> y32 = conv2d(x, w, {}, 1, 3, 1, 6);
  Tensor<double> yd32 = conv2d(xd, wd, {}, 1, 0);
  MatmulPrecisionGuard bf16(MatmulPrecision::bf16);
  CHECK(max_abs_diff(conv2d(x, w, {}, 1, 3, 1, 6), y32) == 0);
  auto a = conv2d(xd, wd, {}, 1, 0).to_vector(), b = yd32.to_vector();
  CHECK(a == b);
}

TEST_CASE("bf16 products: the setting is per thread, scoped by its guard, parsed with clear errors") {
  CHECK(matmul_precision() == MatmulPrecision::fp32);
  {
    MatmulPrecisionGuard g(MatmulPrecision::bf16);
    CHECK(matmul_precision() == MatmulPrecision::bf16);
    MatmulPrecision seen = MatmulPrecision::bf16;
    std::thread([&] { seen = matmul_precision(); }).join();
    CHECK(seen == MatmulPrecision::fp32);  // another thread keeps its own (default) setting
    {
      MatmulPrecisionGuard inner(MatmulPrecision::fp32);
      CHECK(matmul_precision() == MatmulPrecision::fp32);
    }
    CHECK(matmul_precision() == MatmulPrecision::bf16);
  }
  CHECK(matmul_precision() == MatmulPrecision::fp32);
  CHECK(parse_matmul_precision("bf16") == MatmulPrecision::bf16);
  CHECK(parse_matmul_precision("fp32") == MatmulPrecision::fp32);
  CHECK(std::string(to_string(MatmulPrecision::bf16)) == "bf16");
  REQUIRE_THROWS_WITH(parse_matmul_precision("fp16"),
                      Catch::Contains("expected \"fp32\" or \"bf16\"") && Catch::Contains("got \"fp16\""));
}

TEST_CASE("bf16 products: conv2d and gelu_conv2d record the precision of their forward for backward") {
  // (gelu_conv2d under bf16 also rounds its input: the next case compares it with the two ops)
  Generator gen(9);
  const int64_t N = std::max<int64_t>(4, cpu::max_threads());
  Tensor<float> x0 = randn<float>({N, 12, 6, 6}, gen), w0 = randn<float>({20, 12, 1, 1}, gen);
  Tensor<float> dout = randn<float>({N, 20, 6, 6}, gen);
  auto run = [&](bool fused, bool bf16_forward, bool bf16_backward) {
    Tensor<float> x = x0.clone().requires_grad_(), w = w0.clone().requires_grad_();
    Tensor<float> y;
    {
      MatmulPrecisionGuard g(bf16_forward ? MatmulPrecision::bf16 : MatmulPrecision::fp32);
      y = fused ? gelu_conv2d(x, w) : conv2d(gelu(x), w);
    }
    MatmulPrecisionGuard g(bf16_backward ? MatmulPrecision::bf16 : MatmulPrecision::fp32);
    y.backward(dout);
    return std::vector<Tensor<float>>{y.detach(), x.grad(), w.grad()};
  };
  for (bool fused : {false, true}) {
    INFO((fused ? "gelu_conv2d" : "conv2d(gelu(x))"));
    auto both = run(fused, true, true), forward_only = run(fused, true, false), none = run(fused, false, true);
    for (int i = 0; i < 3; ++i) {
      CHECK(max_abs_diff(both[i], forward_only[i]) == 0);  // backward ran as its forward did
      if (cpu::kBf16Gemm) CHECK(max_abs_diff(both[i], none[i]) > 0);
    }
  }
}

TEST_CASE("bf16 products: gelu_conv2d keeps its input in bfloat16 and takes the GELU of the rounded values") {
  // under bf16 products gelu_conv2d is conv2d(gelu(round(h))) with h's gradient passed straight
  // through the rounding: bit for bit the two ops run on a leaf holding round(h), on every CPU
  // (the rounding of h does not need AVX512-BF16); grouped convs take float products and keep h
  Generator gen(12);
  const int64_t N = std::max<int64_t>(4, cpu::max_threads());
  struct GeluCase {
    int64_t k, stride, padding, groups;
    bool tanh_form, bias;
    const char* what;
  };
  const GeluCase cases[] = {
      {1, 1, 0, 1, false, true, "1x1 (panel GEMMs, the GELU per chunk of images)"},
      {1, 1, 0, 1, true, false, "1x1, tanh form, no bias"},
      {2, 2, 0, 1, false, true, "2x2 stride 2 (im2col)"},
      {3, 1, 1, 1, false, true, "3x3 pad 1"},
      {1, 1, 0, 2, false, true, "1x1 groups 2: float products, h kept in float"},
  };
  for (const GeluCase& c : cases) {
    INFO(c.what);
    const Tensor<float> h0 = randn<float>({N, 12, 9, 9}, gen) * 3.0f;
    const Tensor<float> w0 = randn<float>({10, 12 / c.groups, c.k, c.k}, gen), b0 = randn<float>({10}, gen);
    const bool kept_bf16 = c.groups == 1;
    Tensor<float> h = h0.clone().requires_grad_(), w = w0.clone().requires_grad_(), b = b0.clone().requires_grad_();
    // the two ops on a leaf that holds round(h) (or h itself where nothing is rounded)
    Tensor<float> hr = (kept_bf16 ? h0.to<bfloat16>().to<float>() : h0.clone()).requires_grad_();
    Tensor<float> w2 = w0.clone().requires_grad_(), b2 = b0.clone().requires_grad_();
    Tensor<float> bias = c.bias ? b : Tensor<float>(), bias2 = c.bias ? b2 : Tensor<float>();
    Tensor<float> fused, apart;
    size_t held = 0;
    {
      MatmulPrecisionGuard bf16(MatmulPrecision::bf16);
      const size_t before = cpu_memory_allocated();
      fused = gelu_conv2d(h, w, bias, c.stride, c.padding, 1, c.groups, c.tanh_form);
      held = cpu_memory_allocated() - before - static_cast<size_t>(fused.numel()) * sizeof(float);
      apart = conv2d(gelu(hr, c.tanh_form), w2, bias2, c.stride, c.padding, 1, c.groups);
    }
    // what the op keeps for backward: h in bfloat16 (2 bytes an element), or nothing (h is shared)
    CHECK(held == (kept_bf16 ? static_cast<size_t>(h.numel()) * sizeof(bfloat16) : 0));
    CHECK(max_abs_diff(fused, apart) == 0);
    const Tensor<float> dout = randn<float>(fused.shape(), gen);
    fused.backward(dout);
    apart.backward(dout);
    CHECK(max_abs_diff(h.grad(), hr.grad()) == 0);
    CHECK(max_abs_diff(w.grad(), w2.grad()) == 0);
    if (c.bias) CHECK(max_abs_diff(b.grad(), b2.grad()) == 0);
    if (kept_bf16) {  // the rounding did happen: the GELU of h itself gives other values
      Tensor<float> unrounded;
      {
        MatmulPrecisionGuard bf16(MatmulPrecision::bf16);
        NoGradGuard no_grad;
        unrounded = conv2d(gelu(h0, c.tanh_form), w0, bias.defined() ? b0 : Tensor<float>(), c.stride, c.padding);
      }
      CHECK(max_abs_diff(fused, unrounded) > 0);
    }
  }
  // only the bias asks for a gradient: nothing of h is kept
  Tensor<float> h = randn<float>({N, 12, 5, 5}, gen), w = randn<float>({6, 12, 1, 1}, gen);
  Tensor<float> b = zeros<float>({6}).requires_grad_();
  MatmulPrecisionGuard bf16(MatmulPrecision::bf16);
  const size_t before = cpu_memory_allocated();
  Tensor<float> y = gelu_conv2d(h, w, b);
  CHECK(cpu_memory_allocated() - before == static_cast<size_t>(y.numel()) * sizeof(float));
  y.sum().backward();
  CHECK(b.grad().to_vector() == std::vector<float>(6, float(N * 25)));
}

}  // namespace test_bf16
