#include "json_lite.h"

#include <cerrno>
#include <cstdlib>
#include <sstream>

namespace bayesrace {
namespace json {

Value Value::make_bool(bool b) {
  Value v;
  v.kind_ = Kind::Bool;
  v.bool_ = b;
  return v;
}
Value Value::make_integer(int64_t i) {
  Value v;
  v.kind_ = Kind::Integer;
  v.int_ = i;
  return v;
}
Value Value::make_real(double d) {
  Value v;
  v.kind_ = Kind::Real;
  v.real_ = d;
  return v;
}
Value Value::make_string(std::string s) {
  Value v;
  v.kind_ = Kind::String;
  v.str_ = std::move(s);
  return v;
}
Value Value::make_array(std::vector<Value> a) {
  Value v;
  v.kind_ = Kind::Array;
  v.arr_ = std::move(a);
  return v;
}
Value Value::make_object(std::map<std::string, Value> o) {
  Value v;
  v.kind_ = Kind::Object;
  v.obj_ = std::move(o);
  return v;
}

const Value *Value::find(const std::string &key) const {
  if (kind_ != Kind::Object) return nullptr;
  auto it = obj_.find(key);
  return it == obj_.end() ? nullptr : &it->second;
}

const char *Value::kind_name(Kind k) {
  switch (k) {
    case Kind::Null: return "null";
    case Kind::Bool: return "boolean";
    case Kind::Integer: return "integer";
    case Kind::Real: return "number";
    case Kind::String: return "string";
    case Kind::Array: return "list";
    case Kind::Object: return "object";
  }
  return "?";
}

namespace {

class Parser {
 public:
  explicit Parser(const std::string &t) : s_(t) {}

  Value document() {
    skip_ws();
    Value v = value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("unexpected trailing characters");
    return v;
  }

 private:
  const std::string &s_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string &what) const {
    size_t line = 1, col = 1;
    for (size_t i = 0; i < pos_ && i < s_.size(); ++i) {
      if (s_[i] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    std::ostringstream os;
    os << "invalid JSON: " << what << " at line " << line << " column " << col;
    throw ParseError(os.str());
  }

  void skip_ws() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
      ++pos_;
  }

  char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }

  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }

  void literal(const char *word) {
    for (const char *p = word; *p; ++p) {
      if (peek() != *p) fail(std::string("invalid literal (expected ") + word + ")");
      ++pos_;
    }
  }

  Value value(int depth) {
    if (depth > 64) fail("nesting too deep");
    switch (peek()) {
      case '{': return object(depth);
      case '[': return array(depth);
      case '"': return Value::make_string(string());
      case 't': literal("true"); return Value::make_bool(true);
      case 'f': literal("false"); return Value::make_bool(false);
      case 'n': literal("null"); return Value();
      case '\0': fail("unexpected end of input");
      default: return number();
    }
  }

  Value object(int depth) {
    expect('{');
    std::map<std::string, Value> out;
    skip_ws();
    if (peek() == '}') {
      ++pos_;
      return Value::make_object(std::move(out));
    }
    while (true) {
      skip_ws();
      if (peek() != '"') fail("expected a string key");
      std::string key = string();
      skip_ws();
      expect(':');
      skip_ws();
      Value v = value(depth + 1);
      if (out.count(key)) fail("duplicate key \"" + key + "\"");
      out.emplace(std::move(key), std::move(v));
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      expect('}');
      return Value::make_object(std::move(out));
    }
  }

  Value array(int depth) {
    expect('[');
    std::vector<Value> out;
    skip_ws();
    if (peek() == ']') {
      ++pos_;
      return Value::make_array(std::move(out));
    }
    while (true) {
      skip_ws();
      out.push_back(value(depth + 1));
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      expect(']');
      return Value::make_array(std::move(out));
    }
  }

  static void put_utf8(std::string &out, uint32_t cp) {
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

  uint32_t hex4() {
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = peek();
      v <<= 4;
      if (c >= '0' && c <= '9') v |= static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f') v |= static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= static_cast<uint32_t>(c - 'A' + 10);
      else fail("bad \\u escape");
      ++pos_;
    }
    return v;
  }

  std::string string() {
    expect('"');
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("unterminated string");
      char c = s_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      char e = peek();
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
          if (cp >= 0xD800 && cp < 0xDC00) {
            if (peek() != '\\') fail("lone surrogate");
            ++pos_;
            if (peek() != 'u') fail("lone surrogate");
            ++pos_;
            uint32_t lo = hex4();
            if (lo < 0xDC00 || lo >= 0xE000) fail("bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          put_utf8(out, cp);
          break;
        }
        default: --pos_; fail("bad escape");
      }
    }
  }

  Value number() {
    size_t start = pos_;
    bool integral = true;
    if (peek() == '-') ++pos_;
    if (peek() == '0') {
      ++pos_;
    } else if (peek() >= '1' && peek() <= '9') {
      while (peek() >= '0' && peek() <= '9') ++pos_;
    } else {
      fail("unexpected character");
    }
    if (peek() == '.') {
      integral = false;
      ++pos_;
      if (!(peek() >= '0' && peek() <= '9')) fail("digit expected after '.'");
      while (peek() >= '0' && peek() <= '9') ++pos_;
    }
    if (peek() == 'e' || peek() == 'E') {
      integral = false;
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (!(peek() >= '0' && peek() <= '9')) fail("digit expected in exponent");
      while (peek() >= '0' && peek() <= '9') ++pos_;
    }
    std::string tok = s_.substr(start, pos_ - start);
    errno = 0;
    if (integral) {
      long long v = std::strtoll(tok.c_str(), nullptr, 10);
      if (errno == ERANGE) return Value::make_real(std::strtod(tok.c_str(), nullptr));
      return Value::make_integer(static_cast<int64_t>(v));
    }
    return Value::make_real(std::strtod(tok.c_str(), nullptr));
  }
};

}  // namespace

Value parse(const std::string &text) { return Parser(text).document(); }

}  // namespace json
}  // namespace bayesrace
