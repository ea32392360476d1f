#include "metadata.h"

#include <cmath>
#include <set>
#include <sstream>
#include <stdexcept>

#include "../keys.h"

namespace bayesrace {

int Metadata::species_index(const std::string &element) const {
  for (size_t i = 0; i < type_names.size(); ++i)
    if (type_names[i] == element) return static_cast<int>(i);
  return -1;
}

namespace {

struct Checker {
  const std::string &source;

  [[noreturn]] void fail(const std::string &field, const std::string &what) const {
    throw std::runtime_error(source + ": metadata field '" + field + "' " + what);
  }

  const json::Value &require(const json::Value &obj, const char *key, const std::string &path) const {
    const json::Value *v = obj.find(key);
    if (!v) fail(path, "is missing");
    return *v;
  }

  int64_t integer(const json::Value &v, const std::string &path) const {
    if (!v.is_integer()) fail(path, std::string("must be an integer, got ") + v.kind_name());
    return v.as_integer();
  }

  double positive(const json::Value &v, const std::string &path) const {
    if (!v.is_number()) fail(path, std::string("must be a number, got ") + v.kind_name());
    double d = v.as_number();
    if (!(std::isfinite(d) && d > 0.0)) {
      std::ostringstream os;
      os << "must be a finite number > 0, got " << d;
      fail(path, os.str());
    }
    return d;
  }

  std::vector<double> numbers(const json::Value &v, const std::string &path) const {
    if (!v.is_array()) fail(path, std::string("must be a list of numbers, got ") + v.kind_name());
    std::vector<double> out;
    for (const auto &e : v.as_array()) {
      if (!e.is_number()) fail(path, std::string("must hold only numbers, got ") + e.kind_name());
      out.push_back(e.as_number());
    }
    return out;
  }

  // optional map {sigma: [...], calibrated: [...]} inside the calibration object
  void std_map(const json::Value &cal, const char *key, const std::string &path, StdCalibration &into) const {
    const json::Value *v = cal.find(key);
    if (!v) return;
    if (!v->is_object())
      fail(path, std::string("must be an object {'") + keys::META_MAP_SIGMA + "': [...], '" +
                     keys::META_MAP_CALIBRATED + "': [...]}, got " + v->kind_name());
    for (const auto &kv : v->as_object())
      if (kv.first != keys::META_MAP_SIGMA && kv.first != keys::META_MAP_CALIBRATED)
        fail(path, "has an unknown key '" + kv.first + "' (expected '" + keys::META_MAP_SIGMA + "' and '" +
                       keys::META_MAP_CALIBRATED + "')");
    const std::string px = path + "." + keys::META_MAP_SIGMA, py = path + "." + keys::META_MAP_CALIBRATED;
    into.map_sigma = numbers(require(*v, keys::META_MAP_SIGMA, px), px);
    into.map_calibrated = numbers(require(*v, keys::META_MAP_CALIBRATED, py), py);
    try {
      check_std_map(into.map_sigma, into.map_calibrated, path);
    } catch (const std::invalid_argument &e) {
      throw std::runtime_error(source + ": metadata " + e.what());
    }
  }

