/* ----------------------------------------------------------------------
   bayesrace LAMMPS plugin: uncertainty computes (GPL-2.0, as LAMMPS)
------------------------------------------------------------------------- */

#include "compute_bayesrace.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "update.h"

#include "pair_bayesrace.h"

#include "core/engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

using namespace LAMMPS_NS;

namespace {

PairBayesRace *find_pair(LAMMPS *lmp, const char *who)
{
  Pair *p = lmp->force->pair_match("bayesrace", 1);
  if (!p) p = lmp->force->pair_match("bayesrace", 0);
  auto *bp = dynamic_cast<PairBayesRace *>(p);
  if (!bp) lmp->error->all(FLERR, std::string("compute ") + who + " requires pair_style bayesrace");
  return bp;
}

void check_step(LAMMPS *lmp, PairBayesRace *pair, const char *who)
{
  const bigint now = lmp->update->ntimestep;
  if (pair->uncertainty_step() != now)
    lmp->error->all(FLERR,
                    "compute {}: pair_style bayesrace has no uncertainty for step {} (last computed on step {}); "
                    "invoke the compute only on steps where forces were computed with it requested "
                    "(thermo, dump, fix halt, variables do this), or use 'uncertainty every N' with a "
                    "matching N",
                    who, now, pair->uncertainty_step());
}

}    // namespace

/* ---------------------------------------------------------------------- */

ComputeBayesRaceAtom::ComputeBayesRaceAtom(LAMMPS *lmp, int narg, char **arg) :
    Compute(lmp, narg, arg), pair(nullptr), nmax(0), values(nullptr)
{
  if (narg != 3)
    error->all(FLERR, "compute bayesrace/atom takes no arguments: compute ID group bayesrace/atom");
  peratom_flag = 1;
  size_peratom_cols = PairBayesRace::NCOLS;
  // ask LAMMPS to raise eflag_atom on the steps this compute is invoked on, which makes
  // pair_style bayesrace compute the uncertainty there
  peatomflag = 1;
  timeflag = 1;
}

ComputeBayesRaceAtom::~ComputeBayesRaceAtom()
{
  memory->destroy(values);
}

void ComputeBayesRaceAtom::init()
{
  pair = find_pair(lmp, "bayesrace/atom");
}

void ComputeBayesRaceAtom::compute_peratom()
{
  invoked_peratom = update->ntimestep;
  check_step(lmp, pair, "bayesrace/atom");
  if (atom->nmax > nmax) {
    memory->destroy(values);
    nmax = atom->nmax;
    memory->create(values, nmax, PairBayesRace::NCOLS, "bayesrace/atom:values");
    array_atom = values;
  }
  const int nlocal = atom->nlocal;
  const int *mask = atom->mask;
  double **uq = pair->atom_uncertainty();
  const auto &mapped = pair->atom_mapped();
  for (int i = 0; i < nlocal; i++)
    for (int c = 0; c < PairBayesRace::NCOLS; c++)
      values[i][c] = ((mask[i] & groupbit) && mapped[i]) ? uq[i][c] : 0.0;
}

double ComputeBayesRaceAtom::memory_usage()
{
  return static_cast<double>(nmax) * PairBayesRace::NCOLS * sizeof(double);
}

/* ---------------------------------------------------------------------- */

ComputeBayesRace::ComputeBayesRace(LAMMPS *lmp, int narg, char **arg) :
    Compute(lmp, narg, arg), pair(nullptr), threshold(-1.0)
{
  int iarg = 3;
  while (iarg < narg) {
    if (std::strcmp(arg[iarg], "threshold") == 0) {
      if (iarg + 2 > narg) error->all(FLERR, "compute bayesrace: 'threshold' needs a value");
      threshold = utils::numeric(FLERR, arg[iarg + 1], false, lmp);
      if (threshold < 0.0) error->all(FLERR, "compute bayesrace: threshold must be >= 0");
      iarg += 2;
    } else {
      error->all(FLERR, "compute bayesrace: unknown keyword '{}' (expected: threshold X)", arg[iarg]);
    }
  }
  vector_flag = 1;
  size_vector = NVALUES;
  extvector = 0;
  vector = values;
  peatomflag = 1;
  timeflag = 1;
  for (double &v : values) v = 0.0;
}

ComputeBayesRace::~ComputeBayesRace() = default;

void ComputeBayesRace::init()
{
  pair = find_pair(lmp, "bayesrace");
  // -1 is what a "> threshold" halt never crosses: say so rather than let such a halt pass silently
  if (!pair->has_feature_distance() && !warned_no_density && comm->me == 0)
    error->warning(FLERR, "compute bayesrace: this deployable has no feature density, so values 9 and 10 (and "
                          "compute bayesrace/atom column 7) read -1 and a 'fix halt' on them never fires; export "
                          "a posterior trained by this bayesrace, or fit one with 'bayesrace calibrate "
                          "--feature-density-from TRAIN'");
  warned_no_density = true;
}

