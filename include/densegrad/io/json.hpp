// densegrad/io/json.hpp: a small strict JSON reader (RFC 8259) for file headers such as
// safetensors', plus quote() to write JSON strings. Not a general JSON library: no editing,
// no serializer; numbers keep their source text and become integers only when asked, checked.
#pragma once

#include <cstdint>
#include <limits>
#include <locale>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "densegrad/core/error.hpp"

namespace dg::io::json {

/// One parsed JSON value. Objects keep their keys in file order (duplicates are rejected).
/// Example: `auto v = json::parse(s.data(), s.size(), "cfg.json"); v.at("n", "cfg").as_uint64("n");`
struct Value {
  enum class Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  std::string text;               // String: decoded UTF-8; Number: the literal as written
  std::vector<Value> items;       // Array elements, or Object values (parallel to keys)
  std::vector<std::string> keys;  // Object keys
  size_t offset = 0;              // byte offset of this value in the input, for messages

  static const char* kind_name(Kind k) {
    switch (k) {
      case Kind::Null: return "null";
      case Kind::Bool: return "a boolean";
      case Kind::Number: return "a number";
      case Kind::String: return "a string";
      case Kind::Array: return "an array";
      case Kind::Object: return "an object";
    }
    return "?";
  }

  /// Throws "<what>: expected <k>, got <kind> (byte N)" unless this value is of kind k.
  const Value& expect(Kind k, const std::string& what) const {
    DG_CHECK(kind == k, what, ": expected ", kind_name(k), ", got ", kind_name(kind), " (byte ",
             offset, ")");
    return *this;
  }

  /// The member named key of an object, or nullptr.
  const Value* find(const std::string& key) const {
    for (size_t i = 0; i < keys.size(); ++i)
      if (keys[i] == key) return &items[i];
    return nullptr;
  }

  /// The member named key of an object; throws naming `what` when it is missing.
  const Value& at(const std::string& key, const std::string& what) const {
    const Value* v = expect(Kind::Object, what).find(key);
    DG_CHECK(v, what, ": missing field '", key, "' (object at byte ", offset, ")");
    return *v;
  }

  const std::string& as_string(const std::string& what) const {
    return expect(Kind::String, what).text;
  }

  /// The number as a uint64; rejects fractions, exponents, signs and values above 2^64-1.
  uint64_t as_uint64(const std::string& what) const {
    expect(Kind::Number, what);
    DG_CHECK(text.find_first_not_of("0123456789") == std::string::npos, what,
             ": expected a non-negative integer, got ", text, " (byte ", offset, ")");
    return digits_to_u64(text, std::numeric_limits<uint64_t>::max(), what);
  }

  /// The number as an int64; rejects fractions, exponents and values outside int64.
  int64_t as_int64(const std::string& what) const {
    expect(Kind::Number, what);
    bool neg = !text.empty() && text[0] == '-';
    std::string digits = neg ? text.substr(1) : text;
    DG_CHECK(digits.find_first_not_of("0123456789") == std::string::npos, what,
             ": expected an integer, got ", text, " (byte ", offset, ")");
    const uint64_t max_pos = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    uint64_t mag = digits_to_u64(digits, neg ? max_pos + 1 : max_pos, what);
    if (!neg) return static_cast<int64_t>(mag);
    return mag == max_pos + 1 ? std::numeric_limits<int64_t>::min() : -static_cast<int64_t>(mag);
  }

  /// The number as a double (locale-independent; huge values become inf).
  double as_double(const std::string& what) const {
    expect(Kind::Number, what);
    std::istringstream is(text);
    is.imbue(std::locale::classic());
    double d = 0;
    is >> d;
    return d;
  }

