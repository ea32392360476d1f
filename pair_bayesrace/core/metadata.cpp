#include "metadata.h"

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <set>
#include <sstream>
#include <stdexcept>

#include "../keys.h"
#include "json_document.h"

#ifndef BAYESRACE_VERSION
#error "BAYESRACE_VERSION (python/bayesrace/_version.py) must be defined by the build"
#endif

namespace bayesrace {

std::string bayesrace_build_version() { return BAYESRACE_VERSION; }

int Metadata::species_index(const std::string &element) const {
  for (size_t i = 0; i < type_names.size(); ++i)
    if (type_names[i] == element) return static_cast<int>(i);
  return -1;
}

namespace {

using Json = nlohmann::json;

struct Checker {
  const std::string &source;

  [[noreturn]] void fail(const std::string &field, const std::string &what) const {
    throw std::runtime_error(source + ": metadata field '" + field + "' " + what);
  }

  // nullptr when obj is not an object or lacks the key
  static const Json *find(const Json &obj, const char *key) {
    auto it = obj.find(key);
    return it == obj.end() ? nullptr : &*it;
  }

  const Json &require(const Json &obj, const char *key, const std::string &path) const {
    const Json *v = find(obj, key);
    if (!v) fail(path, "is missing");
    return *v;
  }

  int64_t integer(const Json &v, const std::string &path) const {
    if (!is_int64(v)) fail(path, std::string("must be an integer, got ") + json_kind_name(v));
    return v.get<int64_t>();
  }

  double positive(const Json &v, const std::string &path) const {
    if (!v.is_number()) fail(path, std::string("must be a number, got ") + json_kind_name(v));
    double d = v.get<double>();
    if (!(std::isfinite(d) && d > 0.0)) {
      std::ostringstream os;
      os << "must be a finite number > 0, got " << d;
      fail(path, os.str());
    }
    return d;
  }

  std::vector<double> numbers(const Json &v, const std::string &path) const {
    if (!v.is_array()) fail(path, std::string("must be a list of numbers, got ") + json_kind_name(v));
    std::vector<double> out;
    for (const auto &e : v) {
      if (!e.is_number()) fail(path, std::string("must hold only numbers, got ") + json_kind_name(e));
      out.push_back(e.get<double>());
    }
    return out;
  }