void ComputeBayesRace::compute_vector()
{
  invoked_vector = update->ntimestep;
  check_step(lmp, pair, "bayesrace");
  const double thr = threshold >= 0.0 ? threshold : pair->force_threshold();
  const int nlocal = atom->nlocal;
  const int *mask = atom->mask;
  double **uq = pair->atom_uncertainty();
  const auto &mapped = pair->atom_mapped();
  // max σ, σ_epi, relative, feature distance; sum σ, count, sum of feature distances
  double mx[4] = {0.0, 0.0, 0.0, -1.0}, sums[3] = {0.0, 0.0, 0.0}, over = 0.0;
  double closest = std::numeric_limits<double>::max();    // smallest contact ratio
  for (int i = 0; i < nlocal; i++) {
    if (!(mask[i] & groupbit) || !mapped[i]) continue;
    closest = std::min(closest, uq[i][4]);
    const double s = uq[i][0];
    mx[0] = std::max(mx[0], s);
    mx[1] = std::max(mx[1], uq[i][1]);
    mx[2] = std::max(mx[2], uq[i][5]);
    mx[3] = std::max(mx[3], uq[i][6]);
    sums[0] += s;
    sums[1] += 1.0;
    sums[2] += uq[i][6];
    if (s > thr) over += 1.0;
  }
  double gmx[4] = {0.0, 0.0, 0.0, -1.0}, gsums[3] = {0.0, 0.0, 0.0}, gover = 0.0;
  MPI_Allreduce(mx, gmx, 4, MPI_DOUBLE, MPI_MAX, world);
  MPI_Allreduce(sums, gsums, 3, MPI_DOUBLE, MPI_SUM, world);
  MPI_Allreduce(&over, &gover, 1, MPI_DOUBLE, MPI_SUM, world);
  double gclosest = 0.0;
  MPI_Allreduce(&closest, &gclosest, 1, MPI_DOUBLE, MPI_MIN, world);
  values[0] = gmx[0];
  values[1] = gsums[1] > 0.0 ? gsums[0] / gsums[1] : 0.0;
  values[2] = pair->energy_std();
  values[3] = gover;
  // no atom in the group: no contact to report, read as "not short" (the no-neighbour value)
  values[4] = gclosest == std::numeric_limits<double>::max() ? pair->no_contact_ratio() : gclosest;
  // the members' disagreement alone: the largest epistemic force σ, and the epistemic energy σ
  // per atom of the whole system (the score that flags torsions: README, "Which posterior to use")
  values[5] = gmx[1];
  const double n_atoms = pair->energy_atoms();
  values[6] = n_atoms > 0.0 ? std::sqrt(pair->energy_var_epistemic()) / n_atoms : 0.0;
  // the largest epistemic force σ relative to the force (per-atom column 6): what flags novelty
  // in hot MD, whose larger forces carry proportionally larger errors
  values[7] = gmx[2];
  // how far the atoms' features lie from the training atoms' (per-atom column 7): the largest
  // and the mean over the group; -1 when the deployable carries no feature density
  const bool distances = pair->has_feature_distance();
  values[8] = distances ? gmx[3] : -1.0;
  values[9] = distances ? (gsums[1] > 0.0 ? gsums[2] / gsums[1] : 0.0) : -1.0;
}

/* ----------------------------------------------------------------------
   the pair style's side of the uncertainty interface, read by the computes above
------------------------------------------------------------------------- */

double PairBayesRace::force_threshold() const
{
  if (!engine) return 0.0;
  return engine->metadata().threshold_atomic_force_std * econv;
}

double PairBayesRace::no_contact_ratio() const
{
  if (!engine || !engine->metadata().has_contacts()) return -1.0;
  return engine->metadata().no_contact_ratio;
}

bool PairBayesRace::has_feature_distance() const
{
  return engine && engine->metadata().has_feature_density;
}

bool PairBayesRace::uncertainty_wanted(int eflag_atom_now) const
{
  // bayesrace computes set peatomflag + timeflag, so LAMMPS raises eflag_atom on the steps
  // where one of them (or compute pe/atom) will be invoked
  if (eflag_atom_now) return true;
  return uq_every > 0 && (update->ntimestep % uq_every) == 0;
}

void *PairBayesRace::extract_peratom(const char *str, int &ncol)
{
  if (std::strcmp(str, "uncertainty") == 0) {
    ncol = NCOLS;
    return (void *) uq;
  }
  return nullptr;
}
