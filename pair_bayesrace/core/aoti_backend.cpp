// AOTInductor backend: a .pt2 package (python/bayesrace/export/_aoti.py) holding forward()
// compiled ahead of time, run by torch::inductor::AOTIModelPackageLoader. Shell mode only:
// the compiled graph evaluates a whole structure (local atoms and the ghost shell) at once.
#include <caffe2/serialize/inline_container.h>
#include <sys/utsname.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/version.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "../keys.h"
#include "backend.h"
#include "metadata.h"

namespace bayesrace {

namespace {

// torch's own names: the record that marks a .pt2 package, and its text
const char *const kPt2FormatRecord = "archive_format";
const char *const kPt2FormatText = "pt2";

std::string first_line(const std::string &s) { return s.substr(0, s.find('\n')); }

// "2.13.0+cpu" -> "2.13.0": the release, without the local build tag
std::string release(const std::string &v) { return v.substr(0, v.find_first_of("+ ")); }

std::string trimmed(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  return s;
}

std::string record_text(caffe2::serialize::PyTorchStreamReader &zip, const std::string &name) {
  auto record = zip.getRecord(name);
  return std::string(static_cast<const char *>(std::get<0>(record).get()), std::get<1>(record));
}

// The CPU features the kernels of an inductor ISA need that this CPU lacks ("" if none, or if
// the ISA is not one this check knows).
std::string missing_cpu_features(const std::string &isa) {
  std::string missing;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
#define BAYESRACE_NEED(feature) \
  if (!__builtin_cpu_supports(feature)) missing += std::string(missing.empty() ? "" : ", ") + feature
  if (isa == "avx2" || isa.rfind("avx512", 0) == 0 || isa.rfind("amx", 0) == 0) {
    BAYESRACE_NEED("avx2");
    BAYESRACE_NEED("fma");
  }
  if (isa.rfind("avx512", 0) == 0 || isa.rfind("amx", 0) == 0) {
    BAYESRACE_NEED("avx512f");
    BAYESRACE_NEED("avx512dq");
    BAYESRACE_NEED("avx512vl");
    BAYESRACE_NEED("avx512bw");
  }
#undef BAYESRACE_NEED
#else
  (void)isa;
#endif
  return missing;
}

class AotiBackend : public Backend {
 public:
  explicit AotiBackend(std::string path) : path_(std::move(path)) {}

  void configure(const Metadata &meta, const std::string &device) {
    const std::string again = " (export it again on this machine: bayesrace export --format aoti; or use a "
                              "TorchScript deployable, bayesrace export --format torchscript)";
    if (device != "cpu")
      throw std::runtime_error(path_ + " is an AOTInductor package compiled for the CPU: device '" + device +
                               "' needs a TorchScript deployable (bayesrace export --format torchscript)");
    if (release(meta.torch_version) != release(TORCH_VERSION))
      throw std::runtime_error(path_ + " was compiled with torch " + meta.torch_version + ", this build of bayesrace "
                               "uses torch " + TORCH_VERSION + ": compiled code runs only with the torch version that "
                               "compiled it" + again);
    struct utsname host;
    if (uname(&host) == 0 && meta.machine != host.machine)
      throw std::runtime_error(path_ + " was compiled for " + meta.machine + " CPUs, this machine is " +
                               host.machine + again);
    const std::string missing = missing_cpu_features(meta.cpu_isa);
    if (!missing.empty())
      throw std::runtime_error(path_ + " was compiled for " + meta.cpu_isa + " on " + meta.compiled_on +
                               ", and this CPU lacks " + missing + again);
    compiled_for_ = (meta.cpu_isa.empty() ? std::string("no vector ISA") : meta.cpu_isa) + ", " + meta.compiled_on;
    dtype_ = meta.dtype == "float32" ? torch::kFloat32 : torch::kFloat64;
    n_members_ = meta.n_members;

    const std::vector<std::string> inputs{keys::POSITIONS, keys::SPECIES, keys::EDGE_INDEX, keys::EDGE_SHIFTS,
                                          keys::LOCAL_ATOMS};
    if (meta.input_keys != inputs) {
      std::string want;
      for (const auto &k : inputs) want += (want.empty() ? "" : ", ") + k;
      throw std::runtime_error(path_ + ": metadata field '" + keys::META_INPUT_KEYS + "' must be [" + want +
                               "] (the inputs this build passes)");
    }
    output_keys_ = meta.output_keys;
    for (const char *key : {keys::MEMBER_ENERGY, keys::MEMBER_ATOMIC_ENERGY, keys::MEMBER_FORCES, keys::MEMBER_VIRIAL,
                            keys::MEMBER_ATOMIC_VIRIAL, keys::ATOMIC_ENERGY_LOG_VAR, keys::FORCE_COVARIANCE})
      if (std::count(output_keys_.begin(), output_keys_.end(), key) != 1)
        throw std::runtime_error(path_ + ": metadata field '" + keys::META_OUTPUT_KEYS + "' must name '" + key +
                                 "' once");
    for (const auto &name : meta.aoti_models) {
      has_plain_ = has_plain_ || name == keys::AOTI_MODEL_PLAIN;
      has_virial_ = has_virial_ || name == keys::AOTI_MODEL_ATOMIC_VIRIAL;
    }
    if (!has_plain_ && !has_virial_)
      throw std::runtime_error(path_ + ": metadata field '" + keys::META_AOTI_MODELS + "' names neither '" +
                               keys::AOTI_MODEL_PLAIN + "' nor '" + keys::AOTI_MODEL_ATOMIC_VIRIAL + "'");
    // load the compiled code now (after the checks above), so that a broken file fails at load time
    runner(!has_plain_);
  }

