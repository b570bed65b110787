// fma_peak: the CPU's peak multiply-add rate on T threads, measured: float32 FMAs (AVX-512, or
// AVX2 + FMA) and, where the build has AVX512-BF16, bfloat16 dot products (vdpbf16ps: two
// products added into each float32 lane). Sixteen independent chains per thread stay in registers
// and touch no memory: the ceiling that no kernel of this library (or of PyTorch) can pass on the
// same cores. bench/compare runs it to print each row's share of this peak.
//   fma_peak --threads 2
// The last line is machine-readable (bf16_gflops=0: the build has no AVX512-BF16):
//   RESULT threads=2 fp32_gflops=X bf16_gflops=Y
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#include <immintrin.h>
#ifdef DENSEGRAD_WITH_OPENMP
#include <omp.h>
#endif

namespace {

constexpr int kChains = 16;  // independent accumulators: latency x issue width of any current x86 core

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
Vec splat(float v) { return _mm512_set1_ps(v); }
Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int kLanes = 8;
Vec splat(float v) { return _mm256_set1_ps(v); }
Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
#else
#define DENSEGRAD_FMA_PEAK_NO_SIMD 1  // built without -march=native (DENSEGRAD_NATIVE off): see main
#endif

/// The lanes of n vectors of `lanes` floats, added up.
template <class V, class Store>
float lanes_sum(const V* v, int n, int lanes, Store st) {
  float f[16], sum = 0;
  for (int i = 0; i < n; ++i) {
    st(f, v[i]);
    for (int l = 0; l < lanes; ++l) sum += f[l];
  }
  return sum;
}

#ifndef DENSEGRAD_FMA_PEAK_NO_SIMD
/// `steps` x kChains float32 FMAs of one register each: a <- a * m + c converges (m < 1), so the
/// values stay normal floats however long it runs. Returns a sum of the chains (kept alive).
float fp32_chains(int64_t steps) {
  Vec a[kChains];
  for (int i = 0; i < kChains; ++i) a[i] = splat(1.0f + static_cast<float>(i) * 1e-3f);
  const Vec m = splat(0.999f), c = splat(1e-3f);
  for (int64_t s = 0; s < steps; ++s)
    for (int i = 0; i < kChains; ++i) a[i] = fma(a[i], m, c);
  return lanes_sum(a, kChains, kLanes, [](float* p, Vec v) { store(p, v); });
}

#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr bool kBf16 = true;
/// `steps` x kChains vdpbf16ps of 16 lanes: acc <- acc + x0 y0 + x1 y1, with products of 2^-20
/// (exact in bfloat16): the sums grow slowly and stay exact far past any run's length.
float bf16_chains(int64_t steps) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_setzero_ps();
  const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0x1p-10f), _mm512_set1_ps(0x1p-10f));
  for (int64_t s = 0; s < steps; ++s)
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], x, x);
  return lanes_sum(acc, kChains, 16, [](float* p, __m512 v) { _mm512_storeu_ps(p, v); });
}
#else
constexpr bool kBf16 = false;
float bf16_chains(int64_t) { return 0; }
#endif

/// The best of `rounds` runs of kernel(steps) on every thread at once: flops per second in all,
/// each step of each chain being flops_per_op floating-point operations.
template <class Kernel>
double measure(Kernel kernel, int threads, int64_t steps, int rounds, double flops_per_op, float& sink) {
  double best = 1e300;
  for (int r = 0; r < rounds; ++r) {
    std::vector<float> out(static_cast<size_t>(threads), 0.0f);
    const auto t0 = std::chrono::steady_clock::now();
#ifdef DENSEGRAD_WITH_OPENMP
#pragma omp parallel num_threads(threads)
    out[static_cast<size_t>(omp_get_thread_num())] = kernel(steps);
#else
    out[0] = kernel(steps);
#endif
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s);
    for (float v : out) sink += v;
  }
  return static_cast<double>(steps) * kChains * flops_per_op * threads / best;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fma_peak: the CPU's peak float32 (and bfloat16) multiply-add rate on T threads"};
  int threads = 2;
  int64_t steps = 20'000'000;
  int rounds = 5;
  app.add_option("--threads", threads, "threads, one chain set each")->check(CLI::PositiveNumber);
  app.add_option("--steps", steps, "steps of the chains per thread and round")->check(CLI::PositiveNumber);
  app.add_option("--rounds", rounds, "rounds; the fastest counts")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
#ifndef DENSEGRAD_WITH_OPENMP
  if (threads != 1) {
    std::fprintf(stderr, "fma_peak: error: this build has no OpenMP: --threads must be 1, got %d\n", threads);
    return 1;
  }
#endif
#ifdef DENSEGRAD_FMA_PEAK_NO_SIMD
  std::fprintf(stderr, "fma_peak: error: built without AVX2 + FMA or AVX-512 code (configure with "
                       "DENSEGRAD_NATIVE=ON on an x86-64 CPU that has them): no vector peak to measure\n");
  return 1;
#else
  float sink = 0;
  const double fp32 = measure(fp32_chains, threads, steps, rounds, 2.0 * kLanes, sink);
  const double bf16 = kBf16 ? measure(bf16_chains, threads, steps, rounds, 4.0 * 16, sink) : 0.0;
  std::printf("fma_peak: %d threads, %d-lane float32 FMAs: %.1f GFLOP/s", threads, kLanes, fp32 / 1e9);
  if (kBf16) std::printf("; bfloat16 dot products (AVX512-BF16): %.1f GFLOP/s", bf16 / 1e9);
  std::printf(" (checksum %g)\n", static_cast<double>(sink));
  std::printf("RESULT threads=%d fp32_gflops=%.1f bf16_gflops=%.1f\n", threads, fp32 / 1e9, bf16 / 1e9);
  return 0;
#endif
}
