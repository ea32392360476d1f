// Aggregation of the members of a posterior into predictive uncertainties.
// ONE function, used by the Python binding and by the LAMMPS pair style (which calls it
// after reverse-communicating member forces and Allreduce-ing the global sums).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backend.h"

namespace bayesrace {

// One calibration c(σ) = scale · g(σ) of a σ (the contract of pair_bayesrace/README.md).
// g is the identity without a map; with knots (x_k, y_k), x strictly increasing > 0 and
// y non-decreasing > 0, g interpolates linearly on [x_1, x_K] and is proportional outside
// (g(σ) = σ·y_1/x_1 below, σ·y_K/x_K above), so out-of-distribution σ's keep growing.
struct StdCalibration {
  double scale = 1.0;
  std::vector<double> map_sigma;       // x_k (σ before calibration); empty: no map
  std::vector<double> map_calibrated;  // y_k = g(x_k)

  bool has_map() const { return !map_sigma.empty(); }
  // r(σ) = c(σ)/σ, the factor applied to σ's (r² to variances); r(0) = scale·y_1/x_1 with
  // a map, scale without. Binary search over the knots: O(log K).
  double ratio(double sigma) const;
};

// Throws std::invalid_argument("field '<field>.sigma' must be strictly increasing", ...) unless
// the knots satisfy the contract (equal non-zero lengths, finite, x > 0 strictly increasing,
// y > 0 non-decreasing). `field` names the map, e.g. "calibration.force_std_map".
void check_std_map(const std::vector<double> &sigma, const std::vector<double> &calibrated,
                   const std::string &field);

// Calibration of force σ's (per atom) and energy σ's (on the per-atom energy σ): either of the
// total σ (`force`, `energy`) or, when `*_by_parts`, of the epistemic and aleatoric σ's each on
// its own (the parts share the quantity's scale; the totals are sqrt(c_epi² + c_ale²)).
struct Calibration {
  StdCalibration force;
  StdCalibration energy;
  bool force_by_parts = false;
  bool energy_by_parts = false;
  StdCalibration force_epistemic, force_aleatoric;
  StdCalibration energy_epistemic, energy_aleatoric;
};

struct AggregateInput {
  int64_t n_members = 0;  // M
  int64_t n_atoms = 0;    // n: atoms to aggregate (rows 0..n-1 of each member block)
  int64_t stride = 0;     // atoms per member block in the arrays below (>= n)
  const double *member_forces = nullptr;         // [M, stride, 3], complete (ghost rows folded in)
  const double *force_covariance = nullptr;      // [M, stride, 3, 3] aleatoric Σ_i of each member
  const double *member_atomic_energy = nullptr;  // [M, stride]
  // global quantities, already summed over all atoms of the system (all ranks):
  const double *member_total_energy = nullptr;  // [M] E_m
  const double *log_var_sum = nullptr;          // [M] Σ_i s_{m,i}
  double n_atoms_total = 0.0;                   // number of atoms in those sums
  const Calibration *calibration = nullptr;     // nullptr: uncalibrated (identity)
  const double *member_feature_distance = nullptr;  // [M, stride], or nullptr (no feature density)
};

// Everything calibrated. Forces: with σ_i the uncalibrated total force σ of atom i and
// r_i = force.ratio(σ_i), the three force σ's are multiplied by r_i and both covariances by r_i².
// Energy: with σ_pa = sqrt(var_epi + var_ale) / n_atoms_total (the per-atom energy σ) and
// r = energy.ratio(σ_pa), both energy variances are multiplied by r², energy_std and every
// atomic_energy_std by r. By parts, each part gets the ratio of its own map on its own σ
// (forces: sqrt(tr Σ_part/3); energy: sqrt(var_part)/n_atoms_total), the totals are recomputed
// from the calibrated parts and atomic_energy_std follows the epistemic ratio.
struct AggregateOutput {
  std::vector<double> force_std;             // [n] sqrt(tr(Σ_epi + Σ_ale)/3)
  std::vector<double> force_std_epistemic;   // [n] sqrt(tr Σ_epi / 3)
  std::vector<double> force_std_aleatoric;   // [n] sqrt(tr Σ_ale / 3)
  std::vector<double> force_std_relative;    // [n] force_std_epistemic / (|mean member force| + keys::RELATIVE_FORCE_LEVEL)
  std::vector<double> atomic_energy_std;     // [n] population std of member atomic energies
  std::vector<double> force_cov_epistemic;   // [n, 3, 3] (1/M) Σ_m (F_m - F̄)(F_m - F̄)ᵀ
  std::vector<double> force_cov_aleatoric;   // [n, 3, 3] mean_m Σ_m,i
  double energy_var_epistemic = 0.0;         // Var_m(E_m) (population)
  double energy_var_aleatoric = 0.0;         // mean_m exp(Σ_i s_{m,i} / n_atoms_total)
  double energy_std = 0.0;                   // sqrt(var_epi + var_ale)
  std::vector<double> feature_distance;      // [n] mean over members (not calibrated); empty without
};

void aggregate(const AggregateInput &in, AggregateOutput &out);

// Driving quantities: member < 0 means the mean over members, else member `member`.
struct DrivingOutputs {
  double energy = 0.0;
  std::vector<double> atomic_energy;  // [N]
  std::vector<double> forces;         // [N, 3]
  double virial[9] = {0};             // [3, 3]
  std::vector<double> atomic_virial;  // [N, 3, 3] or empty
};
// member < 0: the mean of every member; else member `member` (which outputs of one member
// alone, mo.only_member >= 0, must be)
void select_driving(const MemberOutputs &mo, int member, DrivingOutputs &out);

}  // namespace bayesrace
