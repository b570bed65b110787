// tests/test_cpu_fastpaths.cpp: the CPU fast paths that are not a whole op family of their own,
// each against its ref kernel on odd shapes: broadcasting binary maps (cpu::map2), sums over
// dims (cpu::sum), concatenation (cpu::concat), depthwise padded-plane conv kernels, dense convs
// as panel GEMMs over several images, GELU packets, in-place gradient accumulation on the tape
// (threaded above 2^15 elements; a leaf's first gradient adopted), and the caching CPU allocator. Kernels that split work over OpenMP threads run on 1 and 2.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <thread>


#include "test_util.hpp"

namespace test_cpu_fastpaths {

using namespace dg;
using dgtest::with_threads;

namespace {
/// Every element equal (fast and ref paths do the same per-element math).
template <class T>
void require_equal(const Tensor<T>& a, const Tensor<T>& b, const std::string& what) {
  INFO(what);
  REQUIRE(shape_str(a.shape()) == shape_str(b.shape()));
  auto va = a.to_vector(), vb = b.to_vector();
  size_t i = 0;
  while (i < va.size() && double(acc_t<T>(va[i])) == double(acc_t<T>(vb[i]))) ++i;
  INFO("first difference at element " << i << " of " << va.size());
  REQUIRE(i == va.size());
}


/// cpu::conv2d_* against ref::conv2d_* on the given x and dout (views as they come): forward,
/// dx, dweight (relative to its largest element: it sums N*Ho*Wo products) and dbias.
template <class T>
void conv_fast_matches_ref(const Tensor<T>& x, const Tensor<T>& w, const Tensor<T>& b, const Tensor<T>& dout,
                           const Conv2dGeometry& g) {
  const double tol = std::is_same_v<T, double> ? 1e-12 : 1e-5;
  dgtest::require_close(cpu::conv2d_forward(x, w, b, g), ref::conv2d_forward(x, w, b, g), tol, tol, "forward");
  dgtest::require_close(cpu::conv2d_backward_input(dout, w, g), ref::conv2d_backward_input(dout, w, g), tol, tol,
                        "dx");
  auto dw = ref::conv2d_backward_weight(dout, x, g);
  double scale = 1;
  for (auto v : dw.to_vector()) scale = std::max(scale, std::abs(double(v)));
  dgtest::require_close(cpu::conv2d_backward_weight(dout, x, g), dw, tol, tol * scale, "dweight");
  dgtest::require_close(cpu::conv2d_backward_bias(dout, g), ref::conv2d_backward_bias(dout, g), tol, tol * scale,
                        "dbias");
  // the gradients in one sweep (conv2d's backward takes them so), every combination asked for:
  // the bits of the three functions apart
  const Tensor<T> dx = cpu::conv2d_backward_input(dout, w, g), dw1 = cpu::conv2d_backward_weight(dout, x, g);
  const Tensor<T> db = cpu::conv2d_backward_bias(dout, g);
  for (int asked = 1; asked < 8; ++asked) {
    const bool need_x = asked & 1, need_w = asked & 2, need_b = asked & 4;
    INFO("conv2d_backward asked for dx " << need_x << ", dweight " << need_w << ", dbias " << need_b);
    const std::array<Tensor<T>, 3> got = cpu::conv2d_backward(dout, x, w, g, need_x, need_w, need_b);
    CHECK(got[0].defined() == need_x);
    CHECK(got[1].defined() == need_w);
    CHECK(got[2].defined() == need_b);
    if (need_x) require_equal(got[0], dx, "dx");
    if (need_w) require_equal(got[1], dw1, "dweight");
    if (need_b) require_equal(got[2], db, "dbias");
  }
}
}  // namespace

// ---------------------------------------------------------------- cpu::map2

TEMPLATE_TEST_CASE("cpu::map2 matches ref::map2 on broadcast shapes and views", "[fastpath]", float, double,
                   bfloat16) {
  Generator gen(3);
  // (a, b): same shape, per-channel scale both ways, SE gate, rows, scalar, leading broadcast
  std::vector<std::pair<Shape, Shape>> cases{
      {{3, 7, 5, 5}, {3, 7, 5, 5}}, {{3, 7, 5, 5}, {1, 7, 1, 1}}, {{1, 7, 1, 1}, {3, 7, 5, 5}},
      {{3, 17, 3, 3}, {3, 17, 1, 1}}, {{7, 17}, {17}},           {{17, 1}, {1, 9}},
      {{2, 3, 17}, {}},               {{5, 1, 9}, {3, 1}},       {{1, 1, 1, 1}, {1, 3, 1, 1}},
      {{4, 0, 3}, {1, 3}}};
  auto mul = [](auto x, auto y) { return x * y; };
  for (auto& [sa, sb] : cases) {
    INFO("a " << shape_str(sa) << " b " << shape_str(sb));
    auto a = randn<TestType>(sa, gen), b = randn<TestType>(sb, gen);
    require_equal(cpu::map2(a, b, mul, "mul"), ref::map2(a, b, mul, "mul"), "mul");
    auto sub = [](auto x, auto y) { return x - y; };
    require_equal(cpu::map2(a, b, sub, "sub"), ref::map2(a, b, sub, "sub"), "sub");
  }
  // non-contiguous operands: a permuted view, a stepped slice, a narrow along channels
  auto x = randn<TestType>({5, 9, 6, 4}, gen);
  auto p = x.permute({0, 1, 3, 2});
  auto s = x.slice(3, 0, 4, 2);
  auto n = x.narrow(1, 2, 5);
  auto g = randn<TestType>({1, 9, 1, 1}, gen);
  require_equal(cpu::map2(p, g, mul, "mul"), ref::map2(p, g, mul, "mul"), "permuted");
  require_equal(cpu::map2(s, g, mul, "mul"), ref::map2(s, g, mul, "mul"), "sliced");
  require_equal(cpu::map2(n, n, mul, "mul"), ref::map2(n, n, mul, "mul"), "narrowed");
  // big enough for the OpenMP split
  auto big = randn<TestType>({3, 33, 29, 31}, gen), ch = randn<TestType>({1, 33, 1, 1}, gen);
  require_equal(cpu::map2(big, ch, mul, "mul"), ref::map2(big, ch, mul, "mul"), "big");
}

TEST_CASE("cpu::map2 reports broadcast errors like ref::map2", "[fastpath]") {
  auto a = zeros<float>({2, 3}), b = zeros<float>({4});
  REQUIRE_THROWS_WITH(cpu::map2(a, b, [](auto x, auto y) { return x + y; }, "add"), Catch::Contains("add"));
}

// ---------------------------------------------------------------- cpu::sum

TEMPLATE_TEST_CASE("cpu::sum matches ref::sum on odd shapes", "[fastpath]", float, double) {
  Generator gen(5);
  std::vector<std::pair<Shape, Shape>> cases{
      {{3, 7, 5, 5}, {0, 2, 3}}, {{3, 7, 5, 5}, {2, 3}}, {{17, 9}, {0}},     {{17, 9}, {1}},
      {{3, 7, 5, 5}, {}},        {{1, 7, 1, 1}, {0, 2, 3}}, {{3, 7, 5, 5}, {0}}, {{3, 1, 17}, {0, 1}},
      {{131, 67, 3, 3}, {0, 2, 3}}, {{5, 300}, {0}}, {{2, 3, 4}, {0, 1, 2}}};
  for (auto& [shape, dims] : cases) {
    INFO("x " << shape_str(shape) << " dims " << shape_str(dims));
    auto x = randn<TestType>(shape, gen);
    Shape d = dims;
    if (d.empty())
      for (int64_t i = 0; i < x.dim(); ++i) d.push_back(i);
    REQUIRE(cpu::sum_fits(x, d));
    if constexpr (std::is_same_v<TestType, double>) {
      require_equal(cpu::sum(x, d), ref::sum(x, d), "double: ref::sum's order");
    } else {  // float in double lanes: at most a rounding apart
      dgtest::require_close(cpu::sum(x, d), ref::sum(x, d), 1e-6, 1e-6, "float");
    }
  }
  // layouts the fast path leaves to ref::sum: two kept blocks, a view, bfloat16
  auto x = randn<float>({3, 4, 5}, gen);
  CHECK_FALSE(cpu::sum_fits(x, {1}));
  CHECK_FALSE(cpu::sum_fits(x.permute({2, 0, 1}), {0}));
  CHECK_FALSE(cpu::sum_fits(randn<bfloat16>({3, 4}, gen), {0}));
}

TEST_CASE("cpu::sum_of_products gives cpu::sum of the elementwise product, to the bit", "[fastpath]") {
  using TestType = float;
  // a broadcast factor's gradient (mul's backward): sum_to(dout * x) without the product tensor;
  // the layer scale's (N, C, H, W) over {0, 2, 3} and the SE gate's over {2, 3} among them
  Generator gen(7);
  std::vector<std::pair<Shape, Shape>> cases{
      {{3, 7, 5, 5}, {0, 2, 3}}, {{3, 7, 5, 5}, {2, 3}},      {{17, 9}, {0}},         {{17, 9}, {1}},
      {{3, 7, 5, 5}, {}},        {{3, 1, 17}, {0, 1}},       {{131, 67, 3, 3}, {0, 2, 3}}, {{5, 300}, {0}},
      {{16, 32, 14, 14}, {0, 2, 3}}, {{16, 64, 7, 7}, {2, 3}}, {{9, 96, 3, 3}, {2, 3}}};
  for (auto& [shape, dims] : cases) {
    INFO("x " << shape_str(shape) << " dims " << shape_str(dims));
    const auto a = randn<TestType>(shape, gen), b = randn<TestType>(shape, gen);
    Shape d = dims;
    if (d.empty())
      for (int64_t i = 0; i < a.dim(); ++i) d.push_back(i);
    REQUIRE(cpu::sum_fits(a, d));
    for (int threads : {1, 2})
      with_threads(threads, [&] {
        INFO(threads << " threads");
        require_equal(cpu::sum_of_products(a, b, d), cpu::sum(a * b, d), "fused against product then sum");
      });
  }
}

/// g's values as channels [2, 8) of a (4, 10, 5, 7) tensor: a batch-strided window.
template <class T>
Tensor<T> cat_window(const Tensor<T>& g, Generator& gen) {
  return concat({randn<T>({4, 2, 5, 7}, gen), g, randn<T>({4, 2, 5, 7}, gen)}, 1).narrow(1, 2, 6);
}

TEMPLATE_TEST_CASE("mul's gradient of a broadcast factor equals sum_to of the product, to the bit", "[fastpath]",
                   float, double) {
  Generator gen(8);
  const auto g = randn<TestType>({4, 6, 5, 7}, gen), x = randn<TestType>({4, 6, 5, 7}, gen);
  for (const Shape& to : {Shape{1, 6, 1, 1}, Shape{4, 6, 1, 1}, Shape{6, 1, 1}, Shape{1}, Shape{4, 6, 5, 7},
                          Shape{4, 1, 5, 7}}) {
    INFO("to " << shape_str(to));
    require_equal(detail::sum_to_mul(g, x, to), sum_to(g * x, to), "contiguous");
    // a window of channels of a wider gradient (a dense stage's), read in place where its runs
    // stay inside an image; a transposed g takes the product path
    const auto gw = cat_window(g, gen);
    REQUIRE(batch_stride(gw) == 10 * 5 * 7);
    require_equal(detail::sum_to_mul(gw, x, to), sum_to(g * x, to), "batch-strided g");
    require_equal(detail::sum_to_mul(x, gw, to), sum_to(x * g, to), "batch-strided x");
    const auto gt = g.permute({0, 1, 3, 2}).contiguous().permute({0, 1, 3, 2});
    REQUIRE_FALSE(gt.is_contiguous());
    require_equal(detail::sum_to_mul(gt, x, to), sum_to(g * x, to), "transposed g");
  }
  CHECK(cpu::sum_of_products_fits(cat_window(g, gen), x, {0, 2, 3}) == std::is_same_v<TestType, float>);
  CHECK_FALSE(cpu::sum_of_products_fits(cat_window(g, gen), x, {0, 1, 2, 3}));  // one run across images
  // and through autograd: the layer scale's gradient, x * gamma (1, C, 1, 1)
  auto gamma = randn<TestType>({1, 6, 1, 1}, gen).requires_grad_();
  sum(x * gamma * g).backward();
  require_equal(gamma.grad(), sum_to(g * x, {1, 6, 1, 1}), "gamma's gradient");
}

// ---------------------------------------------------------------- cpu::concat

TEMPLATE_TEST_CASE("cpu::concat matches ref::concat", "[fastpath]", float, double, bfloat16) {
  Generator gen(7);
  auto a = randn<TestType>({3, 5, 7, 2}, gen), b = randn<TestType>({3, 1, 7, 2}, gen),
       c = randn<TestType>({3, 9, 2, 7}, gen).permute({0, 1, 3, 2});  // a view
  std::vector<Tensor<TestType>> xs{a, b, c};
  require_equal(cpu::concat(xs, 1, {3, 15, 7, 2}), ref::concat(xs, 1, {3, 15, 7, 2}), "dim 1 with a view");
  auto e = randn<TestType>({1, 5, 7, 2}, gen);
  std::vector<Tensor<TestType>> ys{a, e};
  require_equal(cpu::concat(ys, 0, {4, 5, 7, 2}), ref::concat(ys, 0, {4, 5, 7, 2}), "dim 0");
  auto f = randn<TestType>({3, 5, 7, 3}, gen);
  std::vector<Tensor<TestType>> zs{a, f};
  require_equal(cpu::concat(zs, 3, {3, 5, 7, 5}), ref::concat(zs, 3, {3, 5, 7, 5}), "last dim");
  auto big = randn<TestType>({17, 131, 11, 11}, gen), empty = randn<TestType>({17, 0, 11, 11}, gen);
  std::vector<Tensor<TestType>> bs{big, empty, big};
  require_equal(cpu::concat(bs, 1, {17, 262, 11, 11}), ref::concat(bs, 1, {17, 262, 11, 11}), "big + empty");
}

// ---------------------------------------------------------------- depthwise padded-plane kernels

TEMPLATE_TEST_CASE("conv2d depthwise padded-plane kernels match the ref kernels", "[fastpath]", float, double) {
  Generator gen(11);
  struct Case {
    Shape x;
    int64_t k, p, d;
  };
  // plane sizes around the 16/64-element sweep blocks, dilation, no padding, padding past the
  // reach of the kernel (the strided fallback), 1x1 planes
  std::vector<Case> cases{{{1, 1, 3, 3}, 7, 3, 1},  {{2, 3, 7, 7}, 7, 3, 1},   {{3, 5, 14, 14}, 7, 3, 1},
                          {{2, 3, 33, 20}, 7, 3, 1}, {{2, 4, 9, 13}, 3, 2, 2},  {{1, 3, 11, 5}, 5, 0, 1},
                          {{2, 2, 6, 6}, 3, 3, 1},   {{3, 2, 1, 1}, 7, 3, 1},   {{1, 17, 17, 1}, 3, 1, 1}};
  for (const Case& c : cases) {
    INFO("x " << shape_str(c.x) << " k " << c.k << " p " << c.p << " d " << c.d);
    const int64_t C = c.x[1];
    Shape ws{C, 1, c.k, c.k}, bs{C};
    Conv2dGeometry g = conv2d_geometry(c.x, ws, &bs, {1, 1}, {c.p, c.p}, {c.d, c.d}, C);
    auto x = randn<TestType>(c.x, gen), w = randn<TestType>(ws, gen), b = randn<TestType>(bs, gen);
    auto dout = randn<TestType>(g.out_shape(), gen);
    const double tol = std::is_same_v<TestType, double> ? 1e-12 : 1e-5;
    dgtest::require_close(cpu::conv2d_forward(x, w, b, g), ref::conv2d_forward(x, w, b, g), tol, tol, "forward");
    dgtest::require_close(cpu::conv2d_backward_input(dout, w, g), ref::conv2d_backward_input(dout, w, g), tol, tol,
                          "dx");
    auto dw = ref::conv2d_backward_weight(dout, x, g);
    double scale = 1;  // dweight sums N*Ho*Wo products: compare relative to its size
    for (auto v : dw.to_vector()) scale = std::max(scale, std::abs(double(v)));
    dgtest::require_close(cpu::conv2d_backward_weight(dout, x, g), dw, tol, tol * scale, "dweight");
  }
}

TEMPLATE_TEST_CASE("conv2d depthwise planes of several images side by side match the ref kernels", "[fastpath]",
                   float, double) {
  Generator gen(16);
  struct Case {
    Shape x;
    int64_t kh, kw, ph, pw, dh, dw;
  };
  // batches that leave a short last group of planes (7x7: 6 per group, 14x14: 3, 3x3: 10), tall
  // maps (several row blocks), rectangular kernels and padding, dilation along W (row blocks) and
  // along H (flat sweeps)
  std::vector<Case> cases{{{7, 5, 7, 7}, 7, 7, 3, 3, 1, 1},   {{5, 3, 14, 14}, 7, 7, 3, 3, 1, 1},
                          {{13, 4, 3, 3}, 7, 7, 3, 3, 1, 1},  {{3, 2, 19, 6}, 5, 3, 2, 1, 1, 1},
                          {{4, 3, 8, 9}, 3, 7, 1, 6, 1, 2},   {{6, 2, 9, 5}, 3, 3, 2, 1, 2, 1},
                          {{9, 3, 2, 11}, 7, 5, 3, 2, 1, 1}};
  for (int threads : {1, 2})
    for (const Case& c : cases) {
      INFO("threads " << threads << " x " << shape_str(c.x) << " k " << c.kh << "x" << c.kw << " p " << c.ph << ","
                      << c.pw << " d " << c.dh << "," << c.dw);
      const int64_t N = c.x[0], C = c.x[1];
      Shape ws{C, 1, c.kh, c.kw}, bs{C};
      Conv2dGeometry g = conv2d_geometry(c.x, ws, &bs, {1, 1}, {c.ph, c.pw}, {c.dh, c.dw}, C);
      auto w = randn<TestType>(ws, gen), b = randn<TestType>(bs, gen);
      auto xbuf = randn<TestType>({N, C + 2, c.x[2], c.x[3]}, gen);  // x: a dense stage's prefix view
      auto dout = randn<TestType>(g.out_shape(), gen);
      with_threads(threads, [&] { conv_fast_matches_ref(xbuf.narrow(1, 0, C), w, b, dout, g); });
    }
}

TEMPLATE_TEST_CASE("conv2d pointwise on small maps: images folded into one GEMM match the ref kernels", "[fastpath]",
                   float, double) {
  Generator gen(12);
  // 41 images of 3x3 (P = 9): several uneven chunks of images side by side; 2x2 and 4x3 maps
  for (Shape xs : {Shape{41, 7, 3, 3}, Shape{3, 5, 2, 2}, Shape{67, 3, 4, 3}}) {
    INFO("x " << shape_str(xs));
    Shape ws{5, xs[1], 1, 1}, bs{5};
    Conv2dGeometry g = conv2d_geometry(xs, ws, &bs, {1, 1}, {0, 0}, {1, 1}, 1);
    auto x = randn<TestType>(xs, gen), w = randn<TestType>(ws, gen), b = randn<TestType>(bs, gen);
    auto dout = randn<TestType>(g.out_shape(), gen);
    const double tol = std::is_same_v<TestType, double> ? 1e-12 : 1e-5;
    dgtest::require_close(cpu::conv2d_forward(x, w, b, g), ref::conv2d_forward(x, w, b, g), tol, tol, "forward");
    dgtest::require_close(cpu::conv2d_backward_input(dout, w, g), ref::conv2d_backward_input(dout, w, g), tol, tol,
                          "dx");
  }
}

TEMPLATE_TEST_CASE("conv2d panel GEMMs (several images per GEMM) match the ref kernels", "[fastpath]", float,
                   double) {
  Generator gen(14);
  struct Case {
    Shape x;
    int64_t c_out, kh, kw, s, p, d;
  };
  // pointwise on 14x14, 7x7, 3x3, 1x1 and odd maps, C_in above and below C_out (dW gathers the
  // other operand transposed), row counts off the tiles (8 rows with AVX-512, 6 with AVX2) and the
  // vectors (16 or 8 floats), batches that leave a short last chunk; im2col convs: the k2 s2
  // transitions, padding, dilation, a strided 1x1, a rectangular kernel
  std::vector<Case> cases{{{6, 9, 14, 14}, 20, 1, 1, 1, 0, 1}, {{17, 13, 7, 7}, 35, 1, 1, 1, 0, 1},
                          {{41, 7, 3, 3}, 5, 1, 1, 1, 0, 1},   {{41, 5, 3, 3}, 13, 1, 1, 1, 0, 1},
                          {{67, 3, 1, 1}, 19, 1, 1, 1, 0, 1},  {{3, 19, 5, 7}, 8, 1, 1, 1, 0, 1},
                          {{1, 4, 6, 5}, 3, 1, 1, 1, 0, 1},    {{5, 6, 9, 9}, 7, 2, 2, 2, 0, 1},
                          {{9, 12, 7, 7}, 17, 2, 2, 2, 0, 1},  {{3, 4, 8, 7}, 9, 3, 3, 1, 1, 1},
                          {{4, 3, 11, 10}, 10, 3, 3, 2, 2, 2}, {{2, 5, 6, 6}, 6, 1, 1, 2, 0, 1},
                          {{3, 2, 9, 8}, 5, 2, 3, 1, 1, 1},
                          // contractions over 256 (blocks of K with AVX2): forward, dx, an im2col conv
                          {{3, 300, 5, 5}, 13, 1, 1, 1, 0, 1}, {{3, 7, 5, 5}, 300, 1, 1, 1, 0, 1},
                          {{3, 70, 6, 6}, 9, 2, 2, 2, 0, 1},
                          // patch convs (kernel == stride): a k4 s4 stem, k2 s2 on rows of more than
                          // 16 windows, k3 s3 with rows and columns left over
                          {{2, 3, 17, 18}, 8, 4, 4, 4, 0, 1}, {{3, 5, 40, 37}, 6, 2, 2, 2, 0, 1},
                          {{2, 4, 11, 10}, 5, 3, 3, 3, 0, 1}};
  for (int threads : {1, 2})
    for (const Case& c : cases) {
      INFO("threads " << threads << " x " << shape_str(c.x) << " C_out " << c.c_out << " k " << c.kh << "x" << c.kw
                      << " s " << c.s << " p " << c.p << " d " << c.d);
      const int64_t N = c.x[0], C = c.x[1];
      Shape ws{c.c_out, C, c.kh, c.kw}, bs{c.c_out};
      Conv2dGeometry g = conv2d_geometry(c.x, ws, &bs, {c.s, c.s}, {c.p, c.p}, {c.d, c.d}, 1);
      auto w = randn<TestType>(ws, gen), b = randn<TestType>(bs, gen);
      // x and dout as a dense stage's prefix views (batch-strided, read in place), contiguous, and
      // permuted (copied first)
      auto xbuf = randn<TestType>({N, C + 3, c.x[2], c.x[3]}, gen);
      auto dbuf = randn<TestType>({N, c.c_out + 5, g.Ho, g.Wo}, gen);
      auto xc = randn<TestType>(c.x, gen), dc = randn<TestType>(g.out_shape(), gen);
      auto xt = randn<TestType>({N, C, c.x[3], c.x[2]}, gen).transpose(2, 3);
      with_threads(threads, [&] {
        {
          INFO("batch-strided views");
          conv_fast_matches_ref(xbuf.narrow(1, 2, C), w, b, dbuf.narrow(1, 0, c.c_out), g);
        }
        {
          INFO("contiguous");
          conv_fast_matches_ref(xc, w, b, dc, g);
        }
        {
          INFO("transposed x");
          conv_fast_matches_ref(xt, w, Tensor<TestType>(), dc, g);
        }
      });
    }
}

TEMPLATE_TEST_CASE("im2col and col2im of patch convs (kernel == stride) give the general loops' values to the bit",
                   "[fastpath]", float, double) {
  // x holds -0, and col both signs of zero: col2im's 0 += v makes -0 into +0, and so must the
  // patch path; rows of col lie ld > P apart, as in a chunk of images side by side
  Generator gen(31);
  for (int64_t k : {2, 3, 4})
    for (int64_t h : {5, 8, 9})
      for (int64_t w : std::initializer_list<int64_t>{2 * k, 7, 36, 41}) {
        if (w < k || h < k) continue;
        INFO("k = s = " << k << ", " << h << "x" << w);
        const int64_t C = 3;
        Shape xs{1, C, h, w}, ws{4, C, k, k};
        const Conv2dGeometry g = conv2d_geometry(xs, ws, nullptr, {k, k}, {0, 0}, {1, 1}, 1);
        REQUIRE(cpu::conv_detail::is_patch_conv(g));
        const int64_t K = C * k * k, P = g.Ho * g.Wo, ld = P + 5;
        std::vector<TestType> x = randn<TestType>(xs, gen).to_vector();
        x[1] = TestType(-0.0);
        std::vector<TestType> col(static_cast<size_t>(K * ld), TestType(7)), want = col;
        cpu::conv_detail::im2col(x.data(), col.data(), g, ld);
        for (int64_t c = 0; c < C; ++c)  // row (c, kh, kw), pixel (oh, ow) = x[c, oh*k + kh, ow*k + kw]
          for (int64_t kh = 0; kh < k; ++kh)
            for (int64_t kw = 0; kw < k; ++kw)
              for (int64_t p = 0; p < P; ++p)
                want[((c * k + kh) * k + kw) * ld + p] = x[(c * h + p / g.Wo * k + kh) * w + p % g.Wo * k + kw];
        REQUIRE(std::memcmp(col.data(), want.data(), col.size() * sizeof(TestType)) == 0);  // the padding untouched too

        for (size_t i = 0; i < col.size(); ++i) col[i] = i % 3 == 0 ? TestType(-0.0) : TestType(col[i] * 0.5f);
        std::vector<TestType> dx(x.size(), TestType(9)), dx_want(x.size(), TestType(0));
        cpu::conv_detail::col2im(col.data(), dx.data(), g, ld);
        for (int64_t c = 0; c < C; ++c)
          for (int64_t kh = 0; kh < k; ++kh)
            for (int64_t kw = 0; kw < k; ++kw)
              for (int64_t p = 0; p < P; ++p)
                dx_want[(c * h + p / g.Wo * k + kh) * w + p % g.Wo * k + kw] += col[((c * k + kh) * k + kw) * ld + p];
        REQUIRE(std::memcmp(dx.data(), dx_want.data(), dx.size() * sizeof(TestType)) == 0);
      }
}

TEMPLATE_TEST_CASE("gelu packets match ref::gelu on every tail length, 1 and 2 threads", "[fastpath]", float,
                   bfloat16) {
  Generator gen(15);
  const double tol = std::is_same_v<TestType, float> ? 1e-5 : 1e-2;
  for (int threads : {1, 2})
    for (int64_t n : {1, 15, 16, 17, 31, 33, 4095, 4096, 4097, 40000}) {
      INFO("threads " << threads << " n " << n);
      auto x = randn<TestType>({n}, gen, 0, 3), dy = randn<TestType>({n}, gen);
      auto xd = x.template to<double>(), dyd = dy.template to<double>();
      for (bool tanh_form : {false, true})
        with_threads(threads, [&] {
          dgtest::require_close(cpu::gelu(x, tanh_form).template to<double>(), ref::gelu(xd, tanh_form), tol,
                                tol * 0.1, "forward");
          dgtest::require_close(cpu::gelu_backward(dy, x, tanh_form).template to<double>(),
                                ref::gelu_backward(dyd, xd, tanh_form), tol, tol * 0.1, "backward");
        });
    }
}

/// The elements of t, to compare their bytes with memcmp (bit for bit, NaN included).
template <class T>
std::vector<T> values_of(const Tensor<T>& t) {
  return t.contiguous().to_vector();
}

TEMPLATE_TEST_CASE("gelu_and_backward_ gives cpu::gelu and cpu::gelu_backward to the bit, dy overwritten",
                   "[fastpath]", float, bfloat16, double) {
  Generator gen(16);
  for (int threads : {1, 2})
    for (int64_t n : {1, 15, 17, 4097, 40000}) {
      INFO("threads " << threads << " n " << n);
      auto x = randn<TestType>({n}, gen, 0, 3), dy = randn<TestType>({n}, gen);
      for (bool tanh_form : {false, true})
        with_threads(threads, [&] {
          INFO("tanh form " << tanh_form);
          Tensor<TestType> d = dy.clone();
          const Tensor<TestType> y = cpu::gelu_and_backward_(d, x, tanh_form);
          const std::vector<TestType> y_want = values_of(cpu::gelu(x, tanh_form));
          const std::vector<TestType> d_want = values_of(cpu::gelu_backward(dy, x, tanh_form));
          const std::vector<TestType> y_got = values_of(y), d_got = values_of(d);
          REQUIRE(y_got.size() == y_want.size());
          REQUIRE(d_got.size() == d_want.size());
          CHECK(std::memcmp(y_got.data(), y_want.data(), y_got.size() * sizeof(TestType)) == 0);
          CHECK(std::memcmp(d_got.data(), d_want.data(), d_got.size() * sizeof(TestType)) == 0);
        });
    }
  Tensor<TestType> short_dy = zeros<TestType>({3});
  CHECK_THROWS_WITH(cpu::gelu_and_backward_(short_dy, zeros<TestType>({4}), false),
                    Catch::Contains("expected contiguous dy and x of one shape, got [3] and [4]"));
}

TEST_CASE("gelu_and_backward_ of a bfloat16 x gives that of the widened float x, to the bit", "[fastpath]") {
  Generator gen(17);
  for (int threads : {1, 2})
    for (int64_t n : {1, 15, 17, 4097, 40000}) {
      INFO("threads " << threads << " n " << n);
      const Tensor<float> xf = randn<float>({n}, gen, 0, 3), dy = randn<float>({n}, gen);
      Tensor<bfloat16> xs = Tensor<bfloat16>::empty({n});
      const Tensor<float> xr = cpu::round_to_bf16(xf, xs);  // xr: xs's values as float
      for (bool tanh_form : {false, true})
        with_threads(threads, [&] {
          INFO("tanh form " << tanh_form);
          Tensor<float> d_half = dy.clone(), d_float = dy.clone();
          const std::vector<float> y_got = values_of(cpu::gelu_and_backward_(d_half, xs, tanh_form));
          const std::vector<float> y_want = values_of(cpu::gelu_and_backward_(d_float, xr, tanh_form));
          const std::vector<float> d_got = values_of(d_half), d_want = values_of(d_float);
          CHECK(std::memcmp(y_got.data(), y_want.data(), y_got.size() * sizeof(float)) == 0);
          CHECK(std::memcmp(d_got.data(), d_want.data(), d_got.size() * sizeof(float)) == 0);
        });
    }
}

/// bfloat16 bits of the float with bits u by comparison: the nearer of the two bfloat16 around it
/// (ties: the even one), the quiet NaN for any NaN. Another formulation than from_float's.
uint16_t bf16_bits_by_comparison(uint32_t u) {
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  const uint32_t low = u >> 16, rest = u & 0xffffu;  // low: toward zero in magnitude
  if (rest < 0x8000u) return static_cast<uint16_t>(low);
  if (rest > 0x8000u) return static_cast<uint16_t>(low + 1);  // carries into the exponent: may be inf
  return static_cast<uint16_t>(low % 2 == 0 ? low : low + 1);
}

TEST_CASE("bfloat16 rounding (dg::bfloat16, cpu::round_bf16_range): ties to even, overflow, denormals, inf, NaN",
          "[fastpath]") {
  std::vector<uint32_t> bits = {0x00000000u, 0x80000000u, 0x3f800000u, 0x3f808000u, 0x3f818000u, 0x3f80ffffu,
                                0x3f807fffu, 0x7f7fffffu, 0xff7fffffu, 0x7f7f8000u, 0x7f800000u, 0xff800000u,
                                0x7fc00000u, 0x7f800001u, 0xffc12345u, 0xffffffffu, 0x00000001u, 0x00008000u,
                                0x00018000u, 0x807fffffu};
  std::mt19937 rng(5);
  for (int i = 0; i < 5000; ++i) bits.push_back(static_cast<uint32_t>(rng()));
  const int64_t n = static_cast<int64_t>(bits.size());
  std::vector<float> x(bits.size()), r(bits.size());
  std::memcpy(x.data(), bits.data(), bits.size() * 4);
  std::vector<bfloat16> hs(bits.size());
  cpu::round_bf16_range(x.data(), hs.data(), r.data(), n);
  int64_t wrong = 0, first = -1;
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t want = bf16_bits_by_comparison(bits[static_cast<size_t>(i)]);
    uint32_t r_bits;
    std::memcpy(&r_bits, &r[static_cast<size_t>(i)], 4);
    const bool ok = hs[static_cast<size_t>(i)].bits == want && r_bits == uint32_t(want) << 16 &&
                    bfloat16(x[static_cast<size_t>(i)]).bits == want;
    if (!ok && first < 0) first = i;
    wrong += !ok;
  }
  INFO("first wrong input bits 0x" << std::hex << (first < 0 ? 0u : bits[static_cast<size_t>(first)]));
  CHECK(wrong == 0);
  // in place (r = x), as gelu_conv2d's forward calls it
  std::vector<float> y = x;
  cpu::round_bf16_range(y.data(), hs.data(), y.data(), n);
  CHECK(std::memcmp(y.data(), r.data(), y.size() * 4) == 0);
}

