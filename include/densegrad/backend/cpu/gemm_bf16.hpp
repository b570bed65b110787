// densegrad/backend/cpu/gemm_bf16.hpp: float32 GEMMs whose products are taken in bfloat16, for
// dg::MatmulPrecision::bf16 (core/precision.hpp). Both operands are rounded to bfloat16 once
// (round to nearest even, as dg::bfloat16; the instructions treat denormals as zero), and
// AVX512-BF16's vdpbf16ps adds two exact bf16 products into each float32 lane per step: twice the
// multiply-adds of a float32 FMA per instruction, half the bytes per operand. The accumulation
// and the result are float32. Not a general GEMM: the layouts are the ones the conv panel GEMMs
// of backend/cpu/conv.hpp need, and without AVX512-BF16 (kBf16Gemm false) nothing here runs.
// Shape legend: c (M, N) = init + a (M, K) @ b (K, N); Kp = ceil(K / 2) pairs of k. Both operands
// are packed as uint32 pairs of bf16 (element k in bits 16*(k%2) of pair k/2), in the order the
// tiles read them, so that every load is sequential:
//   a: blocks of 8 rows, k-major: pair (i, kp) at (i/8)*8*Kp + kp*8 + i%8 (rows past M unused);
//   b: panels of 48 columns (the last may be narrower), k-major: pair (kp, n) = (b[2kp][n],
//      b[2kp+1][n]) at (n/48)*48*Kp + kp*w + n%48, w the panel's width. N a multiple of 16.
// A panel of b (Kp*192 bytes) stays in L1 or L2 while every block of a meets it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace dg::cpu {

/// True when this build has the bf16 GEMM: compiled for a CPU with AVX512-BF16 (-march=native on
/// AMD Zen 4 or Intel Cooper Lake / Sapphire Rapids and later).
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define DENSEGRAD_BF16_GEMM 1  // the functions below the #if further down exist
#else
#define DENSEGRAD_BF16_GEMM 0
#endif
constexpr bool kBf16Gemm = DENSEGRAD_BF16_GEMM;

/// How a GEMM tile starts: at 0, at a per-row value (bias; null: 0), or at what c holds.
enum class TileInit { Zero, Row, Load };

/// Calls f(std::integral_constant<int, mr>{}) for mr in 1..MR: a tile's row count, chosen at run
/// time, as a compile-time constant.
template <int MR = 8, class F>
void with_rows(int64_t mr, F&& f) {
  if constexpr (MR > 1) {
    if (mr >= MR) return f(std::integral_constant<int, MR>{});
    with_rows<MR - 1>(mr, f);
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

/// Pairs needed for k = 0 .. K-1.
inline int64_t bf16_pairs(int64_t K) { return (K + 1) / 2; }

#if DENSEGRAD_BF16_GEMM
namespace bf16_detail {

/// dst[0, n) <- src[0, n) rounded to bfloat16 (bits), 16 at a time with a masked tail.
inline void round_into(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(dst + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

/// c[MR rows ldc apart, NV vectors of 16] = init + a (one packed block) @ b (one panel, ldb pairs
/// per k): the block of c stays in registers for the whole contraction.
template <int MR, int NV, TileInit Init>
void tile(const uint32_t* a, int64_t Kp, const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
          const float* row_init) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) {
      if constexpr (Init == TileInit::Load) acc[i][v] = _mm512_loadu_ps(c + i * ldc + v * 16);
      else if constexpr (Init == TileInit::Row) acc[i][v] = _mm512_set1_ps(row_init ? row_init[i] : 0.0f);
      else acc[i][v] = _mm512_setzero_ps();
    }
  for (int64_t k = 0; k < Kp; ++k) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + k * ldb + v * 16);
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[k * 8 + i]));
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + v * 16, acc[i][v]);
}

}  // namespace bf16_detail

/// Pairs in a packed a of M rows: whole blocks of 8.
inline int64_t bf16_a_pairs(int64_t M, int64_t K) { return (M + 7) / 8 * 8 * bf16_pairs(K); }

