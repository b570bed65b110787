// densegrad/core/dtype.hpp: element types: float, double, bfloat16 (and int64 for labels).
// bfloat16 is a real 16-bit storage type (round-to-nearest-even, NaN kept NaN); arithmetic
// on it happens in float. float16 exists only as a file format (safetensors F16).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <string>
#include <type_traits>

namespace dg {

/// A brain-float16 number: the top 16 bits of an IEEE float32.
/// Matches torch.bfloat16 conversions (round to nearest even, quiet NaN).
struct bfloat16 {
  uint16_t bits = 0;

  constexpr bfloat16() = default;
  bfloat16(float f) : bits(from_float(f)) {}  // NOLINT: implicit like torch's c10::BFloat16
  explicit bfloat16(double d) : bits(from_float(static_cast<float>(d))) {}
  explicit bfloat16(int i) : bits(from_float(static_cast<float>(i))) {}
  explicit bfloat16(int64_t i) : bits(from_float(static_cast<float>(i))) {}
  operator float() const { return to_float(bits); }  // NOLINT

  static bfloat16 from_bits(uint16_t b) {
    bfloat16 r;
    r.bits = b;
    return r;
  }
  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    // round to nearest, ties to even: add 0x7fff plus the lowest kept bit
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    // any NaN -> the canonical quiet NaN; a select, not an early return, so loops over it vectorize
    return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
  }
  static float to_float(uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }

  bfloat16& operator+=(float o) { return *this = bfloat16(float(*this) + o); }
  bfloat16& operator-=(float o) { return *this = bfloat16(float(*this) - o); }
  bfloat16& operator*=(float o) { return *this = bfloat16(float(*this) * o); }
  bfloat16& operator/=(float o) { return *this = bfloat16(float(*this) / o); }
};

inline std::ostream& operator<<(std::ostream& os, bfloat16 v) { return os << float(v); }

/// IEEE half precision <-> float, for reading and writing safetensors F16 only.
inline float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      u = sign | ((127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u); // overflow -> inf
  if (absu < 0x38800000u) {  // subnormal or zero in half
    if (absu < 0x33000000u) return static_cast<uint16_t>(sign);  // rounds to zero
    uint32_t e = absu >> 23, man = (absu & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14 + (113 - e) ... aligns to half subnormal grid
    uint32_t half_man = man >> shift, rem = man & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_man & 1u))) ++half_man;
    return static_cast<uint16_t>(sign | half_man);
  }
  uint32_t e = (absu >> 23) - 127 + 15, man = absu & 0x7fffffu;
  uint32_t h = (e << 10) | (man >> 13), rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into exponent: correct
  return static_cast<uint16_t>(sign | h);
}

/// Runtime tag of an element type; names follow safetensors ("F32", "BF16", ...).
enum class DType { Float32, Float64, BFloat16, Float16, Int64 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "F32";
    case DType::Float64: return "F64";
    case DType::BFloat16: return "BF16";
    case DType::Float16: return "F16";
    case DType::Int64: return "I64";
  }
  return "?";
}

inline size_t dtype_size(DType d) {
  switch (d) {
    case DType::Float32: return 4;
    case DType::Float64: return 8;
    case DType::BFloat16: return 2;
    case DType::Float16: return 2;
    case DType::Int64: return 8;
  }
  return 0;
}

template <class T> struct dtype_traits;
template <> struct dtype_traits<float> { static constexpr DType value = DType::Float32; using acc = float; };
template <> struct dtype_traits<double> { static constexpr DType value = DType::Float64; using acc = double; };
template <> struct dtype_traits<bfloat16> { static constexpr DType value = DType::BFloat16; using acc = float; };
template <> struct dtype_traits<int64_t> { static constexpr DType value = DType::Int64; using acc = int64_t; };

/// The DType tag of a C++ element type.
template <class T> constexpr DType dtype_of() { return dtype_traits<T>::value; }

/// The type arithmetic on T happens in: float for bfloat16, T otherwise.
template <class T> using acc_t = typename dtype_traits<T>::acc;

template <class T> constexpr bool is_floating_v =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, bfloat16>;

}  // namespace dg