TEST_CASE("gelu packets on a grid into both tails, and at +-inf and NaN", "[fastpath]") {
  // every 1/64 from -90 to 90: the tails where the density's exp underflows (x^2 / 2 > 87) and the
  // negative side where 1 + erf cancels; then the values that must come out exactly. atol: the erf
  // formula's own error (1.5e-7) times |x| / 2 peaks near |x| = 3-4; the tanh form's derivative
  // has 1 - s for s near 1 (as torch's 1 - tanh^2), 1.6e-6 of it at x = 5 known to a float ulp
  std::vector<float> grid;
  for (int i = -90 * 64; i <= 90 * 64; ++i) grid.push_back(float(i) / 64.0f);
  auto x = tensor<float>(grid);
  auto dy = ones<float>({int64_t(grid.size())});
  auto xd = x.to<double>(), dyd = dy.to<double>();
  for (bool tanh_form : {false, true}) {
    INFO("tanh form " << tanh_form);
    const double atol = tanh_form ? 2e-6 : 5e-7;
    dgtest::require_close(cpu::gelu(x, tanh_form).to<double>(), ref::gelu(xd, tanh_form), 1e-6, atol, "forward");
    dgtest::require_close(cpu::gelu_backward(dy, x, tanh_form).to<double>(), ref::gelu_backward(dyd, xd, tanh_form),
                          1e-6, atol, "backward");
    const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
    auto special = tensor<float>({inf, -inf, nan, 0.0f});
    auto y = cpu::gelu(special, tanh_form), d = cpu::gelu_backward(ones<float>({4}), special, tanh_form);
    CHECK(y.data()[0] == inf);
    CHECK(std::isnan(y.data()[1]));  // -inf * Phi(-inf) = -inf * 0, as torch
    CHECK(std::isnan(y.data()[2]));
    CHECK(y.data()[3] == 0.0f);
    CHECK(std::isnan(d.data()[0]));  // 1 + inf * phi(inf) = 1 + inf * 0, as ref and torch
    CHECK(std::isnan(d.data()[2]));
    CHECK(d.data()[3] == 0.5f);
  }
}

