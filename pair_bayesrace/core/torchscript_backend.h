// The TorchScript backend's class, shared by its two translation units: torchscript_backend.cpp
// (loading, shell mode, layer mode keeping every layer's graph) and torchscript_recompute.cpp
// (layer mode recomputing each layer, in chunks of edges). Private to the core.
#pragma once

#include <torch/csrc/autograd/autograd.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include <cstring>
#include <sstream>
#include <stdexcept>

#include "../keys.h"
#include "backend.h"

namespace bayesrace {
namespace torchscript_detail {

inline 
std::string first_line(const std::string &s) {
  auto p = s.find('\n');
  return p == std::string::npos ? s : s.substr(0, p);
}

inline std::string shape_str(const torch::Tensor &t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

class TorchScriptBackend : public Backend {
 public:
  TorchScriptBackend(torch::jit::Module module, std::string path)
      : module_(std::move(module)), path_(std::move(path)) {}

  void configure(const std::string &device, const std::string &dtype, int64_t n_members, int local_rank) {
    if (device.rfind("cuda", 0) == 0) {
      // CUDA path: compiles against any libtorch; untested on CPU-only machines.
      if (!torch::cuda::is_available())
        throw std::runtime_error("device '" + device +
                                 "' requested but this libtorch has no CUDA support or no GPU is visible");
    } else if (device != "cpu") {
      throw std::runtime_error("unknown device '" + device + "' (expected cpu, cuda or cuda:K)");
    }
    try {
      if (device == "cuda") {
        // one GPU per rank on a node: round-robin over the visible devices
        const int64_t count = static_cast<int64_t>(torch::cuda::device_count());
        device_ = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank % count));
      } else {
        device_ = torch::Device(device);
      }
    } catch (const std::exception &e) {
      throw std::runtime_error("bad device '" + device + "': " + first_line(e.what()));
    }
    dtype_ = dtype == "float32" ? torch::kFloat32 : torch::kFloat64;
    n_members_ = n_members;
    module_.to(device_);
    module_.eval();
    has_forward_member_ = module_.find_method("forward_member").has_value();
    read_layer_structure();
  }

  std::vector<int64_t> layer_widths() const override { return widths_; }
  std::string layer_mode_problem() const override { return layer_problem_; }
  bool evaluates_one_member(bool layer_mode, bool recompute_layers) const override {
    return layer_mode ? !widths_.empty() && !recompute_layers : has_forward_member_;
  }

  std::string describe() const override {
    return "TorchScript " + path_ + " on " + device_.str() + (dtype_ == torch::kFloat32 ? " float32" : " float64");
  }