  std::vector<int64_t> layer_widths() const override { return {}; }

  std::string layer_mode_problem() const override {
    return "it is an AOTInductor package (.pt2), whose compiled forward() evaluates the whole structure at once "
           "(shell mode only): use 'halo shell' (pair_style bayesrace picks it by itself for a .pt2) or a "
           "TorchScript deployable (bayesrace export --format torchscript)";
  }

  std::string describe() const override {
    return "AOTInductor " + path_ + " on cpu" + (dtype_ == torch::kFloat32 ? " float32" : " float64") +
           " (compiled for " + compiled_for_ + ")";
  }

  bool evaluates_one_member(bool, bool) const override { return false; }  // one compiled forward()
  void evaluate_layered(const ModelInputs &, HaloExchange &, MemberOutputs &) override {
    throw std::runtime_error(path_ + " cannot run layer mode: " + layer_mode_problem());
  }

  void evaluate(const ModelInputs &in, MemberOutputs &out) override {
    const int64_t N = in.n_atoms, E = in.n_edges, M = n_members_;
    out.n_members = M;
    out.only_member = -1;  // the compiled forward() evaluates every member
    out.n_atoms = N;
    if (N == 0) {  // nothing to run (the compiled code needs at least one atom)
      out.energy.assign(static_cast<size_t>(M), 0.0);
      out.atomic_energy.clear();
      out.forces.clear();
      out.virial.assign(static_cast<size_t>(9 * M), 0.0);
      out.log_var.clear();
      out.force_cov.clear();
      out.feature_distance.clear();
      out.atomic_virial.clear();
      return;
    }
    if (in.compute_atomic_virial && !has_virial_)
      throw std::runtime_error(path_ + " was exported without its per-atom virial model ('" +
                               std::string(keys::AOTI_MODEL_ATOMIC_VIRIAL) + "'), which this run needs (e.g. compute "
                               "stress/atom): export it with atomic_virial=True (the default)");
    auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
    auto i64 = torch::TensorOptions().dtype(torch::kInt64);
    std::vector<at::Tensor> inputs{
        torch::from_blob(const_cast<double *>(in.positions), {N, 3}, f64).to(dtype_, false, true),
        torch::from_blob(const_cast<int64_t *>(in.species), {N}, i64).clone(),
        E ? torch::from_blob(const_cast<int64_t *>(in.edge_index), {2, E}, i64).clone() : torch::zeros({2, 0}, i64),
        (E && in.edge_shifts) ? torch::from_blob(const_cast<double *>(in.edge_shifts), {E, 3}, f64).to(dtype_, false, true)
                              : torch::zeros({E, 3}, f64.dtype(dtype_)),
        torch::empty({in.n_local}, i64)};  // only its length counts: n_local
    // the plain model unless per-atom virials are wanted (or it is not in the package)
    const bool with_virial = in.compute_atomic_virial || !has_plain_;
    std::vector<at::Tensor> result;
    try {
      result = runner(with_virial).run(inputs);
    } catch (const std::exception &e) {
      throw std::runtime_error(path_ + ": the compiled model failed: " + first_line(e.what()));
    }
    if (result.size() != output_keys_.size())
      throw std::runtime_error(path_ + ": the compiled model returned " + std::to_string(result.size()) +
                               " outputs, its metadata names " + std::to_string(output_keys_.size()));
    auto fetch = [&](const char *key, std::vector<int64_t> shape, std::vector<double> &dst) {
      const size_t k = std::find(output_keys_.begin(), output_keys_.end(), key) - output_keys_.begin();
      const at::Tensor &t = result[k];
      if (t.sizes() != c10::IntArrayRef(shape)) {
        std::ostringstream os;
        os << path_ << ": the compiled model returned '" << key << "' of shape " << t.sizes() << ", expected "
           << c10::IntArrayRef(shape) << " (M=" << M << " members, N=" << N << " atoms)";
        throw std::runtime_error(os.str());
      }
      at::Tensor c = t.to(torch::kFloat64).contiguous();
      dst.resize(static_cast<size_t>(c.numel()));
      if (c.numel()) std::memcpy(dst.data(), c.data_ptr<double>(), sizeof(double) * dst.size());
    };
    fetch(keys::MEMBER_ENERGY, {M}, out.energy);
    fetch(keys::MEMBER_ATOMIC_ENERGY, {M, N}, out.atomic_energy);
    fetch(keys::MEMBER_FORCES, {M, N, 3}, out.forces);
    fetch(keys::MEMBER_VIRIAL, {M, 3, 3}, out.virial);
    fetch(keys::ATOMIC_ENERGY_LOG_VAR, {M, N}, out.log_var);
    fetch(keys::FORCE_COVARIANCE, {M, N, 3, 3}, out.force_cov);
    // a package exported with a feature density names its distance [M, N] among its outputs
    const auto distance = std::find(output_keys_.begin(), output_keys_.end(), keys::MEMBER_FEATURE_DISTANCE);
    if (distance != output_keys_.end() && result[distance - output_keys_.begin()].numel() > 0)
      fetch(keys::MEMBER_FEATURE_DISTANCE, {M, N}, out.feature_distance);
    else
      out.feature_distance.clear();
    if (in.compute_atomic_virial)
      fetch(keys::MEMBER_ATOMIC_VIRIAL, {M, N, 3, 3}, out.atomic_virial);
    else
      out.atomic_virial.clear();
  }