// ---------------------------------------------------------------- tape accumulation

TEST_CASE("in-place gradient accumulation: features feeding several concats", "[fastpath][autograd]") {
  Generator gen(13);
  // a dense stage in miniature: f0 feeds two concats and a product, f1 one concat and a sum;
  // the gradients of narrow() views of one dout must not leak into each other
  auto f0 = randn<double>({2, 3, 3, 2}, gen), f1 = randn<double>({2, 2, 3, 2}, gen);
  auto s = randn<double>({1, 5, 1, 1}, gen), v = randn<double>({2, 3, 3, 2}, gen);
  dgtest::require_gradcheck(
      [](const std::vector<Tensor<double>>& in) {
        auto c1 = concat({in[0], in[1]}, 1) * in[2];
        auto c2 = concat({in[0], c1.narrow(1, 0, 3) * in[3]}, 1);
        return sum(c1) + sum(c2 * c2) + sum(in[0] * in[3]) + sum(in[1]);
      },
      {f0, f1, s, v});
}

TEST_CASE("in-place accumulation leaves a caller's gradient tensor alone", "[fastpath][autograd]") {
  auto x = ones<float>({3, 4}).requires_grad_();
  auto y = x * 2.0;
  auto z = y + y;  // y's node receives dout twice (the same tensor): sums into a fresh buffer
  auto g = full<float>({3, 4}, 1.0f);
  z.backward(g);
  CHECK(g.to_vector() == std::vector<float>(12, 1.0f));  // the given gradient is untouched
  CHECK(x.grad().to_vector() == std::vector<float>(12, 4.0f));
}

