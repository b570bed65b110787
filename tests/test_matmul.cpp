// tests/test_matmul.cpp: matmul with torch.matmul's rules (1-D, 2-D, batched, broadcast batch)
// and bmm: gradcheck in double, output shapes, errors, PyTorch parity (core.safetensors), and
// the Eigen GEMM (dg::cpu::bmm) against the plain-loop oracle (dg::ref::bmm) on odd shapes.
// Not a benchmark: speed is measured in bench/.
#include "test_util.hpp"

#include <functional>
#include <vector>

namespace test_matmul {

using namespace dg;
using Catch::Contains;

namespace {
Tensor<double> in(const Shape& shape, uint64_t seed) {
  Generator g(seed);
  return randn<double>(shape, g).requires_grad_();
}


const auto kMatmul = [](const std::vector<Tensor<double>>& v) { return matmul(v[0], v[1]); };
}  // namespace

TEST_CASE("matmul 1-D x 1-D gradcheck (dot product, 0-D result)", "[matmul][gradcheck]") {
  dgtest::require_gradcheck(kMatmul, {in({5}, 1), in({5}, 2)});
}

TEST_CASE("matmul 1-D x 2-D and 2-D x 1-D gradcheck", "[matmul][gradcheck]") {
  dgtest::require_gradcheck(kMatmul, {in({4}, 3), in({4, 3}, 4)});
  dgtest::require_gradcheck(kMatmul, {in({3, 4}, 5), in({4}, 6)});
}

TEST_CASE("matmul 2-D x 2-D gradcheck, also on transposed and sliced operands", "[matmul][gradcheck]") {
  dgtest::require_gradcheck(kMatmul, {in({3, 4}, 7), in({4, 5}, 8)});
  dgtest::require_gradcheck(kMatmul, {in({1, 1}, 9), in({1, 7}, 10)});
  dgtest::require_gradcheck(
      [](const auto& v) { return matmul(v[0].transpose(0, 1), v[1].slice(1, 0, 5, 2)); },
      {in({4, 3}, 11), in({4, 5}, 12)});
  dgtest::require_gradcheck([](const auto& v) { return matmul(v[0], v[0].transpose(0, 1)); }, {in({3, 2}, 13)});
}

TEST_CASE("matmul batched 3-D gradcheck, including 3-D with 2-D and 1-D", "[matmul][gradcheck]") {
  dgtest::require_gradcheck(kMatmul, {in({2, 3, 4}, 14), in({2, 4, 5}, 15)});
  dgtest::require_gradcheck(kMatmul, {in({2, 3, 4}, 16), in({4, 2}, 17)});  // b broadcast over the batch
  dgtest::require_gradcheck(kMatmul, {in({3, 4}, 18), in({2, 4, 2}, 19)});  // a broadcast over the batch
  dgtest::require_gradcheck(kMatmul, {in({4}, 20), in({2, 4, 3}, 21)});
  dgtest::require_gradcheck(kMatmul, {in({2, 3, 4}, 22), in({4}, 23)});
}

TEST_CASE("matmul broadcast batch (2,1,3,4) @ (5,4,2) gradcheck", "[matmul][gradcheck][broadcast]") {
  dgtest::require_gradcheck(kMatmul, {in({2, 1, 3, 4}, 24), in({5, 4, 2}, 25)});
  dgtest::require_gradcheck(kMatmul, {in({1, 3, 2}, 26), in({3, 1, 2, 3}, 27)});
}

TEST_CASE("matmul output shapes follow torch.matmul", "[matmul]") {
  auto shape_of = [](Shape a, Shape b) { return matmul(ones<float>(a), ones<float>(b)).shape(); };
  CHECK(shape_of({5}, {5}) == Shape{});
  CHECK(shape_of({4}, {4, 3}) == Shape{3});
  CHECK(shape_of({3, 4}, {4}) == Shape{3});
  CHECK(shape_of({3, 4}, {4, 5}) == Shape{3, 5});
  CHECK(shape_of({2, 3, 4}, {4}) == Shape{2, 3});
  CHECK(shape_of({4}, {2, 4, 3}) == Shape{2, 3});
  CHECK(shape_of({2, 1, 3, 4}, {5, 4, 2}) == Shape{2, 5, 3, 2});
  CHECK(shape_of({1, 3, 4}, {2, 4, 5}) == Shape{2, 3, 5});
  CHECK(shape_of({3, 0}, {0, 4}) == Shape{3, 4});
  CHECK(matmul(ones<float>({3, 0}), ones<float>({0, 4})).to_vector() == std::vector<float>(12, 0.f));  // K = 0
  CHECK(shape_of({0, 3}, {3, 4}) == Shape{0, 4});
}

TEST_CASE("matmul values on a small known example", "[matmul]") {
  auto a = tensor<double>({1, 2, 3, 4}, {2, 2}), b = tensor<double>({5, 6, 7, 8}, {2, 2});
  CHECK(matmul(a, b).to_vector() == std::vector<double>{19, 22, 43, 50});
  CHECK(a.matmul(b.transpose(0, 1)).to_vector() == std::vector<double>{17, 23, 39, 53});
  CHECK(matmul(tensor<double>({1, 2}), tensor<double>({3, 4})).item() == 11.0);
  auto ah = a.to<bfloat16>(), bh = b.to<bfloat16>();
  CHECK(matmul(ah, bh).to<double>().to_vector() == std::vector<double>{19, 22, 43, 50});
}

TEST_CASE("matmul and bmm errors name both shapes", "[matmul][errors]") {
  auto a = ones<float>({3, 4});
  REQUIRE_THROWS_WITH(matmul(a, ones<float>({5, 2})), Contains("matmul: inner dimensions differ: [3, 4] @ [5, 2] (4 vs 5)"));
  REQUIRE_THROWS_WITH(matmul(ones<float>({4}), ones<float>({3})), Contains("[4] @ [3]"));
  REQUIRE_THROWS_WITH(matmul(ones<float>({2, 3, 4}), ones<float>({3, 4, 2})),
                      Contains("matmul (batch dims): shapes [2] and [3] cannot be broadcast"));
  REQUIRE_THROWS_WITH(matmul(scalar_tensor<float>(1.f), a), Contains("matmul: both arguments need at least 1 dim"));
  REQUIRE_THROWS_WITH(bmm(ones<float>({2, 3, 4}), ones<float>({3, 4, 5})),
                      Contains("bmm: expected (B, M, K) and (B, K, N), got [2, 3, 4] and [3, 4, 5]"));
  REQUIRE_THROWS_WITH(bmm(a, a), Contains("bmm: expected"));
}

TEST_CASE("bmm saves only the operand each needed gradient uses", "[matmul][autograd]") {
  auto a = ones<float>({2, 3, 4}).requires_grad_(), b = ones<float>({2, 4, 5});
  auto y = bmm(a, b);  // only dA = dout @ B^T is needed: B is saved, A is not
  CHECK(a.storage().use_count() == 1);
  CHECK(b.storage().use_count() == 2);
  CHECK(y.grad_fn_name() == "bmm");
  sum(y).backward();
  CHECK(b.storage().use_count() == 1);  // freed by backward
  CHECK(a.grad().to_vector() == std::vector<float>(24, 5.f));
}

TEMPLATE_TEST_CASE("cpu::bmm (Eigen) matches ref::bmm on odd shapes", "[matmul][fastpath]", float, double, bfloat16) {
  using T = TestType;
  // float32 and bfloat16 both accumulate in float; GEMM sums in another order than the ref loop,
  // so allow that rounding (about K float ulps); bfloat16 results may then round to a neighbour
  // (one bfloat16 ulp: 2^-8 relative)
  const double rtol = std::is_same_v<T, double> ? 1e-12 : std::is_same_v<T, float> ? 1e-5 : 8e-3;
  Generator g(28);
  const int64_t sizes[] = {1, 3, 7, 17};
  for (int64_t B : sizes)
    for (int64_t M : sizes)
      for (int64_t K : sizes)
        for (int64_t N : sizes) {
          auto a = randn<T>({B, M, K}, g), c = randn<T>({B, K, N}, g);
          const double atol = (std::is_same_v<T, double> ? 1e-13 : 1e-6) * static_cast<double>(K);
          dgtest::require_close(cpu::bmm(a, c), ref::bmm(a, c), rtol, atol,
                                "B M K N = " + std::to_string(B) + " " + std::to_string(M) + " " +
                                    std::to_string(K) + " " + std::to_string(N));
        }
  // empty inner dim: the product is all zeros
  CHECK(cpu::bmm(Tensor<T>::empty({2, 3, 0}), Tensor<T>::empty({2, 0, 5})).to_vector() ==
        zeros<T>({2, 3, 5}).to_vector());
}

TEST_CASE("matmul parity with torch: 1-D, 2-D, batched and broadcast batch", "[matmul][parity]") {
  for (const char* c : {"mm_1d_1d", "mm_1d_2d", "mm_2d_1d", "mm_2d_2d", "mm_batched", "mm_bcast_batch", "mm_3d_2d"}) {
    INFO(c);
    dgtest::check_parity("core", c, 2, [](const auto& v) { return matmul(v[0], v[1]); });
  }
}

}  // namespace test_matmul
