// densegrad/core/tensor.hpp: Tensor<T>, a refcounted handle to (storage, shape, strides, offset)
// plus autograd metadata. Views share storage. The ops that make views and do math are in
// ops/ (their methods here are declared, and defined next to the op's backward).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "device_kernels.hpp"
#include "dtype.hpp"
#include "error.hpp"
#include "generator.hpp"
#include "shape.hpp"
#include "storage.hpp"
#include "strided.hpp"

namespace dg {

namespace autograd {
struct Node;
}

/// What the autograd graph sees of any tensor, whatever its element type.
struct ImplBase {
  bool requires_grad = false;
  std::shared_ptr<autograd::Node> grad_fn;  // null for leaves and for tensors outside the graph
  virtual ~ImplBase() = default;
};

template <class T>
struct TensorImpl final : ImplBase {
  Storage storage;
  Shape shape, strides;  // strides in elements; 0 for expanded dims
  int64_t offset = 0;    // in elements, into storage
  std::shared_ptr<TensorImpl> grad;     // .grad of a leaf: accumulates over backward() calls
};

/// An n-dimensional array of T (float, double, bfloat16; int64_t for labels) with autograd.
/// Copying a Tensor copies the handle (like a torch.Tensor in Python), not the data.
template <class T>
class Tensor {
 public:
  using value_type = T;

  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl<T>> impl) : impl_(std::move(impl)) {}

  /// Uninitialized contiguous tensor (torch.empty).
  static Tensor empty(const Shape& shape, Device device = Device::cpu()) {
    auto impl = std::make_shared<TensorImpl<T>>();
    int64_t n = shape_numel(shape);
    DG_CHECK(static_cast<uint64_t>(n) <= SIZE_MAX / sizeof(T), "empty: ", shape_str(shape), " is too large");
    impl->storage = Storage::allocate(static_cast<size_t>(n) * sizeof(T), device);
    impl->shape = shape;
    impl->strides = contiguous_strides(shape);
    return Tensor(std::move(impl));
  }
  /// A view of `storage` with the given geometry; no copy.
  static Tensor from_storage(Storage storage, Shape shape, Shape strides, int64_t offset) {
    auto impl = std::make_shared<TensorImpl<T>>();
    impl->storage = std::move(storage);
    impl->shape = std::move(shape);
    impl->strides = std::move(strides);
    impl->offset = offset;
    return Tensor(std::move(impl));
  }