TEST_CASE("a leaf's first gradient becomes its .grad only when no one else holds it", "[fastpath][autograd]") {
  auto a = tensor<float>({1, 2, 3}).requires_grad_(), b = tensor<float>({4, 5, 6}).requires_grad_();
  sum(a + b).backward();  // add's backward hands one dout to both leaves
  REQUIRE_FALSE(a.grad().storage().is_alias_of(b.grad().storage()));
  a.grad().copy_(zeros<float>({3}));
  CHECK(b.grad().to_vector() == std::vector<float>{1, 1, 1});
  auto c = tensor<float>({1, 2}).requires_grad_();
  sum(c * 3.0f).backward();  // mul's fresh gradient: adopted, and later ones sum into it
  sum(c * 3.0f).backward();
  CHECK(c.grad().to_vector() == std::vector<float>{6, 6});
  auto leaf = tensor<float>({1, 2}).requires_grad_();
  auto g = tensor<float>({7, 8});
  leaf.backward(g);  // the caller's tensor is copied, not taken
  REQUIRE_FALSE(leaf.grad().storage().is_alias_of(g.storage()));
  leaf.backward(g);
  CHECK(g.to_vector() == std::vector<float>{7, 8});
  CHECK(leaf.grad().to_vector() == std::vector<float>{14, 16});
}

