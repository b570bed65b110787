// densegrad/data/dataset.hpp: an in-memory image classification dataset: N images of (C, H, W)
// in one contiguous uint8 or float buffer, int64 labels and the number of classes.
// Not a lazy or streaming dataset: everything is in memory (Fashion-MNIST is 47 MB as uint8).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../core/tensor.hpp"

namespace dg::data {

// Shape legend for this folder:
//   N samples, C channels, H x W pixels, K classes, B samples in a batch.

/// N labelled images, like a torchvision dataset whose __getitem__ returns (ToTensor(img), label).
/// A Dataset is a cheap handle: copies share the pixel and label buffers, which never change.
///   auto ds = dg::data::Dataset::from_uint8(pixels, {N, 1, 28, 28}, labels, 10, "mine");
class Dataset {
 public:
  Dataset() = default;

  /// Pixels 0..255 in (N, C, H, W) order; batches see them as float in [0, 1] (ToTensor).
  /// `name` (a file name for loaded data) is what error messages call this dataset.
  static Dataset from_uint8(std::vector<uint8_t> pixels, const Shape& shape, std::vector<int64_t> labels,
                            int64_t num_classes, std::string name = "dataset") {
    Dataset d = checked_geometry(pixels.size(), shape, std::move(labels), num_classes, std::move(name));
    d.u8_ = std::make_shared<const std::vector<uint8_t>>(std::move(pixels));
    return d;
  }
  /// Float pixels in (N, C, H, W) order, used as they are.
  static Dataset from_float(std::vector<float> pixels, const Shape& shape, std::vector<int64_t> labels,
                            int64_t num_classes, std::string name = "dataset") {
    Dataset d = checked_geometry(pixels.size(), shape, std::move(labels), num_classes, std::move(name));
    d.f32_ = std::make_shared<const std::vector<float>>(std::move(pixels));
    return d;
  }

  // ---- geometry
  bool defined() const { return labels_ != nullptr; }
  int64_t size() const { return shape_.empty() ? 0 : shape_[0]; }  // N
  int64_t channels() const { return shape_.at(1); }
  int64_t height() const { return shape_.at(2); }
  int64_t width() const { return shape_.at(3); }
  int64_t sample_numel() const { return channels() * height() * width(); }  // C*H*W
  int64_t num_classes() const { return num_classes_; }
  const Shape& shape() const { return shape_; }  // (N, C, H, W)
  const std::string& name() const { return name_; }

  // ---- raw buffers (exactly one of the two pixel buffers is non-null)
  bool is_uint8() const { return u8_ != nullptr; }
  const uint8_t* uint8_data() const { return u8_ ? u8_->data() : nullptr; }
  const float* float_data() const { return f32_ ? f32_->data() : nullptr; }
  const std::vector<int64_t>& labels() const { return *checked_labels(); }
  int64_t label(int64_t i) const { return labels()[static_cast<size_t>(checked_index(i))]; }

  /// Writes sample i as C*H*W floats to dst: uint8 pixels divided by 255 (torchvision ToTensor).
  void copy_image(int64_t i, float* dst) const {
    const int64_t n = sample_numel(), off = checked_index(i) * n;
    if (u8_) {
      const uint8_t* p = u8_->data() + off;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(p[j]) / 255.0f;
    } else {
      std::copy_n(f32_->data() + off, n, dst);
    }
  }
  /// Sample i as a new float tensor. image: (C, H, W)
  Tensor<float> image(int64_t i) const {
    Tensor<float> t = Tensor<float>::empty({channels(), height(), width()});
    copy_image(i, t.data());
    return t;
  }
  /// All labels as a tensor. (N)
  Tensor<int64_t> labels_tensor() const { return tensor<int64_t>(labels()); }
  /// How many samples each class has. (K)
  std::vector<int64_t> class_counts() const {
    std::vector<int64_t> c(static_cast<size_t>(num_classes_), 0);
    for (int64_t y : labels()) ++c[static_cast<size_t>(y)];
    return c;
  }
  /// The samples at `indices`, in that order, as a new dataset (torch.utils.data.Subset, but copied).
  Dataset subset(const std::vector<int64_t>& indices) const {
    const int64_t n = sample_numel();
    std::vector<int64_t> y;
    std::vector<uint8_t> u8;
    std::vector<float> f32;
    for (int64_t i : indices) {
      const int64_t off = checked_index(i) * n;
      y.push_back(labels()[static_cast<size_t>(i)]);
      if (u8_) u8.insert(u8.end(), u8_->begin() + off, u8_->begin() + off + n);
      else f32.insert(f32.end(), f32_->begin() + off, f32_->begin() + off + n);
    }
    Shape s = shape_;
    s[0] = static_cast<int64_t>(indices.size());
    return u8_ ? from_uint8(std::move(u8), s, std::move(y), num_classes_, name_)
               : from_float(std::move(f32), s, std::move(y), num_classes_, name_);
  }
  /// The first min(n, size()) samples.
  Dataset head(int64_t n) const {
    std::vector<int64_t> idx(static_cast<size_t>(std::max<int64_t>(0, std::min(n, size()))));
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int64_t>(i);
    return subset(idx);
  }

 private:
  // Checks everything except the pixel values: 4-D shape, buffer and label counts, label range.
  static Dataset checked_geometry(size_t num_pixels, const Shape& shape, std::vector<int64_t> labels,
                                  int64_t num_classes, std::string name) {
    DG_CHECK(shape.size() == 4, name, ": expected an image shape (N, C, H, W), got ", shape_str(shape));
    DG_CHECK(shape[1] > 0 && shape[2] > 0 && shape[3] > 0, name, ": C, H and W must be positive, got shape ",
             shape_str(shape));
    const int64_t numel = shape_numel(shape);  // throws on negative dims and overflow
    DG_CHECK(static_cast<uint64_t>(numel) == num_pixels, name, ": shape ", shape_str(shape), " needs ", numel,
             " pixels, got ", num_pixels);
    DG_CHECK(static_cast<int64_t>(labels.size()) == shape[0], name, ": ", shape[0], " images but ", labels.size(),
             " labels");
    DG_CHECK(num_classes > 0, name, ": num_classes must be positive, got ", num_classes);
    for (size_t i = 0; i < labels.size(); ++i)
      DG_CHECK(labels[i] >= 0 && labels[i] < num_classes, name, ": label ", i, " is ", labels[i], ", expected 0 <= label < ",
               num_classes, " (num_classes)");
    Dataset d;
    d.shape_ = shape;
    d.num_classes_ = num_classes;
    d.name_ = std::move(name);
    d.labels_ = std::make_shared<const std::vector<int64_t>>(std::move(labels));
    return d;
  }
  const std::shared_ptr<const std::vector<int64_t>>& checked_labels() const {
    DG_CHECK(labels_ != nullptr, "use of an empty (default-constructed) Dataset");
    return labels_;
  }
  int64_t checked_index(int64_t i) const {
    DG_CHECK(i >= 0 && i < size(), name_, ": sample index ", i, " out of range for ", size(), " samples");
    return i;
  }

  Shape shape_;  // (N, C, H, W)
  int64_t num_classes_ = 0;
  std::string name_;
  std::shared_ptr<const std::vector<uint8_t>> u8_;  // (N, C, H, W) or null
  std::shared_ptr<const std::vector<float>> f32_;   // (N, C, H, W) or null
  std::shared_ptr<const std::vector<int64_t>> labels_;  // (N)
};

}  // namespace dg::data
