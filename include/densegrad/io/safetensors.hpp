// densegrad/io/safetensors.hpp: safetensors read/write, validated like the reference
// implementation (huggingface/safetensors, Rust), for F32, F64, BF16, F16 and I64 tensors.
// Not a lazy or memory-mapped loader: read_safetensors reads the whole file and copies tensors out.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "densegrad/io/json.hpp"
#include "densegrad/io/raw_tensor.hpp"

namespace dg::io {

/// The contents of a safetensors file: tensors by name, and the optional `__metadata__`.
struct Safetensors {
  std::map<std::string, RawTensor> tensors;
  std::map<std::string, std::string> metadata;
};

namespace detail {

/// Largest header the reference implementation accepts (its MAX_HEADER_SIZE).
constexpr uint64_t kSafetensorsMaxHeaderSize = 100000000;

inline DType safetensors_dtype(const std::string& s, const std::string& what) {
  const DType ours[] = {DType::Float32, DType::Float64, DType::BFloat16, DType::Float16, DType::Int64};
  for (DType d : ours)
    if (s == dtype_name(d)) return d;
  const char* theirs[] = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "U64", "F8_E5M2",
                          "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"};
  for (const char* d : theirs)
    DG_CHECK(s != d, what, ": unsupported dtype '", s, "' (densegrad reads F32, F64, BF16, F16, I64)");
  DG_THROW(what, ": unknown dtype '", s, "' (not a safetensors dtype; densegrad reads F32, F64, BF16, F16, I64)");
}

// One header entry before validation: offsets are relative to the start of the data buffer.
struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::Float32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};

inline SafetensorsEntry safetensors_entry(const std::string& name, const json::Value& v,
                                          const std::string& where) {
  const std::string what = where + ": tensor '" + name + "'";
  v.expect(json::Value::Kind::Object, what);
  for (const std::string& key : v.keys)
    DG_CHECK(key == "dtype" || key == "shape" || key == "data_offsets", what, ": unknown field '",
             key, "' (expected dtype, shape, data_offsets)");
  SafetensorsEntry e;
  e.name = name;
  e.dtype = safetensors_dtype(v.at("dtype", what).as_string(what + ": dtype"), what);
  const json::Value& shape = v.at("shape", what).expect(json::Value::Kind::Array, what + ": shape");
  for (size_t i = 0; i < shape.items.size(); ++i) {
    const std::string w = what + ": shape[" + std::to_string(i) + "]";
    uint64_t d = shape.items[i].as_uint64(w);
    DG_CHECK(d <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), w, ": dimension ", d,
             " does not fit in 64 bits");
    e.shape.push_back(static_cast<int64_t>(d));
  }
  const json::Value& off = v.at("data_offsets", what).expect(json::Value::Kind::Array, what + ": data_offsets");
  DG_CHECK(off.items.size() == 2, what, ": data_offsets must be [begin, end], got ", off.items.size(), " numbers");
  e.begin = off.items[0].as_uint64(what + ": data_offsets[0]");
  e.end = off.items[1].as_uint64(what + ": data_offsets[1]");
  return e;
}

// The header JSON, right-padded with spaces to a multiple of 8 bytes as the reference writer does.
inline std::string safetensors_header(const std::map<std::string, RawTensor>& tensors,
                                      const std::map<std::string, std::string>& metadata) {
  std::string h = "{";
  if (!metadata.empty()) {
    h += "\"__metadata__\":{";
    for (auto it = metadata.begin(); it != metadata.end(); ++it)
      h += (it == metadata.begin() ? "" : ",") + json::quote(it->first) + ":" + json::quote(it->second);
    h += "}";
  }
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    DG_CHECK(name != "__metadata__", "write_safetensors: '__metadata__' is reserved, not a tensor name");
    t.check("write_safetensors: tensor '" + name + "'");
    std::string dims;
    for (size_t i = 0; i < t.shape.size(); ++i) dims += (i ? "," : "") + std::to_string(t.shape[i]);
    h += (h.size() > 1 ? "," : "") + json::quote(name) + ":{\"dtype\":\"" + dtype_name(t.dtype) +
         "\",\"shape\":[" + dims + "],\"data_offsets\":[" + std::to_string(offset) + "," +
         std::to_string(offset + t.data.size()) + "]}";
    offset += t.data.size();
  }
  h += "}";
  h.append((8 - h.size() % 8) % 8, ' ');
  DG_CHECK(h.size() <= kSafetensorsMaxHeaderSize, "write_safetensors: header is ", h.size(),
           " bytes, more than the format's limit of ", kSafetensorsMaxHeaderSize);
  return h;
}

}  // namespace detail