 private:
  uint64_t digits_to_u64(const std::string& digits, uint64_t max, const std::string& what) const {
    uint64_t v = 0;
    for (char c : digits) {
      uint64_t d = static_cast<uint64_t>(c - '0');
      DG_CHECK(v <= (max - d) / 10, what, ": integer ", text, " is out of range (max ", max,
               ") (byte ", offset, ")");
      v = v * 10 + d;
    }
    return v;
  }
};

namespace detail {

/// Length of the valid UTF-8 sequence at p (n bytes available), or 0 when it is invalid
/// (bad lead or continuation byte, overlong form, surrogate, above U+10FFFF, truncated).
inline size_t utf8_len(const unsigned char* p, size_t n) {
  unsigned c = p[0];
  if (c < 0x80) return 1;
  size_t len;
  uint32_t cp;
  if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
  else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
  else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
  else return 0;
  if (n < len) return 0;
  for (size_t i = 1; i < len; ++i) {
    if ((p[i] & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (p[i] & 0x3F);
  }
  static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < min_cp[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return len;
}

inline void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Recursive descent over the bytes; depth is bounded so hostile input cannot exhaust the stack.
class Parser {
 public:
  Parser(const char* p, size_t n, const std::string& name, size_t base, size_t max_depth)
      : p_(reinterpret_cast<const unsigned char*>(p)), n_(n), name_(name), base_(base),
        max_depth_(max_depth) {}

  Value document() {
    skip_ws();
    Value v = value(0);
    skip_ws();
    if (pos_ != n_) fail("end of input after the top-level value");
    return v;
  }

 private:
  const unsigned char* p_;
  size_t n_, pos_ = 0;
  const std::string& name_;
  size_t base_, max_depth_;

  [[noreturn]] void fail(const std::string& expected) const {
    std::string got = "end of input";
    if (pos_ < n_) {
      unsigned c = p_[pos_];
      std::ostringstream os;
      if (c >= 0x20 && c < 0x7f) os << "'" << static_cast<char>(c) << "'";
      else os << "byte 0x" << std::hex << c;
      got = os.str();
    }
    DG_THROW("json: ", name_, ": byte ", base_ + pos_, ": expected ", expected, ", got ", got);
  }
  bool at_end() const { return pos_ >= n_; }
  unsigned char peek() const { return at_end() ? 0 : p_[pos_]; }
  void skip_ws() {
    while (!at_end() && (p_[pos_] == ' ' || p_[pos_] == '\t' || p_[pos_] == '\n' || p_[pos_] == '\r'))
      ++pos_;
  }
  void expect_char(char c, const char* what) {
    if (peek() != static_cast<unsigned char>(c)) fail(what);
    ++pos_;
  }

  Value value(size_t depth) {
    Value v;
    v.offset = base_ + pos_;
    switch (peek()) {
      case '{': container(v, depth, true); break;
      case '[': container(v, depth, false); break;
      case '"': v.kind = Value::Kind::String; v.text = string(); break;
      case 't': literal("true"); v.kind = Value::Kind::Bool; v.boolean = true; break;
      case 'f': literal("false"); v.kind = Value::Kind::Bool; break;
      case 'n': literal("null"); break;
      default: v.kind = Value::Kind::Number; v.text = number(); break;
    }
    return v;
  }

  void literal(const char* word) {
    for (const char* c = word; *c; ++c) expect_char(*c, (std::string("'") + word + "'").c_str());
  }

  void container(Value& v, size_t depth, bool is_object) {
    if (depth + 1 > max_depth_) fail("nesting depth at most " + std::to_string(max_depth_));
    v.kind = is_object ? Value::Kind::Object : Value::Kind::Array;
    const char close = is_object ? '}' : ']';
    ++pos_;
    skip_ws();
    if (peek() == close) { ++pos_; return; }
    std::set<std::string> seen;
    for (;;) {
      skip_ws();
      if (is_object) {
        if (peek() != '"') fail("a string key");
        size_t key_pos = pos_;
        std::string key = string();
        if (!seen.insert(key).second) {
          pos_ = key_pos;
          DG_THROW("json: ", name_, ": byte ", base_ + key_pos, ": duplicate key \"", key, "\"");
        }
        v.keys.push_back(std::move(key));
        skip_ws();
        expect_char(':', "':' after an object key");
        skip_ws();
      }
      v.items.push_back(value(depth + 1));
      skip_ws();
      if (peek() == ',') { ++pos_; continue; }
      if (peek() == close) { ++pos_; return; }
      fail(is_object ? "',' or '}'" : "',' or ']'");
    }
  }

  uint32_t hex4() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      unsigned c = peek();
      uint32_t d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10
                 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : 16;
      if (at_end() || d == 16) fail("4 hex digits after \\u");
      v = v * 16 + d;
      ++pos_;
    }
    return v;
  }

  std::string string() {
    std::string out;
    ++pos_;  // opening quote
    for (;;) {
      if (at_end()) fail("closing '\"' of a string");
      unsigned char c = p_[pos_];
      if (c == '"') { ++pos_; return out; }
      if (c < 0x20) fail("no raw control characters in a string (escape them)");
      if (c >= 0x80) {
        size_t len = utf8_len(p_ + pos_, n_ - pos_);
        if (len == 0) fail("valid UTF-8");
        out.append(reinterpret_cast<const char*>(p_ + pos_), len);
        pos_ += len;
        continue;
      }
      ++pos_;
      if (c != '\\') { out += static_cast<char>(c); continue; }
      unsigned char e = peek();
      ++pos_;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) { pos_ -= 6; fail("a high surrogate before \\uDC00-\\uDFFF"); }
          if (cp >= 0xD800 && cp <= 0xDBFF) {  // a surrogate pair: \uD83D\uDE00 -> U+1F600
            if (peek() != '\\' || pos_ + 1 >= n_ || p_[pos_ + 1] != 'u') fail("\\u low surrogate after a high surrogate");
            pos_ += 2;
            uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) { pos_ -= 6; fail("a low surrogate \\uDC00-\\uDFFF"); }
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: --pos_; fail("an escape (\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)");
      }
    }
  }