  // ---- geometry
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return checked().shape; }
  const Shape& strides() const { return checked().strides; }
  int64_t offset() const { return checked().offset; }
  int64_t dim() const { return static_cast<int64_t>(shape().size()); }
  int64_t size(int64_t d) const { return shape()[wrap_dim(d, dim(), "size")]; }
  int64_t stride(int64_t d) const { return strides()[wrap_dim(d, dim(), "stride")]; }
  int64_t numel() const { return shape_numel(shape()); }
  DType dtype() const { return dtype_of<T>(); }
  Device device() const { return checked().storage.device(); }
  const Storage& storage() const { return checked().storage; }
  bool is_contiguous() const {
    const auto& s = shape();
    const auto& st = strides();
    if (std::find(s.begin(), s.end(), 0) != s.end()) return true;  // no elements: any strides do (torch)
    int64_t expect = 1;
    for (int64_t i = dim() - 1; i >= 0; --i) {
      if (s[i] != 1 && st[i] != expect) return false;
      expect *= s[i];
    }
    return true;
  }
  /// Pointer to element [0, ..., 0] (in device memory for a CUDA tensor); index with strides().
  T* data() const { return static_cast<T*>(checked().storage.data()) + checked().offset; }

  // ---- element access (CPU, for tests and small things; not for inner loops)
  T item() const {
    DG_CHECK(numel() == 1, "item: expected a tensor with one element, got shape ", shape_str(shape()));
    return read_element(0);
  }
  T at(const Shape& index) const { return read_element(element_offset(index)); }
  /// All elements in C order (copied to the host for a CUDA tensor).
  std::vector<T> to_vector() const {
    if (!device().is_cpu()) return to(Device::cpu()).to_vector();
    std::vector<T> v;
    v.reserve(static_cast<size_t>(numel()));
    const T* p = data();
    for_each_strided<1>(shape(), {strides().data()}, {0}, [&](auto o) { v.push_back(p[o[0]]); });
    return v;
  }

  // ---- autograd (the engine is in autograd/tape.hpp)
  bool requires_grad() const { return defined() && impl_->requires_grad; }
  /// Marks a leaf as a parameter whose .grad() backward() fills (torch requires_grad_).
  Tensor& requires_grad_(bool on = true) {
    DG_CHECK(is_floating_v<T> || !on, "requires_grad_: only floating point tensors can require gradients");
    DG_CHECK(is_leaf(), "requires_grad_: can only be changed on a leaf tensor; use detach() for a non-leaf");
    checked().requires_grad = on;
    return *this;
  }
  /// True when no op created it under autograd (a parameter, an input, a detached tensor).
  bool is_leaf() const { return checked().grad_fn == nullptr; }
  /// Accumulated gradient of a leaf; undefined until backward() reaches it.
  Tensor grad() const { return Tensor(checked().grad); }
  void set_grad(const Tensor& g) {
    if (g.defined())
      DG_CHECK(g.shape() == shape(), "set_grad: gradient shape ", shape_str(g.shape()),
               " does not match tensor shape ", shape_str(shape()));
    checked().grad = g.impl_;
  }
  /// Rebinds this tensor (every handle sharing it) to src's storage and geometry, like
  /// torch's `param.data = src`; used to move parameters between devices in place.
  void set_data_(const Tensor& src) {
    check_inplace("set_data_");
    checked().storage = src.storage();
    checked().shape = src.shape();
    checked().strides = src.strides();
    checked().offset = src.offset();
  }
  /// Forgets the gradient (torch's zero_grad(set_to_none=True)).
  void zero_grad() { checked().grad.reset(); }
  /// Same data, cut from the graph (torch detach): shares storage, requires no grad.
  Tensor detach() const {
    return from_storage(storage(), shape(), strides(), offset());
  }
  std::string grad_fn_name() const;
  void backward(const Tensor& grad = Tensor(), bool retain_graph = false) const;

  // ---- views and ops with autograd (defined in ops/)
  Tensor reshape(const Shape& shape) const;
  Tensor view(const Shape& shape) const;
  Tensor permute(const Shape& dims) const;
  Tensor transpose(int64_t d0, int64_t d1) const;
  Tensor narrow(int64_t dim, int64_t start, int64_t length) const;
  Tensor slice(int64_t dim, int64_t start, int64_t end, int64_t step = 1) const;
  Tensor select(int64_t dim, int64_t index) const;
  Tensor expand(const Shape& shape) const;
  Tensor unsqueeze(int64_t dim) const;
  Tensor squeeze(int64_t dim) const;
  Tensor flatten(int64_t start_dim = 0, int64_t end_dim = -1) const;
  Tensor contiguous() const;
  Tensor clone() const;
  template <class U> Tensor<U> to() const;
  /// The same values on `device` (torch .to(device)); returns *this when already there.
  Tensor to(Device device) const;
  Tensor sum(const Shape& dims = {}, bool keepdim = false) const;
  Tensor mean(const Shape& dims = {}, bool keepdim = false) const;
  Tensor max(const Shape& dims = {}, bool keepdim = false) const;
  Tensor matmul(const Tensor& other) const;

  // ---- in-place, outside autograd (optimizer updates, initialization)
  Tensor& fill_(T value) {
    check_inplace("fill_");
    if (device().is_cuda()) {
      cuda_kernels<T>("fill_").fill(*this, value);
      return *this;
    }
    T* p = data();
    for_each_strided<1>(shape(), {strides().data()}, {0}, [&](auto o) { p[o[0]] = value; });
    return *this;
  }
  Tensor& zero_() { return fill_(T(0)); }
  /// Copies src (same shape, or broadcastable to it) into this tensor's elements.
  Tensor& copy_(const Tensor& src) {
    check_inplace("copy_");
    Shape b = broadcast_shapes(shape(), src.shape(), "copy_");
    DG_CHECK(b == shape(), "copy_: source shape ", shape_str(src.shape()), " does not broadcast to ",
             shape_str(shape()));
    if (device().is_cuda() || src.device().is_cuda()) return copy_on_device(src);
    Shape sst = broadcast_strides(src, shape());
    T* dst = data();
    const T* s = src.data();
    if (storage().is_alias_of(src.storage())) {  // overlapping copy: go through a temporary
      std::vector<T> tmp;
      for_each_strided<1>(shape(), {sst.data()}, {0}, [&](auto o) { tmp.push_back(s[o[0]]); });
      size_t i = 0;
      for_each_strided<1>(shape(), {strides().data()}, {0}, [&](auto o) { dst[o[0]] = tmp[i++]; });
    } else {
      for_each_strided<2>(shape(), {strides().data(), sst.data()}, {0, 0},
                          [&](auto o) { dst[o[0]] = s[o[1]]; });
    }
    return *this;
  }

  /// Strides that read `t` as if expanded to `target` (0 on broadcast dims).
  static Shape broadcast_strides(const Tensor& t, const Shape& target) {
    Shape st(target.size(), 0);
    size_t lead = target.size() - t.shape().size();
    for (size_t i = 0; i < t.shape().size(); ++i)
      st[lead + i] = t.shape()[i] == 1 && target[lead + i] != 1 ? 0 : t.strides()[i];
    return st;
  }

  /// "Tensor<float> [2, 3]" followed by the values (long tensors are abbreviated).
  std::string str(int64_t max_per_dim = 6) const;

  const std::shared_ptr<TensorImpl<T>>& impl() const { return impl_; }

 private:
  TensorImpl<T>& checked() const {
    DG_CHECK(impl_ != nullptr, "use of an undefined tensor (default-constructed Tensor)");
    return *impl_;
  }
  int64_t element_offset(const Shape& index) const {
    DG_CHECK(static_cast<int64_t>(index.size()) == dim(), "at: index ", shape_str(index), " has ", index.size(),
             " entries, tensor has ", dim(), " dims (shape ", shape_str(shape()), ")");
    int64_t off = 0;
    for (int64_t i = 0; i < dim(); ++i) {
      int64_t k = index[i] < 0 ? index[i] + shape()[i] : index[i];
      DG_CHECK(k >= 0 && k < shape()[i], "at: index ", index[i], " out of range for dim ", i, " of size ",
               shape()[i]);
      off += k * strides()[i];
    }
    return off;
  }
  void check_inplace(const char* op) const;
  /// Element at storage offset `off` from data(), read from whichever device holds it.
  T read_element(int64_t off) const {
    if (device().is_cpu()) return data()[off];
    T v;
    copy_bytes(&v, Device::cpu(), data() + off, device(), sizeof(T));
    return v;
  }
  /// copy_ when either side is on a CUDA device: the source comes to this tensor's device first
  /// (contiguous), then the device copies it into place (through a clone when the two overlap).
  Tensor& copy_on_device(const Tensor& src) {
    Tensor s = src.device() == device() ? src : src.to(device());
    if (device().is_cpu()) return copy_(s);
    if (storage().is_alias_of(s.storage())) s = s.clone();
    cuda_kernels<T>("copy_").copy(*this, s);
    return *this;
  }

  std::shared_ptr<TensorImpl<T>> impl_;
};

