// densegrad/io/raw_tensor.hpp: RawTensor, the bytes of one tensor as a file holds them (dtype,
// shape, C-order little-endian data), with checked conversions; and the file helpers io shares.
// Not a Tensor: no device, strides or autograd; a bridge elsewhere converts RawTensor <-> Tensor.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <system_error>
#include <type_traits>
#include <vector>

#ifdef _WIN32
#include <io.h>
#include <process.h>
#else
#include <unistd.h>
#endif

#include "densegrad/core/dtype.hpp"
#include "densegrad/core/error.hpp"

namespace dg::io {

namespace detail {

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// Number of elements of shape, checked: every dim >= 0, and the product of the non-zero dims
/// fits in int64. Like the safetensors reference, an overflow is an error even if a later dim
/// is 0; stricter than it, also when an earlier dim is 0 ([0, 2^62, 2^62]): a tensor's strides
/// are products of the dims after their own, so they must fit even when numel is 0.
inline int64_t checked_numel(const std::vector<int64_t>& shape, const std::string& what) {
  int64_t n = 1, nonzero = 1;  // nonzero: the product of the non-zero dims, n <= nonzero
  for (size_t i = 0; i < shape.size(); ++i) {
    DG_CHECK(shape[i] >= 0, what, ": shape ", shape_str(shape), " has negative dim ", i, " (",
             shape[i], "); dims must be >= 0");
    DG_CHECK(shape[i] == 0 || nonzero <= std::numeric_limits<int64_t>::max() / shape[i], what,
             ": shape ", shape_str(shape), " has more elements than fit in 64 bits",
             (n == 0 ? " (counting its non-zero dims, as its strides do)" : ""));
    if (shape[i] != 0) nonzero *= shape[i];
    n *= shape[i];
  }
  return n;
}

/// Bytes of a tensor of this shape and dtype, checked against int64 and size_t overflow.
inline size_t checked_nbytes(const std::vector<int64_t>& shape, DType dtype, const std::string& what) {
  uint64_t n = static_cast<uint64_t>(checked_numel(shape, what)), sz = dtype_size(dtype);
  const uint64_t limit = std::min<uint64_t>(std::numeric_limits<int64_t>::max(),
                                            std::numeric_limits<size_t>::max());
  DG_CHECK(n <= limit / sz, what, ": shape ", shape_str(shape), " of ", dtype_name(dtype),
           " needs more bytes than fit in 64 bits");
  return static_cast<size_t>(n * sz);
}

// Little-endian loads and stores, independent of the host's byte order.
inline uint64_t load_le(const uint8_t* p, size_t nbytes) {
  uint64_t v = 0;
  for (size_t i = 0; i < nbytes; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}
inline void store_le(uint8_t* p, uint64_t v, size_t nbytes) {
  for (size_t i = 0; i < nbytes; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

/// A float value as int64, or an error when it is not an exact integer in range.
inline int64_t exact_int64(double x, size_t index, DType from, const char* op) {
  DG_CHECK(std::isfinite(x) && std::trunc(x) == x && x >= -9223372036854775808.0 &&
               x < 9223372036854775808.0,
           op, ": element ", index, " of a ", dtype_name(from), " tensor is ", x,
           ", which is not an integer representable as I64");
  return static_cast<int64_t>(x);
}

/// Reads a whole file into memory; the size is read (and checked) before anything is allocated.
inline std::vector<uint8_t> read_file(const std::string& path, const char* format) {
  std::error_code ec;
  DG_CHECK(std::filesystem::is_regular_file(path, ec), format, ": cannot read '", path,
           "': no such regular file", (ec ? " (" + ec.message() + ")" : std::string()));
  uintmax_t size = std::filesystem::file_size(path, ec);
  DG_CHECK(!ec, format, ": cannot read '", path, "': ", ec.message());
  DG_CHECK(size <= std::vector<uint8_t>().max_size(), format, ": cannot read '", path,
           "': file is ", size, " bytes, more than fits in memory");
  std::FILE* f = std::fopen(path.c_str(), "rb");
  DG_CHECK(f, format, ": cannot open '", path, "' for reading: ", std::strerror(errno));
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  size_t got = bytes.empty() ? 0 : std::fread(bytes.data(), 1, bytes.size(), f);
  bool grew = got == bytes.size() && std::fgetc(f) != EOF;
  std::fclose(f);
  DG_CHECK(got == bytes.size() && !grew, format, ": cannot read '", path, "': expected ",
           size, " bytes, ", (grew ? "file grew while reading" : "read " + std::to_string(got)));
  return bytes;
}

/// Writes a file atomically: bytes go to `path + ".tmp.<pid>"`, which is flushed, fsynced and
/// renamed over path by commit(). If commit() is never reached the temporary file is removed.
class AtomicFileWriter {
 public:
  AtomicFileWriter(const std::string& path, const char* format)
      : path_(path), format_(format) {
#ifdef _WIN32
    tmp_ = path + ".tmp." + std::to_string(_getpid());
#else
    tmp_ = path + ".tmp." + std::to_string(getpid());
#endif
    f_ = std::fopen(tmp_.c_str(), "wb");
    if (!f_) fail("cannot create temporary file '" + tmp_ + "'");
  }
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  ~AtomicFileWriter() { discard(); }

  void write(const void* p, size_t n) {
    if (n != 0 && std::fwrite(p, 1, n, f_) != n) fail("write to '" + tmp_ + "' failed");
  }

  void commit() {
    if (std::fflush(f_) != 0) fail("flush of '" + tmp_ + "' failed");
#ifdef _WIN32
    if (_commit(_fileno(f_)) != 0) fail("fsync of '" + tmp_ + "' failed");
#else
    if (fsync(fileno(f_)) != 0) fail("fsync of '" + tmp_ + "' failed");
#endif
    std::FILE* f = f_;
    f_ = nullptr;
    if (std::fclose(f) != 0) fail("close of '" + tmp_ + "' failed");
    std::error_code ec;
    std::filesystem::rename(tmp_, path_, ec);  // replaces path_ atomically on POSIX
    if (ec) { errno = ec.value(); fail("rename of '" + tmp_ + "' failed"); }
    done_ = true;
  }

 private:
  std::string path_, tmp_;
  const char* format_;
  std::FILE* f_ = nullptr;
  bool done_ = false;

  void discard() {
    if (f_) std::fclose(f_);
    f_ = nullptr;
    if (!done_ && !tmp_.empty()) std::remove(tmp_.c_str());
    done_ = true;
  }
  [[noreturn]] void fail(const std::string& why) {
    int err = errno;
    discard();
    DG_THROW(format_, ": cannot write '", path_, "': ", why, ": ", std::strerror(err));
  }
};

}  // namespace detail

/// One tensor as stored in a file: dtype, shape and its C-order little-endian bytes.
/// Example: `auto t = RawTensor::from_vector<float>({2, 2}, {1, 2, 3, 4}, DType::Float16);`
///          `std::vector<double> v = t.to_vector<double>();  // {1, 2, 3, 4}`
struct RawTensor {
  DType dtype = DType::Float32;
  std::vector<int64_t> shape;  // () is a scalar with one element; dims may be 0
  std::vector<uint8_t> data;   // numel() * dtype_size(dtype) bytes

  /// Number of elements (1 for shape []); throws on negative dims or overflow.
  int64_t numel() const { return detail::checked_numel(shape, "RawTensor"); }

  /// Throws unless data holds exactly numel() * dtype_size(dtype) bytes.
  void check(const std::string& what) const {
    size_t expected = detail::checked_nbytes(shape, dtype, what);
    DG_CHECK(data.size() == expected, what, ": ", dtype_name(dtype), " tensor of shape ",
             detail::shape_str(shape), " needs ", expected, " bytes of data, has ", data.size());
  }

  /// The elements converted to T in {float, double, bfloat16, int64_t}, like torch's `.to()`.
  /// Float dtypes round to nearest even; to int64_t each value must be an exact integer.
  template <class T>
  std::vector<T> to_vector() const {
    const std::string op = std::string("RawTensor::to_vector<") + dtype_name(dtype_of<T>()) + ">";
    check(op);
    const size_t n = data.size() / dtype_size(dtype), sz = dtype_size(dtype);
    std::vector<T> out;
    out.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const uint64_t bits = detail::load_le(data.data() + i * sz, sz);
      if (dtype == DType::Int64) {
        const auto x = static_cast<int64_t>(bits);
        if constexpr (std::is_same_v<T, int64_t>) out.push_back(x);
        else if constexpr (std::is_same_v<T, bfloat16>) out.push_back(bfloat16(x));
        else out.push_back(static_cast<T>(x));
        continue;
      }
      double x = 0;  // every float dtype widens to double exactly
      switch (dtype) {
        case DType::Float32: { uint32_t u = static_cast<uint32_t>(bits); float f; std::memcpy(&f, &u, 4); x = f; break; }
        case DType::Float64: std::memcpy(&x, &bits, 8); break;
        case DType::BFloat16: x = bfloat16::to_float(static_cast<uint16_t>(bits)); break;
        case DType::Float16: x = half_to_float(static_cast<uint16_t>(bits)); break;
        case DType::Int64: break;
      }
      if constexpr (std::is_same_v<T, int64_t>) out.push_back(detail::exact_int64(x, i, dtype, op.c_str()));
      else if constexpr (std::is_same_v<T, bfloat16>) out.push_back(bfloat16(static_cast<float>(x)));
      else out.push_back(static_cast<T>(x));
    }
    return out;
  }

  /// A RawTensor of the given shape holding values, stored as `stored` (default: T's dtype).
  /// T in {float, double, bfloat16, int64_t}; storing floats as I64 needs exact integers.
  template <class T>
  static RawTensor from_vector(std::vector<int64_t> shape, const std::vector<T>& values,
                               DType stored = dtype_of<T>()) {
    const std::string op = std::string("RawTensor::from_vector<") + dtype_name(dtype_of<T>()) + ">";
    RawTensor t;
    t.dtype = stored;
    t.shape = std::move(shape);
    const size_t nbytes = detail::checked_nbytes(t.shape, stored, op);
    const size_t sz = dtype_size(stored), n = nbytes / sz;
    DG_CHECK(values.size() == n, op, ": shape ", detail::shape_str(t.shape), " has ", n,
             " elements, but ", values.size(), " values were given");
    t.data.resize(nbytes);
    for (size_t i = 0; i < n; ++i) {
      uint64_t bits = 0;
      if (stored == DType::Int64) {
        if constexpr (std::is_same_v<T, int64_t>) bits = static_cast<uint64_t>(values[i]);
        else bits = static_cast<uint64_t>(detail::exact_int64(static_cast<double>(values[i]), i, dtype_of<T>(), op.c_str()));
      } else {
        float f;   // the value in float, for the 32- and 16-bit dtypes
        double d;  // the value in double, for F64
        if constexpr (std::is_same_v<T, int64_t>) { f = static_cast<float>(values[i]); d = static_cast<double>(values[i]); }
        else { d = static_cast<double>(values[i]); f = static_cast<float>(d); }
        switch (stored) {
          case DType::Float32: { uint32_t u; std::memcpy(&u, &f, 4); bits = u; break; }
          case DType::Float64: std::memcpy(&bits, &d, 8); break;
          case DType::BFloat16: bits = bfloat16::from_float(f); break;
          case DType::Float16: bits = float_to_half(f); break;
          case DType::Int64: break;
        }
      }
      detail::store_le(t.data.data() + i * sz, bits, sz);
    }
    return t;
  }
};

}  // namespace dg::io