 private:
  // the loader of one compiled model, made on first use (each extracts the package once)
  torch::inductor::AOTIModelPackageLoader &runner(bool with_virial) {
    auto &slot = with_virial ? virial_ : plain_;
    if (!slot) {
      const std::string name = with_virial ? keys::AOTI_MODEL_ATOMIC_VIRIAL : keys::AOTI_MODEL_PLAIN;
      try {
        // run_single_threaded: no thread pool of the runner's own (one torch thread per MPI rank)
        slot = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path_, name, /*run_single_threaded=*/true);
      } catch (const std::exception &e) {
        throw std::runtime_error(path_ + ": cannot load its compiled model '" + name + "': " + first_line(e.what()));
      }
    }
    return *slot;
  }

  std::string path_;
  std::string compiled_for_;
  torch::ScalarType dtype_ = torch::kFloat64;
  int64_t n_members_ = 0;
  std::vector<std::string> output_keys_;
  bool has_plain_ = false, has_virial_ = false;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> plain_, virial_;
};

}  // namespace

std::string deployable_format(const std::string &path) {
  try {
    caffe2::serialize::PyTorchStreamReader zip(path);
    if (zip.hasRecord(kPt2FormatRecord) && trimmed(record_text(zip, kPt2FormatRecord)) == kPt2FormatText)
      return keys::FORMAT_AOTI;
  } catch (const std::exception &) {
    // not a zip archive (or unreadable): the TorchScript loader says what is wrong
  }
  return keys::FORMAT_TORCHSCRIPT;
}

std::unique_ptr<Backend> load_aoti(const std::string &path, std::string &metadata_json) {
  try {
    caffe2::serialize::PyTorchStreamReader zip(path);
    if (!zip.hasRecord(keys::ARCHIVE_METADATA_RECORD))
      throw std::runtime_error("'" + path + "' is an AOTInductor package without " + keys::ARCHIVE_METADATA_RECORD +
                               ": not a bayesrace deployable (write it with bayesrace export --format aoti)");
    metadata_json = record_text(zip, keys::ARCHIVE_METADATA_RECORD);
  } catch (const c10::Error &e) {
    throw std::runtime_error("cannot read the package '" + path + "': " + first_line(e.what()));
  }
  return std::make_unique<AotiBackend>(path);
}

void configure_aoti(Backend &backend, const Metadata &meta, const std::string &device) {
  auto *aoti = dynamic_cast<AotiBackend *>(&backend);
  if (!aoti) throw std::logic_error("configure_aoti: not an AOTInductor backend");
  aoti->configure(meta, device);
}

}  // namespace bayesrace
