#include "aggregate.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "../keys.h"

namespace bayesrace {

double StdCalibration::ratio(double sigma) const {
  if (map_sigma.empty()) return scale;
  const size_t K = map_sigma.size();
  // proportional outside the knots: the ratio is that of the nearest end knot
  if (!(sigma > map_sigma.front())) return scale * (map_calibrated.front() / map_sigma.front());
  if (!(sigma < map_sigma.back())) return scale * (map_calibrated.back() / map_sigma.back());
  // x_k <= σ < x_{k+1}
  const size_t k = static_cast<size_t>(std::upper_bound(map_sigma.begin(), map_sigma.end(), sigma) -
                                       map_sigma.begin()) - 1;
  const double x0 = map_sigma[k], x1 = map_sigma[std::min(k + 1, K - 1)];
  const double y0 = map_calibrated[k], y1 = map_calibrated[std::min(k + 1, K - 1)];
  const double g = y0 + (y1 - y0) * ((sigma - x0) / (x1 - x0));
  return scale * (g / sigma);
}

void check_std_map(const std::vector<double> &sigma, const std::vector<double> &calibrated,
                   const std::string &field) {
  const std::string fx = field + "." + keys::META_MAP_SIGMA, fy = field + "." + keys::META_MAP_CALIBRATED;
  auto fail = [](const std::string &f, const std::string &what) {
    throw std::invalid_argument("field '" + f + "' " + what);
  };
  if (sigma.empty()) fail(fx, "must hold at least one knot");
  if (calibrated.size() != sigma.size())
    fail(fy, "must have as many values as '" + fx + "' (" + std::to_string(sigma.size()) + "), got " +
                 std::to_string(calibrated.size()));
  for (size_t k = 0; k < sigma.size(); ++k) {
    if (!(std::isfinite(sigma[k]) && sigma[k] > 0.0)) fail(fx, "must hold finite numbers > 0");
    if (!(std::isfinite(calibrated[k]) && calibrated[k] > 0.0)) fail(fy, "must hold finite numbers > 0");
    if (k > 0 && !(sigma[k] > sigma[k - 1])) fail(fx, "must be strictly increasing");
    if (k > 0 && !(calibrated[k] >= calibrated[k - 1])) fail(fy, "must be non-decreasing");
  }
}

void aggregate(const AggregateInput &in, AggregateOutput &out) {
  const int64_t M = in.n_members, n = in.n_atoms, S = in.stride;
  if (M < 1) throw std::invalid_argument("aggregate: n_members must be >= 1");
  if (S < n) throw std::invalid_argument("aggregate: stride < n_atoms");
  static const Calibration identity;
  const Calibration &cal = in.calibration ? *in.calibration : identity;
  const double invM = 1.0 / static_cast<double>(M);

  // the energy first: its ratio also calibrates the atomic energy σ's
  double emean = 0.0;
  for (int64_t m = 0; m < M; ++m) emean += in.member_total_energy[m];
  emean *= invM;
  double var_e = 0.0, var_a = 0.0;
  for (int64_t m = 0; m < M; ++m) {
    const double d = in.member_total_energy[m] - emean;
    var_e += d * d;
    if (in.n_atoms_total > 0) var_a += std::exp(in.log_var_sum[m] / in.n_atoms_total);
  }
  var_e *= invM;
  var_a *= invM;
  const double energy_sigma = std::sqrt(var_e + var_a);
  // per-atom energy σ, so that a map fitted on small molecules transfers to large cells
  const double per_atom = in.n_atoms_total > 0 ? 1.0 / in.n_atoms_total : 0.0;
  double es = 1.0;  // the ratio of the atomic energy σ's (the members' spread: epistemic)
  if (cal.energy_by_parts) {
    const double re = cal.energy_epistemic.ratio(std::sqrt(var_e) * per_atom);
    const double ra = cal.energy_aleatoric.ratio(std::sqrt(var_a) * per_atom);
    out.energy_var_epistemic = re * re * var_e;
    out.energy_var_aleatoric = ra * ra * var_a;
    out.energy_std = std::sqrt(out.energy_var_epistemic + out.energy_var_aleatoric);
    es = re;
  } else {
    es = cal.energy.ratio(energy_sigma * per_atom);
    out.energy_var_epistemic = es * es * var_e;
    out.energy_var_aleatoric = es * es * var_a;
    out.energy_std = es * energy_sigma;
  }

  out.force_std.assign(n, 0.0);
  out.force_std_epistemic.assign(n, 0.0);
  out.force_std_aleatoric.assign(n, 0.0);
  out.force_std_relative.assign(n, 0.0);
  out.atomic_energy_std.assign(n, 0.0);
  out.force_cov_epistemic.assign(9 * n, 0.0);
  out.force_cov_aleatoric.assign(9 * n, 0.0);

  for (int64_t i = 0; i < n; ++i) {
    double mean[3] = {0, 0, 0};
    for (int64_t m = 0; m < M; ++m)
      for (int a = 0; a < 3; ++a) mean[a] += in.member_forces[(m * S + i) * 3 + a];
    for (int a = 0; a < 3; ++a) mean[a] *= invM;
    double epi[9] = {0}, ale[9] = {0};
    for (int64_t m = 0; m < M; ++m) {
      const double *f = in.member_forces + (m * S + i) * 3;
      const double d[3] = {f[0] - mean[0], f[1] - mean[1], f[2] - mean[2]};
      const double *c = in.force_covariance + (m * S + i) * 9;
      for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b) {
          epi[3 * a + b] += d[a] * d[b];
          ale[3 * a + b] += c[3 * a + b];
        }
    }
    for (int k = 0; k < 9; ++k) {
      epi[k] *= invM;
      ale[k] *= invM;
    }
    const double tr_e = (epi[0] + epi[4] + epi[8]) / 3.0;
    const double tr_a = (ale[0] + ale[4] + ale[8]) / 3.0;
    const double sigma_e = std::sqrt(std::max(0.0, tr_e)), sigma_a = std::sqrt(std::max(0.0, tr_a));
    const double sigma = std::sqrt(std::max(0.0, tr_e + tr_a));
    double fe, fa;  // the ratios of the epistemic and the aleatoric part
    if (cal.force_by_parts) {
      fe = cal.force_epistemic.ratio(sigma_e);
      fa = cal.force_aleatoric.ratio(sigma_a);
    } else {
      fe = fa = cal.force.ratio(sigma);  // from the uncalibrated total σ of this atom
    }
    for (int k = 0; k < 9; ++k) {
      out.force_cov_epistemic[9 * i + k] = fe * fe * epi[k];
      out.force_cov_aleatoric[9 * i + k] = fa * fa * ale[k];
    }
    out.force_std_epistemic[i] = fe * sigma_e;
    out.force_std_aleatoric[i] = fa * sigma_a;
    out.force_std[i] = cal.force_by_parts ? std::hypot(fe * sigma_e, fa * sigma_a) : fe * sigma;
    const double magnitude = std::sqrt(mean[0] * mean[0] + mean[1] * mean[1] + mean[2] * mean[2]);
    out.force_std_relative[i] = out.force_std_epistemic[i] / (magnitude + keys::RELATIVE_FORCE_LEVEL);

    double amean = 0.0;
    for (int64_t m = 0; m < M; ++m) amean += in.member_atomic_energy[m * S + i];
    amean *= invM;
    double avar = 0.0;
    for (int64_t m = 0; m < M; ++m) {
      const double d = in.member_atomic_energy[m * S + i] - amean;
      avar += d * d;
    }
    out.atomic_energy_std[i] = es * std::sqrt(avar * invM);
  }
  if (!in.member_feature_distance) {
    out.feature_distance.clear();
    return;
  }
  out.feature_distance.assign(static_cast<size_t>(n), 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < n; ++i) out.feature_distance[i] += invM * in.member_feature_distance[m * S + i];
}