TEST_CASE("gradient sums of 2^15+ elements split over threads: same bits on 1 and 2 threads", "[fastpath][autograd]") {
  // a dense stage of (8, 16, 24, 24) features: the prefix gradients are strided windows of one
  // dout summed into the features' pending gradients, and the buffer writes are split by image
  Generator gen(14);
  const auto x = randn<float>({8, 16, 24, 24}, gen), w = randn<float>({16, 1, 7, 7}, gen);
  REQUIRE(x.numel() >= autograd::detail::kParallelAccumulate);
  auto run = [&](bool buffer, int threads, const Tensor<float>& input) {
    std::pair<Tensor<float>, Tensor<float>> r;
    with_threads(threads, [&] {
      auto xi = input.detach().clone().requires_grad_();
      auto h = xi * 1.5f;
      Tensor<float> out;
      if (buffer) {
        DenseBuffer<float> buf(h, 48);
        Tensor<float> p = buf.append(h);
        p = buf.append(conv2d(p, w, Tensor<float>(), 1, 3, 1, 16));
        out = buf.append(conv2d(p.narrow(1, 16, 16), w, Tensor<float>(), 1, 3, 1, 16) + p.narrow(1, 0, 16));
      } else {
        auto c1 = conv2d(h, w, Tensor<float>(), 1, 3, 1, 16);
        auto p = concat({h, c1}, 1);
        out = concat({p, conv2d(p.narrow(1, 16, 16), w, Tensor<float>(), 1, 3, 1, 16) + p.narrow(1, 0, 16)}, 1);
      }
      sum(out * out).backward();
      r = {out.detach(), xi.grad()};
    });
    return r;
  };
  auto [y1, g1] = run(true, 1, x);
  auto [y2, g2] = run(true, 2, x);
  auto [yc, gc] = run(false, 1, x);
  require_equal(y2, y1, "forward, 2 threads against 1");
  require_equal(g2, g1, "dx, 2 threads against 1");
  require_equal(y1, yc, "forward, buffer against concat");
  require_equal(g1, gc, "dx, buffer against concat");
  // the reference: each image alone (9,216 elements: the serial sums), images being independent
  std::vector<Tensor<float>> ys, gs;
  for (int64_t i = 0; i < x.size(0); ++i) {
    auto [yi, gi] = run(true, 1, x.narrow(0, i, 1).contiguous());
    ys.push_back(yi);
    gs.push_back(gi);
  }
  require_equal(y2, concat(ys, 0), "forward, batch against image by image");
  require_equal(g2, concat(gs, 0), "dx, batch against image by image");
}

