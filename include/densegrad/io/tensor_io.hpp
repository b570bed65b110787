// densegrad/io/tensor_io.hpp: Tensor<T> <-> files. Bridges the format parsers (RawTensor,
// safetensors.hpp, npy.hpp) and Tensor<T>, converting element types like torch's .to().
// Not a checkpoint format of its own: checkpoints are plain safetensors files.
#pragma once

#include <map>
#include <string>

#include "../core/tensor.hpp"
#include "npy.hpp"
#include "safetensors.hpp"

namespace dg::io {

/// The tensor's elements as a RawTensor stored as `stored` (default: T's own dtype).
template <class T>
RawTensor to_raw(const Tensor<T>& t, DType stored = dtype_of<T>()) {
  return RawTensor::from_vector<T>(t.shape(), t.to_vector(), stored);
}

/// A new contiguous Tensor<T> holding the RawTensor's values converted to T.
template <class T>
Tensor<T> from_raw(const RawTensor& r) {
  return tensor<T>(r.to_vector<T>(), r.shape);
}

/// Every tensor of a safetensors file, converted to T (torch: safetensors.torch.load_file).
template <class T>
std::map<std::string, Tensor<T>> load_safetensors(const std::string& path) {
  std::map<std::string, Tensor<T>> out;
  for (const auto& [name, raw] : read_safetensors(path).tensors) out.emplace(name, from_raw<T>(raw));
  return out;
}

/// Writes tensors to a safetensors file atomically (torch: safetensors.torch.save_file).
template <class T>
void save_safetensors(const std::string& path, const std::map<std::string, Tensor<T>>& tensors,
                      const std::map<std::string, std::string>& metadata = {}, DType stored = dtype_of<T>()) {
  std::map<std::string, RawTensor> raw;
  for (const auto& [name, t] : tensors) raw.emplace(name, to_raw(t, stored));
  write_safetensors(path, raw, metadata);
}

/// numpy.load for .npy files holding float32, float64 or int64, converted to T.
template <class T>
Tensor<T> load_npy(const std::string& path) {
  return from_raw<T>(read_npy(path));
}

/// numpy.save; T = float, double or int64_t (bfloat16 has no .npy dtype: convert first).
template <class T>
void save_npy(const std::string& path, const Tensor<T>& t) {
  write_npy(path, to_raw(t));
}

}  // namespace dg::io
