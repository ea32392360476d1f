// The JSON document of a deployable's metadata.json, read with nlohmann/json.
//
// Only the core's .cpp files and the pybind11 binding include this header. The LAMMPS
// plugin's files see the checked Metadata (metadata.h) and never nlohmann, so they cannot
// meet the other copy of nlohmann that the LAMMPS headers carry.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace bayesrace {

// Parse a whole document. Stricter than nlohmann's defaults where the old contract was: a
// key given twice in one object, and containers nested deeper than 64 levels, are refused.
// Throws std::runtime_error("<source>: metadata.json is not valid JSON (<what>)"), where
// <what> gives nlohmann's line and column for syntax errors.
nlohmann::json parse_json_document(const std::string &text, const std::string &source);

// true for a whole number written without '.' or exponent that fits int64_t
bool is_int64(const nlohmann::json &v);

// The kind of a value as the metadata messages name it: null, boolean, integer, number,
// string, list, object ("integer" only when is_int64; other numbers are "number").
const char *json_kind_name(const nlohmann::json &v);

}  // namespace bayesrace