/// The 8 x 8 block of 32-bit words in r[0..8) (rows) transposed into out[0..8): out[k] = (r[0][k],
/// ..., r[7][k]). Shuffles only: any bit patterns (bf16 pairs here) come through unchanged.
inline void transpose8x8(const __m256 r[8], __m256 out[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  out[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  out[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  out[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  out[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  out[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  out[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  out[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  out[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/// dst (packed a, bf16_a_pairs(M, K) pairs) <- the (M, K) float matrix whose row i, k-range
/// [s*seg_len, (s+1)*seg_len) lies at a + i*lda + s*seg_stride (segs segments: the pixels of
/// several images, each in place), rounded to bfloat16; an odd K's last pair is padded with 0.
/// Eight rows at a time: each is rounded into rows (scratch, 8 rounded rows), then 8 x 8 blocks
/// of pairs are transposed into the block's k-major layout (one 32-byte store per pair index
/// instead of eight 4-byte ones); a partial last block and the last Kp % 8 pairs go by element.
template <class Row>  // a std::vector of uint32_t, of any allocator
void pack_a(const float* a, int64_t lda, int64_t seg_stride, int64_t seg_len, int64_t segs, int64_t M, uint32_t* dst,
            Row& rows) {
  const int64_t K = seg_len * segs, Kp = bf16_pairs(K);
  rows.resize(static_cast<size_t>(8 * Kp));
  for (int64_t i0 = 0; i0 < M; i0 += 8) {
    const int64_t mr = std::min<int64_t>(8, M - i0);
    for (int64_t r = 0; r < mr; ++r) {
      uint16_t* halves = reinterpret_cast<uint16_t*>(rows.data() + r * Kp);
      for (int64_t s = 0; s < segs; ++s)
        bf16_detail::round_into(a + (i0 + r) * lda + s * seg_stride, seg_len, halves + s * seg_len);
      if (K % 2) halves[K] = 0;
    }
    uint32_t* block = dst + i0 * Kp;  // i0 is a multiple of 8: its block starts at i0 * Kp
    int64_t kp = 0;
    if (mr == 8) {
      for (; kp + 8 <= Kp; kp += 8) {
        __m256 in[8], out[8];
        for (int r = 0; r < 8; ++r) in[r] = _mm256_loadu_ps(reinterpret_cast<const float*>(rows.data() + r * Kp + kp));
        transpose8x8(in, out);
        for (int k = 0; k < 8; ++k) _mm256_storeu_ps(reinterpret_cast<float*>(block + (kp + k) * 8), out[k]);
      }
    }
    for (; kp < Kp; ++kp)
      for (int64_t r = 0; r < mr; ++r) block[kp * 8 + r] = rows[static_cast<size_t>(r * Kp + kp)];
  }
}

/// Pairs in a packed b of N columns.
inline int64_t bf16_b_pairs(int64_t K, int64_t N) { return bf16_pairs(K) * N; }

/// dst (packed b) <- b (K rows ldb apart, N columns, N % 16 == 0) rounded to bfloat16, rows 2kp and
/// 2kp+1 interleaved (a missing row K is 0).
inline void pack_b(const float* b, int64_t ldb, int64_t K, int64_t N, uint32_t* dst) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  const int64_t Kp = bf16_pairs(K);
  for (int64_t j = 0; j < N; j += 48) {
    const int64_t w = std::min<int64_t>(48, N - j);
    uint32_t* panel = dst + j * Kp;
    for (int64_t kp = 0; kp < Kp; ++kp) {
      const float* r0 = b + 2 * kp * ldb + j;
      const float* r1 = 2 * kp + 1 < K ? r0 + ldb : nullptr;
      for (int64_t n = 0; n < w; n += 16) {
        const __m512 lo = _mm512_loadu_ps(r0 + n), hi = r1 ? _mm512_loadu_ps(r1 + n) : _mm512_setzero_ps();
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lanes 0..15: row 2kp, 16..31: row 2kp+1
        _mm512_storeu_si512(panel + kp * w + n, _mm512_permutexvar_epi16(idx, both));
      }
    }
  }
}

/// c (M, N) = init + a @ b, both packed as in the legend (row_init: M start values for
/// TileInit::Row, null: 0). Tiles of 8 rows x 3 vectors; the larger operand goes in the outer loop
/// so that the smaller one is re-read from cache (as gemm_panels in backend/cpu/conv.hpp).
template <TileInit Init>
void gemm_bf16(const uint32_t* a, const uint32_t* b, float* c, int64_t ldc, int64_t M, int64_t N, int64_t Kp,
               const float* row_init = nullptr) {
  auto block = [&](int64_t i, int64_t j) {
    const int64_t w = std::min<int64_t>(48, N - j), nv = w / 16;
    const uint32_t* ai = a + i * Kp;  // i is a multiple of 8: its block starts at i * Kp
    const uint32_t* bj = b + j * Kp;
    const float* ri = row_init ? row_init + i : nullptr;
    float* cij = c + i * ldc + j;
    with_rows(std::min<int64_t>(8, M - i), [&](auto mr) {
      constexpr int MR = decltype(mr)::value;
      if (nv == 3) bf16_detail::tile<MR, 3, Init>(ai, Kp, bj, w, cij, ldc, ri);
      else if (nv == 2) bf16_detail::tile<MR, 2, Init>(ai, Kp, bj, w, cij, ldc, ri);
      else bf16_detail::tile<MR, 1, Init>(ai, Kp, bj, w, cij, ldc, ri);
    });
  };
  if (M > N) {
    for (int64_t i = 0; i < M; i += 8)
      for (int64_t j = 0; j < N; j += 48) block(i, j);
  } else {
    for (int64_t j = 0; j < N; j += 48)
      for (int64_t i = 0; i < M; i += 8) block(i, j);
  }
}
#endif

}  // namespace dg::cpu