  std::string string(const json::Value &v, const std::string &path) const {
    if (!v.is_string()) fail(path, std::string("must be a string, got ") + v.kind_name());
    return v.as_string();
  }
};

}  // namespace

Metadata parse_metadata(const std::string &text, const std::string &source) {
  namespace K = keys;
  Checker c{source};
  Metadata m;
  m.raw_json = text;
  try {
    m.tree = json::parse(text);
  } catch (const json::ParseError &e) {
    throw std::runtime_error(source + ": " + K::METADATA_FILE + " is not valid JSON (" + e.what() + ")");
  }
  const json::Value &root = m.tree;
  if (!root.is_object())
    throw std::runtime_error(source + ": " + K::METADATA_FILE + " must hold a JSON object, got " +
                             root.kind_name());

  // format_version first: a file of another version may legitimately lack other keys
  {
    int64_t v = c.integer(c.require(root, K::META_FORMAT_VERSION, K::META_FORMAT_VERSION),
                          K::META_FORMAT_VERSION);
    if (v != kFormatVersion) {
      std::ostringstream os;
      os << "is " << v << ", this build of bayesrace reads format_version " << kFormatVersion
         << " (re-export the model with a matching bayesrace version)";
      c.fail(K::META_FORMAT_VERSION, os.str());
    }
    m.format_version = static_cast<int>(v);
  }

  {
    const json::Value &tn = c.require(root, K::META_TYPE_NAMES, K::META_TYPE_NAMES);
    if (!tn.is_array() || tn.as_array().empty())
      c.fail(K::META_TYPE_NAMES, "must be a non-empty list of element symbols");
    std::set<std::string> seen;
    for (const auto &e : tn.as_array()) {
      if (!e.is_string() || e.as_string().empty())
        c.fail(K::META_TYPE_NAMES, "must hold only non-empty strings");
      if (!seen.insert(e.as_string()).second)
        c.fail(K::META_TYPE_NAMES, "lists '" + e.as_string() + "' twice");
      m.type_names.push_back(e.as_string());
    }
  }

  m.cutoff = c.positive(c.require(root, K::META_CUTOFF, K::META_CUTOFF), K::META_CUTOFF);
  {
    int64_t n = c.integer(c.require(root, K::META_N_LAYERS, K::META_N_LAYERS), K::META_N_LAYERS);
    if (n < 1) c.fail(K::META_N_LAYERS, "must be >= 1, got " + std::to_string(n));
    m.n_layers = static_cast<int>(n);
  }
  m.units = c.string(c.require(root, K::META_UNITS, K::META_UNITS), K::META_UNITS);
  if (m.units != "metal")
    c.fail(K::META_UNITS, "must be \"metal\" (eV, Å), got \"" + m.units + "\"");
  m.dtype = c.string(c.require(root, K::META_DTYPE, K::META_DTYPE), K::META_DTYPE);
  if (m.dtype != "float64" && m.dtype != "float32")
    c.fail(K::META_DTYPE, "must be \"float64\" or \"float32\", got \"" + m.dtype + "\"");
  {
    int64_t n = c.integer(c.require(root, K::META_N_MEMBERS, K::META_N_MEMBERS), K::META_N_MEMBERS);
    if (n < 1) c.fail(K::META_N_MEMBERS, "must be >= 1, got " + std::to_string(n));
    m.n_members = static_cast<int>(n);
  }
  {
    const json::Value &cal = c.require(root, K::META_CALIBRATION, K::META_CALIBRATION);
    if (!cal.is_object()) c.fail(K::META_CALIBRATION, "must be an object");
    std::string p = std::string(K::META_CALIBRATION) + ".";
    m.calibration.force.scale = c.positive(
        c.require(cal, K::META_FORCE_STD_SCALE, p + K::META_FORCE_STD_SCALE), p + K::META_FORCE_STD_SCALE);
    m.calibration.energy.scale = c.positive(
        c.require(cal, K::META_ENERGY_STD_SCALE, p + K::META_ENERGY_STD_SCALE), p + K::META_ENERGY_STD_SCALE);
    c.std_map(cal, K::META_FORCE_STD_MAP, p + K::META_FORCE_STD_MAP, m.calibration.force);
    c.std_map(cal, K::META_ENERGY_STD_MAP, p + K::META_ENERGY_STD_MAP, m.calibration.energy);
  }
  {
    const json::Value &th = c.require(root, K::META_THRESHOLDS, K::META_THRESHOLDS);
    if (!th.is_object()) c.fail(K::META_THRESHOLDS, "must be an object");
    std::string p = std::string(K::META_THRESHOLDS) + ".";
    m.threshold_atomic_force_std =
        c.positive(c.require(th, K::ATOMIC_FORCE_STD, p + K::ATOMIC_FORCE_STD), p + K::ATOMIC_FORCE_STD);
  }
  m.bayesrace_version =
      c.string(c.require(root, K::META_BAYESRACE_VERSION, K::META_BAYESRACE_VERSION), K::META_BAYESRACE_VERSION);
  m.torch_version = c.string(c.require(root, K::META_TORCH_VERSION, K::META_TORCH_VERSION), K::META_TORCH_VERSION);
  m.training_data_sha256 = c.string(c.require(root, K::META_TRAINING_DATA_SHA256, K::META_TRAINING_DATA_SHA256),
                                    K::META_TRAINING_DATA_SHA256);
  m.posterior = c.string(c.require(root, K::META_POSTERIOR, K::META_POSTERIOR), K::META_POSTERIOR);
  if (m.bayesrace_version.empty()) c.fail(K::META_BAYESRACE_VERSION, "must not be empty");
  if (m.torch_version.empty()) c.fail(K::META_TORCH_VERSION, "must not be empty");
  if (m.posterior.empty()) c.fail(K::META_POSTERIOR, "must not be empty");
  return m;
}

}  // namespace bayesrace
