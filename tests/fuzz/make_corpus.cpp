// tests/fuzz/make_corpus.cpp: writes the seed corpus of the fuzz targets, tests/fuzz/corpus/<target>/:
// a few small valid files of each format and truncated copies (every file < 4 KiB). The files are
// committed; rerun after a format change:  make_fuzz_corpus tests/fuzz/corpus
// Not a fuzz target: a plain program, built with the others in tests/fuzz.
#include <rdnet/rdnet.hpp>
#include <rdnet/train_util.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "fuzz_util.hpp"

namespace {

using Bytes = std::vector<uint8_t>;
using dg::io::RawTensor;

std::string g_root;

void put(const std::string& target, const std::string& name, const Bytes& bytes) {
  DG_CHECK(bytes.size() < 4096, "make_corpus: ", target, "/", name, " is ", bytes.size(), " bytes, seeds must be < 4 KiB");
  const std::string dir = g_root + "/" + target;
  std::filesystem::create_directories(dir);
  std::ofstream f(dir + "/" + name, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  DG_CHECK(f.good(), "make_corpus: cannot write ", dir, "/", name);
}
Bytes text(const std::string& s) { return Bytes(s.begin(), s.end()); }
Bytes cut(Bytes b, size_t n) { b.resize(std::min(n, b.size())); return b; }
Bytes with_mode(uint8_t mode, const Bytes& b) {  // the idx and cifar10 targets' first byte
  Bytes out{mode};
  out.insert(out.end(), b.begin(), b.end());
  return out;
}
Bytes gz(const Bytes& b) { return fuzz::gzip(b.data(), b.size()); }

void safetensors() {
  const Bytes two = dg::io::serialize_safetensors(
      {{"w", RawTensor::from_vector<float>({2, 3}, {1, 2, 3, 4, 5, 6})}, {"n", RawTensor::from_vector<int64_t>({2}, {7, -8})}},
      {{"format", "pt"}});
  put("safetensors", "two_tensors.safetensors", two);
  put("safetensors", "all_dtypes.safetensors",
      dg::io::serialize_safetensors({{"f64", RawTensor::from_vector<double>({2}, {0.5, -1e300})},
                                     {"bf16", RawTensor::from_vector<float>({2, 2}, {1, -2, 3.5f, 0}, dg::DType::BFloat16)},
                                     {"f16", RawTensor::from_vector<float>({3}, {65504, 1e-7f, -0.f}, dg::DType::Float16)},
                                     {"scalar", RawTensor::from_vector<int64_t>({}, {42})},
                                     {"empty", RawTensor::from_vector<float>({0, 4}, {})}}));
  put("safetensors", "empty.safetensors", dg::io::serialize_safetensors({}));
  put("safetensors", "truncated_data.safetensors", cut(two, two.size() - 5));
  put("safetensors", "truncated_header.safetensors", cut(two, 40));
}

void npy() {
  put("npy", "f32_2x3.npy", dg::io::serialize_npy(RawTensor::from_vector<float>({2, 3}, {1, 2, 3, 4, 5, 6})));
  put("npy", "f64_scalar.npy", dg::io::serialize_npy(RawTensor::from_vector<double>({}, {3.25})));
  const Bytes i64 = dg::io::serialize_npy(RawTensor::from_vector<int64_t>({3}, {1, -2, 3}));
  put("npy", "i64_vec.npy", i64);
  put("npy", "truncated.npy", cut(i64, i64.size() - 3));
  // version 2.0: a 4-byte header length, and a header in the other quoting style
  const std::string header = "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (1, 2), }\n";
  Bytes v2 = text(std::string("\x93NUMPY\x02\x00", 8));
  for (int i = 0; i < 4; ++i) v2.push_back(static_cast<uint8_t>(header.size() >> (8 * i)));
  v2.insert(v2.end(), header.begin(), header.end());
  v2.resize(v2.size() + 8, 0);
  put("npy", "v2_f32_1x2.npy", v2);
}

void json() {
  put("json", "object.json", text(R"({"a": [1, -2, 3.5e-3, true, false, null], "b": {"c": "d"}, "e": []})"));
  put("json", "strings.json", text(R"(["\"\\\/\b\f\n\r\t", "\u00e9\u4e2d\ud83d\ude00", "é中😀", ""])"));
  put("json", "numbers.json", text("[0, -0, 18446744073709551615, -9223372036854775808, 1E+2, 1e-999, 123456789012345678901234567890]"));
  put("json", "safetensors_header.json",
      text(R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})"));
  put("json", "nested.json", text("[[[[[[[[[[{\"x\":[[[[]]]]}]]]]]]]]]]"));
  put("json", "truncated.json", text(R"({"a": [1, 2, {"b": "c)"));
}

Bytes idx_file(uint32_t magic, const std::vector<uint32_t>& dims) {
  Bytes b;
  auto be32 = [&](uint32_t v) { for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(v >> s)); };
  be32(magic);
  uint64_t n = 1;
  for (uint32_t d : dims) be32(d), n *= d;
  for (uint64_t i = 0; i < n; ++i) b.push_back(static_cast<uint8_t>(i * 37 % 10));
  return b;
}

void idx() {
  const Bytes images = idx_file(0x803, {3, 4, 5}), labels = idx_file(0x801, {3});
  put("idx", "images_plain.idx", with_mode(0, images));
  put("idx", "labels_plain.idx", with_mode(0, labels));
  put("idx", "images_gzip_by_target.idx", with_mode(1, images));
  put("idx", "images_gz_file.idx", with_mode(0, gz(images)));
  put("idx", "two_dims.idx", with_mode(0, idx_file(0x802, {2, 3})));
  put("idx", "truncated_plain.idx", with_mode(0, cut(images, images.size() - 7)));
  const Bytes g = gz(labels);
  put("idx", "truncated_gz_file.idx", with_mode(0, cut(g, g.size() - 4)));
}

void cifar10() {
  auto records = [](int n) {
    Bytes b;
    for (int r = 0; r < n; ++r) {
      b.push_back(static_cast<uint8_t>(3 + r));
      for (int i = 0; i < 3072; ++i) b.push_back(static_cast<uint8_t>((i * 7 + r) % 256));
    }
    return b;
  };
  put("cifar10", "one_record.bin", with_mode(0, records(1)));
  put("cifar10", "one_record_gzip_by_target.bin", with_mode(1, records(1)));
  put("cifar10", "two_records_gz_file.bin", with_mode(0, gz(records(2))));
  put("cifar10", "truncated_record.bin", with_mode(0, cut(records(1), 1000)));
}

void checkpoint() {
  // What rdnet_train writes, minus what does not fit a seed: the nano model's smallest tensors,
  // AdamW's options (not its moments), the schedule, counters and metadata.
  dg::Generator gen(0);
  rdnet::RDNet<float> model(rdnet::RDNetConfig::nano(), gen);
  dg::optim::AdamW<float> opt(dg::optim::timm_param_groups(model, 0.05), dg::optim::AdamWOptions().lr(1e-3));
  dg::optim::CosineSchedule sched(1e-3, 100, 10, 1e-5, 1e-6);
  train_util::Checkpoint ck;
  std::map<std::string, dg::Tensor<float>> small;
  for (const auto& [name, t] : model.state_dict())
    if (t.numel() <= 10 && small.size() < 3) small.emplace(name, t);
  ck.put("model", small);
  std::map<std::string, dg::Tensor<float>> options;  // options and param groups, not the per-tensor state
  for (const auto& [name, t] : opt.state_dict())
    if (name.rfind("state.", 0) != 0) options.emplace(name, t);
  ck.put("optim", options);
  ck.put("sched", sched.state_dict<double>());
  ck.put_int("train.epoch", 1);
  ck.put_int("train.step", 25);
  ck.put_double("train.best_acc", 85.5);
  ck.tensors["rng.default_generator"] = RawTensor::from_vector<int64_t>({5}, {'5', '4', '8', '9', ' '});
  ck.metadata = {{"format", "rdnet_train checkpoint v1"},
                 {"args", "--model=nano\n--epochs=2\n"},
                 {"metrics", train_util::metrics_csv({{1, 0.5, 0.4, 85.5, 1e-3, 1.0}})},
                 {"densegrad", DENSEGRAD_VERSION}};
  const Bytes full = dg::io::serialize_safetensors(ck.tensors, ck.metadata);
  put("checkpoint", "resumable_parts.safetensors", full);
  put("checkpoint", "truncated.safetensors", cut(full, full.size() / 2));
  ck.tensors["model.head.fc.bias"] = RawTensor::from_vector<float>({3}, {1, 2, 3});  // a mis-shaped weight
  ck.metadata["metrics"] = std::string(train_util::kMetricsHeader) + "\n1,x,,,1e-3,2\n";
  put("checkpoint", "bad_shape_and_metrics.safetensors", dg::io::serialize_safetensors(ck.tensors, ck.metadata));
  // 0 elements, but strides beyond 64 bits: must be refused before it becomes a Tensor
  const std::string header = R"({"model.head.fc.bias":{"dtype":"F32","shape":[0,4611686018427387904,4611686018427387904],"data_offsets":[0,0]}})";
  Bytes zero_size(8);
  dg::io::detail::store_le(zero_size.data(), header.size(), 8);
  zero_size.insert(zero_size.end(), header.begin(), header.end());
  put("checkpoint", "zero_size_huge_dims.safetensors", zero_size);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_fuzz_corpus <corpus dir, e.g. tests/fuzz/corpus>\n");
    return 2;
  }
  g_root = argv[1];
  try {
    safetensors();
    npy();
    json();
    idx();
    cifar10();
    checkpoint();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make_fuzz_corpus: %s\n", e.what());
    return 1;
  }
  std::printf("make_fuzz_corpus: wrote the seeds under %s\n", g_root.c_str());
  return 0;
}
