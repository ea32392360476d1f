// Layer mode with recompute_layers: memory that follows a piece of the domain, not the domain.
//
// The forward pass runs without autograd and keeps only the node features h_k of every atom
// (the exchange buffers) and the readouts. The backward pass runs each layer again, in
// pieces: a piece is a run of consecutive local centres with at most `recompute_chunk`
// (edge, member) pairs; it sees the rows of its centres and of their neighbours, and its
// graph is freed before the next piece. Peak memory is then one piece's graph whatever the
// number of atoms, at the price of one more forward pass.
#include "torchscript_backend.h"

namespace bayesrace {
namespace torchscript_detail {

namespace {

// One piece: local centres [c0, c0 + n_centres), its rows (the centres first, then the other
// atoms its edges reach) and its edges, renumbered into those rows.
struct Piece {
  int64_t c0 = 0, n_centres = 0;
  torch::Tensor rows;        // [R] int64: row of the piece -> row of the domain
  torch::Tensor rows_host;   // the same on the host (for adding gradients into host buffers)
  torch::Tensor edges;       // [Ec] int64: edge ids in the domain's edge list (host)
  torch::Tensor edge_index;  // [2, Ec] int64, renumbered
  torch::Tensor vectors;     // [Ec, 3] edge vectors, model dtype
};

std::vector<Piece> make_pieces(const ModelInputs &in, const std::vector<double> &vec, int64_t per_piece,
                               int64_t members, torch::Device device, torch::ScalarType dtype) {
  const int64_t N = in.n_atoms, nl = in.n_local, E = in.n_edges;
  const int64_t *ci = in.edge_index, *cj = in.edge_index + E;
  // edges bucketed by centre (counting sort): start[c] .. start[c + 1]
  std::vector<int64_t> start(static_cast<size_t>(nl + 1), 0), order(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) start[ci[e] + 1]++;
  for (int64_t c = 0; c < nl; ++c) start[c + 1] += start[c];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t e = 0; e < E; ++e) order[fill[ci[e]]++] = e;