TEMPLATE_TEST_CASE("a gradient broadcast over trailing dims sums into a dense one, one value per run", "[fastpath][autograd]",
                   float, double) {
  // an SE module's input in miniature: read by mean over H, W (whose gradient is an expanded
  // (N, C, 1, 1) view) and by a product; the two gradients meet in x's buffer
  Generator gen(16);
  for (const Shape& shape : {Shape{2, 3, 5, 7}, Shape{4, 16, 24, 24}}) {  // the second is threaded (2^15+)
    const int64_t N = shape[0], C = shape[1], HW = shape[2] * shape[3];
    const auto s = randn<TestType>({N, C, 1, 1}, gen), t = randn<TestType>({N, C, 1, 1}, gen);
    for (int threads : {1, 2})
      with_threads(threads, [&] {
        INFO("x " << shape_str(shape) << ", " << threads << " threads");
        auto x = randn<TestType>(shape, gen).requires_grad_();
        (sum(x * s) + sum(mean(x, {2, 3}, true) * t)).backward();
        // d/dx: s (the product's) + t / HW (mean's, as it scales: t * (T)(1 / HW)), either order
        using A = acc_t<TestType>;
        const auto vs = s.to_vector(), vt = t.to_vector(), got = x.grad().to_vector();
        const A scale = A(1.0 / static_cast<double>(HW));
        size_t bad = 0;
        for (size_t i = 0; i < got.size(); ++i) {
          const size_t nc = i / static_cast<size_t>(HW);
          const TestType want = TestType(A(vs[nc]) + A(TestType(A(vt[nc]) * scale)));
          if (!(got[i] == want)) ++bad;
        }
        CHECK(bad == 0);
      });
  }
  // broadcast along channels (not trailing): the general loop
  auto x = randn<TestType>({2, 3, 4, 5}, gen).requires_grad_();
  const auto u = randn<TestType>({2, 1, 4, 5}, gen);
  (sum(x * 2.0) + sum(mean(x, {1}, true) * u)).backward();
  dgtest::require_close(x.grad(), (u * (1.0 / 3.0)).expand({2, 3, 4, 5}).contiguous() + 2.0, 1e-6, 1e-6,
                        "channel-broadcast gradient");
}

// ---------------------------------------------------------------- caching allocator

TEST_CASE("caching CPU allocator reuses, caps and releases blocks", "[fastpath][storage]") {
  using A = CachingCpuAllocator;
  for (size_t n : {size_t(0), size_t(1), size_t(63), size_t(64), size_t(257), size_t(1000), size_t(4096),
                   size_t(123457), size_t(1) << 30}) {
    INFO("n " << n);
    size_t c = A::size_class(n);
    CHECK(c >= n);
    CHECK(c % 64 == 0);
    CHECK(c <= std::max<size_t>(64, n + n / 4 + 64));
    CHECK(A::size_class(c) == c);
  }
  A a;
  void* p = a.allocate(1000);
  a.deallocate(p, 1000);
  CHECK(a.cached_bytes() == A::size_class(1000));
  void* q = a.allocate(1010);  // same size class: the cached block comes back
  CHECK(q == p);
  CHECK(a.cached_bytes() == 0);
  a.deallocate(q, 1010);
  a.release_cached();
  CHECK(a.cached_bytes() == 0);
  a.set_max_cached_bytes(0);  // caching off: blocks go straight back
  void* r = a.allocate(5000);
  a.deallocate(r, 5000);
  CHECK(a.cached_bytes() == 0);
}

TEST_CASE("caching CPU allocator gives the oldest blocks back on a miss", "[fastpath][storage]") {
  using A = CachingCpuAllocator;
  A a;
  a.set_budget(2.0);     // the default is no bound
  a.set_fit_ratio(1.0);  // blocks of the request's own class only (best fit is tested below)
  // One block at a time, each size once: the cache fills with sizes never asked for again. A
  // miss gives back the oldest blocks while in use + cached + the request passes 2 x the peak:
  // 4096+5120 cached, 6144 asked (peak 6144): 15360 > 12288, 4096 goes; 7168 asked: 5120 goes;
  // 8192 asked: 6144 goes.
  for (size_t n : {4096, 5120, 6144, 7168, 8192}) {
    CHECK(A::size_class(n) == n);
    a.deallocate(a.allocate(n), n);
  }
  CHECK(a.cached_bytes() == 7168 + 8192);
  void* hit = a.allocate(7000);  // class 7168: cached, handed out again
  CHECK(a.cached_bytes() == 8192);
  void* miss = a.allocate(4096);  // given back before: a miss, within bounds (7168 + 8192 + 4096 <= 2 x 11264)
  CHECK(a.cached_bytes() == 8192);
  a.deallocate(hit, 7000);
  a.deallocate(miss, 4096);
  a.release_cached();
  CHECK(a.cached_bytes() == 0);

  // Random requests of mixed sizes: in use + cached never exceeds twice the most ever in use.
  A r;  // a fresh one: its peak is this part's
  r.set_budget(2.0);
  std::mt19937 rng(7);
  std::vector<size_t> sizes;
  std::vector<void*> live;
  size_t in_use = 0, peak = 0;
  bool bounded = true;
  for (int i = 0; i < 3000; ++i) {
    if (live.empty() || rng() % 3 != 0) {
      const size_t base = size_t(64) << (rng() % 12), n = base + rng() % base;
      live.push_back(r.allocate(n));
      sizes.push_back(n);
    } else {
      const size_t k = rng() % live.size();
      r.deallocate(live[k], sizes[k]);
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(k));
      sizes.erase(sizes.begin() + static_cast<std::ptrdiff_t>(k));
    }
    in_use = r.in_use_bytes();  // in the classes of the blocks handed out (best fit: >= the requests')
    peak = std::max(peak, in_use);
    if (in_use + r.cached_bytes() > 2 * peak) bounded = false;
  }
  CHECK(bounded);
  CHECK(r.cached_bytes() > 0);  // the cache is still used
  for (size_t k = 0; k < live.size(); ++k) r.deallocate(live[k], sizes[k]);
  r.release_cached();
  CHECK(r.cached_bytes() == 0);
}

TEST_CASE("caching CPU allocator keeps in use + cached within its budget, big blocks included", "[fastpath][storage]") {
  using A = CachingCpuAllocator;
  // Sizes from 64 bytes to 8 MiB: blocks of 1 MiB and more are pages of their own (mmap on Linux).
  for (double fit : {1.0, 2.0, 4.0})                          // 2: the default
  for (double budget : {1.0, 1.1, 1.2, 1.5, 3.0, HUGE_VAL}) {  // HUGE_VAL: no bound; 1.2 the default on Linux
    INFO("fit ratio " << fit << ", budget " << budget);
    A r;
    r.set_fit_ratio(fit);
    r.set_budget(budget);
    std::mt19937 rng(11);
    std::vector<size_t> sizes;
    std::vector<void*> live;
    std::vector<unsigned char> tags;  // each block filled with its own byte
    size_t in_use = 0, peak = 0, worst = 0, held = 0;
    bool bounded = true, intact = true, kept_all = true;
    for (int i = 0; i < 600; ++i) {
      if (live.empty() || rng() % 3 != 0) {
        const size_t base = size_t(64) << (rng() % 17), n = base + rng() % base;
        auto* p = static_cast<unsigned char*>(r.allocate(n));
        const auto tag = static_cast<unsigned char>(1 + i % 251);
        std::memset(p, tag, n);  // every byte of the block is there
        live.push_back(p);
        sizes.push_back(n);
        tags.push_back(tag);
      } else {
        const size_t k = rng() % live.size();
        auto* p = static_cast<unsigned char*>(live[k]);
        if (p[0] != tags[k] || p[sizes[k] / 2] != tags[k] || p[sizes[k] - 1] != tags[k])
          intact = false;  // a block handed out twice would carry another block's byte
        r.deallocate(p, sizes[k]);
        live.erase(live.begin() + static_cast<std::ptrdiff_t>(k));
        sizes.erase(sizes.begin() + static_cast<std::ptrdiff_t>(k));
        tags.erase(tags.begin() + static_cast<std::ptrdiff_t>(k));
      }
      in_use = r.in_use_bytes();
      peak = std::max(peak, in_use);
      worst = std::max(worst, in_use + r.cached_bytes());
      if (static_cast<double>(in_use + r.cached_bytes()) > budget * static_cast<double>(peak)) bounded = false;
      if (in_use + r.cached_bytes() < held) kept_all = false;  // something went back to the OS
      held = in_use + r.cached_bytes();
    }
    CHECK(bounded);
    if (budget == HUGE_VAL) CHECK(kept_all);  // no bound: every freed block stays cached
    CHECK(intact);
    if (budget > 1.0) CHECK(worst > peak);  // above 1 the cache keeps blocks
    for (size_t k = 0; k < live.size(); ++k) r.deallocate(live[k], sizes[k]);
    r.release_cached();
    CHECK(r.cached_bytes() == 0);
  }
  A a;
  REQUIRE_THROWS_WITH(a.set_budget(0.5), Catch::Contains("expected a factor >= 1, got 0.5"));
  REQUIRE_THROWS_WITH(a.set_budget(std::nan("")), Catch::Contains("expected a factor >= 1"));
  REQUIRE_THROWS_WITH(set_cpu_cache_budget(0.9), Catch::Contains("expected a factor >= 1, got 0.9"));
  set_cpu_cache_budget(A::kDefaultBudget);
}

