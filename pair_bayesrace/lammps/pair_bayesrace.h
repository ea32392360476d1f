/* -*- c++ -*- ----------------------------------------------------------
   bayesrace LAMMPS plugin: pair_style bayesrace (GPL-2.0, as LAMMPS)

   pair_style bayesrace [device cpu|cuda|cuda:K] [dynamics mean|member K] [uncertainty every N]
   pair_coeff * * model.pt E1 E2 ... (one element or NULL per LAMMPS type)

   Exact ghost-shell design: ghosts reach n_layers*cutoff (+ skin), the model sees every
   local and ghost atom with the edges of a full neighbour list including ghosts, and only
   local atoms' energies are summed; ghost forces (driving and per-member) are reverse-
   communicated to their owners.
------------------------------------------------------------------------- */

#ifndef LMP_PAIR_BAYESRACE_H
#define LMP_PAIR_BAYESRACE_H

#include "pair.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace bayesrace {
class Engine;
}

namespace LAMMPS_NS {

class PairBayesRace : public Pair {
 public:
  PairBayesRace(class LAMMPS *);
  ~PairBayesRace() override;

  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;
  int pack_reverse_comm(int, int, double *) override;
  void unpack_reverse_comm(int, int *, double *) override;
  void *extract_peratom(const char *, int &) override;
  double memory_usage() override;

  // --- read by compute bayesrace/atom and compute bayesrace
  static constexpr int NCOLS = 4;  // force σ total, epistemic, aleatoric; atomic energy σ
  bigint uncertainty_step() const { return uq_step; }
  int uncertainty_every() const { return uq_every; }
  // [nlocal][NCOLS] in run units, valid when uncertainty_step() == update->ntimestep
  double **atom_uncertainty() const { return uq; }
  // 1 for local atoms the model acts on (type not NULL)
  const std::vector<char> &atom_mapped() const { return mapped_local; }
  double energy_std() const { return energy_sigma; }
  double energy_var_epistemic() const { return energy_var_epi; }
  double energy_var_aleatoric() const { return energy_var_ale; }
  double force_threshold() const;  // model's atomic_force_std threshold, run units

 protected:
  std::unique_ptr<bayesrace::Engine> engine;
  std::string device;
  int driving_member;  // -1 = mean
  int uq_every;        // 0 = only when a bayesrace compute needs it
  int n_members;
  double econv;  // model energy unit (eV) -> run energy unit
  double cut_model, cutsq_model;
  std::vector<int> type_map;  // LAMMPS type -> species, -1 = NULL

  // per-step buffers
  std::vector<int> lmp2model, model2lmp;
  std::vector<double> pos;
  std::vector<int64_t> spec, edges, edges_j;
  std::vector<double> member_f;  // [nall][3M]
  std::vector<double> agg_forces;
  std::vector<char> mapped_local;
  double **uq;
  int uq_nmax;
  bigint uq_step;
  double energy_sigma, energy_var_epi, energy_var_ale;

  void allocate();
  bool uncertainty_wanted(int eflag_atom_now) const;
};

}    // namespace LAMMPS_NS

#endif
