// A small JSON reader for the deployable's metadata.json (a flat schema).
//
// Why hand-written: libtorch ships no public JSON parser, the core must build without the
// LAMMPS headers (which carry nlohmann::json), and a PyPI/Debian nlohmann_json would add a
// build dependency to `pip install .` for ~200 lines of code. Full RFC 8259 syntax is
// accepted (objects, arrays, strings with escapes incl. \uXXXX and surrogate pairs,
// numbers, true/false/null); numbers keep whether they were written as integers.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace bayesrace {
namespace json {

class Value {
 public:
  enum class Kind { Null, Bool, Integer, Real, String, Array, Object };

  Value() = default;
  static Value make_bool(bool b);
  static Value make_integer(int64_t i);
  static Value make_real(double d);
  static Value make_string(std::string s);
  static Value make_array(std::vector<Value> a);
  static Value make_object(std::map<std::string, Value> o);

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::Null; }
  bool is_bool() const { return kind_ == Kind::Bool; }
  bool is_integer() const { return kind_ == Kind::Integer; }
  bool is_number() const { return kind_ == Kind::Integer || kind_ == Kind::Real; }
  bool is_string() const { return kind_ == Kind::String; }
  bool is_array() const { return kind_ == Kind::Array; }
  bool is_object() const { return kind_ == Kind::Object; }

  bool as_bool() const { return bool_; }
  int64_t as_integer() const { return int_; }
  double as_number() const { return kind_ == Kind::Integer ? static_cast<double>(int_) : real_; }
  const std::string &as_string() const { return str_; }
  const std::vector<Value> &as_array() const { return arr_; }
  const std::map<std::string, Value> &as_object() const { return obj_; }

  // nullptr when not an object or the key is absent
  const Value *find(const std::string &key) const;

  static const char *kind_name(Kind k);
  const char *kind_name() const { return kind_name(kind_); }

 private:
  Kind kind_ = Kind::Null;
  bool bool_ = false;
  int64_t int_ = 0;
  double real_ = 0.0;
  std::string str_;
  std::vector<Value> arr_;
  std::map<std::string, Value> obj_;
};

struct ParseError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Parse a whole document; throws ParseError("... at line L column C") on bad input.
Value parse(const std::string &text);

}  // namespace json
}  // namespace bayesrace