  void evaluate(const ModelInputs &in, MemberOutputs &out) override {
    const int64_t N = in.n_atoms, E = in.n_edges;
    auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
    auto i64 = torch::TensorOptions().dtype(torch::kInt64);
    auto to_dev = [&](torch::Tensor t, torch::ScalarType st) {
      return t.to(device_, st, /*non_blocking=*/false, /*copy=*/true);
    };
    torch::Tensor pos = N ? to_dev(torch::from_blob(const_cast<double *>(in.positions), {N, 3}, f64), dtype_)
                          : torch::zeros({0, 3}, f64.dtype(dtype_).device(device_));
    torch::Tensor spec = N ? to_dev(torch::from_blob(const_cast<int64_t *>(in.species), {N}, i64), torch::kInt64)
                           : torch::zeros({0}, i64.device(device_));
    torch::Tensor ei = E ? to_dev(torch::from_blob(const_cast<int64_t *>(in.edge_index), {2, E}, i64), torch::kInt64)
                         : torch::zeros({2, 0}, i64.device(device_));
    torch::Tensor sh = (E && in.edge_shifts)
                           ? to_dev(torch::from_blob(const_cast<double *>(in.edge_shifts), {E, 3}, f64), dtype_)
                           : torch::zeros({E, 3}, f64.dtype(dtype_).device(device_));

    torch::AutoGradMode grad_on(true);  // the deployable differentiates inside forward()
    std::vector<torch::jit::IValue> args{pos, spec, ei, sh, in.n_local, in.compute_atomic_virial};
    const bool alone = in.only_member >= 0 && has_forward_member_;  // in range: Engine::check_inputs
    if (alone) args.insert(args.begin(), in.only_member);
    c10::impl::GenericDict dict =
        (alone ? module_.get_method("forward_member")(args) : module_.forward(args)).toGenericDict();
    const int64_t M = alone ? 1 : n_members_;
    out.only_member = alone ? in.only_member : -1;

    auto fetch = [&](const char *key, std::vector<int64_t> shape, std::vector<double> &dst, bool may_be_empty) {
      auto it = dict.find(c10::IValue(std::string(key)));
      if (it == dict.end())
        throw std::runtime_error(path_ + ": forward() returned no '" + key + "'");
      torch::Tensor t = it->value().toTensor().detach();
      if (may_be_empty && t.numel() == 0) {
        dst.clear();
        return;
      }
      if (t.sizes() != c10::IntArrayRef(shape)) {
        std::ostringstream os;
        os << path_ << ": forward() returned '" << key << "' of shape " << shape_str(t) << ", expected "
           << c10::IntArrayRef(shape) << " (M=" << M << " members, N=" << N << " atoms)";
        throw std::runtime_error(os.str());
      }
      t = t.to(torch::kCPU, torch::kFloat64).contiguous();
      dst.resize(static_cast<size_t>(t.numel()));
      if (t.numel()) std::memcpy(dst.data(), t.data_ptr<double>(), sizeof(double) * dst.size());
    };
    out.n_members = M;
    out.n_atoms = N;
    fetch(keys::MEMBER_ENERGY, {M}, out.energy, false);
    fetch(keys::MEMBER_ATOMIC_ENERGY, {M, N}, out.atomic_energy, false);
    fetch(keys::MEMBER_FORCES, {M, N, 3}, out.forces, false);
    fetch(keys::MEMBER_VIRIAL, {M, 3, 3}, out.virial, false);
    fetch(keys::ATOMIC_ENERGY_LOG_VAR, {M, N}, out.log_var, false);
    fetch(keys::FORCE_COVARIANCE, {M, N, 3, 3}, out.force_cov, false);
    // older deployables have no feature distance; without a density it is empty [M, 0]
    if (dict.find(c10::IValue(std::string(keys::MEMBER_FEATURE_DISTANCE))) != dict.end())
      fetch(keys::MEMBER_FEATURE_DISTANCE, {M, N}, out.feature_distance, true);
    else
      out.feature_distance.clear();
    if (in.compute_atomic_virial) {
      fetch(keys::MEMBER_ATOMIC_VIRIAL, {M, N, 3, 3}, out.atomic_virial, N == 0);
      if (N && out.atomic_virial.empty())
        throw std::runtime_error(path_ + ": forward() returned an empty '" + std::string(keys::MEMBER_ATOMIC_VIRIAL) +
                                 "' although compute_atomic_virial was true");
    } else {
      out.atomic_virial.clear();
    }
  }

  void evaluate_layered(const ModelInputs &in, HaloExchange &halo, MemberOutputs &out) override;

 private:
  // layer mode with recompute_layers (torchscript_recompute.cpp)
  void evaluate_recomputing(const ModelInputs &in, HaloExchange &halo, MemberOutputs &out);
  void read_layer_structure();
  void exchange_only(HaloExchange &halo, const std::vector<int64_t> &widths);
  void prepare_layered(const ModelInputs &in, int64_t M, const std::vector<int64_t> &widths, MemberOutputs &out);
  void add_edge_terms(const ModelInputs &in, const std::vector<double> &vec, const double *edge_grad, int64_t member,
                      MemberOutputs &out);
  void copy_out(const torch::Tensor &t, std::vector<int64_t> shape, double *dst, const char *what);
  void copy_feature_distance(const c10::ivalue::Tuple &heads, bool together, int64_t g, int64_t Mg, int64_t nl,
                             MemberOutputs &out);
  torch::Tensor from_buffer(std::vector<double> &buf, int64_t rows, int64_t width);

  torch::jit::Module module_;
  std::string path_;
  torch::Device device_{torch::kCPU};
  torch::ScalarType dtype_ = torch::kFloat64;
  int64_t n_members_ = 0;
  // layer mode: the widths of the rows exchanged, [d_0..d_K] of one member or, when the
  // deployable evaluates all members in one pass (together_), M * [d_0..d_K]; and n_out
  // (widths_ empty: no per-layer methods)
  std::vector<int64_t> widths_;
  std::vector<int64_t> member_widths_;  // [d_0..d_K] of one member (layer mode with only_member)
  bool together_ = false;
  bool has_forward_member_ = false;  // shell mode can evaluate one member alone
  int64_t n_readout_ = 0;
  std::string layer_problem_;  // why layer mode is unavailable (widths_ empty)
  // exchange buffers, float64 whatever the model's dtype, kept across calls:
  // features_[k] holds h_k [N, d_k] (k = 1..K-1), grads_[k] dE/dh_k [N, d_k]
  std::vector<std::vector<double>> features_, grads_;
  int64_t n_rows_ = 0;
};

std::vector<double> host_edge_vectors(const ModelInputs &in);

}  // namespace torchscript_detail
}  // namespace bayesrace