TEST_CASE("caching CPU allocator serves a request from the smallest larger cached block, up to its fit ratio",
          "[fastpath][storage]") {
  using A = CachingCpuAllocator;
  REQUIRE(A::size_class(8192) == 8192);
  REQUIRE(A::size_class(6144) == 6144);
  REQUIRE(A::size_class(5000) == 5120);
  REQUIRE(A::size_class(4000) == 4096);
  REQUIRE(A::size_class(3000) == 3072);
  A a;  // fit ratio 2, the default
  a.set_budget(HUGE_VAL);  // no bound: what a miss gives back is tested above
  void* p = a.allocate(8192);
  a.deallocate(p, 8192);
  void* q = a.allocate(5000);  // class 5120: none cached; 8192 <= 2 x 5120 serves it
  CHECK(q == p);
  CHECK(a.cached_bytes() == 0);
  CHECK(a.in_use_bytes() == 8192);  // counted as the block it is
  a.deallocate(q, 5000);              // told the request's size: back to the block's own class
  CHECK(a.cached_bytes() == 8192);
  CHECK(a.in_use_bytes() == 0);
  void* r = a.allocate(8000);  // class 8192 finds it there
  CHECK(r == p);
  void* big = a.allocate(6000);  // class 6144: nothing cached, a new block
  a.deallocate(r, 8000);
  a.deallocate(big, 6000);
  CHECK(a.cached_bytes() == 8192 + 6144);
  void* t = a.allocate(4000);  // class 4096: 6144 and 8192 both fit; the smaller serves
  CHECK(t == big);
  void* u = a.allocate(3000);  // class 3072: 8192 > 2 x 3072, a new block
  CHECK(u != p);
  CHECK(a.cached_bytes() == 8192);
  a.deallocate(t, 4000);
  a.deallocate(u, 3000);
  a.set_fit_ratio(1.0);        // the request's own class only
  void* v = a.allocate(5000);  // 6144 and 8192 cached, neither of class 5120
  CHECK(v != p);
  CHECK(v != big);
  a.deallocate(v, 5000);
  a.set_fit_ratio(4.0);
  void* w = a.allocate(1500);  // class 1536: 3072, 5120 and 6144 cached within 4 x; the smallest serves
  CHECK(w == u);
  a.set_max_cached_bytes(0);  // caching off: a larger block goes back to the OS at its own size
  a.deallocate(w, 1500);
  CHECK(a.cached_bytes() == 0);
  CHECK(a.in_use_bytes() == 0);
  REQUIRE_THROWS_WITH(a.set_fit_ratio(0.5), Catch::Contains("expected a ratio >= 1, got 0.5"));
  REQUIRE_THROWS_WITH(a.set_fit_ratio(std::nan("")), Catch::Contains("expected a ratio >= 1"));
  REQUIRE_THROWS_WITH(set_cpu_cache_fit_ratio(0.9), Catch::Contains("expected a ratio >= 1, got 0.9"));
  set_cpu_cache_fit_ratio(2.0);  // the default
}

TEST_CASE("caching CPU allocator splits big free pieces for smaller requests and merges them back",
          "[fastpath][storage]") {
  using A = CachingCpuAllocator;
  constexpr size_t MiB = size_t{1} << 20;
  if (!A::kPieces) {  // macOS, or under ASan: big blocks are size classes like small ones
    A c;
    c.set_budget(HUGE_VAL);
    void* b = c.allocate(8 * MiB);
    c.deallocate(b, 8 * MiB);
    CHECK(c.cached_bytes() == A::size_class(8 * MiB));  // kept whole, in its class
    CHECK(c.allocate(5 * MiB) == b);                     // best fit within 2x, not split
    CHECK(c.cached_bytes() == 0);
    c.deallocate(b, 5 * MiB);
    c.release_cached();
    CHECK(c.cached_bytes() == 0);
    return;
  }
  const size_t page = A::page_bytes();
  A a;
  a.set_budget(HUGE_VAL);  // nothing given back on a miss here (the budget is tested above)
  auto* p = static_cast<char*>(a.allocate(8 * MiB));
  std::memset(p, 1, 8 * MiB);
  a.deallocate(p, 8 * MiB);
  CHECK(a.cached_bytes() == 8 * MiB);
  // two smaller requests carve the free piece from its start; sizes round up to whole pages
  auto* q = static_cast<char*>(a.allocate(3 * MiB + 100));
  CHECK(q == p);
  auto* r = static_cast<char*>(a.allocate(2 * MiB));
  CHECK(r == p + 3 * MiB + page);
  CHECK(a.in_use_bytes() == 5 * MiB + page);
  CHECK(a.cached_bytes() == 3 * MiB - page);
  std::memset(q, 2, 3 * MiB + 100);
  std::memset(r, 3, 2 * MiB);
  CHECK(p[3 * MiB + 99] == 2);  // the blocks do not overlap
  CHECK(r[0] == 3);
  auto* s = static_cast<char*>(a.allocate(1 * MiB));  // from the rest, after r; 2 MiB - page stay free
  CHECK(s == r + 2 * MiB);
  a.deallocate(q, 3 * MiB + 100);  // the first piece goes back: no free neighbour (r is in use)
  // free: 3 MiB + page at p and 2 MiB - page at the end; the smallest that holds the request serves
  auto* t = static_cast<char*>(a.allocate(2 * MiB + 5000));
  CHECK(t == p);
  auto* v = static_cast<char*>(a.allocate(1 * MiB));  // 2 MiB - page at the end is now the smallest
  CHECK(v == s + 1 * MiB);
  a.deallocate(v, 1 * MiB);
  a.deallocate(t, 2 * MiB + 5000);
  a.deallocate(s, 1 * MiB);
  CHECK(a.cached_bytes() == 3 * MiB + page + (3 * MiB - page));
  a.deallocate(r, 2 * MiB);  // merges with the free pieces on both sides: one piece of 8 MiB again
  CHECK(a.cached_bytes() == 8 * MiB);
  CHECK(a.in_use_bytes() == 0);
  auto* whole = static_cast<char*>(a.allocate(8 * MiB));
  CHECK(whole == p);
  std::memset(whole, 4, 8 * MiB);
  // a request bigger than every free piece grows the largest: its pages, and what they hold,
  // become the block's first 8 MiB (new pages would read 0), and only the last MiB is new
  a.deallocate(whole, 8 * MiB);
  auto* bigger = static_cast<char*>(a.allocate(9 * MiB));
  CHECK(a.cached_bytes() == 0);
  CHECK(a.in_use_bytes() == 9 * MiB);
  CHECK(bigger[0] == 4);
  CHECK(bigger[8 * MiB - 1] == 4);
  CHECK(bigger[8 * MiB] == 0);
  std::memset(bigger, 5, 9 * MiB);  // all of it is the block's
  a.deallocate(bigger, 9 * MiB);
  CHECK(a.cached_bytes() == 9 * MiB);
  // with pieces in use between them, two free pieces stay apart; the larger grows, and the other
  // goes back when it would pass the budget (1.0 here: in use + cached within the peak)
  {
    A b;
    b.set_budget(1.0);
    auto* x = static_cast<char*>(b.allocate(4 * MiB));
    void* y = b.allocate(1 * MiB);
    void* z = b.allocate(2 * MiB);
    void* w = b.allocate(1 * MiB);
    std::memset(x, 6, 4 * MiB);
    b.deallocate(x, 4 * MiB);
    b.deallocate(z, 2 * MiB);
    CHECK(b.cached_bytes() == 6 * MiB);
    auto* big = static_cast<char*>(b.allocate(6 * MiB));  // 2 in use + 6 > the 8 MiB peak with 2 cached
    CHECK(big[4 * MiB - 1] == 6);                          // x's pages
    CHECK(b.cached_bytes() == 0);
    CHECK(b.in_use_bytes() == 8 * MiB);
    b.deallocate(big, 6 * MiB);
    b.deallocate(y, 1 * MiB);
    b.deallocate(w, 1 * MiB);
  }
  a.release_cached();
  CHECK(a.cached_bytes() == 0);
  // caching off: a big block goes straight back, whatever its neighbours
  a.set_max_cached_bytes(0);
  void* u = a.allocate(2 * MiB);
  a.deallocate(u, 2 * MiB);
  CHECK(a.cached_bytes() == 0);
  CHECK(a.in_use_bytes() == 0);
  // the default budget, 1.2 here: 8 MiB free and 3 in use, then 9 asked: the 8 grow into the 9
  // (in use 12 + cached 0 <= 1.2 x 12)
  REQUIRE(A::kDefaultBudget == 1.2);
  A d;
  void* k = d.allocate(3 * MiB);
  d.deallocate(d.allocate(8 * MiB), 8 * MiB);
  void* e = d.allocate(9 * MiB);
  CHECK(d.cached_bytes() == 0);
  d.deallocate(k, 3 * MiB);
  d.deallocate(e, 9 * MiB);
  d.release_cached();  // then one 9 MiB piece alone
  void* f = d.allocate(9 * MiB);
  d.deallocate(f, 9 * MiB);
  void* h = d.allocate(4 * MiB);  // a hit: split from the 9 MiB, nothing given back
  CHECK(d.cached_bytes() == 5 * MiB);
  d.deallocate(h, 4 * MiB);
  CHECK(d.cached_bytes() == 9 * MiB);
}