// ---------------------------------------------------------------- creation (torch.* factories)

/// torch.full
template <class T> Tensor<T> full(const Shape& shape, T value, Device device = Device::cpu()) {
  Tensor<T> t = Tensor<T>::empty(shape, device);
  if (device.is_cpu()) std::fill_n(t.data(), t.numel(), value);
  else t.fill_(value);
  return t;
}
/// torch.zeros
template <class T> Tensor<T> zeros(const Shape& shape, Device device = Device::cpu()) {
  return full<T>(shape, T(0), device);
}
/// torch.ones
template <class T> Tensor<T> ones(const Shape& shape, Device device = Device::cpu()) {
  return full<T>(shape, T(1), device);
}
/// torch.zeros_like (same shape and device)
template <class T> Tensor<T> zeros_like(const Tensor<T>& t) { return zeros<T>(t.shape(), t.device()); }
/// A 0-D tensor holding v.
template <class T> Tensor<T> scalar_tensor(T v) { return full<T>({}, v); }
/// torch.arange(start, end, step): values start, start+step, ... < end (> end if step < 0).
template <class T> Tensor<T> arange(double start, double end, double step = 1.0) {
  DG_CHECK(step != 0.0 && std::isfinite(start) && std::isfinite(end) && std::isfinite(step),
           "arange: step must be non-zero and all bounds finite (got start ", start, ", end ", end, ", step ", step, ")");
  double n = std::ceil((end - start) / step);
  int64_t count = n > 0 ? static_cast<int64_t>(n) : 0;
  Tensor<T> t = Tensor<T>::empty({count});
  for (int64_t i = 0; i < count; ++i) t.data()[i] = static_cast<T>(start + static_cast<double>(i) * step);
  return t;
}
/// torch.arange(n): 0, 1, ..., n-1
template <class T> Tensor<T> arange(int64_t n) { return arange<T>(0.0, static_cast<double>(n)); }
/// A tensor with the given values in C order (torch.tensor(values).reshape(shape)).
/// Without a shape, a 1-D tensor.
template <class T> Tensor<T> tensor(const std::vector<T>& values, Shape shape = {-1}) {
  if (shape == Shape{-1}) shape = {static_cast<int64_t>(values.size())};
  DG_CHECK(shape_numel(shape) == static_cast<int64_t>(values.size()), "tensor: ", values.size(),
           " values do not fill shape ", shape_str(shape), " (", shape_numel(shape), " elements)");
  Tensor<T> t = Tensor<T>::empty(shape);
  std::copy(values.begin(), values.end(), t.data());
  return t;
}
/// torch.rand: uniform in [low, high) from `gen`.
template <class T> Tensor<T> rand(const Shape& shape, Generator& gen, double low = 0.0, double high = 1.0) {
  Tensor<T> t = Tensor<T>::empty(shape);
  T* p = t.data();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = static_cast<T>(low + (high - low) * gen.uniform());
  return t;
}
/// torch.randn: normal(mean, std) from `gen`.
template <class T> Tensor<T> randn(const Shape& shape, Generator& gen, double mean = 0.0, double std = 1.0) {
  Tensor<T> t = Tensor<T>::empty(shape);
  T* p = t.data();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = static_cast<T>(mean + std * gen.normal());
  return t;
}

