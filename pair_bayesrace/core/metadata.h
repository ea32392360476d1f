// Metadata of a bayesrace deployable (metadata.json inside the TorchScript archive).
#pragma once

#include <string>
#include <vector>

#include "aggregate.h"

namespace bayesrace {

inline constexpr int kFormatVersion = 1;

struct Metadata {
  int format_version = 0;
  std::vector<std::string> type_names;
  double cutoff = 0.0;  // Å, one layer
  int n_layers = 0;     // interaction range = n_layers * cutoff
  std::string units;    // "metal"
  std::string dtype;    // "float64" | "float32"
  int n_members = 0;
  Calibration calibration;  // scales and optional maps, parsed once at load time
  double threshold_atomic_force_std = 0.0;  // eV/Å
  // optional thresholds of the epistemic scores (compute bayesrace columns 6 and 7); 0: absent
  double threshold_atomic_force_std_epistemic = 0.0;   // eV/Å
  double threshold_energy_std_epistemic_per_atom = 0.0;  // eV/atom
  double threshold_atomic_force_std_relative = 0.0;    // 1 (compute bayesrace column 8)
  double threshold_atomic_feature_distance = 0.0;      // 1 (compute bayesrace column 9)
  // the deployable's heads report each member's feature distance (metadata 'feature_density')
  bool has_feature_density = false;
  std::string bayesrace_version;
  std::string torch_version;
  std::string training_data_sha256;
  std::string posterior;
  // the training set's shortest distance of each pair of species [T*T], Å, a pair it never
  // saw set to the shortest of all (optional field; empty when the file lacks it)
  std::vector<double> shortest_contacts;
  double no_contact_ratio = 0.0;  // of an atom without neighbours: cutoff / the shortest of all
  // the container: keys::FORMAT_TORCHSCRIPT (also when the field is absent) or FORMAT_AOTI;
  // an AOTInductor package (.pt2) adds the fields below (required then, empty otherwise)
  std::string format;
  std::vector<std::string> input_keys, output_keys, aoti_models;
  std::string machine, cpu_isa, compiled_on;

  std::string raw_json;  // the text as stored in the archive (the binding's .metadata parses it)
  // non-fatal remarks on the file, e.g. written by a newer minor version of bayesrace
  std::vector<std::string> warnings;

  double interaction_range() const { return cutoff * n_layers; }
  // index of an element in type_names, or -1
  int species_index(const std::string &element) const;
  bool has_contacts() const { return !shortest_contacts.empty(); }
  // r_min(a, b) of two species (requires has_contacts())
  double shortest_contact(int a, int b) const {
    return shortest_contacts[static_cast<size_t>(a) * type_names.size() + b];
  }

};

// Parse and validate; throws std::runtime_error whose message names the field and what
// was expected. `source` (the file name) prefixes every message. A file written by a newer
// MAJOR version of bayesrace is refused; a newer MINOR version adds a warning.
// `container` (keys::FORMAT_TORCHSCRIPT or FORMAT_AOTI, if given): what the file is; the
// field META_FORMAT must say the same.
Metadata parse_metadata(const std::string &json_text, const std::string &source, const std::string &container = "");

// The bayesrace version this core was built as, e.g. "0.1.0" (python/bayesrace/_version.py).
std::string bayesrace_build_version();

}  // namespace bayesrace
