// bayesrace core engine: loads a deployable, validates its metadata, evaluates it.
// LAMMPS-free; libtorch is reached only through backend.h.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "aggregate.h"
#include "backend.h"
#include "metadata.h"

namespace bayesrace {

struct EngineOptions {
  std::string device = "cpu";  // "cpu", "cuda", "cuda:K"
  int num_threads = 1;         // torch intra-op threads for this process; 0 = leave as is
  int local_rank = 0;          // rank within the node: device "cuda" uses GPU local_rank % count
};

class Engine {
 public:
  // Throws std::runtime_error with a precise message (file, field, what was expected).
  explicit Engine(const std::string &path, const EngineOptions &opts = EngineOptions());
  ~Engine();
  Engine(const Engine &) = delete;
  Engine &operator=(const Engine &) = delete;

  const Metadata &metadata() const { return meta_; }
  const std::string &path() const { return path_; }
  const std::string &device() const { return opts_.device; }
  std::string describe() const;
  // non-fatal remarks found while loading (e.g. torch version differs from the exporter's)
  const std::vector<std::string> &warnings() const { return warnings_; }

  // Checks the inputs (species range, edge indices, n_local) and runs the model.
  void evaluate(const ModelInputs &in, MemberOutputs &out) const;
  // Layer mode (the deployable's per-layer methods, features exchanged through `halo`
  // between layers); the same checks, plus every edge centre < n_local. See backend.h.
  void evaluate_layered(const ModelInputs &in, HaloExchange &halo, MemberOutputs &out) const;
  // [d_0..d_K] of the deployable's node features; empty when it cannot run layer mode
  const std::vector<int64_t> &layer_widths() const { return layer_widths_; }
  // why layer_widths() is empty, e.g. "it has no per-layer methods (...): export it again ..."
  std::string layer_mode_problem() const;
  // whether a step that asks for one member (ModelInputs::only_member) evaluates it alone
  bool evaluates_one_member(bool layer_mode, bool recompute_layers) const;

 private:
  std::string path_;
  EngineOptions opts_;
  Metadata meta_;
  std::unique_ptr<Backend> backend_;
  std::vector<std::string> warnings_;
  std::vector<int64_t> layer_widths_;

  void check_inputs(const ModelInputs &in) const;
  void check_outputs(const ModelInputs &in, const MemberOutputs &out) const;
};

// One intra-op and one inter-op torch thread (call once per process; safe to repeat).
void set_torch_threads(int num_threads);
// The torch version this core was compiled against, e.g. "2.13.0".
std::string torch_build_version();

}  // namespace bayesrace
