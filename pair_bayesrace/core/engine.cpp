#include "engine.h"

#include <ATen/Parallel.h>
#include <torch/version.h>

#include <mutex>
#include <sstream>
#include <stdexcept>

#include "../keys.h"

namespace bayesrace {

std::string torch_build_version() { return TORCH_VERSION; }

void set_torch_threads(int num_threads) {
  if (num_threads <= 0) return;
  at::set_num_threads(num_threads);
  static std::once_flag once;
  std::call_once(once, [num_threads] {
    try {
      at::set_num_interop_threads(num_threads);
    } catch (const std::exception &) {
      // the inter-op pool was already started (e.g. by Python torch): keep it
    }
  });
}

namespace {
std::string major_minor(const std::string &v) {
  auto p = v.find('.');
  if (p == std::string::npos) return v;
  auto q = v.find_first_not_of("0123456789", p + 1);
  return v.substr(0, q);
}
}  // namespace

Engine::Engine(const std::string &path, const EngineOptions &opts) : path_(path), opts_(opts) {
  set_torch_threads(opts.num_threads);
  std::string text;
  const std::string format = deployable_format(path);
  const bool aoti = format == keys::FORMAT_AOTI;
  backend_ = aoti ? load_aoti(path, text) : load_torchscript(path, text);
  meta_ = parse_metadata(text, path, format);
  if (aoti)
    configure_aoti(*backend_, meta_, opts.device);
  else
    configure_torchscript(*backend_, opts.device, meta_.dtype, meta_.n_members, opts.local_rank);
  warnings_ = meta_.warnings;
  layer_widths_ = backend_->layer_widths();
  if (!layer_widths_.empty() && static_cast<int64_t>(layer_widths_.size()) != meta_.n_layers + 1)
    throw std::runtime_error(path + ": layer_widths() lists " + std::to_string(layer_widths_.size()) +
                             " widths, expected n_layers + 1 = " + std::to_string(meta_.n_layers + 1) +
                             " (metadata field 'n_layers' is " + std::to_string(meta_.n_layers) + ")");
  if (major_minor(meta_.torch_version) != major_minor(torch_build_version()))
    warnings_.push_back(path + " was exported with torch " + meta_.torch_version + ", this build uses torch " +
                        torch_build_version());
}

Engine::~Engine() = default;

std::string Engine::describe() const {
  std::ostringstream os;
  os << backend_->describe() << ": " << meta_.n_members << " members (" << meta_.posterior << "), elements";
  for (const auto &t : meta_.type_names) os << ' ' << t;
  os << ", cutoff " << meta_.cutoff << " A x " << meta_.n_layers << " layers";
  // the stored extrapolation thresholds (metal units), with the compute bayesrace column each applies to
  os << "; thresholds: max force sigma " << meta_.threshold_atomic_force_std << " eV/A (c_ug[1])";
  if (meta_.threshold_atomic_force_std_epistemic > 0.0)
    os << ", max epistemic force sigma " << meta_.threshold_atomic_force_std_epistemic << " eV/A (c_ug[6])";
  if (meta_.threshold_energy_std_epistemic_per_atom > 0.0)
    os << ", epistemic energy sigma " << meta_.threshold_energy_std_epistemic_per_atom << " eV/atom (c_ug[7])";
  if (meta_.threshold_atomic_force_std_relative > 0.0)
    os << ", max relative epistemic force sigma " << meta_.threshold_atomic_force_std_relative << " (c_ug[8])";
  if (meta_.threshold_atomic_feature_distance > 0.0)
    os << ", max feature distance " << meta_.threshold_atomic_feature_distance << " (c_ug[9])";
  return os.str();
}

std::string Engine::layer_mode_problem() const { return backend_->layer_mode_problem(); }

bool Engine::evaluates_one_member(bool layer_mode, bool recompute_layers) const {
  return backend_->evaluates_one_member(layer_mode, recompute_layers);
}

void Engine::check_inputs(const ModelInputs &in) const {
  const int64_t nt = static_cast<int64_t>(meta_.type_names.size());
  if (in.n_atoms < 0 || in.n_edges < 0) throw std::invalid_argument("negative atom or edge count");
  if (in.only_member >= meta_.n_members)
    throw std::invalid_argument("only_member " + std::to_string(in.only_member) + " out of range (the model has " +
                                std::to_string(meta_.n_members) + " members)");
  if (in.n_local < 0 || in.n_local > in.n_atoms)
    throw std::invalid_argument("n_local = " + std::to_string(in.n_local) + " must lie in [0, " +
                                std::to_string(in.n_atoms) + "]");
  for (int64_t i = 0; i < in.n_atoms; ++i)
    if (in.species[i] < 0 || in.species[i] >= nt)
      throw std::invalid_argument("species[" + std::to_string(i) + "] = " + std::to_string(in.species[i]) +
                                  " is not a species index of the model (0.." + std::to_string(nt - 1) + ")");
  for (int64_t e = 0; e < 2 * in.n_edges; ++e)
    if (in.edge_index[e] < 0 || in.edge_index[e] >= in.n_atoms)
      throw std::invalid_argument("edge_index holds atom " + std::to_string(in.edge_index[e]) +
                                  ", outside [0, " + std::to_string(in.n_atoms) + ")");
}

void Engine::check_outputs(const ModelInputs &in, const MemberOutputs &out) const {
  // the metadata promises a feature distance of every member and atom (the pair style's column 7)
  if (meta_.has_feature_density && in.n_local > 0 &&
      out.feature_distance.size() != static_cast<size_t>(out.n_members * out.n_atoms))
    throw std::runtime_error(path_ + ": the metadata declares a '" + keys::META_FEATURE_DENSITY +
                             "' but the model returned no feature distance (re-export it)");
}

void Engine::evaluate(const ModelInputs &in, MemberOutputs &out) const {
  check_inputs(in);
  backend_->evaluate(in, out);
  check_outputs(in, out);
}

void Engine::evaluate_layered(const ModelInputs &in, HaloExchange &halo, MemberOutputs &out) const {
  if (layer_widths_.empty()) throw std::runtime_error(path_ + " cannot run layer mode: " + layer_mode_problem());
  check_inputs(in);
  for (int64_t e = 0; e < in.n_edges; ++e)
    if (in.edge_index[e] >= in.n_local)
      throw std::invalid_argument("layer mode: edge " + std::to_string(e) + " has centre " +
                                  std::to_string(in.edge_index[e]) + ", not a local atom (n_local = " +
                                  std::to_string(in.n_local) + ")");
  backend_->evaluate_layered(in, halo, out);
  check_outputs(in, out);
}

}  // namespace bayesrace