  // optional map {sigma: [...], calibrated: [...]} inside the calibration object
  void std_map(const Json &cal, const char *key, const std::string &path, StdCalibration &into) const {
    const Json *v = find(cal, key);
    if (!v) return;
    if (!v->is_object())
      fail(path, std::string("must be an object {'") + keys::META_MAP_SIGMA + "': [...], '" +
                     keys::META_MAP_CALIBRATED + "': [...]}, got " + json_kind_name(*v));
    for (const auto &kv : v->items())
      if (kv.key() != keys::META_MAP_SIGMA && kv.key() != keys::META_MAP_CALIBRATED)
        fail(path, "has an unknown key '" + kv.key() + "' (expected '" + keys::META_MAP_SIGMA + "' and '" +
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

  std::string string(const Json &v, const std::string &path) const {
    if (!v.is_string()) fail(path, std::string("must be a string, got ") + json_kind_name(v));
    return v.get<std::string>();
  }

  std::vector<std::string> strings(const Json &v, const std::string &path) const {
    if (!v.is_array() || v.empty()) fail(path, std::string("must be a non-empty list of strings, got ") + json_kind_name(v));
    std::vector<std::string> out;
    for (const auto &e : v) out.push_back(string(e, path));
    return out;
  }
};

// "MAJOR.MINOR[anything]" -> both numbers (covers PEP 440 forms such as 0.2.0.dev1+g12ab)
bool major_minor(const std::string &version, long &major, long &minor) {
  const char *p = version.c_str();
  char *end = nullptr;
  if (!std::isdigit(static_cast<unsigned char>(p[0]))) return false;
  major = std::strtol(p, &end, 10);
  if (end[0] != '.' || !std::isdigit(static_cast<unsigned char>(end[1]))) return false;
  minor = std::strtol(end + 1, &end, 10);
  return true;
}

// The file's bayesrace_version against this build's: a newer MAJOR version may have changed
// the contract, so it is refused; a newer MINOR version only adds, so it loads with a warning.
void check_exporter_version(const Checker &c, const std::string &file_version, std::vector<std::string> &warnings) {
  const std::string ours = bayesrace_build_version();
  long file_major = 0, file_minor = 0, our_major = 0, our_minor = 0;
  if (!major_minor(ours, our_major, our_minor)) return;  // CMake read it from _version.py
  if (!major_minor(file_version, file_major, file_minor)) {
    warnings.push_back(c.source + ": metadata field '" + keys::META_BAYESRACE_VERSION + "' is \"" + file_version +
                       "\", not MAJOR.MINOR[.PATCH]: its compatibility with this build of bayesrace (" + ours +
                       ") is not checked");
    return;
  }
  if (file_major > our_major)
    c.fail(keys::META_BAYESRACE_VERSION, "is " + file_version + ", a newer major version than this build of bayesrace (" +
                                             ours + "): upgrade bayesrace to " + std::to_string(file_major) +
                                             ".x to run this model");
  if (file_major == our_major && file_minor > our_minor)
    warnings.push_back(c.source + " was exported with bayesrace " + file_version +
                       ", a newer minor version than this build (" + ours +
                       "): what that version added to the deployable is ignored (upgrade bayesrace to " +
                       std::to_string(file_major) + "." + std::to_string(file_minor) + " or newer to use it)");
}

}  // namespace

Metadata parse_metadata(const std::string &text, const std::string &source, const std::string &container) {
  namespace K = keys;
  Checker c{source};
  Metadata m;
  m.raw_json = text;
  const Json root = parse_json_document(text, source);
  if (!root.is_object())
    throw std::runtime_error(source + ": " + K::METADATA_FILE + " must hold a JSON object, got " +
                             json_kind_name(root));

  // the exporter's version before format_version: a newer major version says best why the
  // file cannot be read (its other checks come with the other string fields below)
  {
    const Json *v = Checker::find(root, K::META_BAYESRACE_VERSION);
    if (v && v->is_string() && !v->get<std::string>().empty())
      check_exporter_version(c, v->get<std::string>(), m.warnings);
  }

  // format_version before the other keys: a file of another version may legitimately lack them
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
    const Json &tn = c.require(root, K::META_TYPE_NAMES, K::META_TYPE_NAMES);
    if (!tn.is_array() || tn.empty()) c.fail(K::META_TYPE_NAMES, "must be a non-empty list of element symbols");
    std::set<std::string> seen;
    for (const auto &e : tn) {
      if (!e.is_string() || e.get_ref<const std::string &>().empty())
        c.fail(K::META_TYPE_NAMES, "must hold only non-empty strings");
      const std::string &name = e.get_ref<const std::string &>();
      if (!seen.insert(name).second) c.fail(K::META_TYPE_NAMES, "lists '" + name + "' twice");
      m.type_names.push_back(name);
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
    const Json &cal = c.require(root, K::META_CALIBRATION, K::META_CALIBRATION);
    if (!cal.is_object()) c.fail(K::META_CALIBRATION, "must be an object");
    std::string p = std::string(K::META_CALIBRATION) + ".";
    m.calibration.force.scale = c.positive(
        c.require(cal, K::META_FORCE_STD_SCALE, p + K::META_FORCE_STD_SCALE), p + K::META_FORCE_STD_SCALE);
    m.calibration.energy.scale = c.positive(
        c.require(cal, K::META_ENERGY_STD_SCALE, p + K::META_ENERGY_STD_SCALE), p + K::META_ENERGY_STD_SCALE);
    c.std_map(cal, K::META_FORCE_STD_MAP, p + K::META_FORCE_STD_MAP, m.calibration.force);
    c.std_map(cal, K::META_ENERGY_STD_MAP, p + K::META_ENERGY_STD_MAP, m.calibration.energy);
    // by parts: one map each for the epistemic and the aleatoric σ, never with the total map
    struct Parts {
      const char *total, *epistemic, *aleatoric;
      StdCalibration &whole, &epi, &ale;
      bool &by_parts;
    };
    Calibration &mc = m.calibration;
    for (Parts q : {Parts{K::META_FORCE_STD_MAP, K::META_FORCE_EPISTEMIC_STD_MAP, K::META_FORCE_ALEATORIC_STD_MAP,
                          mc.force, mc.force_epistemic, mc.force_aleatoric, mc.force_by_parts},
                    Parts{K::META_ENERGY_STD_MAP, K::META_ENERGY_EPISTEMIC_STD_MAP, K::META_ENERGY_ALEATORIC_STD_MAP,
                          mc.energy, mc.energy_epistemic, mc.energy_aleatoric, mc.energy_by_parts}}) {
      q.by_parts = c.find(cal, q.epistemic) || c.find(cal, q.aleatoric);
      if (!q.by_parts) continue;
      if (q.whole.has_map())
        c.fail(p + q.total, std::string("cannot be given together with '") + q.epistemic + "' or '" + q.aleatoric +
                                "' (a quantity is calibrated either as a total or by parts)");
      q.epi.scale = q.ale.scale = q.whole.scale;
      c.std_map(cal, q.epistemic, p + q.epistemic, q.epi);
      c.std_map(cal, q.aleatoric, p + q.aleatoric, q.ale);
    }
  }
  if (const Json *fd = c.find(root, K::META_FEATURE_DENSITY)) {
    if (!fd->is_object()) c.fail(K::META_FEATURE_DENSITY, "must be an object");
    m.has_feature_density = true;
  }
  if (const Json *sc = c.find(root, K::META_SHORTEST_CONTACTS)) {
    // [T][T] of distances > 0 or null (pair not seen in training: the shortest of all)
    const std::string f = K::META_SHORTEST_CONTACTS;
    const size_t T = m.type_names.size();
    if (!sc->is_array() || sc->size() != T)
      c.fail(f, "must be a list of " + std::to_string(T) + " rows (one per type), got " + json_kind_name(*sc));
    double shortest = 0.0;
    for (size_t a = 0; a < T; ++a) {
      const Json &row = (*sc)[a];
      if (!row.is_array() || row.size() != T)
        c.fail(f + "[" + std::to_string(a) + "]", "must be a list of " + std::to_string(T) + " distances");
      for (size_t b = 0; b < T; ++b) {
        const Json &v = row[b];
        double d = 0.0;  // 0: unseen, filled below
        if (!v.is_null()) d = c.positive(v, f + "[" + std::to_string(a) + "][" + std::to_string(b) + "]");
        m.shortest_contacts.push_back(d);
        if (d > 0.0 && (shortest == 0.0 || d < shortest)) shortest = d;
      }
    }
    if (shortest == 0.0) c.fail(f, "has no pair (every entry is null)");
    m.no_contact_ratio = m.cutoff / shortest;
    for (double &d : m.shortest_contacts)
      if (d == 0.0) d = shortest;
  }
  {
    const Json &th = c.require(root, K::META_THRESHOLDS, K::META_THRESHOLDS);
    if (!th.is_object()) c.fail(K::META_THRESHOLDS, "must be an object");
    std::string p = std::string(K::META_THRESHOLDS) + ".";
    m.threshold_atomic_force_std =
        c.positive(c.require(th, K::ATOMIC_FORCE_STD, p + K::ATOMIC_FORCE_STD), p + K::ATOMIC_FORCE_STD);
    if (const Json *v = Checker::find(th, K::ATOMIC_FORCE_STD_EPISTEMIC))
      m.threshold_atomic_force_std_epistemic = c.positive(*v, p + K::ATOMIC_FORCE_STD_EPISTEMIC);
    if (const Json *v = Checker::find(th, K::ENERGY_STD_EPISTEMIC_PER_ATOM))
      m.threshold_energy_std_epistemic_per_atom = c.positive(*v, p + K::ENERGY_STD_EPISTEMIC_PER_ATOM);
    if (const Json *v = Checker::find(th, K::ATOMIC_FORCE_STD_RELATIVE))
      m.threshold_atomic_force_std_relative = c.positive(*v, p + K::ATOMIC_FORCE_STD_RELATIVE);
    if (const Json *v = Checker::find(th, K::ATOMIC_FEATURE_DISTANCE))
      m.threshold_atomic_feature_distance = c.positive(*v, p + K::ATOMIC_FEATURE_DISTANCE);
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

  m.format = K::FORMAT_TORCHSCRIPT;  // files written before the field existed are TorchScript
  if (const Json *v = Checker::find(root, K::META_FORMAT)) m.format = c.string(*v, K::META_FORMAT);
  if (!container.empty() && m.format != container)
    c.fail(K::META_FORMAT, "says \"" + m.format + "\" but the file is " +
                               (container == K::FORMAT_AOTI ? "an AOTInductor package (.pt2)" : "a TorchScript archive"));
  if (m.format == K::FORMAT_AOTI) {
    m.input_keys = c.strings(c.require(root, K::META_INPUT_KEYS, K::META_INPUT_KEYS), K::META_INPUT_KEYS);
    m.output_keys = c.strings(c.require(root, K::META_OUTPUT_KEYS, K::META_OUTPUT_KEYS), K::META_OUTPUT_KEYS);
    m.aoti_models = c.strings(c.require(root, K::META_AOTI_MODELS, K::META_AOTI_MODELS), K::META_AOTI_MODELS);
    m.machine = c.string(c.require(root, K::META_MACHINE, K::META_MACHINE), K::META_MACHINE);
    m.cpu_isa = c.string(c.require(root, K::META_CPU_ISA, K::META_CPU_ISA), K::META_CPU_ISA);
    m.compiled_on = c.string(c.require(root, K::META_COMPILED_ON, K::META_COMPILED_ON), K::META_COMPILED_ON);
  } else if (m.format != K::FORMAT_TORCHSCRIPT) {
    c.fail(K::META_FORMAT, "is \"" + m.format + "\", expected \"" + K::FORMAT_TORCHSCRIPT + "\" or \"" +
                               K::FORMAT_AOTI + "\" (a newer bayesrace may read it)");
  }
  return m;
}

}  // namespace bayesrace