  static bool digit(unsigned char c) { return c >= '0' && c <= '9'; }
  std::string number() {
    size_t start = pos_;
    if (peek() == '-') ++pos_;
    if (peek() == '0') ++pos_;
    else if (digit(peek())) while (digit(peek())) ++pos_;
    else fail(pos_ == start ? "a JSON value" : "a digit");
    if (peek() == '.') {
      ++pos_;
      if (!digit(peek())) fail("a digit after '.'");
      while (digit(peek())) ++pos_;
    }
    if (peek() == 'e' || peek() == 'E') {
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (!digit(peek())) fail("a digit in the exponent");
      while (digit(peek())) ++pos_;
    }
    return std::string(reinterpret_cast<const char*>(p_ + start), pos_ - start);
  }
};

}  // namespace detail

/// Parses exactly one JSON value from data[0, size); only whitespace may follow it.
/// Errors are dg::Error "json: <name>: byte <base_offset + i>: expected ..., got ...".
inline Value parse(const char* data, size_t size, const std::string& name_for_errors,
                   size_t base_offset = 0, size_t max_depth = 64) {
  return detail::Parser(data, size, name_for_errors, base_offset, max_depth).document();
}

/// The JSON string literal for s, quotes included: `quote("a\"b") == "\"a\\\"b\""`.
/// Throws dg::Error when s is not valid UTF-8 (JSON text must be).
inline std::string quote(const std::string& s) {
  std::string out = "\"";
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = 0; i < s.size();) {
    unsigned char c = p[i];
    if (c == '"' || c == '\\') { out += '\\'; out += static_cast<char>(c); ++i; continue; }
    if (c < 0x20) {
      static const char hex[] = "0123456789abcdef";
      switch (c) {
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        default: out += "\\u00"; out += hex[c >> 4]; out += hex[c & 15];
      }
      ++i;
      continue;
    }
    size_t len = detail::utf8_len(p + i, s.size() - i);
    DG_CHECK(len != 0, "json::quote: string is not valid UTF-8 at byte ", i);
    out.append(s, i, len);
    i += len;
  }
  return out + "\"";
}

}  // namespace dg::io::json
