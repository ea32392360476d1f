#include "json_document.h"

#include <cstdint>
#include <limits>
#include <set>
#include <stdexcept>
#include <vector>

#include "../keys.h"

namespace bayesrace {

namespace {

constexpr int kMaxDepth = 64;

// A document nlohmann accepts but the contract does not (duplicate key, too deep).
struct DocumentError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// nlohmann's messages start with "[json.exception.parse_error.101] ": keep what follows
std::string without_exception_id(const std::string &what) {
  if (what.rfind("[json.exception.", 0) == 0) {
    auto end = what.find("] ");
    if (end != std::string::npos) return what.substr(end + 2);
  }
  return what;
}

}  // namespace

nlohmann::json parse_json_document(const std::string &text, const std::string &source) {
  // keys seen so far in each open object, innermost last; objects and arrays both count
  // for the depth, which nlohmann reports as the number of enclosing containers
  std::vector<std::set<std::string>> open_objects;
  auto check = [&open_objects](int depth, nlohmann::json::parse_event_t event, nlohmann::json &parsed) {
    using E = nlohmann::json::parse_event_t;
    switch (event) {
      case E::object_start:
        if (depth > kMaxDepth) throw DocumentError("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
        open_objects.emplace_back();
        break;
      case E::array_start:
        if (depth > kMaxDepth) throw DocumentError("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
        break;
      case E::key:
        if (!open_objects.back().insert(parsed.get<std::string>()).second)
          throw DocumentError("duplicate key \"" + parsed.get<std::string>() + "\"");
        break;
      case E::object_end: open_objects.pop_back(); break;
      default: break;
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text, check);
  } catch (const nlohmann::json::exception &e) {
    throw std::runtime_error(source + ": " + keys::METADATA_FILE + " is not valid JSON (" +
                             without_exception_id(e.what()) + ")");
  } catch (const DocumentError &e) {
    throw std::runtime_error(source + ": " + keys::METADATA_FILE + " is not valid JSON (" + e.what() + ")");
  }
}

bool is_int64(const nlohmann::json &v) {
  if (v.is_number_unsigned())
    return v.get<std::uint64_t>() <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
  return v.is_number_integer();
}

const char *json_kind_name(const nlohmann::json &v) {
  using T = nlohmann::json::value_t;
  switch (v.type()) {
    case T::null: return "null";
    case T::boolean: return "boolean";
    case T::number_integer:
    case T::number_unsigned: return is_int64(v) ? "integer" : "number";
    case T::number_float: return "number";
    case T::string: return "string";
    case T::array: return "list";
    case T::object: return "object";
    default: return "?";
  }
}

}  // namespace bayesrace