TEST_CASE("caching CPU allocator: a request the system cannot serve names its size and leaves the counts as they were",
          "[fastpath][storage]") {
  using A = CachingCpuAllocator;
  constexpr size_t MiB = size_t(1) << 20, huge = size_t(1) << 62;  // 4 EiB: no machine maps this
  A a;
  a.set_budget(1.0);
  void* keep = a.allocate(4096);
  void* first = a.allocate(2 * MiB);
  a.deallocate(first, 2 * MiB);  // cached: 2 MiB
  const size_t in_use = a.in_use_bytes();
  // big blocks are mapped pages where pieces are on, a size class's block elsewhere (ASan):
  // either way the error names the request, and the cache was given back before the second try
  REQUIRE_THROWS_WITH(a.allocate(huge),
                      Catch::Contains("out of memory") && Catch::Contains(std::to_string(huge) + " bytes on cpu"));
  CHECK(a.in_use_bytes() == in_use);
  CHECK(a.cached_bytes() == 0);
  // the failed request did not raise the peak the budget scales with: a cached block that would
  // pass the budget beside a new 3 MiB request is still given back on that miss
  void* second = a.allocate(2 * MiB);
  a.deallocate(second, 2 * MiB);
  REQUIRE(a.cached_bytes() >= 2 * MiB);
  void* third = a.allocate(3 * MiB);  // 4 KiB + 2 MiB cached + 3 MiB > 1.0 x a 3 MiB peak
  CHECK(a.cached_bytes() == 0);
  CHECK(a.in_use_bytes() >= in_use + 3 * MiB);
  a.deallocate(third, 3 * MiB);
  a.deallocate(keep, 4096);
  CHECK(a.in_use_bytes() == 0);
}

TEST_CASE("caching CPU allocator is thread-safe", "[fastpath][storage]") {
  CachingCpuAllocator a;
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&a, t] {
      for (int i = 0; i < 2000; ++i) {
        // small blocks, and every 16th a big one (pieces of mapped pages, split and merged)
        size_t n = i % 16 == 0 ? (size_t{1} << 20) + static_cast<size_t>(4096 * ((i + t) % 300))
                               : static_cast<size_t>(64 * (1 + (i * 7 + t) % 50));
        auto* p = static_cast<unsigned char*>(a.allocate(n));
        p[0] = p[n - 1] = 1;  // the whole block is ours (ASan checks)
        a.deallocate(p, n);
      }
    });
  for (auto& t : ts) t.join();
  a.release_cached();
  CHECK(a.cached_bytes() == 0);
}

TEST_CASE("scratch_vector takes its memory from the CPU allocator it was made with, and is no tensor",
          "[fastpath][storage]") {
  struct Counting final : Allocator {  // malloc, counting what goes through it
    size_t allocated = 0, freed = 0, live = 0;
    void* allocate(size_t n) override {
      allocated += n;
      ++live;
      return std::malloc(n);
    }
    void deallocate(void* p, size_t n) override {
      freed += n;
      --live;
      std::free(p);
    }
  };
  Counting counting;
  Allocator* before = get_allocator(Device::Kind::CPU);
  struct Restore {  // the default allocator comes back even when a check throws
    Allocator* a;
    ~Restore() { set_allocator(Device::Kind::CPU, a); }
  } restore{before};
  const size_t tensors = cpu_memory_allocated();
  set_allocator(Device::Kind::CPU, &counting);
  {
    scratch_vector<float> v(1000);  // zeroed, like std::vector<float>(1000)
    CHECK(counting.allocated == 4000);
    CHECK(std::all_of(v.begin(), v.end(), [](float x) { return x == 0.0f; }));
    CHECK(cpu_memory_allocated() == tensors);  // scratch is not counted as tensors
    set_allocator(Device::Kind::CPU, before);  // v still goes back to the allocator it came from
    v.assign(10, 1.0f);
    scratch_vector<float> w(8);  // a new one takes the allocator installed now
    CHECK(counting.allocated == 4000);
  }
  CHECK(counting.freed == 4000);
  CHECK(counting.live == 0);
}

TEST_CASE("scratch_buffer leaves new elements as the allocator gave them while scratch_vector zeroes them",
          "[fastpath][storage]") {
  struct Patterned final : Allocator {  // every byte it hands out is 0xAB
    size_t live = 0;
    void* allocate(size_t n) override {
      ++live;
      void* p = std::malloc(n);
      std::memset(p, 0xAB, n);
      return p;
    }
    void deallocate(void* p, size_t) override {
      --live;
      std::free(p);
    }
  };
  Patterned patterned;
  Allocator* before = get_allocator(Device::Kind::CPU);
  struct Restore {
    Allocator* a;
    ~Restore() { set_allocator(Device::Kind::CPU, a); }
  } restore{before};
  set_allocator(Device::Kind::CPU, &patterned);
  uint32_t pattern;
  std::memset(&pattern, 0xAB, sizeof pattern);
  auto is_pattern = [&](uint32_t x) { return x == pattern; };
  {
    scratch_buffer<uint32_t> b(1000);  // default-initialized: the allocator's bytes
    CHECK(std::all_of(b.begin(), b.end(), is_pattern));
    b[0] = 5;
    b.resize(3000);  // a new block: the old elements copied, the new ones left as they come
    CHECK(b[0] == 5);
    CHECK(std::all_of(b.begin() + 1000, b.end(), is_pattern));
    scratch_buffer<float> f(64, 2.0f);  // a value given: filled
    CHECK(std::all_of(f.begin(), f.end(), [](float x) { return x == 2.0f; }));
    scratch_vector<uint32_t> z(1000);  // value-initialized: zeros
    CHECK(std::all_of(z.begin(), z.end(), [](uint32_t x) { return x == 0; }));
    CHECK(patterned.live == 3);
  }
  CHECK(patterned.live == 0);
}

TEST_CASE("release_cached_cpu_memory frees what tensors gave back", "[fastpath][storage]") {
  { auto t = zeros<float>({1000, 17}); }
  CHECK(release_cached_cpu_memory() >= 1000 * 17 * sizeof(float));
  CHECK(release_cached_cpu_memory() == 0);
}

}  // namespace test_cpu_fastpaths
