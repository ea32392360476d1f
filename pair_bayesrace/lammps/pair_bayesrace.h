/* -*- c++ -*- ----------------------------------------------------------
   bayesrace LAMMPS plugin: pair_style bayesrace (GPL-2.0, as LAMMPS)

   pair_style bayesrace [device cpu|cuda|cuda:K] [dynamics mean|member K] [uncertainty every N]
                        [halo shell|layer] [recompute yes|no]
   pair_coeff * * model.pt E1 E2 ... (one element or NULL per LAMMPS type)

   halo layer (the default when the model has per-layer methods) or shell. halo shell: exact ghost shell. Ghosts reach n_layers*cutoff (+ skin), the model
   sees every local and ghost atom with the edges of a full neighbour list including ghosts,
   and only local atoms' energies are summed.
   halo layer: ghosts reach one cutoff (+ skin), edges only from local centres; node
   features go to the ghosts after every message-passing layer (forward_comm) and their
   gradients back to the owners (reverse_comm): methods in pair_bayesrace_halo.cpp.
   recompute yes (halo layer): no layer's autograd graph is kept through the forward pass;
   each layer runs again in the backward pass (peak memory of one layer, one more forward).
   Both: ghost forces (driving and per-member) are reverse-communicated to their owners.
------------------------------------------------------------------------- */

#ifndef LMP_PAIR_BAYESRACE_H
#define LMP_PAIR_BAYESRACE_H

#include "pair.h"

#include "core/aggregate.h"
#include "core/backend.h"

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
  int pack_forward_comm(int, int *, double *, int, int *) override;
  void unpack_forward_comm(int, int, double *) override;
  int pack_reverse_comm(int, int, double *) override;
  void unpack_reverse_comm(int, int *, double *) override;
  void *extract_peratom(const char *, int &) override;
  double memory_usage() override;

  // --- read by compute bayesrace/atom and compute bayesrace
  // force σ total, epistemic, aleatoric; atomic energy σ; contact ratio (min_j r_ij / the training
  // set's shortest distance of that pair; -1 when the deployable does not carry those distances);
  // relative epistemic force σ; feature distance (-1 when the deployable has no feature density)
  static constexpr int NCOLS = 7;
  bigint uncertainty_step() const { return uq_step; }
  int uncertainty_every() const { return uq_every; }
  // [nlocal][NCOLS] in run units, valid when uncertainty_step() == update->ntimestep
  double **atom_uncertainty() const { return uq; }
  // 1 for local atoms the model acts on (type not NULL)
  const std::vector<char> &atom_mapped() const { return mapped_local; }
  double energy_std() const { return energy_sigma; }
  double energy_var_epistemic() const { return energy_var_epi; }
  double energy_var_aleatoric() const { return energy_var_ale; }
  double energy_atoms() const { return energy_n_atoms; }  // atoms in the energy sums (all ranks)
  double force_threshold() const;  // model's atomic_force_std threshold, run units
  // the contact ratio of an atom without neighbours (-1 without training contacts)
  double no_contact_ratio() const;
  // whether per-atom column 7 and compute bayesrace values 9-10 hold feature distances (else -1)
  bool has_feature_distance() const;

 protected:
  std::unique_ptr<bayesrace::Engine> engine;
  std::string device;
  int driving_member;  // -1 = mean
  int uq_every;        // 0 = only when a bayesrace compute needs it
  int n_members;
  double econv;  // model energy unit (eV) -> run energy unit
  double cut_model, cutsq_model;
  std::vector<int> type_map;  // LAMMPS type -> species, -1 = NULL
  bool halo_layer;            // halo layer (true) or halo shell
  bool halo_auto;             // no 'halo' keyword: layer if the model can, else shell
  bool recompute_layers;      // recompute yes: layer mode keeps one layer's graph at a time

  // what pack/unpack_*_comm move: rows [nall][comm_width] of comm_rows, by LAMMPS index
  enum class Moving { NOTHING, FEATURES, FEATURE_GRADIENTS, MEMBER_FORCES };
  Moving moving;
  double *comm_rows;
  int comm_width;
  std::vector<double> halo_rows;  // [nall][width] features or their gradients, kept across steps

  // per-step buffers
  std::vector<int> lmp2model, model2lmp;
  std::vector<double> pos;
  std::vector<int64_t> spec, edges, edges_j;
  std::vector<double> member_f;  // [nall][3M]
  bayesrace::MemberOutputs member_out;
  bayesrace::DrivingOutputs driving_out;
  std::vector<double> reduced;  // [2M + 1] member energies, Σ log-variances, atom count (Allreduced)
  bayesrace::AggregateOutput aggregate_out;
  std::vector<double> agg_forces;
  std::vector<char> mapped_local;
  std::vector<double> contact;  // [nl] contact ratio of each mapped local atom (model order)
  double **uq;
  int uq_nmax;
  bigint uq_step;
  double energy_sigma, energy_var_epi, energy_var_ale, energy_n_atoms;

  // layer mode: the core's bayesrace::HaloExchange is this pair's forward/reverse_comm
  struct Halo : bayesrace::HaloExchange {
    PairBayesRace *pair;
    explicit Halo(PairBayesRace *p) : pair(p) {}
    void forward(double *features, int64_t width) override { pair->halo_forward(features, width); }
    void reverse(double *grads, int64_t width) override { pair->halo_reverse(grads, width); }
  } halo;
  // rows indexed by model atom (mapped local atoms first, then mapped ghosts)
  void halo_forward(double *features, int64_t width);
  void halo_reverse(double *grads, int64_t width);

  void allocate();
  void init_halo();  // neighbour request, comm sizes, cutoff for the halo mode
  void communicate(Moving what, double *rows, int width, bool reverse_direction);
  bool uncertainty_wanted(int eflag_atom_now) const;
};

}    // namespace LAMMPS_NS

#endif