void select_driving(const MemberOutputs &mo, int member, DrivingOutputs &out) {
  const int64_t M = mo.n_members, N = mo.n_atoms;
  if (mo.only_member >= 0) {
    // outputs of one member alone: it must be the one asked for
    if (member != mo.only_member)
      throw std::invalid_argument("the outputs hold member " + std::to_string(mo.only_member) + " alone, not " +
                                  (member < 0 ? std::string("the mean of every member") : "member " + std::to_string(member)));
    member = 0;
  }
  if (member >= M)
    throw std::invalid_argument("driving member " + std::to_string(member) + " out of range: the model has " +
                                std::to_string(M) + " members (0.." + std::to_string(M - 1) + ")");
  const bool av = !mo.atomic_virial.empty();
  out.atomic_energy.assign(N, 0.0);
  out.forces.assign(3 * N, 0.0);
  out.atomic_virial.assign(av ? 9 * N : 0, 0.0);
  for (int k = 0; k < 9; ++k) out.virial[k] = 0.0;
  out.energy = 0.0;
  const int64_t m0 = member < 0 ? 0 : member, m1 = member < 0 ? M : member + 1;
  const double w = 1.0 / static_cast<double>(m1 - m0);
  for (int64_t m = m0; m < m1; ++m) {
    out.energy += w * mo.energy[m];
    for (int64_t i = 0; i < N; ++i) out.atomic_energy[i] += w * mo.atomic_energy[m * N + i];
    for (int64_t k = 0; k < 3 * N; ++k) out.forces[k] += w * mo.forces[m * 3 * N + k];
    for (int k = 0; k < 9; ++k) out.virial[k] += w * mo.virial[m * 9 + k];
    if (av)
      for (int64_t k = 0; k < 9 * N; ++k) out.atomic_virial[k] += w * mo.atomic_virial[m * 9 * N + k];
  }
}

}  // namespace bayesrace
