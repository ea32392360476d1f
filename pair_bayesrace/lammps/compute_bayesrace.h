/* -*- c++ -*- ----------------------------------------------------------
   bayesrace LAMMPS plugin: uncertainty computes (GPL-2.0, as LAMMPS)

   compute ID group bayesrace/atom
       per-atom array, 6 columns (run units, calibrated):
       1 force σ total, 2 force σ epistemic, 3 force σ aleatoric, 4 atomic energy σ,
       5 contact ratio (min_j r_ij / the training set's shortest distance of that pair; -1
       when the deployable does not carry those distances), 6 relative epistemic force σ,
       column 2 / (|mean member force| + keys::RELATIVE_FORCE_LEVEL), unit-free
   compute ID group bayesrace [threshold X]
       global vector, 8 values, identical on every rank:
       1 max force σ, 2 mean force σ (over the group's model atoms), 3 energy σ of the
       whole system, 4 number of group atoms whose force σ exceeds the threshold
       (default: the model's thresholds.atomic_force_std, converted to run units),
       5 the smallest contact ratio of the group's model atoms, 6 max epistemic force σ,
       7 epistemic energy σ per atom of the whole system, 8 max relative epistemic force σ
------------------------------------------------------------------------- */

#ifndef LMP_COMPUTE_BAYESRACE_H
#define LMP_COMPUTE_BAYESRACE_H

#include "compute.h"

namespace LAMMPS_NS {

class PairBayesRace;

class ComputeBayesRaceAtom : public Compute {
 public:
  ComputeBayesRaceAtom(class LAMMPS *, int, char **);
  ~ComputeBayesRaceAtom() override;
  void init() override;
  void compute_peratom() override;
  double memory_usage() override;

 private:
  PairBayesRace *pair;
  int nmax;
  double **values;
};

class ComputeBayesRace : public Compute {
 public:
  ComputeBayesRace(class LAMMPS *, int, char **);
  ~ComputeBayesRace() override;
  void init() override;
  void compute_vector() override;

 private:
  PairBayesRace *pair;
  double threshold;  // < 0: the model's
  bool warned_no_density = false;  // the warning of init() once per compute, not once per run
  static constexpr int NVALUES = 10;
  double values[NVALUES];
};

}    // namespace LAMMPS_NS

#endif