/// Parses the bytes of a safetensors file, checking everything the reference reader checks:
/// header length <= 100,000,000 and inside the file, a JSON object header, known fields only,
/// tensors contiguous from offset 0 (InvalidOffset), sizes matching shape and dtype
/// (TensorInvalidInfo), and the last tensor ending at the end of the file (MetadataIncompleteBuffer).
inline Safetensors parse_safetensors(const uint8_t* bytes, size_t size, const std::string& name_for_errors) {
  const std::string where = "safetensors: '" + name_for_errors + "'";
  DG_CHECK(size >= 8, where, ": HeaderTooSmall: file is ", size,
           " bytes, shorter than the 8-byte header length");
  const uint64_t n = detail::load_le(bytes, 8);
  DG_CHECK(n <= detail::kSafetensorsMaxHeaderSize, where, ": HeaderTooLarge: header length ", n,
           " exceeds the limit of ", detail::kSafetensorsMaxHeaderSize, " bytes");
  DG_CHECK(n <= size - 8, where, ": InvalidHeaderLength: header length ", n,
           " runs past the end of the file (", size, " bytes)");
  const char* header = reinterpret_cast<const char*>(bytes + 8);
  DG_CHECK(n > 0 && header[0] == '{', where, ": InvalidHeaderStart: the JSON header must start with '{'");
  json::Value root;
  try {
    root = json::parse(header, static_cast<size_t>(n), name_for_errors, 8);
  } catch (const Error& e) {
    DG_THROW(where, ": InvalidHeaderDeserialization: header is not valid JSON: ", e.what());
  }

  Safetensors out;
  std::vector<detail::SafetensorsEntry> entries;
  for (size_t i = 0; i < root.keys.size(); ++i) {
    const json::Value& v = root.items[i];
    if (root.keys[i] != "__metadata__") {
      entries.push_back(detail::safetensors_entry(root.keys[i], v, where));
      continue;
    }
    if (v.kind == json::Value::Kind::Null) continue;  // the reference reads it as Option<...>
    v.expect(json::Value::Kind::Object, where + ": __metadata__");
    for (size_t j = 0; j < v.keys.size(); ++j)
      out.metadata[v.keys[j]] = v.items[j].as_string(where + ": __metadata__['" + v.keys[j] + "']");
  }

  // Sorted by offsets, the tensors must tile the data buffer exactly: [0,a) [a,b) ... [y,z).
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  const uint64_t buffer_len = size - 8 - n;
  uint64_t start = 0;
  for (const auto& e : entries) {
    const std::string what = where + ": tensor '" + e.name + "'";
    DG_CHECK(e.begin == start && e.end >= e.begin, what, ": InvalidOffset: data_offsets [", e.begin,
             ", ", e.end, "] ",
             (e.end < e.begin ? "end before begin"
              : e.begin < start ? "overlap the previous tensor, which ends at " + std::to_string(start)
              : start == 0 ? "leave a gap: the first tensor must start at 0"
              : "leave a gap after the previous tensor, which ends at " + std::to_string(start)),
             " (tensors must be contiguous from 0, no gaps or overlaps)");
    const size_t nbytes = detail::checked_nbytes(e.shape, e.dtype, what);
    DG_CHECK(e.end - e.begin == nbytes, what, ": TensorInvalidInfo: data_offsets [", e.begin, ", ",
             e.end, "] span ", e.end - e.begin, " bytes, but shape ", detail::shape_str(e.shape),
             " of ", dtype_name(e.dtype), " needs ", nbytes);
    start = e.end;
  }
  DG_CHECK(start == buffer_len, where, ": MetadataIncompleteBuffer: tensors cover ", start,
           " bytes of data, but the file has ", buffer_len, " bytes after the header");

  const uint8_t* data = bytes + 8 + n;
  for (auto& e : entries) {
    RawTensor& t = out.tensors[e.name];
    t.dtype = e.dtype;
    t.shape = std::move(e.shape);
    t.data.assign(data + e.begin, data + e.end);
  }
  return out;
}

/// Reads a safetensors file, like `safetensors.torch.load_file(path)`; throws naming the path.
inline Safetensors read_safetensors(const std::string& path) {
  std::vector<uint8_t> bytes = detail::read_file(path, "safetensors");
  return parse_safetensors(bytes.data(), bytes.size(), path);
}

/// The bytes of a safetensors file holding tensors (in name order) and metadata.
inline std::vector<uint8_t> serialize_safetensors(const std::map<std::string, RawTensor>& tensors,
                                                  const std::map<std::string, std::string>& metadata = {}) {
  const std::string header = detail::safetensors_header(tensors, metadata);
  std::vector<uint8_t> out(8);
  detail::store_le(out.data(), header.size(), 8);
  out.insert(out.end(), header.begin(), header.end());
  for (const auto& kv : tensors) out.insert(out.end(), kv.second.data.begin(), kv.second.data.end());
  return out;
}

/// Writes tensors (in name order) and metadata as a safetensors file, like
/// `safetensors.torch.save_file(tensors, path, metadata)`. Atomic: the data goes to
/// `path + ".tmp.<pid>"`, is fsynced, then renamed over path; on failure nothing is left behind.
inline void write_safetensors(const std::string& path, const std::map<std::string, RawTensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  const std::string header = detail::safetensors_header(tensors, metadata);
  uint8_t len[8];
  detail::store_le(len, header.size(), 8);
  detail::AtomicFileWriter out(path, "safetensors");
  out.write(len, 8);
  out.write(header.data(), header.size());
  for (const auto& kv : tensors) out.write(kv.second.data.data(), kv.second.data.size());
  out.commit();
}

/// Writes st.tensors and st.metadata; see the overload above.
inline void write_safetensors(const std::string& path, const Safetensors& st) {
  write_safetensors(path, st.tensors, st.metadata);
}

}  // namespace dg::io
