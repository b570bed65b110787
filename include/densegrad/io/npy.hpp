// densegrad/io/npy.hpp: NumPy .npy read/write (format versions 1.0, 2.0, 3.0) for F32, F64, I64.
// Not all of NumPy: C order and little-endian only; no .npz, no pickled objects, no other dtypes.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "densegrad/io/raw_tensor.hpp"

namespace dg::io {

namespace detail {

// The .npy header is a Python dict literal: {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// This reads exactly that grammar: string keys; string, True/False and int-tuple values.
class NpyHeaderParser {
 public:
  NpyHeaderParser(const std::string& s, const std::string& where) : s_(s), where_(where) {}

  void parse(std::string& descr, bool& fortran_order, std::vector<int64_t>& shape) {
    bool seen[3] = {false, false, false};
    ws();
    expect('{');
    for (;;) {
      ws();
      if (peek() == '}') break;
      std::string key = str();
      ws();
      expect(':');
      ws();
      int k = key == "descr" ? 0 : key == "fortran_order" ? 1 : key == "shape" ? 2 : -1;
      DG_CHECK(k >= 0, where_, ": unexpected key '", key, "' in header (expected descr, fortran_order, shape)");
      DG_CHECK(!seen[k], where_, ": duplicate key '", key, "' in header");
      seen[k] = true;
      if (k == 0) {
        DG_CHECK(peek() == '\'' || peek() == '"', where_,
                 ": descr must be a string like '<f4' (structured dtypes are not supported)");
        descr = str();
      } else if (k == 1) {
        fortran_order = boolean();
      } else {
        shape = tuple();
      }
      ws();
      if (peek() == ',') { ++pos_; continue; }
      if (peek() != '}') fail("',' or '}'");
    }
    ++pos_;
    ws();
    if (pos_ != s_.size()) fail("end of header after '}'");
    DG_CHECK(seen[0] && seen[1] && seen[2], where_, ": header misses key '",
             (!seen[0] ? "descr" : !seen[1] ? "fortran_order" : "shape"), "'");
  }

 private:
  const std::string& s_;
  const std::string& where_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const char* expected) const {
    DG_THROW(where_, ": malformed header at character ", pos_, ": expected ", expected, ", got ",
             (pos_ < s_.size() ? "'" + s_.substr(pos_, 1) + "'" : std::string("end of header")),
             " (header: ", s_, ")");
  }
  char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  void ws() { while (peek() == ' ' || peek() == '\n' || peek() == '\t' || peek() == '\r') ++pos_; }
  void expect(char c) {
    if (peek() != c) fail(std::string(1, c).c_str());
    ++pos_;
  }
  std::string str() {
    char q = peek();
    if (q != '\'' && q != '"') fail("a quoted string");
    size_t end = s_.find(q, pos_ + 1);
    if (end == std::string::npos) fail("a closing quote");
    std::string r = s_.substr(pos_ + 1, end - pos_ - 1);
    pos_ = end + 1;
    return r;
  }
  bool boolean() {
    if (s_.compare(pos_, 4, "True") == 0) { pos_ += 4; return true; }
    if (s_.compare(pos_, 5, "False") == 0) { pos_ += 5; return false; }
    fail("True or False");
  }
  std::vector<int64_t> tuple() {
    std::vector<int64_t> dims;
    bool trailing_comma = false;
    expect('(');
    for (;;) {
      ws();
      if (peek() == ')') break;
      DG_CHECK(peek() != '-', where_, ": shape has a negative dimension (header: ", s_, ")");
      if (peek() < '0' || peek() > '9') fail("a dimension (non-negative integer)");
      int64_t d = 0;
      while (peek() >= '0' && peek() <= '9') {
        int digit = peek() - '0';
        DG_CHECK(d <= (std::numeric_limits<int64_t>::max() - digit) / 10, where_,
                 ": shape dimension does not fit in 64 bits (header: ", s_, ")");
        d = d * 10 + digit;
        ++pos_;
      }
      if (peek() == 'L') ++pos_;  // Python 2 long, as old NumPy wrote it
      dims.push_back(d);
      ws();
      trailing_comma = peek() == ',';
      if (trailing_comma) { ++pos_; continue; }
      if (peek() != ')') fail("',' or ')' in the shape tuple");
    }
    ++pos_;
    DG_CHECK(dims.size() != 1 || trailing_comma, where_, ": shape (", dims[0],
             ") is not a tuple; NumPy writes (", dims[0], ",)");
    return dims;
  }
};

// descr -> DType for the three supported types. '<' is little-endian; '|' (byte order not
// applicable) and a missing or '=' (native) prefix are read as little-endian too.
inline DType npy_dtype(const std::string& descr, const std::string& where) {
  const char* supported = "supported: '<f4', '<f8', '<i8', i.e. F32, F64, I64";
  DG_CHECK(descr.empty() || descr[0] != '>', where, ": big-endian descr '", descr,
           "' is not supported (", supported, "); convert with arr.astype(arr.dtype.newbyteorder('<'))");
  std::string t = (!descr.empty() && (descr[0] == '<' || descr[0] == '|' || descr[0] == '='))
                      ? descr.substr(1) : descr;
  if (t == "f4") return DType::Float32;
  if (t == "f8") return DType::Float64;
  if (t == "i8") return DType::Int64;
  DG_THROW(where, ": unsupported descr '", descr, "' (", supported, ")");
}

}  // namespace detail