// ---------------------------------------------------------------- printing

template <class T>
std::string Tensor<T>::str(int64_t max_per_dim) const {
  if (!defined()) return "Tensor<undefined>";
  if (!device().is_cpu()) return to(Device::cpu()).str(max_per_dim) + " (on " + device().str() + ")";
  std::ostringstream os;
  const char* name = dtype() == DType::Float32 ? "float" : dtype() == DType::Float64 ? "double"
                   : dtype() == DType::BFloat16 ? "bfloat16" : "int64";
  os << "Tensor<" << name << "> " << shape_str(shape());
  if (requires_grad()) os << " requires_grad";
  os << "\n";
  os.precision(std::is_same_v<T, double> ? 10 : 6);
  // recursive pretty printer: abbreviates each dim to its first and last max_per_dim/2 entries
  std::vector<int64_t> idx;
  std::function<void(int64_t)> rec = [&](int64_t d) {
    if (d == dim()) {
      int64_t off = 0;
      for (int64_t i = 0; i < dim(); ++i) off += idx[i] * strides()[i];
      os << static_cast<acc_t<T>>(data()[off]);
      return;
    }
    os << "[";
    int64_t n = shape()[d], half = std::max<int64_t>(1, max_per_dim / 2);
    for (int64_t i = 0; i < n; ++i) {
      if (n > max_per_dim && i == half) {
        os << "...";
        i = n - half - 1;
        if (i + 1 < n) os << (d + 1 == dim() ? ", " : ",\n" + std::string(d + 1, ' '));
        continue;
      }
      idx.push_back(i);
      rec(d + 1);
      idx.pop_back();
      if (i + 1 < n) os << (d + 1 == dim() ? ", " : ",\n" + std::string(d + 1, ' '));
    }
    os << "]";
  };
  rec(0);
  return os.str();
}

template <class T>
std::ostream& operator<<(std::ostream& os, const Tensor<T>& t) {
  return os << t.str();
}

/// The distance in elements from image n to image n + 1 of an (N, C, H, W) tensor that is
/// "batch-strided": its C, H, W dims laid out densely (strides (S_n, H*W, W, 1), size-1 dims
/// aside) and its images at least C*H*W apart. A contiguous tensor is one (S_n = C*H*W); so is
/// a window of channels of one, such as a dense stage's prefix view (S_n = C_total*H*W), which
/// the CPU kernels of conv2d and layer_norm2d and the CUDA depthwise conv read in place. -1 for
/// any other layout.
template <class T>
int64_t batch_stride(const Tensor<T>& t) {
  if (t.dim() != 4) return -1;
  const Shape &s = t.shape(), &st = t.strides();
  int64_t image = 1;  // C*H*W once the loop is done
  for (int64_t i = 3; i >= 1; --i) {
    if (s[i] != 1 && st[i] != image) return -1;
    image *= s[i];
  }
  if (s[0] <= 1 || image == 0) return image;  // one image (or none): its distance to the next is moot
  return st[0] >= image ? st[0] : -1;
}

}  // namespace dg