  std::vector<Piece> pieces;
  std::vector<int64_t> slot(static_cast<size_t>(N), -1);
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const int64_t max_edges = std::max<int64_t>(1, per_piece / std::max<int64_t>(1, members));
  for (int64_t c0 = 0; c0 < nl;) {
    int64_t c1 = c0 + 1;  // at least one centre, however many edges it has
    while (c1 < nl && start[c1 + 1] - start[c0] <= max_edges) ++c1;
    Piece p;
    p.c0 = c0;
    p.n_centres = c1 - c0;
    std::vector<int64_t> rows;
    for (int64_t c = c0; c < c1; ++c) {
      slot[c] = static_cast<int64_t>(rows.size());
      rows.push_back(c);
    }
    const int64_t Ec = start[c1] - start[c0];
    std::vector<int64_t> ids(static_cast<size_t>(Ec)), index(static_cast<size_t>(2 * Ec));
    std::vector<double> v(static_cast<size_t>(3 * Ec));
    for (int64_t x = 0; x < Ec; ++x) {
      const int64_t e = order[start[c0] + x];
      ids[x] = e;
      if (slot[cj[e]] < 0) {
        slot[cj[e]] = static_cast<int64_t>(rows.size());
        rows.push_back(cj[e]);
      }
      index[x] = slot[ci[e]];
      index[Ec + x] = slot[cj[e]];
      for (int a = 0; a < 3; ++a) v[3 * x + a] = vec[3 * e + a];
    }
    for (int64_t row : rows) slot[row] = -1;
    const int64_t R = static_cast<int64_t>(rows.size());
    p.rows_host = torch::from_blob(rows.data(), {R}, i64).clone();
    p.rows = p.rows_host.to(device);
    p.edges = torch::from_blob(ids.data(), {Ec}, i64).clone();
    p.edge_index = torch::from_blob(index.data(), {2, Ec}, i64).to(device, torch::kInt64, false, true);
    p.vectors = torch::from_blob(v.data(), {Ec, 3}, f64).to(device, dtype, false, true);
    pieces.push_back(std::move(p));
    c0 = c1;
  }
  return pieces;
}

}  // namespace

void TorchScriptBackend::evaluate_recomputing(const ModelInputs &in, HaloExchange &halo, MemberOutputs &out) {
  if (!together_)
    throw std::runtime_error(path_ + ": recompute needs a deployable that evaluates its members together "
                                     "(layer_all): export it again with this version of bayesrace");
  const int64_t N = in.n_atoms, nl = in.n_local, E = in.n_edges, M = n_members_;
  const int64_t K = static_cast<int64_t>(widths_.size()) - 1;
  prepare_layered(in, n_members_, widths_, out);  // every member: only_member is not used here
  out.only_member = -1;
  if (nl == 0) {
    exchange_only(halo, widths_);
    return;
  }
  const std::vector<double> vec = host_edge_vectors(in);
  const std::vector<Piece> pieces =
      make_pieces(in, vec, in.recompute_chunk > 0 ? in.recompute_chunk : kRecomputeChunk, M, device_, dtype_);
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  torch::Tensor spec = torch::from_blob(const_cast<int64_t *>(in.species), {N}, i64).to(device_, torch::kInt64, false, true);
  torch::jit::Method embed = module_.get_method("embed_all"), layer = module_.get_method("layer_all"),
                     head = module_.get_method("head_all");
  torch::AutoGradMode grad_on(true);
  torch::Tensor h0 = embed({spec}).toTensor().detach();
  if (h0.sizes() != c10::IntArrayRef({N, widths_[0]}))
    throw std::runtime_error(path_ + ": embed_all() returned shape " + shape_str(h0) + ", expected [" +
                             std::to_string(N) + ", " + std::to_string(widths_[0]) + "]");
  auto features = [&](int64_t k) { return k == 0 ? h0 : from_buffer(features_[k], N, widths_[k]); };
  auto run = [&](const Piece &p, int64_t k, const torch::Tensor &h_rows, const torch::Tensor &vectors) {
    auto res = layer({k, h_rows, spec.index_select(0, p.rows), p.edge_index, vectors, p.n_centres}).toTuple();
    return std::make_pair(res->elements().at(0).toTensor(), res->elements().at(1).toTensor());
  };

  // forward without graphs: h_{k+1} of the local rows into the exchange buffers, readouts kept
  std::vector<torch::Tensor> readouts(K);
  {
    torch::NoGradGuard no_graph;
    for (int64_t k = 0; k < K; ++k) {
      readouts[k] = torch::empty({M, nl, n_readout_}, torch::TensorOptions().dtype(dtype_).device(device_));
      const torch::Tensor h = features(k);
      for (const Piece &p : pieces) {
        const int64_t Ec = p.edges.size(0);
        auto [h_next, r] = run(p, k, h.index_select(0, p.rows), p.vectors.unsqueeze(0).expand({M, Ec, 3}));
        if (r.sizes() != c10::IntArrayRef({M, p.n_centres, n_readout_}))
          throw std::runtime_error(path_ + ": layer_all(" + std::to_string(k) + ") returned a readout of shape " +
                                   shape_str(r));
        readouts[k].narrow(1, p.c0, p.n_centres).copy_(r);
        if (k + 1 < K)
          copy_out(h_next, {p.n_centres, widths_[k + 1]}, features_[k + 1].data() + p.c0 * widths_[k + 1],
                   "layer_all() features");
      }
      if (k + 1 < K) halo.forward(features_[k + 1].data(), widths_[k + 1]);
    }
  }
  torch::Tensor stacked = torch::stack(readouts).requires_grad_(true);  // [K, M, nl, n_out]
  auto heads = head({stacked, spec.slice(0, 0, nl)}).toTuple();
  torch::Tensor e = heads->elements().at(0).toTensor();
  for (int64_t m = 0; m < M; ++m) {
    const size_t row = static_cast<size_t>(m * N);
    copy_out(e[m], {nl}, &out.atomic_energy[row], "head_all() atomic energy");
    copy_out(heads->elements().at(1).toTensor()[m], {nl}, &out.log_var[row], "head_all() log-variance");
    copy_out(heads->elements().at(2).toTensor()[m], {nl, 3, 3}, &out.force_cov[9 * row], "head_all() force covariance");
  }
  copy_feature_distance(*heads, true, 0, M, nl, out);
  torch::Tensor member_energy = e.sum(1);
  torch::Tensor energies = member_energy.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  for (int64_t m = 0; m < M; ++m) out.energy[m] = energies.data_ptr<double>()[m];
  torch::Tensor g_r = torch::autograd::grad({member_energy.sum()}, {stacked}, {}, false, false, true)[0];
  if (!g_r.defined()) g_r = torch::zeros_like(stacked);

  // backward, layer by layer and piece by piece; dE/dh_k of ghost rows back to the owners
  std::vector<double> edge_grad(static_cast<size_t>(3 * E * M), 0.0);
  torch::Tensor Gk;  // dE/dh_{k+1} of the local rows (none for h_K)
  for (int64_t k = K - 1; k >= 0; --k) {
    torch::Tensor dh;  // dE/dh_k [N, w_k] over the host buffer
    if (k > 0) {
      std::fill(grads_[k].begin(), grads_[k].end(), 0.0);
      dh = torch::from_blob(grads_[k].data(), {N, widths_[k]}, f64);
    }
    const torch::Tensor h = features(k);
    for (const Piece &p : pieces) {
      const int64_t Ec = p.edges.size(0);
      torch::Tensor vectors = p.vectors.unsqueeze(0).expand({M, Ec, 3}).clone().requires_grad_(true);
      torch::Tensor h_rows = h.index_select(0, p.rows).detach().requires_grad_(k > 0);
      auto [h_next, r] = run(p, k, h_rows, vectors);
      std::vector<torch::Tensor> outputs{r}, seeds{g_r[k].narrow(1, p.c0, p.n_centres)}, inputs{vectors};
      if (Gk.defined()) {
        outputs.push_back(h_next);
        seeds.push_back(Gk.narrow(0, p.c0, p.n_centres));
      }
      if (k > 0) inputs.push_back(h_rows);
      auto d = torch::autograd::grad(outputs, inputs, seeds, false, false, true);
      if (d[0].defined()) {
        torch::Tensor gt = d[0].detach().to(torch::kCPU, torch::kFloat64).contiguous();  // [M, Ec, 3]
        const double *gp = gt.data_ptr<double>();
        const int64_t *ids = p.edges.data_ptr<int64_t>();
        for (int64_t m = 0; m < M; ++m)
          for (int64_t x = 0; x < Ec; ++x)
            for (int a = 0; a < 3; ++a) edge_grad[3 * (m * E + ids[x]) + a] += gp[3 * (m * Ec + x) + a];
      }
      if (k > 0 && d[1].defined()) dh.index_add_(0, p.rows_host, d[1].detach().to(torch::kCPU, torch::kFloat64));
    }
    if (k > 0) {
      halo.reverse(grads_[k].data(), widths_[k]);
      Gk = from_buffer(grads_[k], nl, widths_[k]);
    }
  }
  for (int64_t m = 0; m < M; ++m) add_edge_terms(in, vec, &edge_grad[static_cast<size_t>(3 * E * m)], m, out);
}

}  // namespace torchscript_detail
}  // namespace bayesrace