/// Parses the bytes of a .npy file; name_for_errors is used in messages (usually the path).
/// Like `numpy.load` for C-order little-endian float32, float64 and int64 arrays.
inline RawTensor parse_npy(const uint8_t* bytes, size_t size, const std::string& name_for_errors) {
  const std::string where = "npy: '" + name_for_errors + "'";
  DG_CHECK(size >= 10, where, ": file is ", size, " bytes, shorter than the 10-byte npy preamble");
  DG_CHECK(std::memcmp(bytes, "\x93NUMPY", 6) == 0, where,
           ": bad magic: expected \\x93NUMPY, the file does not start like a .npy file");
  const unsigned major = bytes[6], minor = bytes[7];
  DG_CHECK(major >= 1 && major <= 3 && minor == 0, where, ": unsupported npy format version ",
           major, ".", minor, " (supported: 1.0, 2.0, 3.0)");
  const size_t len_bytes = major == 1 ? 2 : 4, prefix = 8 + len_bytes;
  DG_CHECK(size >= prefix, where, ": file is ", size, " bytes, truncated inside the header length");
  const uint64_t header_len = detail::load_le(bytes + 8, len_bytes);
  DG_CHECK(header_len <= size - prefix, where, ": header length ", header_len,
           " runs past the end of the file (", size, " bytes, header starts at byte ", prefix, ")");
  const std::string header(reinterpret_cast<const char*>(bytes + prefix), static_cast<size_t>(header_len));

  std::string descr;
  bool fortran_order = false;
  RawTensor t;
  detail::NpyHeaderParser(header, where).parse(descr, fortran_order, t.shape);
  t.dtype = detail::npy_dtype(descr, where);
  DG_CHECK(!fortran_order, where, ": fortran order not supported; save a C-order array "
           "(np.save(path, np.ascontiguousarray(a)))");
  const size_t data_start = prefix + static_cast<size_t>(header_len);
  const size_t expected = detail::checked_nbytes(t.shape, t.dtype, where);
  DG_CHECK(size - data_start == expected, where, ": data is ", size - data_start,
           " bytes, expected ", expected, " for shape ", detail::shape_str(t.shape), " of '", descr, "'");
  t.data.assign(bytes + data_start, bytes + size);
  return t;
}

/// Reads a .npy file (like `numpy.load(path)`); throws dg::Error naming the path on any problem.
inline RawTensor read_npy(const std::string& path) {
  std::vector<uint8_t> bytes = detail::read_file(path, "npy");
  return parse_npy(bytes.data(), bytes.size(), path);
}

namespace detail {
// Magic, version, header length and the header dict, padded so the data starts 64-byte aligned.
inline std::vector<uint8_t> npy_preamble(const RawTensor& t) {
  const char* descr = t.dtype == DType::Float32 ? "<f4" : t.dtype == DType::Float64 ? "<f8"
                    : t.dtype == DType::Int64 ? "<i8" : nullptr;
  DG_CHECK(descr, "write_npy: dtype ", dtype_name(t.dtype),
           " has no .npy equivalent here (supported: F32, F64, I64); convert with to_vector first");
  t.check("write_npy");
  std::string shape = "(";  // Python's tuple repr: (), (3,), (2, 3)
  for (size_t i = 0; i < t.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(t.shape[i]);
  shape += t.shape.size() == 1 ? ",)" : ")";
  std::string header = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t prefix = 10;
  if (header.size() + 1 + prefix > 65535) prefix = 12;  // only version 2.0 has a 4-byte length
  header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::vector<uint8_t> out(prefix);
  std::memcpy(out.data(), "\x93NUMPY", 6);
  out[6] = prefix == 10 ? 1 : 2;
  out[7] = 0;
  store_le(out.data() + 8, header.size(), prefix - 8);
  out.insert(out.end(), header.begin(), header.end());
  return out;
}
}  // namespace detail

/// The bytes of a version 1.0 .npy file for t (F32, F64 or I64), like `numpy.save`.
inline std::vector<uint8_t> serialize_npy(const RawTensor& t) {
  std::vector<uint8_t> out = detail::npy_preamble(t);
  out.insert(out.end(), t.data.begin(), t.data.end());
  return out;
}

/// Writes t as a .npy file readable by `numpy.load`; the write is atomic (temp file + rename).
inline void write_npy(const std::string& path, const RawTensor& t) {
  std::vector<uint8_t> preamble = detail::npy_preamble(t);
  detail::AtomicFileWriter out(path, "npy");
  out.write(preamble.data(), preamble.size());
  out.write(t.data.data(), t.data.size());
  out.commit();
}

}  // namespace dg::io
