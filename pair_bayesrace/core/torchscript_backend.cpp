// TorchScript backend: loading, shell mode, layer mode (the core's libtorch code lives here,
// in torchscript_recompute.cpp and in torchscript_backend.h).
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/cuda.h>

#include <fstream>

#include "torchscript_backend.h"

namespace bayesrace {

namespace torchscript_detail {

// ---- layer mode ----------------------------------------------------------------------------

const char *const kLayerMethods[] = {"layer_widths", "n_readout", "embed", "layer", "head"};
// the same methods for all members at once (deployables exported since members go in one pass)
const char *const kTogetherMethods[] = {"embed_all", "layer_all", "head_all"};

void TorchScriptBackend::read_layer_structure() {
  widths_.clear();
  n_readout_ = 0;
  layer_problem_.clear();
  together_ = false;
  for (const char *name : kLayerMethods)
    if (!module_.find_method(name)) {
      layer_problem_ = "it has no per-layer methods (layer_widths, n_readout, embed, layer, head): export it "
                       "again with this version of bayesrace";
      return;  // exported before layer mode: shell mode only
    }
  try {
    for (const auto &w : module_.run_method("layer_widths").toIntList()) widths_.push_back(w);
    n_readout_ = module_.run_method("n_readout").toInt();
  } catch (const std::exception &e) {  // e.g. members of different widths: shell mode only
    widths_.clear();
    layer_problem_ = "layer_widths() failed: " + first_line(e.what());
    return;
  }
  if (widths_.size() < 2 || n_readout_ < 1)
    throw std::runtime_error(path_ + ": layer_widths() must list at least 2 widths and n_readout() be >= 1");
  together_ = true;
  for (const char *name : kTogetherMethods) together_ = together_ && module_.find_method(name).has_value();
  member_widths_ = widths_;
  if (together_)
    for (auto &w : widths_) w *= n_members_;  // one row carries every member's features
  features_.resize(widths_.size());
  grads_.resize(widths_.size());
}

// A [rows, width] tensor of the model's dtype and device over rows 0.. of `buf` (no copy on
// a float64 CPU model: the buffer must stay untouched while the tensor is in use).
torch::Tensor TorchScriptBackend::from_buffer(std::vector<double> &buf, int64_t rows, int64_t width) {
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  return torch::from_blob(buf.data(), {rows, width}, f64).to(device_, dtype_);
}

// t (any dtype/device) -> float64 host memory at dst, after checking its shape.
void TorchScriptBackend::copy_out(const torch::Tensor &t, std::vector<int64_t> shape, double *dst,
                                  const char *what) {
  if (t.sizes() != c10::IntArrayRef(shape)) {
    std::ostringstream os;
    os << path_ << ": " << what << " has shape " << shape_str(t) << ", expected " << c10::IntArrayRef(shape);
    throw std::runtime_error(os.str());
  }
  torch::Tensor c = t.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  if (c.numel()) std::memcpy(dst, c.data_ptr<double>(), sizeof(double) * static_cast<size_t>(c.numel()));
}

// Sizes and zeroes the outputs (M members) and the exchange buffers (rows of `widths`) of a
// layer-mode evaluation.
void TorchScriptBackend::prepare_layered(const ModelInputs &in, int64_t M, const std::vector<int64_t> &widths,
                                         MemberOutputs &out) {
  const int64_t N = in.n_atoms, K = static_cast<int64_t>(widths.size()) - 1;
  n_rows_ = N;
  out.n_members = M;
  out.n_atoms = N;
  const size_t MN = static_cast<size_t>(M * N);
  out.energy.assign(static_cast<size_t>(M), 0.0);
  out.atomic_energy.assign(MN, 0.0);
  out.log_var.assign(MN, 0.0);
  out.force_cov.assign(9 * MN, 0.0);
  out.feature_distance.clear();  // sized by copy_feature_distance when the heads report one
  out.forces.assign(3 * MN, 0.0);
  out.virial.assign(9 * static_cast<size_t>(M), 0.0);
  if (in.compute_atomic_virial)
    out.atomic_virial.assign(9 * MN, 0.0);
  else
    out.atomic_virial.clear();
  for (int64_t k = 1; k < K; ++k) {
    features_[k].resize(static_cast<size_t>(N * widths[k]));
    grads_[k].resize(static_cast<size_t>(N * widths[k]));
  }
}

// The heads' feature distance (their 4th element: [Mg, nl] together, [nl] for one member, or
// empty without a feature density) into rows g.. of out.feature_distance [M, N].
void TorchScriptBackend::copy_feature_distance(const c10::ivalue::Tuple &heads, bool together, int64_t g, int64_t Mg,
                                               int64_t nl, MemberOutputs &out) {
  if (heads.elements().size() < 4) return;  // exported before the feature density existed
  const torch::Tensor d = heads.elements().at(3).toTensor();
  if (d.numel() == 0) return;
  if (out.feature_distance.empty()) out.feature_distance.assign(static_cast<size_t>(out.n_members * out.n_atoms), 0.0);
  for (int64_t mm = 0; mm < Mg; ++mm)
    copy_out(together ? d[mm] : d, {nl}, &out.feature_distance[static_cast<size_t>((g + mm) * out.n_atoms)],
             "head() feature distance");
}

// Edge vectors x_j - x_i (+ shift), [E, 3] float64 on the host: the virial is formed from them.
std::vector<double> host_edge_vectors(const ModelInputs &in) {
  const int64_t E = in.n_edges;
  std::vector<double> vec(static_cast<size_t>(3 * E));
  const int64_t *ci = in.edge_index, *cj = in.edge_index + E;
  for (int64_t e = 0; e < E; ++e)
    for (int a = 0; a < 3; ++a)
      vec[3 * e + a] = in.positions[3 * cj[e] + a] - in.positions[3 * ci[e] + a] +
                       (in.edge_shifts ? in.edge_shifts[3 * e + a] : 0.0);
  return vec;
}

// Member `member`'s forces, virial and atomic virial from its dE/dr of every edge [E, 3]:
// r_ij = x_j - x_i, so F_i += dE/dr_ij, F_j -= dE/dr_ij; W = -sum r (x) dE/dr, half to each end.
void TorchScriptBackend::add_edge_terms(const ModelInputs &in, const std::vector<double> &vec, const double *edge_grad,
                                        int64_t member, MemberOutputs &out) {
  const int64_t E = in.n_edges, N = in.n_atoms;
  const int64_t *ci = in.edge_index, *cj = in.edge_index + E;
  const size_t row = static_cast<size_t>(member * N);
  double *F = &out.forces[3 * row], *W = &out.virial[9 * static_cast<size_t>(member)];
  double *AW = in.compute_atomic_virial ? &out.atomic_virial[9 * row] : nullptr;
  for (int64_t x = 0; x < E; ++x) {
    const double *gx = &edge_grad[3 * x], *v = &vec[3 * x];
    for (int a = 0; a < 3; ++a) {
      F[3 * ci[x] + a] += gx[a];
      F[3 * cj[x] + a] -= gx[a];
    }
    for (int a = 0; a < 3; ++a)
      for (int b = 0; b < 3; ++b) {
        const double t = -v[a] * gx[b];
        W[3 * a + b] += t;
        if (AW) {
          AW[9 * ci[x] + 3 * a + b] += 0.5 * t;
          AW[9 * cj[x] + 3 * a + b] += 0.5 * t;
        }
      }
  }
}

// A domain with no local atoms still takes part in every (collective) exchange.
void TorchScriptBackend::exchange_only(HaloExchange &halo, const std::vector<int64_t> &widths) {
  const int64_t K = static_cast<int64_t>(widths.size()) - 1;
  for (int64_t k = 1; k < K; ++k) {
    features_[k].assign(static_cast<size_t>(n_rows_ * widths[k]), 0.0);
    halo.forward(features_[k].data(), widths[k]);
  }
  for (int64_t k = K - 1; k >= 1; --k) {
    grads_[k].assign(static_cast<size_t>(n_rows_ * widths[k]), 0.0);
    halo.reverse(grads_[k].data(), widths[k]);
  }
}

void TorchScriptBackend::evaluate_layered(const ModelInputs &in, HaloExchange &halo, MemberOutputs &out) {
  if (widths_.empty()) throw std::runtime_error(path_ + " cannot run layer mode: " + layer_problem_);
  if (in.recompute_layers) return evaluate_recomputing(in, halo, out);
  const int64_t N = in.n_atoms, nl = in.n_local, E = in.n_edges;
  const int64_t K = static_cast<int64_t>(widths_.size()) - 1;
  // one member alone (only_member) goes through the per-member methods with its own widths
  const bool alone = in.only_member >= 0;  // in range: Engine::check_inputs
  const bool together = together_ && !alone;
  const std::vector<int64_t> &widths = (alone && together_) ? member_widths_ : widths_;
  const int64_t M = alone ? 1 : n_members_;
  // members go through the layers in groups: all M together, or one at a time (older deployables)
  const int64_t G = together ? 1 : M, Mg = together ? M : 1;
  prepare_layered(in, M, widths, out);
  out.only_member = alone ? in.only_member : -1;
  if (nl == 0) {
    for (int64_t g = 0; g < G; ++g) exchange_only(halo, widths);
    return;
  }

  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  const std::vector<double> vec = host_edge_vectors(in);
  torch::Tensor base = E ? torch::from_blob(const_cast<double *>(vec.data()), {E, 3}, f64).to(device_, dtype_, false, true)
                        : torch::zeros({0, 3}, f64.dtype(dtype_).device(device_));
  torch::Tensor spec = torch::from_blob(const_cast<int64_t *>(in.species), {N}, i64).to(device_, torch::kInt64, false, true);
  torch::Tensor ei = E ? torch::from_blob(const_cast<int64_t *>(in.edge_index), {2, E}, i64).to(device_, torch::kInt64, false, true)
                       : torch::zeros({2, 0}, i64.device(device_));
  torch::Tensor spec_local = spec.slice(0, 0, nl);

  torch::AutoGradMode grad_on(true);
  torch::jit::Method embed = module_.get_method(together ? "embed_all" : "embed"),
                     layer = module_.get_method(together ? "layer_all" : "layer"),
                     head = module_.get_method(together ? "head_all" : "head");
  std::vector<int64_t> readout_shape{nl, n_readout_};
  if (together) readout_shape.insert(readout_shape.begin(), M);
  std::vector<torch::Tensor> h_in(K), h_loc(K), r(K);
  std::vector<double> edge_grad(static_cast<size_t>(3 * E * Mg));
  // the deployable's index of group g's member (one member per group unless together)
  auto member_of = [&](int64_t g) { return alone ? in.only_member : g; };
  for (int64_t g = 0; g < G; ++g) {
    // one leaf for all layers; a copy per member, so that the gradient keeps them apart
    torch::Tensor vectors = (together ? base.unsqueeze(0).expand({M, E, 3}) : base).clone().requires_grad_(true);
    torch::Tensor h = (together ? embed({spec}) : embed({member_of(g), spec})).toTensor().detach();
    if (h.sizes() != c10::IntArrayRef({N, widths[0]}))
      throw std::runtime_error(path_ + ": embed() returned shape " + shape_str(h) + ", expected [" +
                               std::to_string(N) + ", " + std::to_string(widths[0]) + "]");
    auto run_layer = [&](int64_t k) {
      auto res = (together ? layer({k, h_in[k], spec, ei, vectors, nl}) : layer({member_of(g), k, h_in[k], spec, ei, vectors, nl}))
                     .toTuple();
      h_loc[k] = res->elements().at(0).toTensor();
      r[k] = res->elements().at(1).toTensor();
    };
    // forward, layer by layer: local rows computed here, ghost rows from their owners
    for (int64_t k = 0; k < K; ++k) {
      h_in[k] = k == 0 ? h : h.requires_grad_(true);
      run_layer(k);
      if (r[k].sizes() != c10::IntArrayRef(readout_shape))
        throw std::runtime_error(path_ + ": layer(" + std::to_string(k) + ") returned a readout of shape " +
                                 shape_str(r[k]) + ", expected " + shape_str(torch::empty(readout_shape)));
      if (k + 1 < K) {
        const int64_t w = widths[k + 1];
        copy_out(h_loc[k], {nl, w}, features_[k + 1].data(), "layer() features");
        halo.forward(features_[k + 1].data(), w);
        h = from_buffer(features_[k + 1], N, w);
      }
    }
    auto heads = (together ? head({torch::stack(r), spec_local}) : head({member_of(g), torch::stack(r), spec_local})).toTuple();
    // [Mg, ...] whichever way the members went
    torch::Tensor e = heads->elements().at(0).toTensor().reshape({Mg, nl});
    torch::Tensor lv = heads->elements().at(1).toTensor(), cov = heads->elements().at(2).toTensor();
    for (int64_t mm = 0; mm < Mg; ++mm) {
      const size_t row = static_cast<size_t>((g + mm) * N);
      copy_out(e[mm], {nl}, &out.atomic_energy[row], "head() atomic energy");
      copy_out(together ? lv[mm] : lv, {nl}, &out.log_var[row], "head() log-variance");
      copy_out(together ? cov[mm] : cov, {nl, 3, 3}, &out.force_cov[9 * row], "head() force covariance");
    }
    copy_feature_distance(*heads, together, g, Mg, nl, out);
    torch::Tensor member_energy = e.sum(1);
    torch::Tensor energy = member_energy.sum();  // members are independent: one backward for all
    torch::Tensor energies = member_energy.detach().to(torch::kCPU, torch::kFloat64).contiguous();
    for (int64_t mm = 0; mm < Mg; ++mm) out.energy[g + mm] = energies.data_ptr<double>()[mm];

    // backward, layer by layer: dE/dh_k of ghost rows goes back to the owners in between
    std::fill(edge_grad.begin(), edge_grad.end(), 0.0);
    std::vector<torch::Tensor> g_r(K);
    if (energy.requires_grad()) g_r = torch::autograd::grad({energy}, r, {}, false, false, true);
    torch::Tensor Gk;  // dE/dh_{k+1} of the local rows; none for h_K (only r_{K-1} reads it)
    for (int64_t k = K - 1; k >= 0; --k) {
      std::vector<torch::Tensor> outputs, seeds, inputs{vectors};
      if (g_r[k].defined() && r[k].requires_grad()) {
        outputs.push_back(r[k]);
        seeds.push_back(g_r[k]);
      }
      if (Gk.defined() && h_loc[k].requires_grad()) {
        outputs.push_back(h_loc[k]);
        seeds.push_back(Gk);
      }
      if (k > 0) inputs.push_back(h_in[k]);
      std::vector<torch::Tensor> d(inputs.size());
      if (!outputs.empty()) d = torch::autograd::grad(outputs, inputs, seeds, false, false, true);
      if (d[0].defined()) {
        torch::Tensor gt = d[0].detach().to(torch::kCPU, torch::kFloat64).contiguous();
        const double *gp = gt.data_ptr<double>();
        for (size_t x = 0; x < edge_grad.size(); ++x) edge_grad[x] += gp[x];
      }
      if (k > 0) {
        const int64_t w = widths[k];
        if (d[1].defined())
          copy_out(d[1], {N, w}, grads_[k].data(), "the gradient of a layer's features");
        else
          std::fill(grads_[k].begin(), grads_[k].end(), 0.0);
        halo.reverse(grads_[k].data(), w);
        Gk = from_buffer(grads_[k], nl, w);
      }
    }
    for (int64_t mm = 0; mm < Mg; ++mm) add_edge_terms(in, vec, &edge_grad[static_cast<size_t>(3 * E * mm)], g + mm, out);
    for (int64_t k = 0; k < K; ++k) h_in[k] = h_loc[k] = r[k] = torch::Tensor();  // free the graphs
  }
}

}  // namespace torchscript_detail

using torchscript_detail::first_line;
using torchscript_detail::TorchScriptBackend;

std::unique_ptr<Backend> load_torchscript(const std::string &path, std::string &metadata_json) {
  {
    std::ifstream probe(path, std::ios::binary);
    if (!probe.good()) throw std::runtime_error("cannot open model file '" + path + "' (missing or unreadable)");
  }
  // The profiling executor's graph optimisation cost ~8 s over the first calls on every
  // rank and did not change the steady-state step time measurably (CPU, shared machine).
  torch::jit::setGraphExecutorOptimize(false);
  torch::jit::ExtraFilesMap extra{{keys::METADATA_FILE, ""}};
  torch::jit::Module module;
  try {
    module = torch::jit::load(path, torch::kCPU, extra);
  } catch (const std::exception &e) {
    throw std::runtime_error("'" + path +
                             "' is not a TorchScript archive written by torch.jit.save (libtorch says: " +
                             first_line(e.what()) + ")");
  }
  metadata_json = extra[keys::METADATA_FILE];
  if (metadata_json.empty())
    throw std::runtime_error("'" + path + "' has no " + keys::METADATA_FILE +
                             " (save with torch.jit.save(module, path, _extra_files={\"metadata.json\": ...}))");
  if (!module.find_method("forward"))
    throw std::runtime_error("'" + path + "' has no forward() method");
  return std::make_unique<TorchScriptBackend>(std::move(module), path);
}

void configure_torchscript(Backend &backend, const std::string &device, const std::string &dtype,
                           int64_t n_members, int local_rank) {
  auto *ts = dynamic_cast<TorchScriptBackend *>(&backend);
  if (!ts) throw std::logic_error("configure_torchscript: not a TorchScript backend");
  ts->configure(device, dtype, n_members, local_rank);
}

}  // namespace bayesrace
