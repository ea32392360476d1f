// Aggregation of the members of a posterior into predictive uncertainties.
// ONE function, used by the Python binding and by the LAMMPS pair style (which calls it
// after reverse-communicating member forces and Allreduce-ing the global sums).
#pragma once

#include <cstdint>
#include <vector>

#include "backend.h"

namespace bayesrace {

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
  double force_std_scale = 1.0;                 // calibration: multiplies every force σ
  double energy_std_scale = 1.0;                // calibration: multiplies every energy σ
};

// Everything calibrated (σ's times the scale, variances/covariances times scale²).
struct AggregateOutput {
  std::vector<double> force_std;             // [n] sqrt(tr(Σ_epi + Σ_ale)/3)
  std::vector<double> force_std_epistemic;   // [n] sqrt(tr Σ_epi / 3)
  std::vector<double> force_std_aleatoric;   // [n] sqrt(tr Σ_ale / 3)
  std::vector<double> atomic_energy_std;     // [n] population std of member atomic energies
  std::vector<double> force_cov_epistemic;   // [n, 3, 3] (1/M) Σ_m (F_m - F̄)(F_m - F̄)ᵀ
  std::vector<double> force_cov_aleatoric;   // [n, 3, 3] mean_m Σ_m,i
  double energy_var_epistemic = 0.0;         // Var_m(E_m) (population)
  double energy_var_aleatoric = 0.0;         // mean_m exp(Σ_i s_{m,i} / n_atoms_total)
  double energy_std = 0.0;                   // sqrt(var_epi + var_ale)
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
void select_driving(const MemberOutputs &mo, int member, DrivingOutputs &out);

}  // namespace bayesrace
