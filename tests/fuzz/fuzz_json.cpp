// tests/fuzz/fuzz_json.cpp: libFuzzer target for io::json::parse, the reader under the safetensors
// header. An accepted document, written back out (numbers as their source text, strings through
// json::quote), must parse to the same tree; the number accessors may only throw dg::Error.
#include <densegrad/io/json.hpp>

#include "fuzz_util.hpp"

namespace {

using dg::io::json::Value;

// The document as compact JSON: what a serializer would write for this tree.
std::string dump(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Null: return "null";
    case Value::Kind::Bool: return v.boolean ? "true" : "false";
    case Value::Kind::Number: return v.text;
    case Value::Kind::String: return dg::io::json::quote(v.text);
    case Value::Kind::Array:
    case Value::Kind::Object: {
      const bool object = v.kind == Value::Kind::Object;
      std::string s = object ? "{" : "[";
      for (size_t i = 0; i < v.items.size(); ++i) {
        if (i) s += ",";
        if (object) s += dg::io::json::quote(v.keys[i]) + ":";
        s += dump(v.items[i]);
      }
      return s + (object ? "}" : "]");
    }
  }
  return "";
}

bool same(const Value& a, const Value& b) {
  if (a.kind != b.kind || a.boolean != b.boolean || a.text != b.text || a.keys != b.keys ||
      a.items.size() != b.items.size())
    return false;
  for (size_t i = 0; i < a.items.size(); ++i)
    if (!same(a.items[i], b.items[i])) return false;
  return true;
}

void visit(const Value& v) {
  if (v.kind == Value::Kind::Number) {
    fuzz::accept_or_reject([&] { v.as_uint64("n"); });
    fuzz::accept_or_reject([&] { v.as_int64("n"); });
    v.as_double("n");
  }
  if (v.kind == Value::Kind::Object)
    for (const std::string& k : v.keys) fuzz::check(v.find(k) != nullptr, "find of an existing key");
  for (const Value& item : v.items) visit(item);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::accept_or_reject([&] {
    const Value v = dg::io::json::parse(reinterpret_cast<const char*>(data), size, "fuzz input");
    visit(v);
    const std::string text = dump(v);
    const Value back = dg::io::json::parse(text.data(), text.size(), "round trip");
    fuzz::check(same(v, back), "dump -> parse round trip");
  });
  return 0;
}
